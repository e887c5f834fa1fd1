"""Sorting ``(key, value)`` pairs by key in bounded memory: sorted runs spilled to temp files,
merged with ``heapq.merge``.

Why: finalize, reindex and seeding need the records of a run in image-id order (or the last
record per image), and a run may hold tens of millions of images; an in-memory dict or sorted
list of them all grows with N (~100 B per image), so each of them sorts through this instead.
Memory is one chunk of pairs while sorting plus one batch per run while merging, and runs are
merged at most ``FAN_IN`` at a time (more runs are first merged into fewer, pass by pass), so
the merge holds at most ``FAN_IN`` batches whatever N: a merge of every run at once held one
batch (~300 KB) per run, which grows with N / chunk (a reindex at 1M images, five sorts side by
side with a fifth of a chunk each, held 250 of them, ~70 MB, and ten times that at 10M).
"""

from __future__ import annotations

import heapq
import itertools
import pickle
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

CHUNK = 100_000  # pairs sorted in memory at a time (~15 MB of short ids and ints)
BATCH = 2_048  # pairs per pickle in a run file: what one run holds in memory while merging
FAN_IN = 16  # runs merged at once: a merge holds FAN_IN batches (~5 MB of short ids and ints)

Pair = tuple[str, Any]  # (key, value): an image id and an offset, a line number or a file name


class SortedPairs:
    """``pairs`` sorted by ``(key, value)``; iterate it as often as needed.

    Runs live in a private temp dir under ``workdir`` (default: the system's temp dir) until
    ``close``; pairs that fit in one chunk stay in memory and write nothing.
    """

    def __init__(self, pairs: Iterable[Pair] = (), workdir: Path | None = None, *, chunk: int | None = None):
        self._dir: Path | None = None
        self._workdir = workdir
        self._chunk = chunk or CHUNK
        self._runs: list[Path] = []
        self._made = 0  # run files written so far (their names)
        self._buf: list[Pair] = []
        self.count = 0
        try:
            for pair in pairs:
                self.add(pair)
        except BaseException:  # a listing that fails midway leaves no spilled runs behind
            self.close()
            raise

    def add(self, pair: Pair) -> None:
        """One more pair (before iterating)."""
        self._buf.append(pair)
        self.count += 1
        if len(self._buf) >= self._chunk:
            self._spill(self._buf)
            self._buf = []

    def extend(self, pairs: list[Pair]) -> None:
        """Many more pairs at once (before iterating): one call per batch, not per pair. The
        sort is total, so where the chunks end does not change what iterating gives."""
        self._buf += pairs
        self.count += len(pairs)
        while len(self._buf) >= self._chunk:  # runs of one chunk each, as ``add`` spills them
            self._spill(self._buf[:self._chunk])
            self._buf = self._buf[self._chunk:]

    def _spill(self, buf: list[Pair]) -> None:
        buf.sort()
        self._runs.append(self._write_run(buf))

    def _write_run(self, pairs: Iterable[Pair]) -> Path:
        """A run file of sorted ``pairs``, written in pickles of ``BATCH`` pairs."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=".sort-", dir=self._workdir))
        self._made += 1
        path = self._dir / f"run-{self._made:05d}"
        try:
            with open(path, "wb") as f:
                it = iter(pairs)
                while batch := list(itertools.islice(it, BATCH)):
                    pickle.dump(batch, f, protocol=pickle.HIGHEST_PROTOCOL)
        except BaseException:  # a full disk: no half-written run left behind
            path.unlink(missing_ok=True)
            raise
        return path

    def _fewer_runs(self) -> None:
        """Merge the runs ``FAN_IN`` at a time until at most ``FAN_IN`` are left (one more pass
        over the pairs per factor of ``FAN_IN``), so iterating holds ``FAN_IN`` batches."""
        while len(self._runs) > FAN_IN:
            merged: list[Path] = []
            for i in range(0, len(self._runs), FAN_IN):
                group = self._runs[i:i + FAN_IN]
                merged.append(group[0] if len(group) == 1 else self._write_run(heapq.merge(*map(_read_run, group))))
                if len(group) > 1:
                    for path in group:
                        path.unlink(missing_ok=True)
            self._runs = merged

    def __iter__(self) -> Iterator[Pair]:
        if self._runs and self._buf:  # spilled already: the last, partial chunk goes too, so a
            self._spill(self._buf)     # sort held for later (finalize keeps one per step) holds no pairs
            self._buf = []
        self._buf.sort()
        if not self._runs:
            return iter(self._buf)
        self._fewer_runs()
        return heapq.merge(*(_read_run(p) for p in self._runs), self._buf)

    def close(self) -> None:
        for path in self._runs:
            path.unlink(missing_ok=True)
        if self._dir is not None:  # with any run a merge that failed midway left unlisted
            shutil.rmtree(self._dir)
        self._runs, self._buf, self._dir = [], [], None

    def __enter__(self) -> SortedPairs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_run(path: Path) -> Iterator[Pair]:
    with open(path, "rb") as f:
        while True:
            try:
                batch = pickle.load(f)
            except EOFError:
                return
            yield from batch


def last_per_key(pairs: Iterable[Pair]) -> Iterator[Pair]:
    """The last pair of each key in sorted pairs: with sink offsets as values, the newest record."""
    it = iter(pairs)
    prev = next(it, None)
    if prev is None:
        return
    for pair in it:
        if pair[0] != prev[0]:
            yield prev
        prev = pair
    yield prev


class Cursor:
    """Walks a sorted pair stream alongside another one (a merge join on the key)."""

    _END = object()

    def __init__(self, pairs: Iterable[Pair]):
        self._it = iter(pairs)
        self._head: object = next(self._it, self._END)

    def take(self, key: str) -> list[Any]:
        """The values of ``key`` (none if absent), skipping smaller keys; keys asked must grow."""
        out = []
        while self._head is not self._END and self._head[0] <= key:  # type: ignore[index]
            k, v = self._head  # type: ignore[misc]
            if k == key:
                out.append(v)
            self._head = next(self._it, self._END)
        return out
