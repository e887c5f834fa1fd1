"""kombu's Redis ack emulation in one sorted set: 2 Redis commands per task (kombu's takes 8).

kombu's Redis transport records a message it hands to a worker as *unacked*, so that the message
of a worker that dies is handed out again: on receipt it adds the delivery tag to a sorted set
scored by the time (``unacked_index``) and the message to a hash (``unacked``), and on the ack it
removes both, each pair in a ``MULTI``/``EXEC`` transaction: 8 commands per task (4 as plain
pipelines in the earlier release, whence the class's name; bench/README.md, issue 16).
:class:`PipelinedQoS` keeps each unacked message as ONE member of another sorted set,
``unacked_messages``, that carries the message itself::

    member = "<delivery tag>\\x1e<receipt id>\\x1f<json [message, exchange, routing key]>"
    score = the stamp

- receipt: one ``ZADD`` (stamped with this host's time, or Redis's while the clock guard says so,
  worker/clock.py);
- ack, or reject without requeue: one ``ZREM`` of the exact member. The QoS keeps ``tag ->
  members`` in memory for the messages it holds (kombu's own ``_delivered`` holds them too), and
  drops the entry on ack or reject;
- the sweep (``restore_visible``, under kombu's mutex and the clock guard as before) reads the
  members stamped longer ago than the visibility timeout, takes message, exchange and routing key
  from the member, works out the queue lists as kombu's ``_do_restore_message`` does (bindings,
  priority list, the ``redelivered`` flags) and restores each with a small Lua script,
  ``if ZREM(member) == 1 then RPUSH`` to each list: atomic, so no ``WATCH`` (kombu's ``WATCH``
  on the hash that every receipt and ack touches failed and retried often under load). An ack
  racing the restore removes the member first and nothing is pushed, or finds it gone after the
  push: never both lost, never pushed twice;
- reject with requeue, and warm shutdown's ``restore_unacked``, restore the member the same way
  (``LPUSH`` for a reject, as kombu). kombu's ``Channel._restore`` (which reads the hash) is not
  reachable from these flows: the virtual QoS calls it only from the ``reject`` and
  ``restore_unacked`` overridden here.

The separator ``\\x1f`` never occurs in a delivery tag (a UUID) and JSON escapes it, so the first
one splits the member.

Why a receipt id (a random one per receipt, after ``\\x1e``): one message can be held twice under
one delivery tag. The sweep hands a message out again when its holder looks dead (a task that
outran the visibility timeout, a paused worker), and the first holder may still be running it;
a message handed out again a second time then has the very same payload (its ``redelivered``
flags were set the first time). Without the receipt id both deliveries would be one member, and
the first holder's ack would remove the second's record: were the second worker to die, its
message would be neither queued nor held (kombu's hash, keyed by the tag, does that on the first
redelivery already). With it each delivery is its own member, and a worker that holds one tag
twice keeps both members, oldest first: an ack removes the oldest, which for the earlier
delivery is the one the sweep already removed (a no-op), so the later delivery keeps its record;
should the later delivery be acked first, the earlier's record stays until a sweep hands the
message out once more, a duplicate the done check skips, never a loss. Readers take the payload
after the first ``\\x1f`` and ignore the tag part, so members with and without a receipt id are
restored alike by either version of this code.

Why a sorted set of its own rather than the payload in ``unacked_index``: a mixed fleet, during a
rolling upgrade. A worker of the earlier release sweeps ``unacked_index`` with kombu's own code,
which reads each tag's message from the hash and removes the entry either way: it would drop a
new-format member (no hash entry) without re-queueing it. In a key of its own, the new members
are invisible to old workers (and to any other process that sweeps with kombu's stock QoS),
and the new sweep reads both keys: ``unacked_messages`` as above,
and ``unacked_index`` with kombu's hash path (its ``WATCH``ed transaction), for the entries
written by old workers. So a mixed fleet loses nothing; the one thing to keep in step is the
producer, whose reconciler (producer/reconcile.py) must know the new key to see the messages new
workers hold (an older producer would put their images back once more: duplicates the done check
absorbs).

The legacy path keeps the earlier release's plain-pipeline removals, message before index entry
(``_remove_from_indices``: ``HDEL``, then ``ZREM``; kombu's order is the reverse), so a dropped
connection never strands a message in the hash with no index entry that a sweep would find.

Installed in worker processes with the clock guard (worker/clock.py ``GuardedQoS`` derives from
this class), through the ``Channel.QoS`` attribute rather than a transport class of our own, which
would replace the transport kombu picks from the URL's scheme (``rediss://``, ``sentinel://``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.json import dumps, loads

from worker.keys import UNACKED, UNACKED_MESSAGES

#: Between the delivery tag and the message in a member of ``unacked_messages``.
SEP = "\x1f"
#: Between the delivery tag and the receipt id, in the tag part of a member.
RECEIPT_SEP = "\x1e"

#: Restores one member: removes it and, only if it was still there, pushes the message to the
#: queue lists. KEYS[1] the sorted set, KEYS[2..] the lists (already prefixed with kombu's global
#: key prefix: kombu's client prefixes only a script's first key); ARGV: member, push command,
#: message.
_RESTORE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
    for i = 2, #KEYS do
        redis.call(ARGV[2], KEYS[i], ARGV[3])
    end
    return 1
end
return 0
"""


