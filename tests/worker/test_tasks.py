"""What the task layer makes of each error: retry for the infrastructure, record for the image."""

from __future__ import annotations

import errno

import pytest
import redis

from worker.context import RunNotInRedis
from worker.errors import ClientError, ConfigError, InputError, ParseError, PermanentClientError
from worker.execute import Uncommitted, failure_payload
from worker.tasks import is_infra_error, retry_countdown


@pytest.mark.parametrize("exc", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EROFS, "Read-only file system"),
    OSError(errno.EIO, "Input/output error"),
    OSError(errno.ESTALE, "Stale file handle"),
    PermissionError(errno.EACCES, "Permission denied"),
    redis.exceptions.ConnectionError("Connection refused"),
    redis.exceptions.TimeoutError("Timeout reading from socket"),
    redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
    redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
    redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
    redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'. script: x"),
    redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots"),
    RunNotInRedis("run abc: spec def is not in Redis"),
    Uncommitted({"record": {}, "legacy": ""}, OSError(errno.ENOSPC, "full")),
])
def test_infrastructure_faults_are_retried_not_recorded(exc):
    assert is_infra_error(exc)


@pytest.mark.parametrize("exc", [
    InputError("x.png: not a readable image"),
    ConfigError("GOOGLE_API_KEY is not set"),
    PermanentClientError("model not found", status=404),
    ParseError("nothing usable", raw="..."),
    ClientError("500"),
    redis.exceptions.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    ValueError("a bug"),
    TypeError("a bug"),
])
def test_image_and_vlm_errors_are_not_infrastructure(exc):
    assert not is_infra_error(exc)


def test_retry_countdown_stays_inside_the_visibility_timeout():
    for retries in range(12):
        for retry_after in (None, 1.0, 50.0, 10_000.0):
            d = retry_countdown(retries, retry_after, 60)
            assert 0.5 <= d <= 30.0
            if retry_after and retry_after < 29:
                assert d >= retry_after


def test_failure_payload_is_plain_json_and_keeps_the_raw_answer():
    p = failure_payload(ParseError("bad " * 2000, raw="r" * 9000))
    assert p["error"] == "ParseError" and len(p["message"]) <= 4000 and len(p["raw"]) == 4000
    assert failure_payload(InputError("gone")) == {"error": "InputError", "message": "gone"}
