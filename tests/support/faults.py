"""Real faults for integration tests: a small tmpfs, a remount read-only, a Redis of our own
that we can fill, stop (SIGSTOP) or restart empty.

Each helper does the real thing (root is needed for mounts: CI runs as root). A fault that cannot
be set up raises, so the test fails instead of silently testing nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import redis

from producer.embedded import embedded_redis, free_port


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. "2m") mounted at ``path`` for the block; unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs at {path} (these tests need root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, mode: str) -> None:
    """Remount the filesystem at ``path`` ``ro`` or ``rw``."""
    done = subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cannot remount {path} {mode}: {done.stderr.strip()}")


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the filesystem holding ``path`` until ``leave`` bytes are free; returns the filler."""
    filler = path / ".filler"
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(filler, "ab") as f:
        chunk = b"\0" * 65536
        todo = max(0, free - leave)
        with contextlib.suppress(OSError):
            while todo > 0:
                todo -= f.write(chunk[:min(len(chunk), todo)])
            f.flush()
    return filler


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class PrivateRedis:
    """A redis-server of the test's own on a fixed port: it can be stopped with SIGSTOP, filled
    to its ``maxmemory``, or replaced by an empty one on the same port."""

    def __init__(self, workdir: Path, *extra: str):
        self.workdir, self.extra = workdir, extra
        self.port = free_port()
        self._cm = None
        self.url = ""
        self.pid = 0

    def start(self) -> PrivateRedis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._cm = embedded_redis(data_dir=str(self.workdir), port=self.port)
        self.url = self._cm.__enter__()
        self.pid = int(self.client().info("server")["process_id"])
        for i in range(0, len(self.extra), 2):
            self.client().config_set(self.extra[i], self.extra[i + 1])
        return self

    def stop(self) -> None:
        if self._cm is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGCONT)
            self._cm.__exit__(None, None, None)
            self._cm = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets open and answers nothing (a stall)."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> PrivateRedis:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
