"""API keys never leave the worker's environment: not into task messages, results, run state or
any other Redis key, not into a log line, not into a file under results_dir.

A job runs with a recognisable key; then a dump of every Redis key of every type (Celery
messages decoded from their base64 bodies), every worker and producer log line and every output
file are searched for it, also in base64.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import redis

from tests.support.fake_vlm import FakeVLM
from tests.support.fleet import producer, wait_until

pytestmark = pytest.mark.integration

KEY_ENV = ("OPENAI_API_KEY", "NVIDIA_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from producer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("secrets-data"), n_images=4, seed=3)


def job(fake: FakeVLM, data, results: Path, *extra: str) -> list[str]:
    image_dir, label_dir = data
    return ["image_referring_expression.vlm.backend=openai",
            f"image_referring_expression.vlm.openai.base_url={fake.openai_base_url}",
            "image_referring_expression.vlm.openai.model_name=fake-vl",
            "image_referring_expression.vlm.openai.timeout=20",
            "image_referring_expression.workflow.output_format=both", *extra,
            "--image-dir", str(image_dir), "--label-dir", str(label_dir), "--results-dir", str(results)]


# --------------------------------------------------------------------------- the search

def needles(secret: str) -> list[bytes]:
    """The secret as bytes, and as it would look inside any base64 text (three alignments)."""
    raw = secret.encode()
    out = [raw]
    for pad in range(3):
        enc = base64.b64encode(b"\0" * pad + raw)
        start = (pad * 4 + 2) // 3  # characters that still depend on the padding
        out.append(enc[start:-3])
    return out


def _expand(value: bytes) -> Iterator[bytes]:
    """A value, plus the JSON documents inside its JSON: strings holding JSON or base64 (Celery
    message bodies, results)."""
    yield value
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and node[:1] in ("[", "{"):
            yield from _expand(node.encode())  # a JSON body stored as text (body_encoding utf-8)
        elif isinstance(node, str) and len(node) >= 16:
            try:
                decoded = base64.b64decode(node, validate=True)
            except (binascii.Error, ValueError):
                continue
            yield from _expand(decoded)


def redis_dump(client: redis.Redis) -> list[tuple[str, bytes]]:
    """``(key, value)`` for every key of every type, each member and field of a structure apart."""
    out: list[tuple[str, bytes]] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "hash":
            values = [x for kv in client.hgetall(key).items() for x in kv]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [x for _, fields in client.xrange(key) for kv in fields.items() for x in kv]
        else:
            values = [client.dump(key) or b""]
        name = key.decode(errors="replace")
        out.extend((name, v) for v in [key, *values])
    return out


def leaks(secret: str, sources: Iterable[tuple[str, bytes]]) -> list[str]:
    found = []
    pats = needles(secret)
    for where, value in sources:
        for part in _expand(value):
            if any(p in part for p in pats):
                found.append(where)
                break
    return found


def files_under(root: Path) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()]


def test_the_search_finds_a_planted_key():
    secret = f"sk-refexp-PROBE-{uuid.uuid4().hex}"
    body = base64.b64encode(json.dumps([["run", "img", 0], {"api_key": secret}]).encode()).decode()
    message = json.dumps({"body": body, "content-encoding": "utf-8", "properties": {"body_encoding": "base64"}})
    assert leaks(secret, [("celery message", message.encode())]) == ["celery message"]
    assert leaks(secret, [("plain", f"x {secret} y".encode())]) == ["plain"]
    assert leaks(secret, [("clean", b"nothing here")]) == []


# --------------------------------------------------------------------------- the jobs

def _worker_argv(name: str, level: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "threads", "-c", "4", "-E",
            "--without-mingle", "--without-gossip", "-n", f"{name}@%h", "-l", level]


def _env_without_keys(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in KEY_ENV}


@pytest.mark.parametrize("spec_key", [False, True], ids=["key-in-worker-env", "key-file-and-spec-override"])
def test_an_api_key_appears_nowhere(fleet, fleet_env, redis_client, data, tmp_path, spec_key):
    """The worker's key in its environment; or (second case) in a file named by OPENAI_API_KEY_FILE
    (a compose secret), with another key in a spec override for good measure."""
    secret = f"sk-refexp-SECRET-{uuid.uuid4().hex}"
    spec_secret = f"sk-refexp-SPEC-{uuid.uuid4().hex}"
    producer_env = _env_without_keys(fleet_env)
    outputs: list[tuple[str, bytes]] = []
    dumps: list[tuple[str, bytes]] = []
    results = tmp_path / "results"
    extra = [f"image_referring_expression.vlm.openai.api_key={spec_secret}"] if spec_key else []
    with FakeVLM(api_key=secret, latency=0.2) as fake:
        fake.fail_next(1, 500)  # an error path through the client, the task and the logs
        fake.fail_next(1, 429, retry_after=1)
        run = producer(producer_env, "enqueue", *job(fake, data, results, *extra))
        outputs += [("enqueue stdout", run.stdout.encode()), ("enqueue stderr", run.stderr.encode())]
        dumps += redis_dump(redis_client)  # every task message still queued
        bodies = [part for _, v in dumps for part in list(_expand(v))[1:]]
        assert any(b"demo_000000" in b for b in bodies), "the dump did not see into the task messages"
        worker_env = {"OPENAI_API_KEY": secret}  # the only place the real key lives
        if spec_key:
            key_file = tmp_path / "secrets" / "vlm_api_key"
            key_file.parent.mkdir()
            key_file.write_text(secret + "\n")
            worker_env = {"OPENAI_API_KEY_FILE": str(key_file)}
        fleet.start(1, extra_env=worker_env, argv=_worker_argv("info", "INFO"))
        fleet.start(1, extra_env=worker_env, argv=_worker_argv("debug", "DEBUG"))
        wait_until(lambda: fake.stats()["in_flight"] > 0, 30, "calls in flight")
        dumps += redis_dump(redis_client)  # messages delivered but not acked, leases, counters
        done = producer(producer_env, "wait", "--results-dir", str(results), "--timeout", "90")
        outputs += [("wait stdout", done.stdout.encode()), ("wait stderr", done.stderr.encode())]
        st = producer(producer_env, "status", "--results-dir", str(results))
        outputs += [("status", st.stdout.encode() + st.stderr.encode())]
        counts = fake.stats()["status_counts"]
    assert counts.get("200", 0) > 0 and "401" not in counts, "the workers did not use their key"
    dumps += redis_dump(redis_client)  # results, chord counters, run state, budget
    final = (results / "annotations.jsonl").read_text().splitlines()
    assert len(final) == 4
    logs = [(f"{w.name} log", w.log.read_bytes()) for w in fleet.workers]
    assert any(b"DEBUG" in text for _, text in logs)

    everything = dumps + outputs + logs + files_under(results)
    assert leaks(secret, everything) == []
    assert leaks(spec_secret, everything) == []
    if spec_key:  # the key came from the file: nothing but the file's path is in the environment
        for w in fleet.workers:
            assert secret.encode() not in Path(f"/proc/{w.proc.pid}/environ").read_bytes()


def test_a_key_given_only_in_the_spec_is_not_sent_to_fleet_workers(fleet, fleet_env, redis_client, data,
                                                                    tmp_path):
    """Keys live in the worker's environment only: a spec key stays with the producer (blanked in
    Redis), so a worker without its own key is refused, and says which variable to set."""
    spec_secret = f"sk-refexp-SPEC-{uuid.uuid4().hex}"
    producer_env = _env_without_keys(fleet_env)
    results = tmp_path / "results"
    fleet.start(1, concurrency=4)
    with FakeVLM(api_key=spec_secret) as fake:
        run = producer(producer_env, "enqueue", *job(fake, data, results,
                                                    f"image_referring_expression.vlm.openai.api_key={spec_secret}"),
                       "--wait", "--timeout", "60", check=False)
        assert run.returncode == 4, f"every image failed: exit 4\n{run.stderr[-3000:]}"
        assert fake.stats()["status_counts"].get("401", 0) > 0 and "200" not in fake.stats()["status_counts"]
    fails = [json.loads(line) for line in (results / "failures.jsonl").read_text().splitlines()]
    assert fails and all(f["error"] == "PermanentClientError" and "OPENAI_API_KEY" in f["message"]
                         and f["attempts"] == 1 for f in fails)
    everything = (redis_dump(redis_client) + files_under(results)
                  + [("enqueue", (run.stdout + run.stderr).encode())]
                  + [(w.name, w.log.read_bytes()) for w in fleet.workers])
    assert leaks(spec_secret, everything) == []


def test_local_run_uses_a_spec_key_without_writing_it_anywhere(fleet_env, data, tmp_path):
    """``producer run`` (one machine) hands a spec key to its in-process worker through the
    environment; it must not reach the output files or the console."""
    spec_secret = f"sk-refexp-SPEC-{uuid.uuid4().hex}"
    env = {k: v for k, v in _env_without_keys(fleet_env).items() if k != "REDIS_URL"}
    results = tmp_path / "results"
    with FakeVLM(api_key=spec_secret) as fake:
        run = producer(env, "run", *job(fake, data, results,
                                        f"image_referring_expression.vlm.openai.api_key={spec_secret}"))
        assert fake.stats()["status_counts"].get("200", 0) > 0 and "401" not in fake.stats()["status_counts"]
    assert len((results / "annotations.jsonl").read_text().splitlines()) == 4
    assert leaks(spec_secret, [*files_under(results), ("run", (run.stdout + run.stderr).encode())]) == []


def test_local_run_prefers_a_key_file_to_a_spec_key(fleet_env, data, tmp_path):
    """``producer run`` with OPENAI_API_KEY_FILE and a (stale) key in the spec: the file's key is
    used, as a fleet worker would, and neither key is written anywhere."""
    secret = f"sk-refexp-FILE-{uuid.uuid4().hex}"
    spec_secret = f"sk-refexp-SPEC-{uuid.uuid4().hex}"
    key_file = tmp_path / "vlm_api_key"
    key_file.write_text(secret + "\n")
    env = {k: v for k, v in _env_without_keys(fleet_env).items() if k != "REDIS_URL"}
    env["OPENAI_API_KEY_FILE"] = str(key_file)
    results = tmp_path / "results"
    with FakeVLM(api_key=secret) as fake:
        run = producer(env, "run", *job(fake, data, results,
                                        f"image_referring_expression.vlm.openai.api_key={spec_secret}"))
        counts = fake.stats()["status_counts"]
    assert counts.get("200", 0) > 0 and "401" not in counts
    assert len((results / "annotations.jsonl").read_text().splitlines()) == 4
    outputs = [*files_under(results), ("run", (run.stdout + run.stderr).encode())]
    assert leaks(secret, outputs) == [] and leaks(spec_secret, outputs) == []
