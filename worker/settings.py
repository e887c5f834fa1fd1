"""Process settings read from the environment (never from task messages).

``REDIS_URL`` is the one address a fleet shares; ``CELERY_BROKER_URL`` and
``CELERY_RESULT_BACKEND`` override it for Celery alone. Run state lives on the broker's Redis.

Secrets can come from files instead of values, so they appear neither on a command line nor in
``docker inspect`` (compose mounts them under ``/run/secrets``):

- ``REDIS_PASSWORD_FILE``: the Redis password, put into every ``redis://`` / ``rediss://`` URL
  above that has none, in this process only (the URLs in the environment stay without it).
- ``<NAME>_FILE`` for each API key (``GOOGLE_API_KEY_FILE``, ``OPENAI_API_KEY_FILE``, ...):
  read by ``secret(NAME)``, which the VLM clients use. Setting both ``NAME`` and ``NAME_FILE``
  is an error (which one was meant?). An empty file counts as unset (a self-hosted server
  without auth needs no key).

Files are read when a value is needed (a rotated key is picked up by the next client built), and
surrounding whitespace is dropped (``echo KEY > file`` adds a newline). Errors name the variable
and the path, never the value.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from worker.errors import ConfigError

#: The environment variables each backend reads its API key from, in the order it tries them
#: (each may instead be ``<NAME>_FILE``, naming a file that holds the key: ``secret``). The one
#: list: the clients, their cache key, the producer's warnings and the tests read it.
API_KEY_VARS: dict[str, tuple[str, ...]] = {
    "gemini": ("GOOGLE_API_KEY", "GEMINI_API_KEY"),
    "openai": ("OPENAI_API_KEY", "NVIDIA_API_KEY"),
}

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_VISIBILITY_TIMEOUT = 3600
#: Seconds any Redis socket operation may take before it fails (a healthy command takes ms; the
#: longest blocking ones, BRPOP and the budget's BLPOP, wait 1 s). Without a bound a stalled
#: Redis holds a thread for ever.
REDIS_SOCKET_TIMEOUT = 20.0
REDIS_PASSWORD_FILE = "REDIS_PASSWORD_FILE"


def _read_secret_file(var: str) -> str:
    path = os.environ[var]
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(f"{var}={path}: no such file (it should hold the secret itself)") from None
    except IsADirectoryError:
        raise ConfigError(f"{var}={path}: is a directory, not a file holding the secret (a secret file that "
                          "did not exist when the container started is created as a directory)") from None
    except PermissionError:
        raise ConfigError(f"{var}={path}: not readable by this process (uid {os.getuid()}); make it "
                          "readable, e.g. chmod 644 on a host only you use, or chown it to this uid") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{var}={path}: cannot read the secret ({type(exc).__name__})") from None


def secret(name: str) -> str:
    """``$NAME``, else the contents of the file ``$NAME_FILE`` names, else ``""``."""
    value = os.environ.get(name) or ""
    if os.environ.get(f"{name}_FILE"):
        if value:
            raise ConfigError(f"both {name} and {name}_FILE are set: set only one "
                              f"({name}_FILE, a file holding the secret, keeps it out of the environment)")
        return _read_secret_file(f"{name}_FILE")
    return value


def with_redis_password(url: str) -> str:
    """``url`` with the password from REDIS_PASSWORD_FILE, when the file is set and the URL is a
    Redis URL without a password of its own (one in the URL and one in a file: which is meant?)."""
    if not os.environ.get(REDIS_PASSWORD_FILE):
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return url
    if parts.password is not None:
        raise ConfigError(f"{REDIS_PASSWORD_FILE} is set and the Redis URL for {parts.hostname or 'localhost'} "
                          "also carries a password: keep the password in one place (the file)")
    password = _read_secret_file(REDIS_PASSWORD_FILE)
    if not password:
        raise ConfigError(f"{REDIS_PASSWORD_FILE}={os.environ[REDIS_PASSWORD_FILE]}: the file is empty")
    user, _, host = parts.netloc.rpartition("@")
    netloc = f"{user}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def redis_url() -> str:
    return with_redis_password(os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL)


def broker_url() -> str:
    return with_redis_password(os.environ.get("CELERY_BROKER_URL") or "") or redis_url()


def result_backend() -> str:
    return with_redis_password(os.environ.get("CELERY_RESULT_BACKEND") or "") or redis_url()


def broker_source() -> str:
    """Which variable set the broker's URL, and that URL without its password: what a user must
    check when Redis does not answer (a worker only logs kombu's "Cannot connect", then retries)."""
    from kombu.utils.url import maybe_sanitize_url

    for var in ("CELERY_BROKER_URL", "REDIS_URL"):
        if os.environ.get(var):
            return f"{var}={maybe_sanitize_url(broker_url())}"
    return f"REDIS_URL (not set, so the default {DEFAULT_REDIS_URL})"


def state_url() -> str:
    """Run state (indexes, budget) lives on the broker's Redis unless REFEXP_STATE_URL says otherwise."""
    return with_redis_password(os.environ.get("REFEXP_STATE_URL") or "") or broker_url()


def env_seconds(name: str, default: float, *, minimum: float, whole: bool = False) -> float:
    """A duration from the environment variable ``name`` (``default`` when unset), checked: a
    number (whole seconds when ``whole``), at least ``minimum``; the error names the variable."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise ValueError(f"{name} must be {'whole seconds' if whole else 'a number of seconds'}, "
                         f"got {raw!r}") from None
    if not value >= minimum:  # also refuses nan
        raise ValueError(f"{name} must be at least {minimum:g} seconds, got {raw!r}")
    return value


def budget_lease_margin() -> float:
    """``REFEXP_BUDGET_LEASE_MARGIN``: how long a call's concurrency slot outlives the VLM timeout
    before it frees itself (30 s by default), which is how long a worker killed mid-call holds
    its slots. Tests shorten it so the slots of a killed worker come back in seconds."""
    return env_seconds("REFEXP_BUDGET_LEASE_MARGIN", 30.0, minimum=1)


def visibility_timeout() -> int:
    """``REFEXP_VISIBILITY_TIMEOUT``: how long Redis waits before handing out an unacked task again."""
    return int(env_seconds("REFEXP_VISIBILITY_TIMEOUT", DEFAULT_VISIBILITY_TIMEOUT, minimum=5, whole=True))
