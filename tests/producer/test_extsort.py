"""The external sort (producer/extsort.py): sorted whatever the number of runs, and a merge that
holds a bounded number of runs open whatever N (finalize and reindex sort every image's pairs)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from producer.extsort import FAN_IN, SortedPairs, last_per_key


def _open_runs(sort_dir: Path) -> int:
    """Run files of ``sort_dir`` this process holds open (what a merge holds a batch of each)."""
    fds = Path("/proc/self/fd")
    targets = (os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink())
    return sum(1 for t in targets if t.startswith(str(sort_dir)))


def test_many_runs_merge_sorted_with_at_most_fan_in_runs_open(tmp_path):
    rng = random.Random(7)
    pairs = [(f"img{rng.randrange(5000):05d}", i) for i in range(3000)]
    with SortedPairs(pairs, tmp_path, chunk=8) as sort:
        assert len(sort._runs) == 3000 // 8 > FAN_IN * FAN_IN  # two passes of merging before the last
        it = iter(sort)
        first = next(it)
        (sort_dir,) = tmp_path.iterdir()
        assert _open_runs(sort_dir) <= FAN_IN, "the merge holds a batch of every run open"
        assert len(list(sort_dir.iterdir())) <= FAN_IN, "runs merged into fewer are removed"
        assert [first, *it] == sorted(pairs)
        assert list(sort) == sorted(pairs)  # iterated again: the same
        assert list(last_per_key(sort)) == sorted(dict(sorted(pairs)).items())
    assert not list(tmp_path.iterdir())  # closed: nothing left


def test_a_sort_with_few_runs_is_not_merged_twice(tmp_path):
    pairs = [(f"k{i % 37:02d}", i) for i in range(100)]
    with SortedPairs(pairs, tmp_path, chunk=10) as sort:
        runs = list(sort._runs)
        assert list(sort) == sorted(pairs)
        assert sort._runs[:len(runs)] == runs  # FAN_IN or fewer: read as written