def member_of(delivery_tag: str, raw: Any, exchange: str, routing_key: str, receipt: str | None = None) -> str:
    """The ``unacked_messages`` member of one receipt of a message: tag and receipt id (random
    unless given: each delivery of a message is a member of its own, see the module docstring),
    separator, kombu's unacked JSON."""
    receipt = os.urandom(6).hex() if receipt is None else receipt
    return f"{delivery_tag}{RECEIPT_SEP}{receipt}{SEP}{dumps([raw, exchange, routing_key])}"


def split_member(member: bytes | str) -> tuple[str, str]:
    """``(delivery tag, [message, exchange, routing key] as JSON)`` of a member; ValueError if it
    has no separator."""
    text = member.decode() if isinstance(member, bytes) else member
    tag, sep, raw = text.partition(SEP)
    if not sep:
        raise ValueError(f"not an unacked_messages member: {text[:80]!r}")
    return tag.partition(RECEIPT_SEP)[0], raw


def unacked_payloads(client: redis.Redis, count: int = 1000) -> Iterator[bytes]:
    """Every unacknowledged message as ``[message, exchange, routing key]`` JSON: those of
    ``unacked_messages`` and those the earlier release keeps in the ``unacked`` hash (for readers
    outside the workers: the reconciler, tests)."""
    for member, _ in client.zscan_iter(UNACKED_MESSAGES, count=count):
        _, sep, raw = member.partition(SEP.encode()) if isinstance(member, bytes) else member.partition(SEP)
        if sep:
            yield raw if isinstance(raw, bytes) else raw.encode()
    for _, raw in client.hscan_iter(UNACKED, count=count):
        yield raw


