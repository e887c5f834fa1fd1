"""docker-compose.yml, tested without a Docker engine.

The test reads the compose file, interpolates its ``${VAR:-default}`` / ``${VAR:?message}``
variables the way Compose does, checks the promises the file makes (Redis durable, private and
password-protected; secrets only in files; workers scalable; Flower on 127.0.0.1:5555 behind basic
auth; the producer a one-off; one data volume at one path), then starts the Redis, worker and
Flower commands it declares as local processes, runs a small job through them with the producer
CLI, and checks what Flower serves and that no secret shows on a command line or in an
environment. Only what a container would provide is replaced: the secret files' directory
(compose mounts them at ``/run/secrets``), the Redis address (compose says host ``redis``), ports
(free ones), the redis image's entrypoint (a stand-in that handles arguments as it does) and, for
the second worker, the node name a second container would get from its own hostname.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.embedded import redis_server_binary
from tests.support.fleet import ROOT, producer, wait_until
from worker.keys import QUEUE

pytestmark = pytest.mark.integration

COMPOSE_FILE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent

# What an operator would put in .env; FLOWER_USER is set to check that the default is overridable.
COMPOSE_ENV = {
    "FLOWER_USER": "ops",
    "WORKER_CONCURRENCY": "4",
    "REFEXP_VISIBILITY_TIMEOUT": "600",
}
# The secret files' contents (what `openssl rand -hex` and the key would write).
SECRETS = {
    "redis_password": "5c1e0a7d3b9f4e2a8c6d1f0b7a3e9c2d4f6a8b0c1d3e5f70",
    "flower_password": "f10e7a5b3c9d1e2f4a6b8c0d",
    "vlm_api_key": "AIzaSy-test-key-never-shown-0123456789",
}
SECRETS_IN_CONTAINER = "/run/secrets/"


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


def redis_server_argv(script: str) -> list[str]:
    """The redis-server command line in the compose Redis script (its heredoc left out)."""
    return shlex.split(script.split("<<", 1)[0].replace("\\\n", " "))


def write_secrets(directory: Path, **changed: str) -> Path:
    """The secret files as an operator writes them (``echo`` adds a newline)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in {**SECRETS, **changed}.items():
        (directory / name).write_text(value + "\n")
    return directory


def in_container(node, secrets_dir: Path, port: int | None = None):
    """A service's command or environment as the processes here see it: the secret files in
    ``secrets_dir`` instead of ``/run/secrets``, and the Redis container at 127.0.0.1:port."""
    if isinstance(node, str):
        node = node.replace(SECRETS_IN_CONTAINER, f"{secrets_dir}/")
        return node.replace("redis://redis:6379/", f"redis://127.0.0.1:{port}/") if port else node
    if isinstance(node, list):
        return [in_container(v, secrets_dir, port) for v in node]
    if isinstance(node, dict):
        return {k: in_container(v, secrets_dir, port) for k, v in node.items()}
    return node


def test_secrets_are_files_and_never_values():
    """No secret reaches a command line, an environment or the healthchecks (what `ps` and `docker
    inspect` show), even when the operator still exports the old variables."""
    leaked = {"REDIS_PASSWORD": "old-habit-redis-pw", "FLOWER_PASSWORD": "old-habit-flower-pw",
              "GOOGLE_API_KEY": "old-habit-key", "OPENAI_API_KEY": "old-habit-key2"}
    compose = load_compose({**COMPOSE_ENV, **leaked})
    text = json.dumps(compose["services"])
    for value in leaked.values():
        assert value not in text
    declared = compose["secrets"]
    assert set(declared) == set(SECRETS)
    for name, spec in declared.items():
        assert spec["file"] == f"./secrets/{name}"          # a file on the host, not an environment value
    moved = load_compose({**COMPOSE_ENV, "REDIS_PASSWORD_FILE": "/etc/refexp/redis.pw"})
    assert moved["secrets"]["redis_password"]["file"] == "/etc/refexp/redis.pw"
    services = compose["services"]
    needs = {"redis": {"redis_password"}, "worker": {"redis_password", "vlm_api_key"},
             "flower": {"redis_password", "flower_password"}, "producer": {"redis_password"}}
    for name, wanted in needs.items():
        assert set(services[name].get("secrets") or []) == wanted, name
    for name in ("worker", "flower", "producer"):
        env = service_env(services[name])
        assert env["REDIS_URL"] == "redis://redis:6379/0", "no password inside REDIS_URL"
        assert env["REDIS_PASSWORD_FILE"] == SECRETS_IN_CONTAINER + "redis_password"
        assert not any(k.endswith(("_API_KEY", "_PASSWORD")) for k in services[name].get("environment") or {})
    assert "environment" not in services["redis"]
    wenv = service_env(services["worker"])
    assert wenv["GOOGLE_API_KEY_FILE"] == wenv["OPENAI_API_KEY_FILE"] == SECRETS_IN_CONTAINER + "vlm_api_key"
    # the secret files stay out of git and out of the image
    assert "/secrets/" in (ROOT / ".gitignore").read_text().split()
    assert "secrets" in (ROOT / ".dockerignore").read_text().split()


