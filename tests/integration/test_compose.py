"""docker-compose.yml, tested without a Docker engine.

The test reads the compose file, interpolates its ``${VAR:-default}`` / ``${VAR:?message}``
variables the way Compose does, checks the promises the file makes (Redis durable, private and
password-protected; workers scalable; Flower on 5555 behind basic auth; the producer a one-off; one
data volume at one path), then starts the worker and Flower commands it declares as local
processes against the test's real Redis, runs a small job through them with the producer CLI, and
checks what Flower serves. Only what a container would provide is replaced: the Redis address
(compose says host ``redis``), Flower's port (a free one) and, for the second worker, the node name
a second container would get from its own hostname.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
import yaml

from producer.embedded import redis_server_binary
from tests.support.fleet import ROOT, producer, wait_until
from worker.constants import QUEUE

pytestmark = pytest.mark.integration

COMPOSE_FILE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent

# What an operator would put in .env; FLOWER_USER is set to check that the default is overridable.
COMPOSE_ENV = {
    "REDIS_PASSWORD": "redis-pw-1234",
    "FLOWER_USER": "ops",
    "FLOWER_PASSWORD": "flower-pw-5678",
    "WORKER_CONCURRENCY": "4",
    "REFEXP_VISIBILITY_TIMEOUT": "600",
}


# ---------------------------------------------------------------------------------------------
# Compose variable interpolation
# ---------------------------------------------------------------------------------------------

class MissingVariable(Exception):
    pass


_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                  r"|(?P<named>[A-Za-z_]\w*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's rules: ``$$`` is a literal ``$``; ``${V:-d}`` / ``${V-d}`` default when V is unset
    or empty / unset; ``${V:?m}`` / ``${V?m}`` fail with m when V is unset or empty / unset;
    ``${V}`` and ``$V`` are empty when unset."""

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg = m["op"], m["arg"]
        value = env.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if missing else value
        if op in (":?", "?"):
            if missing:
                raise MissingVariable(f"{name}: {arg}")
            return value
        return value or ""

    return _VAR.sub(sub, text)


