"""Every Redis key refexp reads or writes, named in one place.

Run state hangs off ``refexp:run:<run_id>:...`` (``run_key``), the fleet budget off
``refexp:ep:<endpoint id>:...`` (``budget_key``), and Celery's own keys keep kombu's names:
the queue list ``refexp`` (one more list per priority, ``refexp\\x06\\x16<n>``); the
``unacked_messages`` sorted set (each member a message a worker holds, scored by its delivery
stamp, which the clock guard sets; worker/transport.py) and, written by workers of the earlier
release, the ``unacked`` hash with its ``unacked_index`` sorted set: the reconciler reads both
kinds. The result backend's chord keys keep Celery's prefix, ``celery-taskset-meta-<group
id>.b`` (a chord's bit string) and ``.c`` (its claim), see worker/result_backend.py. No secret
is ever part of a key or a value.

Run keys (``run_key(run_id, ...)``): ``spec:<hash>`` and ``prompts:<hash>`` (the run's public
spec and prompt templates), ``meta``, ``done:<step>`` (image_id -> sink offset), ``failed:<step>``
and ``blocked:<step>`` (image_id -> reason), ``recheck:<step>`` (done entries set aside while a
``reprocess: changed`` run checks their records' fingerprints), ``queued`` (the in-flight window: image_id ->
"<Redis time>:<seed offset>"), ``usage`` and ``quality`` (counter totals) with ``tally`` (the
counter entries not folded into them yet, at most ``runstate.TALLY_FOLD``), ``workers``,
``producer``, ``batch:jobs`` (job id -> a short JSON of its state, one entry per provider job)
and ``batch:gathering`` (requests parked and not yet in a job).
"""

from __future__ import annotations

KEY_PREFIX = "refexp"
#: The Celery queue (its Redis list has the same name), kept apart from other apps on a shared Redis.
QUEUE = "refexp"
#: kombu's Redis transport: unacknowledged messages, and their delivery stamps, as kombu and the
#: earlier release keep them (a worker of this release still sweeps them, worker/transport.py).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
#: Unacknowledged messages as this release's workers keep them: one sorted-set member per message,
#: ``<delivery tag>\x1e<receipt id>\x1f<json [message, exchange, routing key]>``, scored by its
#: delivery stamp (worker/transport.py; members without the receipt id are read alike).
UNACKED_MESSAGES = "unacked_messages"
#: kombu's separator between a queue's name and its priority in the per-priority list names, and
#: its default priority steps (a list per step; step 0 is the queue's own list).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)
#: A throwaway key a worker writes to learn whether Redis takes writes again (worker/tasks.py).
WRITE_PROBE = f"{KEY_PREFIX}:probe"


def run_key(run_id: str, *parts: object) -> str:
    """``refexp:run:<run_id>:<part>:...``: a key of one run's state."""
    return ":".join((KEY_PREFIX, "run", run_id, *map(str, parts)))


def budget_key(endpoint_id: str, *parts: object) -> str:
    """``refexp:ep:<endpoint id>:<part>:...``: a key of one endpoint's fleet budget."""
    return ":".join((KEY_PREFIX, "ep", endpoint_id, *map(str, parts)))


def queue_list(priority: int = 0) -> str:
    """The Redis list holding the queue's messages of one priority step (as kombu names it:
    priority 0 is the queue's own list). Head steps sit in ``queue_list(6)`` (worker/stepdefs.py)."""
    return f"{QUEUE}{PRIORITY_SEP}{priority}" if priority else QUEUE


#: Every list a queued message can sit in, in the order workers serve them.
QUEUE_LISTS: tuple[str, ...] = tuple(queue_list(p) for p in PRIORITY_STEPS)


def is_queue_list(name: str) -> bool:
    """Whether a Redis key is the Celery queue's list (or one of its priority lists)."""
    return name == QUEUE or name.startswith(QUEUE + PRIORITY_SEP)


#: Batch mode (worker/coordinator.py): the coordinator's lease (one worker of the fleet holds it),
#: and the runs with batch work (run refs; the producer and every parking task add theirs).
BATCH_LEASE = f"{KEY_PREFIX}:batch:lease"
BATCH_RUNS = f"{KEY_PREFIX}:batch:runs"