def test_flower_is_published_on_loopback_unless_told():
    services = load_compose(COMPOSE_ENV)["services"]
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    exposed = load_compose({**COMPOSE_ENV, "FLOWER_BIND": "10.0.0.5"})["services"]["flower"]
    assert exposed["ports"] == ["10.0.0.5:5555:5555"]
    for svc in ("redis", "worker", "producer"):
        assert "ports" not in services[svc]


def test_compose_file_keeps_its_promises():
    compose = load_compose(COMPOSE_ENV)
    services = compose["services"]
    assert {"redis", "worker", "flower", "producer"} <= set(services)
    redis_svc, worker, flower, prod = (services[s] for s in ("redis", "worker", "flower", "producer"))

    # Redis: durable, never evicts, password from its secret file, private, checked, own volume.
    args = redis_args(redis_svc)
    assert args[:2] == ["sh", "-c"] and len(args) == 3
    server = redis_server_argv(args[2])
    assert server[:3] == ["exec", "docker-entrypoint.sh", "redis-server"]
    assert option(server, "--appendonly") == "yes"
    assert option(server, "--maxmemory-policy") == "noeviction"
    assert server[-1] == "-", "the config holding the password is read from stdin"
    assert "requirepass $(cat /run/secrets/redis_password)" in args[2]
    assert "--requirepass" not in server
    assert "ports" not in redis_svc, "Redis must not be published on the host by default"
    assert "redis-cli" in " ".join(redis_svc["healthcheck"]["test"])
    assert mounts(redis_svc)["/data"] in compose["volumes"]
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
    assert service_env(worker)["REFEXP_VISIBILITY_TIMEOUT"] == COMPOSE_ENV["REFEXP_VISIBILITY_TIMEOUT"]
    assert "inspect ping" in " ".join(worker["healthcheck"]["test"])

    # Flower: on 5555, basic auth from its secret file (through FLOWER_BASIC_AUTH, not argv).
    fcmd = flower["command"]
    assert fcmd[:2] == ["sh", "-c"]
    fargs = shlex.split(fcmd[2].strip().splitlines()[-1])
    assert fargs[:5] == ["exec", "celery", "-A", "worker", "flower"]
    assert option(fargs, "--port") == "5555" and option(fargs, "--basic-auth") is None
    assert (f'FLOWER_BASIC_AUTH="{COMPOSE_ENV["FLOWER_USER"]}:$(cat /run/secrets/flower_password)"'
            in fcmd[2])
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

# The redis image's docker-entrypoint.sh, as far as arguments go: it runs `redis-server
# --protected-mode no <the rest>` (after dropping to the redis user, which a test process need not).
# What a container has by itself is added: its own port, loopback address and data directory.
ENTRYPOINT_STAND_IN = """#!/bin/sh
[ "$1" = redis-server ] || { echo "docker-entrypoint.sh stand-in: expected redis-server, got $1" >&2; exit 64; }
shift
exec "$REFEXP_TEST_REDIS_SERVER" --protected-mode no --port "$REFEXP_TEST_REDIS_PORT" --bind 127.0.0.1 \\
  --dir "$REFEXP_TEST_REDIS_DIR" "$@"
"""


