"""A run is a results directory: ``run.json`` there names its id; Redis holds its spec and index.

``run.json`` also binds the directory to its inputs (``producer/binding.py``) and records the
steps, the seed's digest and the last producer, so the files alone say what the run is. Older
files with only ``run_id`` still load. Everything a user passes is checked here, before any
work starts, with errors that name the key and the path.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import NamedTuple

import redis
import yaml

from producer.outage import CONNECT_TIMEOUT, SOCKET_TIMEOUT, Outage, patient_client, redact
from worker import settings
from worker.errors import ConfigError
from worker.layout import Layout
from worker.run import Run
from worker.runstate import RunState
from worker.sinks import write_atomic
from worker.spec import Spec
from worker.stepdefs import ALL_STEPS, STEP
from worker.steps.prompts import load_prompts


def spec_hash(public: dict, templates: dict[str, str] | None = None) -> str:
    """The id of one version of a run's spec: the public spec and, when given, the prompt
    templates it resolved to (an edited prompts file is a new version, so workers reload)."""
    doc = public if templates is None else {"spec": public, "prompts": templates}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def connect(url: str | None = None, *, patience_s: float | None = None) -> redis.Redis:
    """A Redis client that has answered a PING, or a ConfigError saying how to get one.

    The first PING fails fast (a wrong address is a user error); after it, the client rides out
    stalls and restarts for up to ``patience_s`` (default ``producer.outage.patience()``).
    """
    url = url or settings.state_url()
    probe = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT)
    try:
        probe.ping()
    except redis.RedisError as exc:
        raise ConfigError(
            f"cannot reach Redis at {redact(url)} ({exc}); start one or set REDIS_URL "
            "(for a single machine without Redis, use `producer run`)"
        ) from None
    finally:
        probe.close()
    return patient_client(url, Outage(url, patience_s=patience_s))


def describe_redis(client: redis.Redis) -> str:
    """Where ``client`` points, as a URL with no secret in it (built from the connection
    settings, so it never holds a password to redact in the first place)."""
    pool = client.connection_pool
    kw = pool.connection_kwargs
    auth = "***@" if kw.get("password") else ""
    if kw.get("path"):
        return f"unix://{auth}{kw['path']}?db={kw.get('db', 0)}"
    scheme = "rediss" if issubclass(pool.connection_class, redis.SSLConnection) else "redis"
    return f"{scheme}://{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def check_paths(spec: Spec) -> None:
    """Every input path the spec names exists and has the right kind; the results dir is writable."""
    data = spec.ire.data
    if not spec.results_dir or spec.results_dir == "???":
        raise ConfigError("results_dir is not set (pass --results-dir or results_dir=/path)")
    if data.input_annotations_jsonl:
        if not Path(data.input_annotations_jsonl).is_file():
            raise ConfigError(f"data.input_annotations_jsonl: file not found: {data.input_annotations_jsonl}")
    else:
        if not data.image_dir or data.image_dir == "???":
            raise ConfigError("data.image_dir is not set (pass --image-dir or "
                              "image_referring_expression.data.image_dir=/path)")
        if not Path(data.image_dir).is_dir():
            raise ConfigError(f"data.image_dir: not a directory: {data.image_dir}")
        if data.kitti_label_dir and data.kitti_label_dir != "???" and not Path(data.kitti_label_dir).is_dir():
            raise ConfigError(f"data.kitti_label_dir: not a directory: {data.kitti_label_dir}")
    if spec.ire.vlm.backend == "openai" and not spec.ire.vlm.openai.model_name:
        raise ConfigError("vlm.openai.model_name is not set (the model your endpoint serves, "
                          "e.g. image_referring_expression.vlm.openai.model_name=Qwen/Qwen2.5-VL-7B-Instruct)")
    load_prompts(spec.ire.workflow.prompts_file)
    results = Path(spec.results_dir)
    try:
        results.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"results_dir: cannot create {results} ({exc})") from None
    if not os.access(results, os.W_OK):
        raise ConfigError(f"results_dir: {results} is not writable")


def normalise(spec: Spec) -> Spec:
    """Absolute paths everywhere ('???' placeholders from TAO specs become unset), so every
    worker host resolves the same files on the shared volume."""
    data = spec.model_dump()

    def absolute(p: str) -> str:
        return "" if p in ("", "???") else str(Path(p).expanduser().resolve())

    data["results_dir"] = absolute(data["results_dir"])
    d = data["image_referring_expression"]["data"]
    for key in ("image_dir", "kitti_label_dir", "input_annotations_jsonl"):
        d[key] = absolute(d[key])
    wf = data["image_referring_expression"]["workflow"]
    wf["prompts_file"] = absolute(wf["prompts_file"])
    return Spec.model_validate(data)


def check_wiring(spec: Spec, layout: Layout) -> None:
    """Steps that need an earlier step's output either run it or find its sink from a past run."""
    steps = spec.ire.workflow.steps
    for step in steps:
        for need in STEP[step].needs:
            if need not in steps and not layout.sink(need).path.exists():
                raise ConfigError(
                    f"workflow.steps {steps}: step {step} reads step {need}'s results, but step {need} is "
                    f"not in the steps and {layout.sink(need).path} does not exist; add step {need}"
                )


