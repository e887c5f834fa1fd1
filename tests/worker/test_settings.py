"""Settings from the environment: secrets from files (``*_FILE``) and the Redis password put into
the Redis URLs in-process, so a container needs neither on a command line nor in ``docker inspect``.
"""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from producer.embedded import embedded_redis
from worker import settings
from worker.errors import ConfigError

VARS = ("REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "REFEXP_STATE_URL", "REDIS_PASSWORD_FILE",
        "GOOGLE_API_KEY", "GOOGLE_API_KEY_FILE")
PASSWORD = "9f2c4e6a8b0d1f3e5a7c9e1b3d5f7a9c"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def password_file(tmp_path, monkeypatch):
    path = tmp_path / "redis_password"
    path.write_text(PASSWORD + "\n")          # as `openssl rand -hex 16 > file` writes it
    monkeypatch.setenv("REDIS_PASSWORD_FILE", str(path))
    return path


def test_secret_from_the_variable_or_its_file(tmp_path, monkeypatch):
    assert settings.secret("GOOGLE_API_KEY") == ""
    monkeypatch.setenv("GOOGLE_API_KEY", "from-env")
    assert settings.secret("GOOGLE_API_KEY") == "from-env"
    monkeypatch.delenv("GOOGLE_API_KEY")
    key = tmp_path / "key"
    key.write_text("  from-file\n")
    monkeypatch.setenv("GOOGLE_API_KEY_FILE", str(key))
    assert settings.secret("GOOGLE_API_KEY") == "from-file"
    key.write_text("rotated\n")                  # read when needed: a rotated key is seen
    assert settings.secret("GOOGLE_API_KEY") == "rotated"
    key.write_text("\n")                         # empty: unset (a server without auth)
    assert settings.secret("GOOGLE_API_KEY") == ""


def test_secret_errors_name_the_variable_and_path_never_the_value(tmp_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"GOOGLE_API_KEY_FILE=.*missing: no such file"):
        settings.secret("GOOGLE_API_KEY")
    monkeypatch.setenv("GOOGLE_API_KEY_FILE", str(tmp_path))
    with pytest.raises(ConfigError, match="is a directory"):
        settings.secret("GOOGLE_API_KEY")
    key = tmp_path / "key"
    key.write_text("the-file-key")
    monkeypatch.setenv("GOOGLE_API_KEY_FILE", str(key))
    monkeypatch.setenv("GOOGLE_API_KEY", "the-env-key")
    with pytest.raises(ConfigError, match="both GOOGLE_API_KEY and GOOGLE_API_KEY_FILE are set") as info:
        settings.secret("GOOGLE_API_KEY")
    assert "the-file-key" not in str(info.value) and "the-env-key" not in str(info.value)


def test_redis_urls_without_a_password_file_are_unchanged(monkeypatch):
    assert settings.redis_url() == settings.DEFAULT_REDIS_URL
    monkeypatch.setenv("REDIS_URL", "redis://:inline@host:6379/0")
    assert settings.broker_url() == settings.result_backend() == settings.state_url() == "redis://:inline@host:6379/0"


def test_password_file_goes_into_every_redis_url(password_file, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    want = f"redis://:{PASSWORD}@redis:6379/0"
    assert settings.redis_url() == settings.broker_url() == settings.result_backend() == settings.state_url() == want
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "rediss://results.internal:6380/1")
    monkeypatch.setenv("REFEXP_STATE_URL", "redis://acl-user@state:6379/2")
    assert settings.result_backend() == f"rediss://:{PASSWORD}@results.internal:6380/1"
    assert settings.state_url() == f"redis://acl-user:{PASSWORD}@state:6379/2"   # an ACL user keeps its name
    monkeypatch.setenv("CELERY_RESULT_BACKEND", "rpc://")
    assert settings.result_backend() == "rpc://"                                  # not a Redis URL


def test_password_file_is_url_quoted(password_file, monkeypatch):
    password_file.write_text("p@ss:w/rd#1\n")
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    assert settings.redis_url() == "redis://:p%40ss%3Aw%2Frd%231@redis:6379/0"
    assert redis.connection.parse_url(settings.redis_url())["password"] == "p@ss:w/rd#1"


def test_password_in_two_places_or_none_is_an_error(password_file, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://:other@redis:6379/0")
    with pytest.raises(ConfigError, match="REDIS_PASSWORD_FILE is set and the Redis URL for redis also carries") as e:
        settings.redis_url()
    assert "other" not in str(e.value) and PASSWORD not in str(e.value)
    monkeypatch.setenv("REDIS_URL", "redis://redis:6379/0")
    password_file.write_text("\n")
    with pytest.raises(ConfigError, match=r"REDIS_PASSWORD_FILE=.*: the file is empty"):
        settings.redis_url()


def test_a_password_protected_redis_is_reached_with_the_file(password_file, monkeypatch):
    """A real Redis that requires the password: the URL with the file's password gets in."""
    with embedded_redis() as url:
        admin = redis.Redis.from_url(url)
        admin.config_set("requirepass", PASSWORD)
        try:
            monkeypatch.setenv("REDIS_URL", url)
            assert redis.Redis.from_url(settings.state_url()).ping()
            monkeypatch.delenv("REDIS_PASSWORD_FILE")
            with pytest.raises(redis.AuthenticationError):  # no retries: a refused AUTH is final here
                redis.Redis.from_url(settings.state_url(), retry=Retry(NoBackoff(), 0)).ping()
        finally:
            redis.Redis.from_url(url, password=PASSWORD).config_set("requirepass", "")


def test_budget_lease_margin_is_30_s_unless_configured(monkeypatch):
    monkeypatch.delenv("REFEXP_BUDGET_LEASE_MARGIN", raising=False)
    assert settings.budget_lease_margin() == 30.0
    monkeypatch.setenv("REFEXP_BUDGET_LEASE_MARGIN", "10")
    assert settings.budget_lease_margin() == 10.0
    monkeypatch.setenv("REFEXP_BUDGET_LEASE_MARGIN", "0.5")
    with pytest.raises(ValueError, match="REFEXP_BUDGET_LEASE_MARGIN must be at least 1"):
        settings.budget_lease_margin()
