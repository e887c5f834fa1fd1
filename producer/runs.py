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
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis

from worker import settings
from worker.errors import ConfigError
from worker.layout import Layout
from worker.runstate import RunState
from worker.sinks import write_atomic
from worker.spec import Spec
from worker.steps.prompts import load_prompts


@dataclass
class Run:
    run_id: str
    spec: Spec
    layout: Layout
    state: RunState
    spec_hash: str
    #: The prompt templates checked at enqueue; stored with the spec for the workers.
    templates: dict[str, str] | None = None

    @property
    def ref(self) -> str:
        return f"{self.run_id}:{self.spec_hash}"


def spec_hash(public: dict, templates: dict[str, str] | None = None) -> str:
    """The id of one version of a run's spec: the public spec and, when given, the prompt
    templates it resolved to (an edited prompts file is a new version, so workers reload)."""
    doc = public if templates is None else {"spec": public, "prompts": templates}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def connect(url: str | None = None) -> redis.Redis:
    """A Redis client that has answered a PING, or a ConfigError saying how to get one."""
    url = url or settings.state_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ConfigError(
            f"cannot reach Redis at {redact(url)} ({exc}); start one or set REDIS_URL "
            "(for a single machine without Redis, use `producer run`)"
        ) from None
    return client


_SECRET_PARAMS = frozenset({"password", "pass", "passwd"})


def redact(url: str) -> str:
    """The URL without its credentials (user info and any ``password=`` query value), for
    messages and the lock file."""
    parts = urlsplit(url)
    out = url
    if "@" in parts.netloc:
        out = out.replace(parts.netloc, "***@" + parts.netloc.rsplit("@", 1)[1], 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
        if query != parts.query:
            out = out.replace("?" + parts.query, "?" + query, 1)
    return out


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
    for step, need in ((2, 0), (3, 2)):
        if step in steps and need not in steps and not layout.sink(need).path.exists():
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
    return spec, layout


def open_run(spec: Spec, client: redis.Redis) -> Run:
    """Validate the spec's paths and wiring, and bind it to its run id and Redis state.

    Creates ``run.json`` on first use: call it only while holding the results dir
    (``producer.guard.claim``)."""
    spec, layout = prepare(spec)
    run_id = run_id_for(layout)
    templates = load_prompts(spec.ire.workflow.prompts_file)
    return Run(run_id, spec, layout, RunState(client, run_id), spec_hash(spec.public_dict(), templates), templates)


def existing_run(results_dir: str | Path, client: redis.Redis) -> tuple[str, Layout, RunState]:
    """The run living in ``results_dir`` (for status, wait, finalize, retry-failed)."""
    layout = Layout(Path(results_dir).expanduser().resolve())
    if not layout.run_file.exists():
        raise ConfigError(f"{layout.root}: no refexp run here ({layout.run_file.name} missing)")
    run_id = run_id_for(layout)
    return run_id, layout, RunState(client, run_id)
