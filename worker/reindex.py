"""A reindex's writes into Redis: the done index rebuilt from the sinks, swapped in whole.

``producer.submit.reindex`` reads every step sink and the seed's ordinals, merged by image id,
and hands each image-step here: an offset (``done``) or, for an image done in every step of the
run, a bit (``bit``). They go to temp keys, and ``commit`` swaps them in step by step, carrying
over the done marks workers set while the sinks were read. Kept apart from ``worker.runstate``
(what a task does to the index) since only the producer rebuilds it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

from worker.keys import run_key
from worker.runstate import BITS, REINDEXING, REINDEXING_TTL, Outcome, RunState

#: Given ``(image_id, offset)`` pairs, yields ``(image_id, offset, seed ordinal or None)`` for each.
OrdinalsOf = Callable[[Iterable[tuple[str, int]]], Iterator[tuple[str, int, "int | None"]]]


class IndexRebuild:
    """A reindex's writes: done entries and bits go to temp keys, swapped in by ``commit``.

    Creating one sets the ``reindexing`` key (so no settle moves an image to the bitmaps while
    the sinks are read: a bit set then would be lost in the swap, its offsets dropped with it);
    ``commit`` removes it, and with it the moves still pending in the ``tally`` list
    (``RunState.drop_moves``): they were written for the old index, and an ``unpack_bits``
    must not see its offsets turn back into bits. The key expires on its own should the
    producer die midway."""

    def __init__(self, state: RunState, steps: list[int], batch: int = 1000):
        self.state, self.steps, self.batch = state, steps, batch
        self.flag = run_key(state.run_id, REINDEXING)
        self.r = state.r
        self._done: dict[int, dict[str, int]] = {s: {} for s in steps}
        self._bits: dict[int, list[int]] = {s: [] for s in steps}
        self.written = dict.fromkeys(steps, 0)
        pipe = self.r.pipeline()
        pipe.set(self.flag, 1, ex=REINDEXING_TTL)
        for s in steps:
            pipe.delete(self._tmp(Outcome.DONE, s), self._tmp(BITS, s))
        pipe.execute()

    def _tmp(self, kind: str, step: int) -> str:
        return f"{run_key(self.state.run_id, kind, step)}:reindex"

    def done(self, step: int, image_id: str, offset: int) -> None:
        """The image-step is done, its record at ``offset``."""
        self._done[step][image_id] = offset
        if len(self._done[step]) >= self.batch:
            self._flush(step)

    def bit(self, step: int, ordinal: int) -> None:
        """The image (done in every step of the run) is done in ``step``: its bit."""
        self._bits[step].append(ordinal)
        if len(self._bits[step]) >= self.batch:
            self._flush(step)

    def _flush(self, step: int) -> None:
        pipe = self.r.pipeline(transaction=False)
        if self._done[step]:
            pipe.hset(self._tmp(Outcome.DONE, step), mapping=self._done[step])
        if self._bits[step]:
            pipe.execute_command("BITFIELD", self._tmp(BITS, step),
                                 *[a for o in self._bits[step] for a in ("SET", "u1", o, 1)])
        pipe.set(self.flag, 1, ex=REINDEXING_TTL)  # a long rebuild keeps its flag
        pipe.execute()
        self.written[step] += len(self._done[step]) + len(self._bits[step])
        self._done[step], self._bits[step] = {}, []

    def commit(self, still_there: dict[int, Callable[[str, int], bool]],
               ordinals_of: OrdinalsOf | None = None) -> dict[int, int]:
        """Swap the rebuilt index in, step by step; returns the entries and bits written per
        step. Done entries a worker set while the sinks were read are carried over (see
        ``RunState.replace_done``), except those of images the rebuild made bits: an image is
        a bit or an entry, never both (status adds ``HLEN`` and ``BITCOUNT``). Telling them
        needs the ordinals of the entries the rebuild did not write: ``ordinals_of`` (given
        when the rebuild made bits) joins them with the seed's."""
        out = {}
        for step in self.steps:
            self._flush(step)
            out[step] = self.written[step] + self._carry_over(step, still_there.get(step), ordinals_of)
        self.state.drop_moves()  # with the flag: moves written before the rebuild are void
        return out

    def abort(self) -> None:
        """Give the rebuild up (the sinks could not be read): the old index stays as it was,
        and settling moves images to the bitmaps again."""
        pipe = self.r.pipeline()
        for s in self.steps:
            pipe.delete(self._tmp(Outcome.DONE, s), self._tmp(BITS, s))
        pipe.delete(self.flag)
        pipe.execute()

    def _carry_over(self, step: int, still_there: Callable[[str, int], bool] | None,
                    ordinals_of: OrdinalsOf | None = None) -> int:
        key, tmp = run_key(self.state.run_id, Outcome.DONE, step), self._tmp(Outcome.DONE, step)
        bits, tmp_bits = run_key(self.state.run_id, BITS, step), self._tmp(BITS, step)
        kept: dict[str, int] = {}
        added = 0

        def keep(image_id: str, offset: int, fresh: bool) -> None:
            nonlocal added
            if still_there is not None and still_there(image_id, offset):
                kept[image_id] = offset
                added += fresh
                if len(kept) >= self.batch:
                    self.r.hset(tmp, mapping=kept)
                    kept.clear()

        def unindexed() -> Iterator[tuple[str, int]]:
            """The old entries of images the rebuild wrote no entry for (newer ones kept here)."""
            old = self.r.hscan_iter(key, count=self.batch)
            while chunk := [(k.decode(), int(v)) for k, v in itertools.islice(old, self.batch)]:
                rebuilt = self.r.hmget(tmp, [k for k, _ in chunk])
                for (image_id, offset), new in zip(chunk, rebuilt, strict=True):
                    if new is None:
                        yield image_id, offset
                    elif offset > int(new):
                        keep(image_id, offset, False)

        if ordinals_of is None or not self.r.exists(tmp_bits):
            for image_id, offset in unindexed():
                keep(image_id, offset, True)
        else:
            joined = ordinals_of(unindexed())
            while chunk := list(itertools.islice(joined, self.batch)):
                known = [o for _, _, o in chunk if o is not None]
                got = iter(self.r.execute_command("BITFIELD", tmp_bits, *[a for o in known for a in ("GET", "u1", o)])
                           if known else [])
                for image_id, offset, ordinal in chunk:
                    if ordinal is None or not next(got):  # a bit: done, its record found in the sink
                        keep(image_id, offset, True)
        if kept:
            self.r.hset(tmp, mapping=kept)
        pipe = self.r.pipeline()
        if self.r.exists(tmp):
            pipe.rename(tmp, key)
        else:
            pipe.delete(key)
        if self.r.exists(tmp_bits):
            pipe.rename(tmp_bits, bits)
        else:
            pipe.delete(bits)
        pipe.execute()
        return added
