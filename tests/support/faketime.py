"""A wrong clock for one worker process, for real: Debian's libfaketime, preloaded.

``LD_PRELOAD=libfaketime.so.1`` makes ``clock_gettime`` (hence Python's ``time.time()``) answer
with an offset, in that process only; the Redis server the tests start runs without it, so its
``TIME`` stays true. What we found out about libfaketime 0.9.10 (Debian 12) under Python 3.11:

- ``FAKETIME_DONT_FAKE_MONOTONIC=1`` is needed: a faked monotonic clock (libfaketime's
  default) makes every timed wait of Python (``Event.wait``, ``Lock.acquire(timeout=)``) hang,
  since glibc's ``sem_clockwait`` is not intercepted (libfaketime issue #390). An NTP step does
  not move the monotonic clock either, so this is also the realistic fault.
- With it, ``time.sleep`` fails with EINVAL (or sleeps the offset longer) while the offset is not
  zero (libfaketime issue #426). Workers do not sleep on the paths these tests take.
- ``FAKETIME_TIMESTAMP_FILE`` holds the offset and is read again every
  ``FAKETIME_CACHE_DURATION`` seconds, which makes the clock jump mid-run.
- Every process leaves ``/dev/shm/faketime_shm_<pid>`` and ``sem.faketime_sem_<pid>`` behind;
  :func:`remove_shm` deletes them once the process is gone.
"""

from __future__ import annotations

import contextlib
import glob
import os
from pathlib import Path

CANDIDATES = ("/usr/lib/*/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1",
              "/usr/local/lib/faketime/libfaketime.so.1")


def libfaketime() -> str:
    """The library's path; a missing libfaketime fails the test that needs it, with the fix."""
    for pattern in CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise AssertionError("libfaketime.so.1 is missing (looked for " + ", ".join(CANDIDATES) + "): install it "
                         "with `apt-get install faketime` (`make test` does, as root)")


def faketime_env(offset: str) -> dict[str, str]:
    """Environment for a process whose wall clock is off by ``offset`` (libfaketime syntax: +1h, -30s)."""
    return {"LD_PRELOAD": libfaketime(), "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


class ClockFile:
    """A wall-clock offset that can change while the process runs (read again every second)."""

    def __init__(self, path: Path, offset: str = "+0") -> None:
        self.path = path
        self.set(offset)

    def set(self, offset: str) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(offset + "\n")
        os.replace(tmp, self.path)  # libfaketime never reads half a file

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": libfaketime(), "FAKETIME_TIMESTAMP_FILE": str(self.path),
                "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def remove_shm(pid: int) -> None:
    """Delete what libfaketime left in /dev/shm for the finished process ``pid``."""
    for name in (f"/dev/shm/faketime_shm_{pid}", f"/dev/shm/sem.faketime_sem_{pid}"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
