"""Per-run message templates: an image's canvas messages without freezing a canvas per image.

Freezing and sending a Celery chord costs about 1.7 ms of one core per image (the canvas is
cloned and frozen, every option merged, a Redis client built per message, four round trips:
the chord-size key's DEL and SET, one LPUSH per header task). Every image of a run gets the same
canvas up to its arguments and its fresh ids, so a publisher builds one *template* per canvas
shape and instantiates it per image:

- The template is what Celery itself hands to kombu (``Producer.publish(body, **kwargs)``) for
  one canvas, recorded by applying ``publish.canvas`` (built from ``publish._sig``, so every
  per-message option, a priority included, carries over) through a recording producer, twice:
  the uuids that differ between the two recordings are the per-image ids (task, group, root ids),
  those that do not (``reply_to``, the app's thread oid) stay. The chord size Celery set for the
  template's group is read back from the result backend and the template's keys deleted.
- ``instantiate`` copies the recorded structures with the image's arguments and fresh ids put
  in, and ``argsrepr`` computed as Celery computes it. kombu still serialises each message, wraps
  it in its envelope (delivery tag, priority) and routes it; ``publish.publish_items`` sends a
  chunk's messages through one pipelined ``Producer.batch()``.

Celery's ``before_task_publish``/``after_task_publish`` signals fire while a template is
recorded, not per image (refexp connects none). Anything a template cannot reproduce (an
unknown canvas, a non-Redis result backend, a placeholder inside a string other than
``argsrepr``) raises ``TemplateError`` when the template is built, and the publisher falls
back to ``apply_async`` per image. The tests
compare templated messages with ``apply_async``'s field by field, for every canvas shape.
"""

from __future__ import annotations

import json
import logging
import re
import uuid as _uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.canvas import Signature, _chain, _chord, group
from celery.utils.saferepr import saferepr
from kombu import Producer

#: Stand-ins for an image's arguments while a template is recorded: distinctive enough to
#: appear nowhere else in a message.
RUN_P = "refexp-template-run-ref-8c1f0e"
IMAGE_P = "refexp-template-image-id-8c1f0e"
OFFSET_P = -8_713_402_551
ARGSREPR_P = "refexp-template-argsrepr-8c1f0e"

log = logging.getLogger("refexp.producer")
_ESCAPED_QUOTE = "\\'"  # how saferepr writes a quote inside a quoted string
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class TemplateError(Exception):
    """The canvas cannot be published from a template; publish it with ``apply_async``."""


class _Recorder(Producer):
    """A kombu producer that records what Celery would publish instead of publishing it."""

    def __init__(self, connection) -> None:
        super().__init__(connection, auto_declare=False)
        self.sent: list[tuple[Any, dict]] = []

    def publish(self, body, **kwargs):
        self.sent.append((body, kwargs))

    def __deepcopy__(self, memo):
        """Canvas clones deep-copy their options, the recorder among them: keep one recorder."""
        return self


def _arm(sig: Signature | list, rec: _Recorder) -> None:
    """Hand ``rec`` to every task of ``sig`` as its producer: a chain passes its own
    ``producer=`` to nobody, so its first task must carry one; a chord drops the one it is
    called with but passes its options on to its header."""
    if isinstance(sig, _chord):
        sig.set(producer=rec)
        _arm(sig.tasks, rec)
        _arm(sig.body, rec)
    elif isinstance(sig, (_chain, group, list, tuple)):
        for task in (sig if isinstance(sig, (list, tuple)) else sig.tasks):
            _arm(task, rec)
    else:
        sig.set(producer=rec)


def _record(app, sig: Signature, expected: int) -> list[tuple[Any, dict]]:
    """What ``sig.apply_async()`` hands to kombu, recorded (nothing reaches the broker).

    Every message Celery publishes passes the ``before_task_publish`` signal. If one of the
    template's went out through another producer than the recorder (a Celery whose canvas passes
    producers on differently), it is taken back out of its queue (a placeholder image of a run
    that does not exist would be retried for ever) and the template is refused; the tests hold
    that this Celery sends none past the recorder."""
    from celery.signals import before_task_publish

    conn = app.connection_for_write()
    seen: list[tuple[str, str, int]] = []  # (queue, task id, priority) of the template's messages

    def count(sender=None, headers=None, routing_key=None, properties=None, **_: object) -> None:
        headers = headers or {}
        if IMAGE_P in str(headers.get("argsrepr")):  # ours, not another thread's (producer run's worker)
            seen.append((str(routing_key), str(headers.get("id")), int((properties or {}).get("priority") or 0)))

    before_task_publish.connect(count, weak=False)
    try:
        rec = _Recorder(conn)
        _arm(sig, rec)
        if isinstance(sig, (_chord, _chain)):
            sig.apply_async()
        else:
            sig.apply_async(producer=rec)
    finally:
        before_task_publish.disconnect(count)
        conn.release()
    recorded = {kw["headers"]["id"] for _, kw in rec.sent}
    leaked = [s for s in seen if s[1] not in recorded]
    if leaked:
        taken = _take_back(app, leaked)
        log.error("recording %r: Celery published %d of the template's messages past the recorder (%d taken "
                  "back out of the queue)", sig, len(leaked), taken)
        raise TemplateError(f"Celery published {len(leaked)} message(s) past the recorder")
    if len(rec.sent) != expected:
        raise TemplateError(f"recorded {len(rec.sent)} messages for {sig!r}, expected {expected}")
    return [(_plain(body, rec), _plain(kwargs, rec)) for body, kwargs in rec.sent]


