"""The Redis result backend, minus the result tracking the producer cannot afford.

The producer publishes a chord per image and never waits on a result: outcomes live in the sinks
and the run index. Celery's Redis backend still tracks, in the *sending* process, every result it
could be asked to wait for:

- ``on_task_call`` subscribes the sender to a pub/sub channel for every task it sends, so that
  ``AsyncResult.get()`` can be woken (celery issue 3808);
- ``add_pending_result`` keeps each chord-header result as *pending*, registered when the chord
  builds its ``GroupResult`` ready barrier, and subscribes to its channel as well.

At 100k images that was 489 MB of producer RSS (4 KB per image, never released), a publish rate
40% lower, and two pub/sub subscriptions per image in Redis for as long as the producer stayed
connected (bench/README.md, target 4). This backend keeps neither. Chord counting and result
storage, which workers do, are unchanged. The cost: ``AsyncResult.get()`` cannot be woken in a
process using this backend; nothing in refexp calls it.

Chord counting (``on_chord_part_return``) is one Redis command per header task: a bit string per
chord instead of Celery's join keys (bench/README.md, issue 16: Celery's part-return script,
join, claim and cleanup cost ~29 commands per two-task chord; this costs 5, publishing included).

- **Publishing** (``apply_chord``, before Celery's canvas sends the first header task, and
  ``producer/templates.py`` for a chunk of images, before its messages) sets
  the chord's key ``<group>.b`` to 8 bytes: bit 0 *live* (the body is not sent yet), bit 1 *a
  part failed*, and one *pending* bit per header task from bit 2 on (``PENDING0 + group_index``),
  with the chord expiry. One ``SET``, where Celery sent ``DEL .c`` and ``SET .s``.
- **Each header task** returns its part with one ``BITFIELD``: clear its pending bit (answering
  the bit's old value), set the *failed* bit if it failed, read the whole field back. A duplicate
  delivery clears a bit already clear: it counts once. No part sees the field with no bit
  pending before every header task has returned, so the body is never sent early.
- **The join**: a part that finds nothing pending and the chord live takes the claim, a short
  lease (``SET <group>.c NX EX``), sends the body, and deletes both keys (one ``DEL``). Only one
  caller wins the lease, so the body goes once even when a redelivered part finds the field
  complete while the claimant is still sending; and a part retried because its first answer
  was lost on the connection, or redelivered because its worker died after the last count,
  finds the lease free (or its own) and sends the body itself, where Celery's claim left such
  a chord waiting for the reconciler. A late duplicate after the join finds no key: its
  ``BITFIELD`` makes an all-clear one, which is not *live*; it deletes it and sends nothing.
- **What it does not do**: pass header results to the body. refexp's header tasks store none
  (worker/stepdefs.py ``stores_result``) and its bodies are immutable signatures, which ignore
  them; a body that would take them is failed with a ``ChordError`` rather than called without
  them. A chord of more than ``MAX_PARTS`` header tasks, a part without a group index, and a
  chord published the Celery way (a ``.s`` size key: a producer of an earlier version) go
  through Celery's join, with a leaner copy of its part-return script
  (``CHORD_PART_RETURN_LUA``, celery/backends/redis.py 5.7: the same keys, arguments and
  answer, with the membership check and the expiries cut to 7 commands per header task).
  pyproject.toml pins Celery below 5.8: an upgrade must compare this module with Celery's again
  (tests/worker/test_backend.py drives both paths as a worker does).
"""

from __future__ import annotations

import logging
import threading
from functools import cached_property, partial
from uuid import uuid4

from celery import states
from celery.backends.redis import RedisBackend
from celery.canvas import _chain, maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult

log = logging.getLogger("refexp.worker")

#: Bit offsets in a chord's ``.b`` key (the most significant bit of its first byte is 0).
LIVE, FAILED, PENDING0 = 0, 1, 2
#: Bits read back by a part: ``BITFIELD ... GET u63 0`` (the widest unsigned field Redis reads).
FIELD = 63
#: The most header tasks a chord can have on this path (one pending bit each after LIVE and FAILED).
MAX_PARTS = FIELD - PENDING0
#: Sizes ``apply_chord`` remembers for ``set_chord_size`` (each for one publish; a publish that
#: failed in between leaves its entry, the oldest go first).
PRESET_KEPT = 1024


def chord_bits(size: int) -> bytes:
    """A published chord's ``.b`` value: live, nothing failed, ``size`` parts pending."""
    if not 0 < size <= MAX_PARTS:
        raise ValueError(f"a chord of {size} header tasks has no bit string (1 to {MAX_PARTS})")
    bits = 1 << (63 - LIVE)
    for i in range(size):
        bits |= 1 << (63 - PENDING0 - i)
    return bits.to_bytes(8, "big")


