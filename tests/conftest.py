"""Shared fixtures: a real Redis, the fake VLM endpoint, worker fleets, synthetic datasets.

Redis: ``REFEXP_TEST_REDIS_URL`` when set (CI points it at a server it started; the database is
flushed by each test that uses it), otherwise a private redis-server started for the session.
Under pytest-xdist (``make test`` runs two workers) each worker is a session of its own: its own
private redis-server, or its own database of ``REFEXP_TEST_REDIS_URL``'s server
(``tests/support/parallel.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from producer.embedded import embedded_redis
from tests.support.fake_vlm import FakeVLM
from tests.support.fleet import Fleet
from tests.support.parallel import worker_db_url
from worker.settings import API_KEY_VARS

API_KEYS = tuple(v for names in API_KEY_VARS.values() for v in names)


@pytest.fixture(autouse=True)
def fresh_process_caches():
    """Every process-wide cache a worker keeps, emptied around each test, so no test sees another's
    runs, clients, endpoint memories or Redis pools."""
    from worker import context
    from worker.clients import factory
    from worker.steps.converse import forget_rejections

    def reset() -> None:
        context.forget_contexts()
        context.state_redis.cache_clear()
        factory.clear_cache()
        forget_rejections()

    reset()
    yield
    reset()


@pytest.fixture(scope="session")
def redis_url():
    url = os.environ.get("REFEXP_TEST_REDIS_URL")
    if url:
        url = worker_db_url(url, os.environ.get("PYTEST_XDIST_WORKER"))
        try:
            redis.Redis.from_url(url).ping()  # a configured but dead server is an error, not a skip
        except redis.ResponseError as e:  # "DB index is out of range": fewer databases than workers
            raise RuntimeError(f"REFEXP_TEST_REDIS_URL: this test worker's database ({url}) does not exist "
                               f"({e}): run fewer workers (-n) or give the server more databases") from e
        yield url
        return
    with embedded_redis() as url:
        yield url


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def fake_vlm():
    with FakeVLM() as fake:
        yield fake


@pytest.fixture
def fleet_env(redis_url, redis_client) -> dict[str, str]:
    """The environment a worker host and a producer share (no API keys unless a test adds one)."""
    env = {k: v for k, v in os.environ.items()
           if k.removesuffix("_FILE") not in (*API_KEYS, "REDIS_PASSWORD")}
    env.update(REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    env.pop("CELERY_BROKER_URL", None)
    env.pop("CELERY_RESULT_BACKEND", None)
    return env


@pytest.fixture
def fleet(fleet_env, tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    f = Fleet(env=fleet_env, logdir=logdir)
    yield f
    f.discard()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic KITTI dataset (drawn road scenes) shared by the integration tests."""
    from producer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_images=50, seed=7)