def _take_back(app, leaked: list[tuple[str, str, int]], near_head: int = 1000) -> int:
    """Remove the messages ``(queue, task id, priority)`` just published from their Redis lists
    (an LPUSH puts them at the head, so the first ``near_head`` entries are searched)."""
    taken = 0
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        client = channel.client
        for queue, task_id, priority in leaked:
            key = channel._q_for_pri(queue, channel.priority(priority))
            for raw in client.lrange(key, 0, near_head - 1):
                try:
                    if json.loads(raw).get("headers", {}).get("id") == task_id:
                        taken += client.lrem(key, 1, raw)
                        break
                except (ValueError, AttributeError):
                    continue
    return taken


def _plain(obj: Any, drop: object) -> Any:
    """``obj`` as plain dicts/lists/tuples (Signatures are dicts to kombu's JSON), without the
    recorder that ``.set(producer=...)`` left in embedded options."""
    if isinstance(obj, dict):
        return {k: _plain(v, drop) for k, v in obj.items() if v is not drop}
    if isinstance(obj, list):
        return [_plain(v, drop) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v, drop) for v in obj)
    return obj


def _uuids(obj: Any, out: list[str]) -> list[str]:
    """Every uuid-shaped string in ``obj``, in order of first appearance."""
    if isinstance(obj, dict):
        for v in obj.values():
            _uuids(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _uuids(v, out)
    elif isinstance(obj, str) and _UUID.match(obj) and obj not in out:
        out.append(obj)
    return out


#: A copy of a recorded structure: ``(obj, values)`` -> obj with the stand-ins replaced.
Copier = Callable[[dict], Any]


def _compile(obj: Any, slots: dict, path: str = "") -> Copier | None:
    """A function copying ``obj`` with its stand-ins replaced (from ``values``), or None when
    ``obj`` holds none (it is then shared by every message: kombu only reads it)."""
    if isinstance(obj, dict):
        parts = {k: _compile(v, slots, f"{path}.{k}") for k, v in obj.items()}
        if all(p is None for p in parts.values()):
            return None
        items = [(k, p, obj[k]) for k, p in parts.items()]
        return lambda values: {k: (v if p is None else p(values)) for k, p, v in items}
    if isinstance(obj, (list, tuple)):
        parts_l = [_compile(v, slots, f"{path}[{i}]") for i, v in enumerate(obj)]
        if all(p is None for p in parts_l):
            return None
        kind = type(obj)
        pairs = list(zip(parts_l, obj, strict=True))
        return lambda values: kind(v if p is None else p(values) for p, v in pairs)
    if type(obj) is int and obj == OFFSET_P:
        return lambda values: values[OFFSET_P]
    if isinstance(obj, str):
        if obj in slots:
            return lambda values, key=obj: values[key]
        if any(s in obj for s in slots if isinstance(s, str)) or str(OFFSET_P) in obj:
            raise TemplateError(f"a stand-in inside the string {obj!r} at {path or 'top'}")
    return None


def _take_chord_sizes(backend, recording: list[tuple[Any, dict]]) -> list[tuple[str, int]]:
    """``[(group id, size)]`` for the chords of a recording, as the result backend set them
    (``set_chord_size``); the keys are deleted (no image will ever join them)."""
    sizes = []
    for gid in dict.fromkeys(kw["headers"]["group"] for body, kw in recording if body[2].get("chord") is not None):
        size = backend.pop_chord_size(gid)
        if size is None:
            raise TemplateError(f"no chord size was set for the template's group {gid}")
        sizes.append((gid, size))
    return sizes


@dataclass
class _Message:
    body: Copier
    headers: Copier
    kwargs: dict  # ``declare`` and ``retry_policy``, the same for every image
    props: Copier  # the other publish kwargs (properties, routing)


class CanvasTemplate:
    """The messages of one canvas shape, ready to instantiate per image."""

    def __init__(self, app, make: Callable[[str, str, int], Signature], expected: int) -> None:
        """``make(run_ref, image_id, offset)`` builds the canvas (``publish.canvas`` for one step
        list); ``expected`` is how many messages it publishes."""
        from worker.result_backend import RefexpRedisBackend

        backend = app.backend
        if not isinstance(backend, RefexpRedisBackend):
            raise TemplateError(f"result backend {type(backend).__name__} is not refexp's Redis backend")
        first = _record(app, make(RUN_P, IMAGE_P, OFFSET_P), expected)
        second = _record(app, make(RUN_P, IMAGE_P, OFFSET_P), expected)
        ids_a, ids_b = _uuids(first, []), _uuids(second, [])
        if len(ids_a) != len(ids_b):
            raise TemplateError("two recordings of one canvas differ in shape")
        fresh = [a for a, b in zip(ids_a, ids_b, strict=True) if a != b]
        # Celery set both recordings' chord sizes: keep the first's sizes, delete both's keys.
        self._chords = _take_chord_sizes(backend, first)
        _take_chord_sizes(backend, second)
        self._backend = backend
        self._fresh = fresh
        self._argsrepr_max = app.amqp.argsrepr_maxsize
        self._check_argsrepr()
        slots = {RUN_P: RUN_P, IMAGE_P: IMAGE_P, ARGSREPR_P: ARGSREPR_P, **{u: u for u in fresh}}
        self._messages: list[_Message] = []
        for body, kwargs in first:
            headers = dict(kwargs["headers"])
            args = body[0]
            if args != (RUN_P, IMAGE_P, OFFSET_P) or headers.get("argsrepr") != saferepr(args, self._argsrepr_max):
                raise TemplateError(f"args {body[0]!r} / argsrepr {headers.get('argsrepr')!r}: not the image's")
            headers["argsrepr"] = ARGSREPR_P  # Celery's saferepr of the image's args, per image
            rest = {k: v for k, v in kwargs.items() if k != "headers"}
            props = {k: v for k, v in rest.items() if k not in ("declare", "retry_policy")}
            static = {k: v for k, v in rest.items() if k in ("declare", "retry_policy")}
            body_c = _compile(body, slots, "body")
            headers_c = _compile(headers, slots, "headers")
            if body_c is None or headers_c is None:
                raise TemplateError("a recorded message carries none of the image's values")
            self._messages.append(_Message(body_c, headers_c, static, _compile(props, slots, "kwargs")
                                           or (lambda values, p=props: dict(p))))

    def instantiate(self, run_ref: str, image_id: str, offset: int) -> tuple[list[tuple[str, int]],
                                                                            list[tuple[Any, dict]]]:
        """``(chord sizes, messages)`` for one image: ``[(group id, size)]`` to set before the
        messages go out, and ``[(body, publish kwargs)]`` for ``kombu.Producer.publish``."""
        values: dict = {RUN_P: run_ref, IMAGE_P: image_id, OFFSET_P: offset,
                        ARGSREPR_P: self._argsrepr(run_ref, image_id, offset)}
        for u in self._fresh:
            values[u] = str(_uuid.uuid4())
        out = []
        for m in self._messages:
            body = m.body(values)
            kwargs = m.props(values)
            kwargs["headers"] = m.headers(values)
            kwargs["declare"] = list(m.kwargs["declare"])
            kwargs["retry_policy"] = m.kwargs["retry_policy"]
            out.append((body, kwargs))
        return [(values[gid], size) for gid, size in self._chords], out

    def _argsrepr(self, run_ref: str, image_id: str, offset: int) -> str:
        """Celery's ``saferepr`` of the args (``argsrepr``), spelled out for the one case we send,
        two strings and an int well under the length limit (a tenth of an image's cost in
        ``saferepr``'s streaming repr); ``saferepr`` itself otherwise. Checked against
        ``saferepr`` when the template is built (``_check_argsrepr``)."""
        if type(run_ref) is str and type(image_id) is str and type(offset) is int:
            run_q, image_q = run_ref.replace("'", _ESCAPED_QUOTE), image_id.replace("'", _ESCAPED_QUOTE)
            text = f"('{run_q}', '{image_q}', {offset})"
            if len(text) < self._argsrepr_max - 16:
                return text
        return saferepr((run_ref, image_id, offset), self._argsrepr_max)

    def _check_argsrepr(self) -> None:
        for args in ((RUN_P, IMAGE_P, OFFSET_P), ("r:h", "it's \\ \"odd\" ünï", -1), ("a" * 40, "b" * 900, 7)):
            if self._argsrepr(*args) != saferepr(args, self._argsrepr_max):
                raise TemplateError(f"argsrepr of {args!r} differs from Celery's saferepr")

    def set_chord_sizes(self, pipe, chords: list[tuple[str, int]]) -> None:
        """Queue on ``pipe`` (the result backend's client) what ``set_chord_size`` writes per
        chord (worker/result_backend.py: one ``SET`` of its bit string, with the chord expiry)."""
        for gid, size in chords:
            self._backend.queue_chord_size(pipe, gid, size)


def expected_messages(sig: Signature) -> int:
    """How many messages ``sig.apply_async()`` publishes: one per header task of a chord or
    group, one for a chain or a single task."""
    if isinstance(sig, _chord):
        return len(sig.tasks)
    if isinstance(sig, group):
        return len(sig.tasks)
    return 1
