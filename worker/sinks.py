"""Append-only JSONL sinks shared by every worker on every host, and the legacy label files.

A sink line is written with one ``write`` under a lock held across threads (``threading.Lock``)
and processes/hosts (``flock`` on the file, which Linux maps to NFS byte-range locks on a shared
volume), then fsynced. Byte-range locks are owned per *process*, so the kernel may report a
false deadlock (EDEADLK) between two multi-threaded workers each holding one sink; we retry.
A crash can only leave a torn *last* line; the next writer seals it with a newline so it stays
an isolated bad line, and readers skip bad lines and take the last record per ``image_id``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    key = str(path)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.Lock()
        return lock


def _lock(fd: int) -> None:
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return
        except OSError as exc:
            if exc.errno != errno.EDEADLK:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written: a write may be short (a disk that fills up
    mid-line writes what fits and reports the count; only the next write raises ENOSPC)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write returned 0 bytes")
        view = view[n:]


def _cut(fd: int, end: int) -> None:
    """Take a partly written line off the end again (we still hold the lock). If even that
    fails (a volume gone read-only), the torn tail stays; the next writer seals it and readers
    skip it, and nothing was indexed to point at it."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, end)


def dumps(record: dict) -> str:
    """The one JSON encoding every output file uses (stable key order, UTF-8, no spaces wasted)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


@dataclass
class ReadStats:
    """What a full read of a sink saw, so torn or corrupt lines are counted, not hidden."""

    lines: int = 0
    bad_lines: int = 0


class JsonlSink:
    """One append-only JSONL file of records keyed by ``image_id``."""

    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync

    def append(self, record: dict) -> int:
        """Append one record as one whole line; return the byte offset where the line starts.

        The line is on disk (written in full, fsynced, read back) when this returns. Anything
        short of that raises ``OSError`` and leaves the file as it was: a short write (a full
        disk, a quota) or a failed fsync is cut off again under the lock, so no torn line is
        ever left behind for a reader, and the caller (``worker.execute.commit``) retries the
        write later. Only a crash between the write and the cut can leave a torn tail, which
        the next writer seals.
        """
        line = (dumps(record) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _thread_lock(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                _lock(fd)
                try:
                    end = os.lseek(fd, 0, os.SEEK_END)
                    if end > 0 and os.pread(fd, 1, end - 1) != b"\n":
                        _write_all(fd, b"\n")  # seal a torn line a crashed writer left behind
                        end += 1
                    try:
                        _write_all(fd, line)
                        if self.fsync:
                            os.fsync(fd)
                        if os.pread(fd, len(line), end) != line:
                            raise OSError(errno.EIO, f"{self.path}: the line written at byte {end} reads back "
                                                     "different")
                    except OSError:
                        _cut(fd, end)
                        raise
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        return end

    def read_at(self, offset: int) -> dict:
        """The record whose line starts at ``offset`` (as returned by ``append``)."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        if not line.endswith(b"\n"):
            raise ValueError(f"{self.path}: no complete record at byte {offset}")
        return json.loads(line)

    def scan(self, stats: ReadStats | None = None) -> Iterator[tuple[int, dict]]:
        """Every valid record with its offset, in file order; bad or torn lines are skipped."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            offset = 0
            for line in f:
                start, offset = offset, offset + len(line)
                if stats is not None:
                    stats.lines += 1
                if not line.endswith(b"\n"):
                    if stats is not None:
                        stats.bad_lines += 1
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    if stats is not None:
                        stats.bad_lines += 1
                    continue
                if not isinstance(record, dict) or "image_id" not in record:
                    if stats is not None:
                        stats.bad_lines += 1
                    continue
                yield start, record

    def latest_offsets(self, stats: ReadStats | None = None) -> dict[str, int]:
        """``image_id -> offset`` of the last valid record per image (last wins)."""
        return {rec["image_id"]: off for off, rec in self.scan(stats)}

    def latest(self) -> dict[str, dict]:
        """``image_id -> record``, last wins. For small sinks and tests; large runs use offsets."""
        return {rec["image_id"]: rec for _, rec in self.scan()}


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file so readers see the old or the new one, never half of it.

    The temporary file is removed again when the write fails (a full or read-only disk), so a
    failure leaves nothing behind; the caller decides whether to try again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
