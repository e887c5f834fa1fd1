"""Every wrong input gets a clear answer, and one exit-code policy (issue 13: items 1-6 and 9c),
through the real ``producer`` entry point (a subprocess, output not a terminal), real workers,
a real Redis and the OpenAI SDK against the fake endpoint.

Exit codes (``producer/exitcodes.py``): 0 all done, 2 usage/config, 3 some images failed, 4
nothing seeded or every image failed, 5 ``--timeout`` before the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from producer.embedded import embedded_redis, free_port
from producer.exitcodes import ExitCode
from tests.support.fake_vlm import default_answer, wants_schema
from tests.support.fleet import ROOT, producer, wait_until

pytestmark = pytest.mark.integration

KEY_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY", "OPENAI_API_KEY", "NVIDIA_API_KEY")
CAR = "Car 0.00 0 0.00 5.00 8.00 40.00 40.00 1.50 1.60 3.90 1.00 1.50 20.00 0.00\n"


def dataset(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` small road scenes, each with one labelled car (their bytes differ)."""
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    for i in range(n):
        im = Image.new("RGB", (64, 48), (100 + i, 110, 120))
        ImageDraw.Draw(im).rectangle((5, 8, 40, 40), fill=(200, 30 + 20 * i, 30))
        im.save(images / f"img_{i}.png")
        (labels / f"img_{i}.txt").write_text(CAR)
    return images, labels


def vlm(fake, *extra: str) -> list[str]:
    return ["image_referring_expression.vlm.backend=openai",
            f"image_referring_expression.vlm.openai.base_url={fake.openai_base_url}",
            "image_referring_expression.vlm.openai.model_name=fake-vl",
            "image_referring_expression.vlm.openai.timeout=20",
            "image_referring_expression.vlm.max_retries=0", *extra]


def dirs(images: Path, labels: Path, results: Path) -> list[str]:
    return ["--image-dir", str(images), "--label-dir", str(labels), "--results-dir", str(results)]