class PipelinedQoS(kombu_redis.QoS):
    """kombu's Redis QoS (kombu 5.7, pinned through celery<5.8) with each unacked message kept as
    one member of ``unacked_messages``: one ``ZADD`` on receipt, one ``ZREM`` on the ack, and a
    sweep that also restores the entries of earlier workers (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # tag -> the members of the deliveries of that tag this QoS holds, oldest first (one,
        # but for a message handed out again while its earlier delivery still runs here). The
        # consumer's thread adds, the pool's threads take (acks): under a lock.
        self._members: dict[str, list[str]] = {}
        self._members_lock = threading.Lock()
        self._restore_script: Any = None

    @property
    def messages_key(self) -> str:
        """The sorted set of unacked messages (kombu's ``unacked`` key plus ``_messages``)."""
        return f"{self.unacked_key}_messages"

    # -- receipt and ack: one command each ---------------------------------------------------

    def append(self, message, delivery_tag, stamp: float | None = None):
        """Record ``message`` as unacked: one ``ZADD``, scored ``stamp`` (default: this host's time).

        The member is remembered before it is sent: should the ``ZADD`` fail after Redis applied
        it (a reply lost with its connection), the ack still removes the exact member."""
        delivery = message.delivery_info
        member = member_of(delivery_tag, message._raw, delivery["exchange"], delivery["routing_key"])
        with self._members_lock:
            self._members.setdefault(delivery_tag, []).append(member)
        with self.channel.conn_or_acquire() as client:
            client.zadd(self.messages_key, {member: kombu_redis.time() if stamp is None else stamp})
        kombu_virtual.QoS.append(self, message, delivery_tag)

    def _take(self, delivery_tag: str) -> str | None:
        """The oldest member held for ``delivery_tag``, no longer held (None: none held). The
        oldest: see the module docstring, "Why a receipt id"."""
        with self._members_lock:
            members = self._members.get(delivery_tag)
            if not members:
                return None
            member = members.pop(0)
            if not members:
                del self._members[delivery_tag]
            return member

    def ack(self, delivery_tag):
        member = self._take(delivery_tag)
        if member is None:  # not appended here (cannot happen through kombu): the earlier format's removal
            return super().ack(delivery_tag)
        with self.channel.conn_or_acquire() as client:
            client.zrem(self.messages_key, member)
        kombu_virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        member = self._take(delivery_tag)
        if member is None:
            return super().reject(delivery_tag, requeue=requeue)
        with self.channel.conn_or_acquire() as client:
            if requeue:
                self._restore_member(member, client, leftmost=True)
            else:
                client.zrem(self.messages_key, member)
        kombu_virtual.QoS.ack(self, delivery_tag)

    # -- restores ------------------------------------------------------------------------------

    def restore_by_tag(self, tag, client=None, leftmost=False):
        """Hand a message this QoS holds back to its queue; a tag it does not hold is looked for
        the earlier way (kombu's, in the ``unacked`` hash)."""
        key = tag.decode() if isinstance(tag, bytes) else tag
        member = self._take(key)
        if member is None:
            return super().restore_by_tag(tag, client=client, leftmost=leftmost)
        with self.channel.conn_or_acquire(client) as client:
            self._restore_member(member, client, leftmost=leftmost)

    def restore_unacked(self, client=None):
        """Warm shutdown: every message still held goes back to its queue: the members this QoS
        holds (kombu's ``_delivered`` may still list tags acked since its last flush, and lists
        a tag held twice once, and dropped it at the first ack)."""
        with self.channel.conn_or_acquire(client) as client:
            with self._members_lock:
                tags = list(self._members)
            for tag in tags:
                while (member := self._take(tag)) is not None:  # a tag held twice: both
                    self._restore_member(member, client)
        self._delivered.clear()

    def restore_visible(self, start=0, num=10, interval=10):
        """kombu's sweep (same throttle, mutex and window) over both formats: the members of
        ``unacked_messages`` restored by the script, then the earlier workers' tags of
        ``unacked_index`` by kombu's hash path."""
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        with self.channel.conn_or_acquire() as client:
            ceil = kombu_redis.time() - self.visibility_timeout
            try:
                with kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    for member in self._older(client, self.messages_key, ceil, start, num):
                        self._restore_member(member, client)
                    for tag in self._older(client, self.unacked_index_key, ceil, start, num):
                        kombu_redis.QoS.restore_by_tag(self, tag, client)
            except kombu_redis.MutexHeld:
                pass

    @staticmethod
    def _older(client, key: str, ceil: float, start: int, num: int) -> list:
        """Members of ``key`` stamped before ``ceil``, newest first, as kombu reads them."""
        return client.zrange(key, ceil, 0, desc=True, byscore=True, offset=num and start, num=num) or []

    def _restore_member(self, member: bytes | str, client, leftmost: bool = False) -> bool:
        """Remove ``member`` and push its message to its queue lists, atomically; False when the
        member was already gone (acked, or restored by another worker).

        As kombu's ``_do_restore_message``: the message is marked redelivered, and one that cannot
        be routed (its JSON unreadable, no binding) is logged CRITICAL and dropped, rather than
        read again by every sweep for ever; a connection error propagates with nothing changed."""
        channel = self.channel
        keys = [self.messages_key]
        body = ""
        try:
            _, raw = split_member(member)
            payload, exchange, routing_key = loads(raw)
            try:
                payload["headers"]["redelivered"] = True
                payload["properties"]["delivery_info"]["redelivered"] = True
            except KeyError:
                pass
            pri = channel._get_message_priority(payload, reverse=False)
            keys += [channel.global_keyprefix + channel._q_for_pri(queue, pri)
                     for queue in channel._lookup(exchange, routing_key)]
            body = dumps(payload)
        except channel.connection_errors:
            raise
        except Exception:
            kombu_redis.crit("Could not restore message: %r", member, exc_info=True)
            keys = [self.messages_key]
        if self._restore_script is None:
            self._restore_script = client.register_script(_RESTORE)
        push = "LPUSH" if leftmost else "RPUSH"
        return bool(self._restore_script(keys=keys, args=[member, push, body], client=client))

    # -- the earlier format --------------------------------------------------------------------

    @contextmanager
    def pipe_or_acquire(self, pipe=None, client=None):
        """The caller's pipeline if it gave one (a restore's ``MULTI``), else a plain pipeline."""
        if pipe is not None:
            yield pipe
        else:
            with self.channel.conn_or_acquire(client) as client:
                yield client.pipeline(transaction=False)

    def _remove_from_indices(self, delivery_tag, pipe=None):
        """An earlier-format entry's removal (kombu's restore of a tag from ``unacked_index``):
        the message before its index entry."""
        with self.pipe_or_acquire(pipe) as pipe:
            return pipe.hdel(self.unacked_key, delivery_tag).zrem(self.unacked_index_key, delivery_tag)