def read_field(field: int) -> tuple[bool, bool, int]:
    """``(live, failed, pending bits)`` from the ``GET u63 0`` of a chord's key."""
    live = bool(field >> (FIELD - 1 - LIVE) & 1)
    failed = bool(field >> (FIELD - 1 - FAILED) & 1)
    return live, failed, field & ((1 << (FIELD - PENDING0)) - 1)


def _ignores_args(sig) -> bool:
    """Whether a chord body ignores the header results it would be called with (immutable, or a
    chain whose first task is)."""
    if isinstance(sig, _chain):
        return bool(sig.tasks) and _ignores_args(maybe_signature(sig.tasks[0], app=sig.app))
    return bool(sig.immutable)

CHORD_PART_RETURN_LUA = """
local jkey, tkey, skey, dkey, gkey, ckey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local tid, value, ordered, score = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local expires = tonumber(ARGV[5])
local claim_expires = tonumber(ARGV[7])
local claim_token = ARGV[8]

if redis.call('GET', ckey) == 'done' then
    return {-1, 0, 0, 0}
end
local added = redis.call('SADD', dkey, tid .. ':' .. score)
if added == 1 then
    if ordered == '1' then
        redis.call('ZADD', jkey, score, value)
    else
        redis.call('RPUSH', jkey, value)
    end
end
local readycount
if ordered == '1' then
    readycount = redis.call('ZCOUNT', jkey, '-inf', '+inf')
else
    readycount = redis.call('LLEN', jkey)
end
if expires > 0 and added == 1 and readycount == 1 then
    redis.call('EXPIRE', jkey, expires)
    redis.call('EXPIRE', dkey, expires)
end

local totaldiff = redis.call('GET', tkey)
local size = redis.call('GET', skey)
local claimed = 0
if size and readycount == tonumber(size) + tonumber(totaldiff or 0) then
    if redis.call('SET', ckey, claim_token, 'NX', 'EX', claim_expires) then
        claimed = 1
    end
end

return {readycount, totaldiff, size, claimed}
"""