@pytest.fixture
def local_env() -> dict[str, str]:
    """``producer run``'s environment: no key (nor key file) and a REDIS_URL at which nothing
    listens, so a command that wrongly asks Redis would fail."""
    env = {k: v for k, v in os.environ.items() if k.removesuffix("_FILE") not in (*KEY_VARS, "REDIS_PASSWORD")}
    for var in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "REFEXP_STATE_URL"):
        env.pop(var, None)
    env.update(PYTHONUNBUFFERED="1", REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The producer as a user runs it; whatever the exit code, never a traceback."""
    proc = producer(env, *args, timeout=timeout, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


# --------------------------------------------------------------------------- item 1


def test_run_without_the_api_key_stops_before_seeding(local_env, tmp_path):
    images, labels = dataset(tmp_path / "data", 2)
    results = tmp_path / "results"
    proc = cli(local_env, "run", "-c", str(ROOT / "configs" / "gemini.yaml"), *dirs(images, labels, results))
    assert proc.returncode == ExitCode.USAGE == 2, proc.stderr
    assert proc.stderr.startswith("error: GOOGLE_API_KEY is not set"), proc.stderr
    assert "GOOGLE_API_KEY_FILE" in proc.stderr and "Nothing was seeded" in proc.stderr
    assert not results.exists(), "nothing may be seeded (or created) without a key"


def test_local_run_exit_codes_and_status_of_a_finished_local_run(local_env, fake_vlm, tmp_path):
    images, labels = dataset(tmp_path / "data", 3)

    # every image done: 0
    ok = cli(local_env, "run", *vlm(fake_vlm), *dirs(images, labels, tmp_path / "ok"))
    assert ok.returncode == ExitCode.OK == 0, ok.stderr
    assert "(3 images; 0 failed, 0 missing)" in ok.stdout

    # run again: every image was done already, no call, still 0
    calls = fake_vlm.stats()["calls"]
    again = cli(local_env, "run", *vlm(fake_vlm), *dirs(images, labels, tmp_path / "ok"))
    assert again.returncode == 0 and fake_vlm.stats()["calls"] == calls, again.stderr

    # one image's calls fail: 3, with the count and the reason
    target = (images / "img_1.png").read_bytes()

    def one_broken(prompt, image, protocol):
        if image == target:
            raise RuntimeError("backend exploded")  # the fake answers 500
        return default_answer(prompt, image, protocol)

    fake_vlm.answer_fn = one_broken
    some = cli(local_env, "run", *vlm(fake_vlm), *dirs(images, labels, tmp_path / "some"))
    assert some.returncode == ExitCode.SOME_FAILED == 3, some.stderr
    assert "(2 images; 1 failed, 0 missing)" in some.stdout
    assert "failed images: img_1" in some.stderr and "1 of 3 images not done (exit 3)" in some.stderr
    assert "run the same `producer run` command again to retry them" in some.stderr
    assert "retry-failed" not in some.stderr, "a local run's Redis is gone: retry-failed cannot work there"
    assert "x ClientError:" in some.stderr and "500" in some.stderr

    # every call fails: 4
    def all_broken(prompt, image, protocol):
        raise RuntimeError("backend down")

    fake_vlm.answer_fn = all_broken
    none = cli(local_env, "run", *vlm(fake_vlm), *dirs(images, labels, tmp_path / "none"))
    assert none.returncode == ExitCode.NONE_DONE == 4, none.stderr
    assert "error: no image is done: all 3 failed (exit 4)" in none.stderr

    # an empty image dir: nothing seeded, 4, and why
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = cli(local_env, "run", *vlm(fake_vlm), *dirs(empty, labels, tmp_path / "nothing"))
    assert nothing.returncode == 4, nothing.stderr
    assert (f"error: nothing could be seeded from {empty}: it holds no .jpg, .jpeg, .png or .webp file"
            in nothing.stderr)

    # item 3: status of the finished local run, from its results dir alone (REDIS_URL is dead)
    st = cli(local_env, "status", "--results-dir", str(tmp_path / "some"))
    assert st.returncode == 0, st.stderr
    first = st.stdout.splitlines()[0]
    assert "a local run by `producer run` (pid" in first and "finished" in first and "summary.json" in first
    assert "  3 images: 2 done, 1 failed, 0 missing" in st.stdout
    assert "failed images: img_1" in st.stdout and "enqueue not complete" not in st.stdout
    js = json.loads(cli(local_env, "status", "--results-dir", str(tmp_path / "some"), "--json").stdout)
    assert js["local"] and js["finished"] and js["alive"] is False
    assert {k: js["summary"][k] for k in ("images", "done", "failed", "exit_code")} == {
        "images": 3, "done": 2, "failed": 1, "exit_code": 3}


def test_local_run_in_progress_or_killed_is_named_by_status(local_env, fake_vlm, tmp_path):
    images, labels = dataset(tmp_path / "data", 2)
    results = tmp_path / "results"
    fake_vlm.latency = 30  # the run stays in progress
    proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "run", *vlm(fake_vlm),
                             *dirs(images, labels, results)], cwd=ROOT, env=local_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: fake_vlm.stats()["in_flight"] > 0, 60, "the local run to call the model")
        st = cli(local_env, "status", "--results-dir", str(results))
        assert st.returncode == 0 and f"a local run by `producer run` (pid {proc.pid} on" in st.stdout, st.stdout
        assert "still running" in st.stdout and "that process's terminal shows it" in st.stdout
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    gone = cli(local_env, "status", "--results-dir", str(results))
    assert "ended before it finalized" in gone.stdout and "Run the same `producer run`" in gone.stdout, gone.stdout


def test_enqueue_exit_codes(fleet_env, tmp_path):
    images, labels = dataset(tmp_path / "data", 3)
    fake = ["image_referring_expression.vlm.backend=offline"]

    # without --wait: 0 once its images are published (no worker runs)
    pub = cli(fleet_env, "enqueue", *fake, *dirs(images, labels, tmp_path / "pub"))
    assert pub.returncode == 0 and "enqueued 3 images" in pub.stdout, pub.stderr

    # --wait with a timeout and no worker: it says it waits for workers (item 9c), then 5; the run goes on
    late = cli(fleet_env, "enqueue", *fake, *dirs(images, labels, tmp_path / "late"), "--wait", "--timeout", "12")
    assert late.returncode == ExitCode.UNFINISHED == 5, late.stderr
    assert "not finished after 12.0 s; it goes on" in late.stderr
    assert (f"waiting for workers: none has taken a task of this run yet; 3 images in flight (is a worker running "
            f"against REDIS_URL={fleet_env['REDIS_URL']}?)") in late.stderr

    # item 2: a jsonl whose every line is outside the allowed root: 4, and why
    root, elsewhere = tmp_path / "dataset", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    lines = []
    for i in range(2):
        (elsewhere / f"x{i}.png").write_bytes((images / f"img_{i}.png").read_bytes())
        lines.append(json.dumps({"image_id": f"x{i}", "image_path": str(elsewhere / f"x{i}.png")}))
    jsonl = root / "input.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    out = cli(fleet_env, "enqueue", *fake, f"image_referring_expression.data.input_annotations_jsonl={jsonl}",
              "--results-dir", str(tmp_path / "outside"))
    assert out.returncode == ExitCode.NONE_DONE == 4, out.stderr
    assert (f"error: nothing could be seeded from {jsonl}: 2 image paths outside the allowed root {root}"
            in out.stderr)
    assert "Nothing was enqueued (exit 4)" in out.stderr and "enqueued" not in out.stdout


def test_help_and_readme_list_every_exit_code():
    text = " ".join(producer(os.environ.copy(), "--help").stdout.split())  # as rich wraps it
    codes = text.split("Exit codes:", 1)[1]
    readme = (ROOT / "README.md").read_text()
    for code in ExitCode:
        assert f" {int(code)} " in codes, f"--help does not explain exit code {code}"
        assert f"| {int(code)} |" in readme, f"README's exit-code table lacks {int(code)}"


# --------------------------------------------------------------------------- item 9c


def test_enqueue_says_it_waits_for_workers_then_goes_on_when_one_comes(fleet, fleet_env, fake_vlm, redis_url,
                                                                       tmp_path):
    images, labels = dataset(tmp_path / "data", 6)
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as o, open(err, "w") as e:  # not a terminal
        proc = subprocess.Popen([sys.executable, "-m", "producer.cli", "enqueue", *vlm(fake_vlm),
                                 *dirs(images, labels, tmp_path / "results"), "--max-inflight", "2"],
                                cwd=ROOT, env=fleet_env, stdout=o, stderr=e)
    try:
        wait_until(lambda: "seeded 6 images" in err.read_text(), 30, "the seed summary, before any worker")
        hint = wait_until(lambda: next((line for line in err.read_text().splitlines()
                                        if line.startswith("waiting for workers")), None), 40, "the waiting hint")
        assert hint == (f"waiting for workers: none has taken a task of this run yet; 2 images in flight "
                        f"(is a worker running against REDIS_URL={redis_url}?)")
        assert proc.poll() is None
        fleet.start(1, concurrency=2)
        assert proc.wait(timeout=90) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "enqueued 6 images" in out.read_text()


# --------------------------------------------------------------------------- item 4


def test_a_worker_names_the_variable_of_a_redis_that_does_not_answer_and_keeps_retrying(fleet):
    port = free_port()
    (w,) = fleet.launch(1, extra_env={"REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    wait_until(lambda: w.text().count("Trying again") >= 2, 60, "the worker to retry twice")
    text = w.text()
    assert text.count("Redis does not answer") == 1, text[-3000:]
    assert f"Redis does not answer at the broker URL from REDIS_URL=redis://127.0.0.1:{port}/0" in text
    assert "CELERY_BROKER_URL" in text and "keeps retrying" in text
    with embedded_redis(port=port):  # Redis comes up later: the worker connects by itself
        wait_until(lambda: "ready." in w.text() or w.proc.poll() is not None, 60, "the worker to be ready")
        assert w.proc.poll() is None, w.text()[-3000:]
    assert w.text().count("Redis does not answer") == 1


def test_a_worker_says_so_when_redis_accepts_but_never_answers(fleet):
    with socket.socket() as silent:  # a stalled Redis (or a firewall's black hole): connects, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        (w,) = fleet.launch(1, extra_env={"CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0"})
        wait_until(lambda: "Redis does not answer" in w.text(), 60, "the worker's hint")
        text = w.text()
        assert f"from CELERY_BROKER_URL=redis://127.0.0.1:{port}/0 (TimeoutError" in text, text[-3000:]
        assert w.proc.poll() is None


# --------------------------------------------------------------------------- items 5 and 6


def test_structured_output_off_as_users_type_it(local_env, fake_vlm, tmp_path):
    images, labels = dataset(tmp_path / "data", 1)
    spec = tmp_path / "spec.yaml"
    spec.write_text("image_referring_expression:\n  vlm:\n    structured_output: off   # YAML reads False\n")
    by_file = cli(local_env, "run", "-c", str(spec), *vlm(fake_vlm), *dirs(images, labels, tmp_path / "a"))
    assert by_file.returncode == 0, by_file.stderr
    by_override = cli(local_env, "run", *vlm(fake_vlm, "image_referring_expression.vlm.structured_output=off"),
                      *dirs(images, labels, tmp_path / "b"))
    assert by_override.returncode == 0, by_override.stderr
    requests = fake_vlm.requests
    assert len(requests) == 8 and not any(wants_schema(r.protocol, r.params) for r in requests)
    fake_vlm.reset()
    on = cli(local_env, "run", *vlm(fake_vlm, "image_referring_expression.vlm.structured_output=yes"),
             *dirs(images, labels, tmp_path / "c"))
    assert on.returncode == 0 and any(wants_schema(r.protocol, r.params) for r in fake_vlm.requests), on.stderr


@pytest.mark.parametrize(("spec_text", "overrides", "message"), [
    ("image_referring_expression:\n  vlm:\n    - backend: openai\n", [],
     "spec.yaml:2: 'image_referring_expression.vlm' must be a mapping of its keys (backend, gemini, openai"),
    ("image_referring_expression:\n  workflow:\n    steps: {a: 1}\n", [],
     "spec.yaml:3: 'image_referring_expression.workflow.steps' must be a list, not a mapping"),
    ("", ["image_referring_expression.vlm.openai.timeout=-1"],
     "command-line override: 'image_referring_expression.vlm.openai.timeout' = -1: Input should be greater than 0"),
    ("image_referring_expression:\n  vlm:\n    gemini:\n      temperature: .nan\n", [],
     "spec.yaml:4: 'image_referring_expression.vlm.gemini.temperature' = nan: Input should be a finite number"),
    ("image_referring_expression:\n  vlm:\n    max_concurrency: 0\n", [],
     "spec.yaml:3: 'image_referring_expression.vlm.max_concurrency' = 0: Input should be greater than or equal to 1"),
    ("", ["image_referring_expression.workflow.steps=[0,1]", "image_referring_expression.workflow.steps.x=1"],
     "command-line override: 'image_referring_expression.workflow.steps' must be a list, not a mapping"),
])
def test_spec_shape_and_number_mistakes_name_the_key(local_env, tmp_path, spec_text, overrides, message):
    images, labels = dataset(tmp_path / "data", 1)
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text or "results_dir: ???\n")
    proc = cli(local_env, "run", "-c", str(spec), *overrides, *dirs(images, labels, tmp_path / "results"))
    assert proc.returncode == 2, proc.stderr
    assert message.replace("spec.yaml", str(spec)) in proc.stderr, proc.stderr
    assert not (tmp_path / "results").exists()