def redis7_server() -> str:
    """A redis-server of version 7 or later: the compose file runs redis:7, and reading the
    configuration from stdin with ``-`` as the last argument is Redis 7's."""
    for candidate in dict.fromkeys(filter(None, (shutil.which("redis-server"), redis_server_binary()))):
        out = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"v=(\d+)\.", out)
        if m and int(m[1]) >= 7:
            return candidate
    pytest.fail("the compose Redis command needs redis-server 7 or later on PATH (the compose file runs "
                "redis:7); install it: apt-get install redis-server")


@dataclass
class ComposeRedis:
    proc: subprocess.Popen
    port: int
    log: Path

    def client(self, password: str | None = SECRETS["redis_password"]) -> redis.Redis:
        # no retries: redis-py retries a refused AUTH (a ConnectionError) for seconds by default
        return redis.Redis(port=self.port, password=password, retry=Retry(NoBackoff(), 0))


@contextlib.contextmanager
def compose_redis(workdir: Path, secrets_dir: Path) -> Iterator[ComposeRedis]:
    """The compose file's Redis command, run by ``sh`` as the container would run it."""
    svc = load_compose(COMPOSE_ENV)["services"]["redis"]
    bindir = workdir / "redis-bin"
    bindir.mkdir(parents=True)
    entry = bindir / "docker-entrypoint.sh"
    entry.write_text(ENTRYPOINT_STAND_IN)
    entry.chmod(0o755)
    port = free_port()
    data = workdir / "redis-data"
    data.mkdir()
    log = workdir / "redis.log"
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "REFEXP_TEST_REDIS_SERVER": redis7_server(), "REFEXP_TEST_REDIS_PORT": str(port),
           "REFEXP_TEST_REDIS_DIR": str(data)}
    with open(log, "w") as fh:
        proc = subprocess.Popen(in_container(redis_args(svc), secrets_dir), env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = ComposeRedis(proc, port, log)
    client = server.client()
    try:
        def up():
            assert proc.poll() is None, f"the compose Redis command exited {proc.returncode}:\n{log.read_text()}"
            try:
                return client.ping()
            except redis.ConnectionError:
                return False

        wait_until(up, 20, "redis-server from the compose command")
        yield server
    finally:
        client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def secret_values_in_process(pid: int) -> list[str]:
    """Which secret values show in a process's command line or environment (what `ps e` shows)."""
    seen = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
    return [name for name, value in SECRETS.items() if value.encode() in seen]


def test_compose_redis_command_runs_and_guards_itself(tmp_path):
    """The Redis command as declared: durable, noeviction, the password from its secret file and
    required, on no command line and in no environment; its healthcheck tells a good password
    file from a bad one."""
    secrets_dir = write_secrets(tmp_path / "secrets")
    svc = load_compose(COMPOSE_ENV)["services"]["redis"]
    with compose_redis(tmp_path, secrets_dir) as server:
        client = server.client()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("list-compress-depth") == {"list-compress-depth": "1"}
        assert int(client.config_get("maxmemory")["maxmemory"]) > 0
        with pytest.raises(redis.AuthenticationError):
            server.client(password=None).ping()
        with pytest.raises(redis.AuthenticationError):
            server.client(password="wrong").ping()
        # sh exec'd the entrypoint, which exec'd redis-server: one process, no secret in sight
        assert Path(f"/proc/{server.proc.pid}/exe").resolve() == Path(redis7_server()).resolve()
        assert secret_values_in_process(server.proc.pid) == []
        client.close()

        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD-SHELL"
        cli = shutil.which("redis-cli") or str(Path(redis7_server()).with_name("redis-cli"))
        check = test[1].replace("redis-cli", f"{shlex.quote(cli)} -p {server.port}")
        ok = subprocess.run(["sh", "-c", in_container(check, secrets_dir)], timeout=30)
        bad_dir = write_secrets(tmp_path / "bad", redis_password="wrong")
        bad = subprocess.run(["sh", "-c", in_container(check, bad_dir)], timeout=30, capture_output=True)
        assert ok.returncode == 0 and bad.returncode != 0


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


def test_compose_worker_and_flower_commands_run_a_job(fleet, fleet_env, demo_data, tmp_path, flower_proc):
    """Redis, two workers, Flower and the producer as compose declares them, secrets from files:
    a job runs through, Flower serves it behind its password, and no secret shows in any of
    their command lines or environments."""
    compose = load_compose(COMPOSE_ENV)
    services = compose["services"]
    secrets_dir = write_secrets(tmp_path / "secrets")
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    with compose_redis(tmp_path, secrets_dir) as server:
        def env_for(service: str) -> dict[str, str]:
            # The container's environment: its secrets under secrets_dir, Redis at the test's port.
            env = {**fleet_env, **in_container(service_env(services[service]), secrets_dir, server.port)}
            env.pop("REFEXP_STATE_URL", None)
            return {**env, "PATH": path}

        # Two worker "containers": the first exactly as declared (node name celery@<hostname>,
        # which the healthcheck pings), the second named as its own container hostname would make it.
        hostname = socket.gethostname()
        wargv = argv_of(services["worker"]["command"])
        wenv = env_for("worker")
        assert wenv["REDIS_URL"] == f"redis://127.0.0.1:{server.port}/0"   # no password in it
        (w1,) = fleet.start(1, argv=wargv, extra_env=wenv)
        (w2,) = fleet.start(1, argv=[*wargv, "-n", "compose2@%h"], extra_env=wenv)
        names = {f"celery@{hostname}", f"compose2@{hostname}"}

        # Flower, as declared, on a free local port (and loopback, as compose publishes it).
        port = free_port()
        fcmd = in_container(services["flower"]["command"], secrets_dir)
        script = fcmd[2].replace("--port=5555", f"--port={port} --address=127.0.0.1")
        assert f"--port={port}" in script
        proc, flog = flower_proc([*fcmd[:2], script], env_for("flower"))
        base = f"http://127.0.0.1:{port}"
        auth = (COMPOSE_ENV["FLOWER_USER"], SECRETS["flower_password"])

        def flower_up():
            assert proc.poll() is None, f"flower exited:\n{flog.read_text()[-3000:]}"
            return http(f"{base}/healthcheck")[0] == 200

        wait_until(flower_up, 60, "flower to serve /healthcheck")

        # The healthchecks the file declares pass against these processes.
        hc_env = {**env_for("worker"), "HOSTNAME": hostname}
        wtest = services["worker"]["healthcheck"]["test"]
        assert wtest[0] == "CMD-SHELL"
        hc = subprocess.run(["sh", "-c", wtest[1]], cwd=ROOT, env=hc_env, capture_output=True, text=True,
                            timeout=60)
        assert hc.returncode == 0, f"worker healthcheck failed:\n{hc.stdout}\n{hc.stderr}\n{fleet.logs()}"
        ftest = services["flower"]["healthcheck"]["test"]
        assert ftest[0] == "CMD"
        fhc = [sys.executable if a == "python" else a.replace(":5555/", f":{port}/") for a in ftest[1:]]
        assert subprocess.run(fhc, timeout=30).returncode == 0

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

        # No secret on a command line or in an environment: the workers and Redis show none;
        # Flower's password is only in its own process's FLOWER_BASIC_AUTH, never in argv.
        for w in (w1, w2):
            assert secret_values_in_process(w.proc.pid) == [], w.name
        assert secret_values_in_process(server.proc.pid) == []
        assert SECRETS["flower_password"].encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert secret_values_in_process(proc.pid) == ["flower_password"]
        # ... nor in what the run wrote or logged
        for f in [*results.rglob("*"), *(w.log for w in (w1, w2)), flog]:
            if f.is_file():
                data = f.read_bytes()
                assert not any(v.encode() in data for v in SECRETS.values()), f
