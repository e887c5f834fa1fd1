"""The reconciler: finds images in flight that nothing will ever move again, and puts them back.

Workers settle every image-step on every path they can see (``worker/tasks.py``), but some
faults happen where no task can see them: a chord whose join count was lost with Redis, a
message deleted by hand, a retry Redis refused while its task was killed. Such an image stays
in the run's in-flight set with no message anywhere, and ``producer wait`` would wait for ever.

"Nothing will move it" is decided carefully, because most images that look slow are fine:

- it has been in flight for a while (the visibility timeout, at most 5 minutes): young images
  are nearly always just waiting their turn, and a look at the queue costs a scan;
- some of its steps have no outcome (done, failed or blocked);
- no message of this run names it, neither in the queue (which also holds chord bodies and
  chain links once published) nor in the unacked set (messages a worker holds: running, or
  waiting for a countdown retry; and those of dead workers, until the visibility timeout
  gives them back);
- and all of that holds on two looks some seconds apart (a message moves between the queue and
  the unacked set, or a chord body is being published, for a few milliseconds).

Such an image is published again for its steps without an outcome (and the blocked ones, which
may have been blocked by the lost step), exactly as ``enqueue`` would. A message that was only
missed costs at most a duplicate, which the workers' done check absorbs.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from producer.enqueue import publish_chunk
from producer.publish import Publisher
from producer.seed import iter_seed
from worker import settings
from worker.keys import QUEUE_LISTS
from worker.layout import Layout
from worker.runstate import Outcome, RunRef, RunState
from worker.transport import unacked_payloads

log = logging.getLogger("refexp.producer")

SCAN_CHUNK = 1000


def message_args(raw: bytes | str) -> list | None:
    """The task arguments of a kombu message as Redis stores it (queue entry or unacked value)."""
    try:
        payload = json.loads(raw)
        if isinstance(payload, list):  # unacked: [message, exchange, routing_key]
            payload = payload[0]
        body = payload["body"]
        if (payload.get("properties") or {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return args if isinstance(args, list) else None
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def _queue_keys() -> list[str]:
    """The Celery queue's Redis lists: the queue, and kombu's one list per priority step (0 is
    the queue itself). Named, not scanned: a SCAN walks the whole keyspace."""
    return list(QUEUE_LISTS)


def _unacked(broker: redis.Redis) -> Iterator[bytes]:
    """The messages workers hold: this release's ``unacked_messages`` members and the earlier
    release's ``unacked`` hash (a fleet mid-upgrade has both)."""
    yield from unacked_payloads(broker, count=SCAN_CHUNK)


def _messages(broker: redis.Redis) -> Iterator[bytes]:
    """Every message of the queue lists and of the unacked set. The unacked set is read before
    and after the lists: a message that moves while the lists are read (a retry published and
    its original acked, a chord body published by its header, a restore of a dead worker's
    message) is seen on one side or the other."""
    yield from _unacked(broker)
    for key in _queue_keys():
        start = 0
        while True:
            chunk = broker.lrange(key, start, start + SCAN_CHUNK - 1)
            yield from chunk
            if len(chunk) < SCAN_CHUNK:
                break
            start += SCAN_CHUNK
    yield from _unacked(broker)


def referenced(broker: redis.Redis, run_id: str) -> set[str]:
    """Images of run ``run_id`` that some queued or unacknowledged message names."""
    prefix = f"{run_id}:"
    ids = set()
    for raw in _messages(broker):
        if run_id.encode() not in raw:
            continue
        args = message_args(raw)
        if args and len(args) >= 2 and isinstance(args[0], str) and args[0].startswith(prefix):
            ids.add(str(args[1]))
    return ids


#: An image in flight this long is worth a look. Every state an image can legitimately be in is
#: visible in Redis (queued, or unacked while a worker holds it, runs it or waits for its
#: countdown; a dead worker's message stays unacked until the visibility timeout restores it),
#: except for the milliseconds a message is in transit, which the second look covers. So the
#: look need not wait for the visibility timeout itself when that is long.
MAX_OLDER_THAN = 300.0


def default_older_than() -> float:
    return float(min(settings.visibility_timeout(), MAX_OLDER_THAN))


