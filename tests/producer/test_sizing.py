"""The enqueue window against a real Redis's memory settings (a private server: we change its config)."""

from __future__ import annotations

import pytest
import redis

from producer.embedded import embedded_redis
from producer.sizing import window_warnings


@pytest.fixture(scope="module")
def private_redis():
    with embedded_redis() as url:
        client = redis.Redis.from_url(url)
        yield client
        client.close()


@pytest.fixture
def client(private_redis):
    private_redis.config_set("list-compress-depth", 1)
    private_redis.config_set("maxmemory", 0)
    yield private_redis
    private_redis.config_set("list-compress-depth", 1)
    private_redis.config_set("maxmemory", 0)


def test_the_embedded_server_compresses_its_lists(client):
    assert client.config_get("list-compress-depth")["list-compress-depth"] == "1"


def test_no_warning_on_a_compressed_redis_without_maxmemory(client):
    assert window_warnings(client, 1_000_000) == []


def test_a_large_window_on_an_uncompressed_redis_is_noted(client):
    client.config_set("list-compress-depth", 0)
    assert window_warnings(client, 5_000) == []
    (note,) = window_warnings(client, 100_000)
    assert "--max-inflight 100000" in note and "391 MB" in note
    assert "list-compress-depth 1" in note


def test_a_window_past_maxmemory_is_a_warning(client):
    client.config_set("maxmemory", 64 * 2**20)
    assert window_warnings(client, 10_000) == []  # ~10 MB compressed
    (warning,) = window_warnings(client, 100_000)  # ~105 MB compressed
    assert "maxmemory" in warning and "Lower --max-inflight" in warning
    assert "CONFIG SET" not in warning  # already compressed: nothing more to suggest
    client.config_set("list-compress-depth", 0)
    (warning,) = window_warnings(client, 20_000)  # ~78 MB uncompressed
    assert "CONFIG SET list-compress-depth 1" in warning