class RefexpRedisBackend(RedisBackend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        #: ``{group id: size}`` of the chords ``apply_chord`` set, until ``set_chord_size``; made
        #: here, not on first use, since the app's backend is shared by its threads.
        self._preset: dict[str, int] = {}
        self._preset_lock = threading.Lock()

    def on_task_call(self, producer, task_id):
        return None

    def chord_key(self, group_id: str) -> str:
        """The chord's bit string (see the module docstring)."""
        return self.get_key_for_group(group_id, ".b")

    def queue_chord_size(self, pipe, group_id: str, size: int, nx: bool = False) -> None:
        """Queue on ``pipe`` (this backend's client or a pipeline of it) what publishing a chord
        of ``size`` header tasks writes: its bit string, or Celery's size key when it has too
        many parts for one (or none). ``nx``: leave a bit string already set alone."""
        if not 0 < size <= MAX_PARTS:
            pipe.delete(self.get_key_for_group(group_id, ".c"))
            pipe.set(self.get_key_for_group(group_id, ".s"), size, ex=self.chord_expires or None)
        else:
            pipe.set(self.chord_key(group_id), chord_bits(size), ex=self.chord_expires or None, nx=nx)

    def apply_chord(self, header_result_args, body, **kwargs):
        """Set the chord's bit string before Celery's canvas sends any header task.

        Celery sets a chord's size (``set_chord_size``) only just before it sends the *last*
        header task (``group._apply_tasks``): an earlier one can run and return in between, and
        it would find no bit string (taken for a late duplicate, dropped) and then have its bit
        set pending again, the body never sent. Celery's own join survives that (its parts are
        listed, the size compared later), but a part of a chord too big for a bit string
        goes there only when it finds the size key: both must exist first. A header of plain
        tasks has one part per result, so the size is known here; ``set_chord_size`` then
        sends nothing when the size it is given is the one set here. ``producer/templates.py``
        writes a chunk's bit strings before its messages (it comes here only to record a
        template)."""
        super().apply_chord(header_result_args, body, **kwargs)
        group_id, results = header_result_args[0], header_result_args[1]
        if isinstance(results, (list, tuple)) and results and not any(isinstance(r, GroupResult) for r in results):
            self.ensure(self.queue_chord_size, (self.client, group_id, len(results), True))
            with self._preset_lock:
                while len(self._preset) >= PRESET_KEPT:  # the oldest: left by publishes that failed
                    del self._preset[next(iter(self._preset))]
                self._preset[group_id] = len(results)


    def set_chord_size(self, group_id, chord_size):
        """Celery's canvas calls this before sending a chord's last header task, after the
        others: a bit string ``apply_chord`` set for this size may hold counts already, and is
        kept. Any other size (a header Celery counts otherwise, nested canvases) is written."""
        with self._preset_lock:
            preset = self._preset.pop(group_id, None)
        if preset == chord_size:
            return
        self.ensure(self.queue_chord_size, (self.client, group_id, chord_size))

    def pop_chord_size(self, group_id: str) -> int | None:
        """The size a chord was published with (and its keys deleted): how ``producer/templates.py``
        learns the sizes of the canvas it recorded."""
        bkey, skey, ckey = self.chord_key(group_id), *(self.get_key_for_group(group_id, s) for s in (".s", ".c"))
        raw_bits, raw_size = self.client.mget([bkey, skey])
        self.client.delete(bkey, skey, ckey)
        if raw_bits is not None:
            return bin(read_field(int.from_bytes(raw_bits, "big") >> 1)[2]).count("1")
        return None if raw_size is None else int(raw_size)

    def add_pending_result(self, result, weak=False, start_drainer=True):
        return result

    def on_chord_part_return(self, request, state, result, propagate=None, **kwargs):
        """Count a header task into its chord, riding out a Redis connection lost on the way
        with the backend's retry policy (about 20 s).

        One ``BITFIELD`` (see the module docstring), or Celery's join for the chords this path
        does not take.

        The header tasks store no result, so this is their first write to the result backend:
        Celery runs it unretried, and a connection reset there raised out of the task after its
        record was committed ("exception raised outside body"), leaving the chord one count
        short and the image waiting for the reconciler. Storing the result used to absorb the
        outage first (``RedisBackend.set`` goes through ``ensure``). A retry cannot count twice:
        the script adds the task to the chord's set once (SADD) and the body is claimed once;
        here a part's bit is cleared once, and a retry that finds the chord complete takes the
        lease (or finds it its own) and sends the body only if this call has not sent it yet."""
        index = getattr(request, "group_index", None)
        if not request.group or not request.id or not isinstance(index, int) or not 0 <= index < MAX_PARTS:
            count = partial(super().on_chord_part_return, propagate=propagate, **kwargs)
            return self.ensure(count, (request, state, result))
        token, sent = uuid4().hex, []
        return self.ensure(self._count_part, (request, state, result, index, token, sent))

    def _count_part(self, request, state, result, index: int, token: str, sent: list) -> None:
        """One attempt at counting a part; ``sent`` holds True once this call sent the body."""
        gid, client = request.group, self.client
        bkey, ckey = self.chord_key(gid), self.get_key_for_group(gid, ".c")
        ops = ["SET", "u1", PENDING0 + index, 0]
        if state in states.PROPAGATE_STATES:
            ops += ["SET", "u1", FAILED, 1]
        ops += ["GET", f"u{FIELD}", 0]
        answer = client.execute_command("BITFIELD", bkey, *ops)
        live, failed, pending = read_field(int(answer[-1]))
        if not live:
            # No such chord: a late duplicate after the join, or a chord published the Celery
            # way. Drop the key BITFIELD just made; Celery's join counts the latter.
            client.delete(bkey)
            if client.exists(self.get_key_for_group(gid, ".s")):
                super().on_chord_part_return(request, state, result)
            return
        if pending:
            return
        if not sent:
            callback = maybe_signature(request.chord, app=self.app)
            lease = self._chord_publish_claim_expires(self._claim_seconds(), callback)
            if not client.set(ckey, token, nx=True, ex=lease) and client.get(ckey) not in (token, token.encode()):
                return  # another part holds the claim: it sends the body
            self._send_body(request, callback, failed)
            sent.append(True)
        client.delete(bkey, ckey)

    def _claim_seconds(self) -> int:
        """Celery's initial claim (twice the join timeout, at least 5 s)."""
        return max(5, int((self.app.conf.result_chord_join_timeout or 5.0) * 2))

    def _send_body(self, request, callback, failed: bool) -> None:
        """Send the chord's body, or fail it as Celery does when a header task failed (or when
        the body would need the header results this path does not keep)."""
        try:
            if failed:
                raise ChordError(f"a header task of chord {request.group} failed")
            if not _ignores_args(callback):
                raise ChordError(f"chord {request.group}: the body takes the header results, which this backend "
                                 "does not keep (worker/result_backend.py); make it an immutable signature")
        except ChordError as exc:
            log.error("chord %s: %s", request.group, exc)
            self.chord_error_from_stack(callback, exc)  # reads the stack: inside the except
            return
        try:
            self.app.amqp._retry_publish(callback.delay, [])
        except Exception as exc:  # as Celery: the body is failed, the chord's keys go
            log.exception("chord %s: the body could not be sent: %r", request.group, exc)
            self.chord_error_from_stack(callback, ChordError(f"Callback error: {exc!r}"))

    @cached_property
    def _chord_part_return_script(self):
        return self.client.register_script(CHORD_PART_RETURN_LUA)