def read_run_file(layout: Layout) -> dict:
    """``run.json`` as a dict ({} when there is none yet); a file that is not ours is an error."""
    path = layout.run_file
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
            raise ValueError("no run_id")
    except ValueError as exc:
        raise ConfigError(f"{path}: not a refexp run file ({exc}); move it away to start afresh") from None
    return data


def update_run_file(layout: Layout, **fields: object) -> dict:
    """Merge ``fields`` into ``run.json`` (atomically replaced; keys others wrote are kept)."""
    data = {**read_run_file(layout), **fields}
    write_atomic(layout.run_file, json.dumps(data, sort_keys=True) + "\n")
    return data


def run_id_for(layout: Layout) -> str:
    """The run id stored in ``results_dir/run.json``, created on first use."""
    data = read_run_file(layout)
    if data:
        return data["run_id"]
    run_id = uuid.uuid4().hex[:12]
    write_atomic(layout.run_file, json.dumps({"run_id": run_id}) + "\n")
    return run_id


def prepare(spec: Spec) -> tuple[Spec, Layout]:
    """The spec with absolute paths, checked (paths, prompts, step wiring), and its layout.

    Writes nothing but the results dir itself (created when missing), so a producer that is
    then refused the results dir has touched none of its files.
    """
    spec = normalise(spec)
    check_paths(spec)
    layout = Layout(Path(spec.results_dir))
    check_wiring(spec, layout)
    check_batch(spec)
    return spec, layout


def check_batch(spec: Spec) -> None:
    """With ``vlm.batch`` on, the endpoint must have a batch API: a ``BatchUnsupported`` (a
    ``ConfigError``) now, before anything is seeded. The probe needs no key (keys stay on the
    workers): it decides from the endpoint (``BatchBackend.probe``)."""
    if spec.ire.vlm.batch.enabled:
        from worker.clients.batch import BatchUnsupported
        from worker.clients.factory import get_batch_backend

        try:
            backend = get_batch_backend(spec.ire.vlm)
        except ImportError as exc:
            raise BatchUnsupported(f"vlm.batch is on, but this installation has no batch backend for "
                                   f"vlm.backend={spec.ire.vlm.backend} ({exc}); turn vlm.batch off") from None
        backend.probe()


def open_run(spec: Spec, client: redis.Redis) -> Run:
    """Validate the spec's paths and wiring, and bind it to its run id and Redis state.

    Creates ``run.json`` on first use: call it only while holding the results dir
    (``producer.guard.claim``)."""
    spec, layout = prepare(spec)
    run_id = run_id_for(layout)
    templates = load_prompts(spec.ire.workflow.prompts_file)
    return Run(run_id, spec, layout, RunState(client, run_id), spec_hash(spec.public_dict(), templates), templates)


def run_layout(results_dir: str | Path) -> Layout:
    """The layout of the run living in ``results_dir``; a ConfigError if there is none."""
    layout = Layout(Path(results_dir).expanduser().resolve())
    if not layout.run_file.exists():
        raise ConfigError(f"{layout.root}: no refexp run here ({layout.run_file.name} missing)")
    return layout


class ExistingRun(NamedTuple):
    """A run found by its results dir (``producer status``, ``wait``, ``retry-failed``, ``repair``)."""

    run_id: str
    layout: Layout
    state: RunState


def existing_run(results_dir: str | Path, client: redis.Redis) -> ExistingRun:
    """The run living in ``results_dir``."""
    layout = run_layout(results_dir)
    run_id = run_id_for(layout)
    return ExistingRun(run_id, layout, RunState(client, run_id))


# --------------------------------------------------------------------------- the run's files
# What a run needs to be finalized or resumed lives in results_dir too, so a Redis that restarted
# empty (or is gone) costs nothing on disk: finalize works from the files, and the message that
# the run is gone from Redis can say exactly what to run.

#: The public spec (secrets blanked) of the last enqueue, as YAML that ``load_spec`` reads back.
SPEC_FILE = "run.spec.yaml"


def spec_file(layout: Layout) -> Path:
    return layout.root / SPEC_FILE


def write_spec_file(run: Run) -> Path:
    """Store the run's public spec (no secrets: ``Spec.public_dict``) in ``results_dir``, so
    ``producer enqueue -c <it>`` resumes the run from any host."""
    path = spec_file(run.layout)
    header = (f"# refexp run {run.run_id}: the spec of its last enqueue (normalised; API keys are never stored,\n"
              "# give them in the environment). Resume with: producer enqueue -c <this file>\n"
              "# (or, on one machine: producer run -c <this file>)\n")
    write_atomic(path, header + yaml.safe_dump(run.spec.public_dict(), sort_keys=False))
    return path


def stored_spec(layout: Layout) -> Spec | None:
    """The spec ``write_spec_file`` stored, or None when there is none (runs from before it)."""
    path = spec_file(layout)
    if not path.exists():
        return None
    from worker.spec import load_spec

    return load_spec(path)


def steps_on_disk(layout: Layout) -> list[int]:
    """The run's steps from its files alone: ``run.json``'s "steps" when it has them, else the
    stored spec's ``workflow.steps``, else every step whose sink exists."""
    try:
        steps = json.loads(layout.run_file.read_text()).get("steps")
    except (OSError, ValueError):
        steps = None
    if steps:
        return sorted(int(s) for s in steps)
    spec = stored_spec(layout)
    if spec is not None:
        return list(spec.ire.workflow.steps)
    return [s for s in ALL_STEPS if layout.sink(s).path.exists()]
