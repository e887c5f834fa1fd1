"""Sorting ``(key, value)`` pairs by key in bounded memory: sorted runs spilled to temp files,
merged with ``heapq.merge``.

Why: finalize, reindex and seeding need the records of a run in image-id order (or the last
record per image), and a run may hold tens of millions of images; an in-memory dict or sorted
list of them all grows with N (~100 B per image), so each of them sorts through this instead.
Memory is one chunk of pairs while sorting plus one batch per run while merging.
"""

from __future__ import annotations

import heapq
import os
import pickle
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

CHUNK = 100_000  # pairs sorted in memory at a time (~15 MB of short ids and ints)
BATCH = 2_048  # pairs per pickle in a run file: what one run holds in memory while merging

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
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=".sort-", dir=self._workdir))
        buf.sort()
        path = self._dir / f"run-{len(self._runs):05d}"
        with open(path, "wb") as f:
            for i in range(0, len(buf), BATCH):
                pickle.dump(buf[i:i + BATCH], f, protocol=pickle.HIGHEST_PROTOCOL)
        self._runs.append(path)

    def __iter__(self) -> Iterator[Pair]:
        if self._runs and self._buf:  # spilled already: the last, partial chunk goes too, so a
            self._spill(self._buf)     # sort held for later (finalize keeps one per step) holds no pairs
            self._buf = []
        self._buf.sort()
        if not self._runs:
            return iter(self._buf)
        return heapq.merge(*(_read_run(p) for p in self._runs), self._buf)

    def close(self) -> None:
        for path in self._runs:
            path.unlink(missing_ok=True)
        if self._dir is not None:
            os.rmdir(self._dir)
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
