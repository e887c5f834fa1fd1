"""Parallel test workers never share a Redis database (tests/support/parallel.py)."""

from __future__ import annotations

import pytest

from tests.support.parallel import worker_db_url


def test_outside_xdist_the_url_is_kept():
    assert worker_db_url("redis://127.0.0.1:6379/9", None) == "redis://127.0.0.1:6379/9"
    assert worker_db_url("redis://127.0.0.1:6379/9", "") == "redis://127.0.0.1:6379/9"


def test_each_worker_takes_the_base_database_plus_its_number():
    urls = {w: worker_db_url("redis://:pw@127.0.0.1:6379/9", w) for w in ("gw0", "gw1", "gw2")}
    assert urls == {"gw0": "redis://:pw@127.0.0.1:6379/9", "gw1": "redis://:pw@127.0.0.1:6379/10",
                    "gw2": "redis://:pw@127.0.0.1:6379/11"}
    assert worker_db_url("redis://localhost:6380", "gw1") == "redis://localhost:6380/1"
    assert worker_db_url("rediss://h:6380/2?ssl_cert_reqs=none", "gw3") == "rediss://h:6380/5?ssl_cert_reqs=none"


def test_a_url_without_database_numbers_is_refused_under_xdist():
    with pytest.raises(ValueError, match="redis:// or rediss://"):
        worker_db_url("unix:///run/redis.sock?db=9", "gw1")