def interpolate_tree(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def load_compose(env: dict[str, str]) -> dict:
    return interpolate_tree(yaml.safe_load(COMPOSE_FILE.read_text()), env)


def argv_of(command) -> list[str]:
    """A compose ``command`` (string or list) as argv, ``celery`` run by this interpreter."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    if argv[0] == "celery":
        argv = [sys.executable, "-m", "celery", *argv[1:]]
    return argv


def service_env(service: dict) -> dict[str, str]:
    """A service's ``environment`` (map or list form); keys without a value pass through from the
    host, so they are left out here (the test's environment has no API keys)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    return {k: str(v) for k, v in raw.items() if v is not None}


def mounts(service: dict) -> dict[str, str]:
    """target -> source for a service's volumes (short or long syntax)."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source"), v["target"]
        out[target] = source
    return out


def redis_args(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def option(args: list[str], name: str) -> str | None:
    """The value of ``--name value`` or ``--name=value`` in argv."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The file itself
# ---------------------------------------------------------------------------------------------

def test_interpolation_follows_compose_rules():
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d}", env) == "v d d  d"
    assert interpolate("${SET:?m} ${EMPTY?m} $SET ${UNSET} $$HOSTNAME", env) == "v  v  $HOSTNAME"
    with pytest.raises(MissingVariable, match="UNSET: say so"):
        interpolate("${UNSET:?say so}", env)
    with pytest.raises(MissingVariable, match="EMPTY"):
        interpolate("${EMPTY:?m}", env)


@pytest.mark.parametrize("secret", ["REDIS_PASSWORD", "FLOWER_PASSWORD"])
def test_compose_refuses_to_start_without_its_secrets(secret):
    env = {k: v for k, v in COMPOSE_ENV.items() if k != secret}
    with pytest.raises(MissingVariable, match=secret):
        load_compose(env)


def test_compose_file_keeps_its_promises():
    compose = load_compose(COMPOSE_ENV)
    services = compose["services"]
    assert {"redis", "worker", "flower", "producer"} <= set(services)
    redis_svc, worker, flower, prod = (services[s] for s in ("redis", "worker", "flower", "producer"))

    # Redis: durable, never evicts, password from the environment, private, checked, with its own volume.
    args = redis_args(redis_svc)
    assert args[0] == "redis-server"
    assert option(args, "--appendonly") == "yes"
    assert option(args, "--maxmemory-policy") == "noeviction"
    assert option(args, "--requirepass") == COMPOSE_ENV["REDIS_PASSWORD"]
    assert "ports" not in redis_svc, "Redis must not be published on the host by default"
    assert "redis-cli" in " ".join(redis_svc["healthcheck"]["test"])
    assert mounts(redis_svc)["/data"] in compose["volumes"]

    # Every service that talks to Redis uses the password and the compose network's Redis.
    pw = COMPOSE_ENV["REDIS_PASSWORD"]
    for svc in (worker, flower, prod):
        assert service_env(svc)["REDIS_URL"] == f"redis://:{pw}@redis:6379/0"
    assert all("healthcheck" in svc for svc in (redis_svc, worker, flower))

    # Workers: the documented command, scalable (no fixed name, no ports), keys passed through.
    wargs = argv_of(worker["command"])
    assert wargs[3:5] == ["-A", "worker"] and wargs[5] == "worker"
    assert option(wargs, "-P") == "threads"
    assert option(wargs, "-c") == COMPOSE_ENV["WORKER_CONCURRENCY"]
    assert "-E" in wargs
    assert option(wargs, "-Q") in (None, QUEUE)
    assert "container_name" not in worker and "ports" not in worker and "hostname" not in worker
    assert worker.get("build") is not None
    for key in ("GOOGLE_API_KEY", "OPENAI_API_KEY", "NVIDIA_API_KEY"):
        assert key in worker["environment"] and worker["environment"][key] is None, (
            f"{key} must pass through from the host, not be written in the file")
    assert service_env(worker)["REFEXP_VISIBILITY_TIMEOUT"] == COMPOSE_ENV["REFEXP_VISIBILITY_TIMEOUT"]
    assert "inspect ping" in " ".join(worker["healthcheck"]["test"])

    # Flower: on 5555, basic auth from the environment.
    fargs = argv_of(flower["command"])
    assert fargs[3:6] == ["-A", "worker", "flower"]
    assert option(fargs, "--port") == "5555"
    assert option(fargs, "--basic-auth") == f"{COMPOSE_ENV['FLOWER_USER']}:{COMPOSE_ENV['FLOWER_PASSWORD']}"
    assert any(str(p).split(":")[-1] == "5555" for p in flower["ports"])

    # Producer: the same image, a one-off behind a profile, the `producer` CLI.
    assert prod["profiles"] and "tools" in prod["profiles"]
    assert prod["entrypoint"] in (["producer"], "producer")
    assert prod.get("image") == worker.get("image") and prod.get("build") == worker.get("build")
    assert "API_KEY" not in json.dumps(prod.get("environment")), "secrets live in the worker only"

    # One shared data volume, mounted at the same path in every worker and the producer.
    wm, pm = mounts(worker), mounts(prod)
    shared = {t for t in wm if t in pm and wm[t] == pm[t]}
    assert shared, f"worker {wm} and producer {pm} share no volume at one path"
    assert any(wm[t] in compose.get("volumes", {}) for t in shared)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for ln in joined.splitlines():
        if ln.strip():
            word, _, rest = ln.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_image_compose_runs():
    ins = dockerfile_instructions()
    kinds = [k for k, _ in ins]
    assert ins[0] == ("FROM", "python:3.11-slim")
    assert any(k == "RUN" and "pip install" in a for k, a in ins)
    user = [a for k, a in ins if k == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image must not run as root"
    assert [a for k, a in ins if k == "WORKDIR"][-1] == "/app"
    for k, a in ins:
        assert not (k in ("ENV", "ARG") and "API_KEY" in a), "API keys must never be baked into the image"
        if k == "COPY":
            sources = a.split()[:-1]
            assert all((ROOT / src).exists() for src in sources if not src.startswith("--")), a
    # The default command is the compose worker's, at its default concurrency.
    cmd = json.loads(next(a for k, a in reversed(ins) if k == "CMD"))
    compose = load_compose({k: v for k, v in COMPOSE_ENV.items() if k != "WORKER_CONCURRENCY"})
    assert ["celery", *argv_of(compose["services"]["worker"]["command"])[3:]] == cmd
    assert kinds.index("USER") > max(i for i, (k, a) in enumerate(ins) if k == "RUN" and "pip install" in a)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv"} <= set(ignored)


# ---------------------------------------------------------------------------------------------
# The declared commands, run
# ---------------------------------------------------------------------------------------------

def test_compose_redis_command_runs_and_guards_itself(tmp_path):
    """The Redis command as declared (plus a free loopback port and a temp dir, which the container
    has by itself): durable, noeviction, password required; its healthcheck tells a good password
    from a bad one."""
    svc = load_compose(COMPOSE_ENV)["services"]["redis"]
    server = redis_server_binary()
    cli = str(Path(server).with_name("redis-cli")) if Path(server).with_name("redis-cli").exists() else "redis-cli"
    port = free_port()
    args = [server, *redis_args(svc)[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis(port=port, password=COMPOSE_ENV["REDIS_PASSWORD"])
    try:
        def up():
            assert proc.poll() is None, f"redis-server {args} exited {proc.returncode}"
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_until(up, 20, "redis-server from the compose command")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert int(client.config_get("maxmemory")["maxmemory"]) > 0
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()

        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        check = test[1].replace("redis-cli", f"{shlex.quote(cli)} -p {port}")
        auth = service_env(svc)["REDISCLI_AUTH"]
        assert auth == COMPOSE_ENV["REDIS_PASSWORD"]
        ok = subprocess.run(["sh", "-c", check], env={**os.environ, "REDISCLI_AUTH": auth}, timeout=30)
        bad = subprocess.run(["sh", "-c", check], env={**os.environ, "REDISCLI_AUTH": "wrong"}, timeout=30,
                             capture_output=True)
        assert ok.returncode == 0 and bad.returncode != 0
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def http(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


@pytest.fixture
def flower_proc(tmp_path):
    """Starts Flower processes; every one is stopped at teardown."""
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"flower{len(procs)}.log"
        fh = open(log, "w")  # noqa: SIM115 - kept open for the process's lifetime
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc, log

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_compose_worker_and_flower_commands_run_a_job(fleet, fleet_env, redis_url, demo_data, tmp_path,
                                                     flower_proc):
    compose = load_compose(COMPOSE_ENV)
    services = compose["services"]

    def env_for(service: str) -> dict[str, str]:
        # The container's environment, with the test's Redis instead of the compose network's.
        return {**fleet_env, **service_env(services[service]), "REDIS_URL": redis_url}

    # Two worker "containers": the first exactly as declared (node name celery@<hostname>, which
    # the healthcheck pings), the second named as its own container hostname would make it.
    hostname = socket.gethostname()
    wargv = argv_of(services["worker"]["command"])
    fleet.start(1, argv=wargv, extra_env=service_env(services["worker"]) | {"REDIS_URL": redis_url})
    fleet.start(1, argv=[*wargv, "-n", "compose2@%h"],
                extra_env=service_env(services["worker"]) | {"REDIS_URL": redis_url})
    names = {f"celery@{hostname}", f"compose2@{hostname}"}

    # Flower, as declared, on a free local port.
    port = free_port()
    fargv = [a if not a.startswith("--port=") else f"--port={port}"
             for a in argv_of(services["flower"]["command"])]
    assert f"--port={port}" in fargv
    proc, flog = flower_proc([*fargv, "--address=127.0.0.1"], env_for("flower"))
    base = f"http://127.0.0.1:{port}"
    auth = (COMPOSE_ENV["FLOWER_USER"], COMPOSE_ENV["FLOWER_PASSWORD"])

    def flower_up():
        assert proc.poll() is None, f"flower exited:\n{flog.read_text()[-3000:]}"
        return http(f"{base}/healthcheck")[0] == 200

    wait_until(flower_up, 60, "flower to serve /healthcheck")

    # The healthchecks the file declares pass against these processes.
    hc_env = {**env_for("worker"), "HOSTNAME": hostname, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    wtest = services["worker"]["healthcheck"]["test"]
    assert wtest[0] == "CMD-SHELL"
    hc = subprocess.run(["sh", "-c", wtest[1]], cwd=ROOT, env=hc_env, capture_output=True, text=True,
                        timeout=60)
    assert hc.returncode == 0, f"worker healthcheck failed:\n{hc.stdout}\n{hc.stderr}\n{fleet.logs()}"
    ftest = services["flower"]["healthcheck"]["test"]
    assert ftest[0] == "CMD"
    fcmd = [sys.executable if a == "python" else a.replace(":5555/", f":{port}/") for a in ftest[1:]]
    assert subprocess.run(fcmd, timeout=30).returncode == 0

    # A small job through them, as `docker compose run --rm producer enqueue ... --wait` would.
    assert services["producer"]["entrypoint"] in (["producer"], "producer")
    image_dir, label_dir = demo_data
    results = tmp_path / "results"
    penv = env_for("producer")
    producer(penv, "enqueue", "image_referring_expression.vlm.backend=offline",
             "--image-dir", str(image_dir), "--label-dir", str(label_dir), "--results-dir", str(results),
             "--wait", "--timeout", "240")
    seeded = sorted(json.loads(line)["image_id"]
                    for line in (results / "seed_annotations.jsonl").read_text().splitlines())
    final = [json.loads(line) for line in (results / "annotations.jsonl").read_text().splitlines()]
    assert seeded and [r["image_id"] for r in final] == seeded, fleet.logs()
    st = json.loads(producer(penv, "status", "--results-dir", str(results), "--json").stdout)
    assert st["finished"] is True and st["images"] == len(seeded)
    assert set(st["workers"]) <= names and st["workers"]

    # Flower: the API lists both workers with the basic auth, and refuses without it.
    def listed():
        code, body = http(f"{base}/api/workers?refresh=1", auth)
        return code == 200 and names <= set(json.loads(body))

    wait_until(listed, 60, f"flower /api/workers to list {sorted(names)}", interval=0.5)
    assert http(f"{base}/api/workers")[0] == 401
    assert http(f"{base}/api/workers", ("ops", "wrong"))[0] == 401
    assert http(f"{base}/")[0] == 401

    # ... saw the job's task events (workers run with -E) ...
    def tasks_seen():
        code, body = http(f"{base}/api/tasks?limit=5", auth)
        return code == 200 and json.loads(body)

    wait_until(tasks_seen, 30, "flower /api/tasks to show the job's tasks", interval=0.5)

    # ... and serves Prometheus text on /metrics.
    def metrics():
        code, body = http(f"{base}/metrics", auth)
        return body if code == 200 and 'flower_events_total{' in body and "task-succeeded" in body else None

    body = wait_until(metrics, 30, "flower /metrics to count the job's events", interval=0.5)
    assert "# TYPE flower_events_total counter" in body
    assert "flower_worker_online" in body