@dataclass
class Reconciler:
    """Looks for stranded images every ``interval`` seconds and publishes them again.

    ``tick`` is cheap when nothing is old: one HSCAN of the in-flight set; the queue is read only
    when an image has been in flight longer than ``older_than`` without finishing.
    """

    state: RunState
    broker: redis.Redis
    older_than: float = field(default_factory=lambda: default_older_than())
    interval: float = 0.0
    suspects: dict[str, int | None] = field(default_factory=dict)
    last: float = 0.0
    requeued: int = 0
    dropped: int = 0

    def __post_init__(self) -> None:
        if not self.interval:
            self.interval = min(60.0, max(2.0, self.older_than / 2))

    def tick(self) -> int:
        """One look if ``interval`` has passed since the last; returns the images put back."""
        now = time.monotonic()
        if now - self.last < self.interval:
            return 0
        self.last = now
        return self.look()

    def look(self) -> int:
        """Suspect the images that look stranded now; put back those that already looked
        stranded on the previous look. Returns how many were put back."""
        meta = self.state.meta()
        steps: list[int] = meta.get("steps") or []
        if not steps or not meta.get("spec_hash"):
            return 0
        horizon = self.state.server_time() - self.older_than
        old = {image_id: offset for image_id, since, offset in self.state.iter_queued() if since <= horizon}
        if not old:
            self.suspects = {}
            return 0
        ordinals = self.state.queued_ordinals(list(old))
        outcomes = self.state.outcomes(list(old), steps, ordinals)
        settled = [i for i in old if all(outcomes[i][s] is not None for s in steps)]
        self.state.unqueue(settled)  # finished, but the settle that drops them was lost
        self.dropped += len(settled)
        unfinished = {i: off for i, off in old.items() if i not in settled}
        if not unfinished:
            self.suspects = {}
            return 0
        alive = referenced(self.broker, self.state.run_id)
        now_suspect = {i: off for i, off in unfinished.items() if i not in alive}
        stranded = {i: off for i, off in now_suspect.items() if i in self.suspects}
        self.suspects = {i: off for i, off in now_suspect.items() if i not in stranded}
        if stranded:
            self.requeue(stranded, steps, str(RunRef(self.state.run_id, meta["spec_hash"])),
                         {i: outcomes[i] for i in stranded}, {i: ordinals.get(i) for i in stranded})
        return len(stranded)

    def requeue(self, stranded: dict[str, int | None], steps: list[int], run_ref: str,
                outcomes: dict[str, dict[int, Outcome | None]],
                ordinals: dict[str, int | None] | None = None) -> None:
        """Publish the stranded images again for their steps without an outcome (and the blocked
        ones), through ``enqueue.publish_chunk`` like every other publish."""
        offsets = _fill_offsets(self.state, stranded)
        todo = []
        for image_id, offset in offsets.items():
            redo = [s for s in steps if outcomes[image_id][s] in (None, Outcome.BLOCKED)]
            if redo:
                todo.append((offset, image_id, redo))
                log.warning("%s: in flight with no task anywhere; published again for steps %s", image_id, redo)
        if todo:
            with Publisher(1) as publisher:
                publish_chunk(self.state, run_ref, todo, steps, publisher, ordinals=ordinals)
            self.requeued += len(todo)


def _fill_offsets(state: RunState, stranded: dict[str, int | None]) -> dict[str, int]:
    """Seed offsets for the stranded images (marks of an older producer hold none: read the seed)."""
    missing = {i for i, off in stranded.items() if off is None}
    offsets = {i: off for i, off in stranded.items() if off is not None}
    root = state.meta().get("results_dir") if missing else None
    if root:
        for offset, rec in iter_seed(Layout(Path(root)).seed):
            if rec.get("image_id") in missing:
                offsets[rec["image_id"]] = offset
    for image_id in sorted(missing - set(offsets)):
        log.error("%s: in flight with no task anywhere, and not in the seed file: cannot publish it again "
                  "(run `producer enqueue` with the run's spec)", image_id)
    return offsets


def repair(state: RunState, broker: redis.Redis, *, older_than: float | None = None,
           confirm_after: float = 3.0) -> Reconciler:
    """``producer repair``: two looks ``confirm_after`` s apart; the reconciler tells what it did
    (``requeued`` images put back, ``dropped`` finished images taken out of the in-flight set)."""
    rec = Reconciler(state, broker, older_than=default_older_than() if older_than is None else older_than)
    rec.look()
    if rec.suspects:
        time.sleep(confirm_after)
        rec.look()
    return rec
