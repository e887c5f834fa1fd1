"""Running the suite in parallel (pytest-xdist): what each worker process must not share.

Each xdist worker is its own pytest session, so session fixtures (the private redis-server, the
demo dataset) exist once per worker. The one thing workers would share is a Redis given by
``REFEXP_TEST_REDIS_URL`` (CI's): every test that uses it flushes its database first, so two
workers on one database would empty each other's queues mid-run. Worker ``gwN`` therefore takes
the URL's database plus N.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def worker_db_url(url: str, worker: str | None) -> str:
    """``url`` for xdist worker ``worker`` (``"gw0"``, ``"gw1"``...; None or "" outside xdist)."""
    if not worker:
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"REFEXP_TEST_REDIS_URL must be redis:// or rediss:// to run tests in parallel, not {url!r}")
    base = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{base + int(worker.removeprefix('gw'))}"))
