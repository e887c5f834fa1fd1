"""libfaketime does what the clock tests rely on: it moves a Python process's wall clock, not its
monotonic clock, and not Redis's; and a missing library fails with the fix."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.support import faketime
from tests.support.faketime import faketime_env, remove_shm

PROBE = "import json, time; print(json.dumps([time.time(), time.monotonic()]))"


def test_libfaketime_moves_only_the_wall_clock_of_the_process_it_is_preloaded_into(redis_client):
    proc = subprocess.Popen([sys.executable, "-c", PROBE], env=faketime_env("+1h"), stdout=subprocess.PIPE,
                            text=True)
    out, _ = proc.communicate(timeout=60)
    remove_shm(proc.pid)
    wall, mono = json.loads(out)
    assert wall - time.time() == pytest.approx(3600, abs=30)
    assert mono - time.monotonic() == pytest.approx(0, abs=30)  # timed waits keep working
    seconds, micros = redis_client.time()  # the suite's Redis runs without it
    assert seconds + micros / 1e6 == pytest.approx(time.time(), abs=1)


def test_a_missing_libfaketime_fails_with_the_fix(monkeypatch):
    monkeypatch.setattr(faketime, "CANDIDATES", ("/nonexistent/libfaketime.so.1",))
    with pytest.raises(AssertionError, match=r"apt-get install faketime"):
        faketime_env("+1h")
