"""Will the enqueue window fit in the fleet's Redis? Warnings before the producer fills it.

Every pending image holds two chord-header messages in the queue. Measured by ``bench.enqueue``
(bench/README.md, target 4): about 4.1 KB per pending image on a Redis with
``list-compress-depth 0`` (Redis's default), about 1.1 KB with ``list-compress-depth 1`` (the two
header messages repeat most of their JSON, and the inner list nodes are LZF-compressed). Our
compose file and the embedded server set it; a Redis the user brings may not, and with
``noeviction`` a full Redis refuses the producer's writes half-way through a large window.
"""

from __future__ import annotations

import redis

#: Redis bytes per pending image, by whether the queue list is compressed (bench.enqueue).
BYTES_PER_PENDING_PLAIN = 4_100
BYTES_PER_PENDING_COMPRESSED = 1_100
#: A window this large on an uncompressed Redis is worth a word even without a maxmemory.
NOTE_ABOVE_BYTES = 256 * 2**20


def _config(client: redis.Redis, name: str) -> str | None:
    """One CONFIG GET value, or None where CONFIG is disabled (managed Redis services)."""
    try:
        return client.config_get(name).get(name)
    except redis.ResponseError:
        return None


def window_warnings(client: redis.Redis, max_inflight: int) -> list[str]:
    """What to tell the user about ``--max-inflight`` against this Redis's memory (may be empty)."""
    depth = _config(client, "list-compress-depth")
    compressed = depth is not None and int(depth) > 0
    per_image = BYTES_PER_PENDING_COMPRESSED if compressed else BYTES_PER_PENDING_PLAIN
    need = per_image * max_inflight
    shrink = ("; `CONFIG SET list-compress-depth 1` (or `--list-compress-depth 1` on redis-server) "
              f"cuts it to about {BYTES_PER_PENDING_COMPRESSED / 1000:.1f} KB per image") if depth == "0" else ""
    maxmemory = int(_config(client, "maxmemory") or 0)
    if maxmemory:
        used = int(client.info("memory")["used_memory"])
        if used + need > 0.9 * maxmemory:
            return [f"--max-inflight {max_inflight} may need about {need / 2**20:.0f} MB of Redis "
                    f"({per_image / 1000:.1f} KB per pending image), and Redis has {used / 2**20:.0f} of "
                    f"{maxmemory / 2**20:.0f} MB (maxmemory) in use: a full Redis refuses new tasks. "
                    f"Lower --max-inflight or raise maxmemory{shrink}"]
    if depth == "0" and need > NOTE_ABOVE_BYTES:
        return [f"--max-inflight {max_inflight} may hold about {need / 2**20:.0f} MB in Redis "
                f"({per_image / 1000:.1f} KB per pending image){shrink}"]
    return []
