"""``producer finalize``: ``annotations.jsonl`` from the sinks, one record per image, sorted,
and each step's TAO-layout file merged down to one line per image.

Works from the files alone (no Redis), in bounded memory at any number of images: the seed ids,
the failures and each step's ``(image_id, offset)`` pairs are sorted externally
(``producer.extsort``: runs spilled to a temp dir in ``results_dir``) and walked side by side
by image id, reading each record at its offset; nothing holds a map of every image.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

from orjson import loads as orjson_loads

from producer.extsort import Cursor, SortedPairs, last_per_key
from producer.seed import iter_seed
from producer.summary import FinalizeReport, write_summary
from producer.usage import call_counts, call_of, call_sums, usage_summary
from worker import stepdefs
from worker.layout import Layout
from worker.sinks import (
    _OFFSET_MASK,
    JsonlSink,
    SinkReader,
    _lines,
    dumps_line,
    encode_offset,
    loads,
    loads_marked,
)
from worker.stepdefs import ALL_STEPS
from worker.steps import final_record
from worker.steps.records import PIPELINE_NAMES, deterministic

T = TypeVar("T")
ANY_STEP = -1  # a failure that counts whatever is done (seeding, or a step not in the final record)


LISTED = 10_000  # image ids a report keeps of the failed and of the missing (the counts are whole)


def _failure_pairs(layout: Layout, final_steps: list[int]) -> Iterator[tuple[str, int]]:
    """``(image_id, step)`` per failure line; a failure of a step outside the final record (or
    of seeding) counts as ``ANY_STEP``: it fails the image whatever is done."""
    for _, rec in layout.failures.scan():
        step = rec.get("step")
        yield str(rec["image_id"]), step if isinstance(step, int) and step in final_steps else ANY_STEP


def _scan_step(root: str, step: int, workdir: str, count_bad: bool, with_usage: bool,
               ) -> tuple[SortedPairs, dict, int]:
    """One step sink read once: its ``(image_id, offset)`` pairs sorted, the usage of every
    line plus what earlier finalizes carried, and its bad lines (when ``count_bad``). Runs in a
    pool process for a large run (``_pool``): the lines are parsed in parallel, one sink each.
    ``JsonlSink.scan``'s loop written out here: it runs once per line of every step."""
    sink = Layout(Path(root)).sink(step)
    usage = dict(sink.carried_usage()) if with_usage else {}
    name = PIPELINE_NAMES[step]
    calls: list[dict | None] = []  # the lines' ``call`` entries only: holding whole records costs more
    pairs: list[tuple[str, int]] = []
    sorted_pairs = SortedPairs((), Path(workdir))
    bad = 0
    try:
        for part, path in sink.files():
            base = encode_offset(part, 0)
            offset = 0
            for line in _lines(path):
                start, offset = offset, offset + len(line)
                if start > _OFFSET_MASK:
                    encode_offset(part, start)  # raises, as JsonlSink.scan does
                # ``_parse`` written out
                try:
                    rec = orjson_loads(line)
                except ValueError:
                    try:
                        rec = loads(line)  # what orjson refuses and ``json`` takes
                    except ValueError:
                        rec = None
                if line[-1:] != b"\n" or not isinstance(rec, dict) or "image_id" not in rec:
                    bad += 1
                    continue
                if with_usage:
                    calls.append(((rec.get("meta") or {}).get(name) or {}).get("call"))
                    if len(calls) >= USAGE_BATCH:
                        _add(usage, call_sums(calls))
                        calls.clear()
                pairs.append((str(rec["image_id"]), base + start))
                if len(pairs) >= PAIR_BATCH:
                    sorted_pairs.extend(pairs)
                    pairs.clear()
        sorted_pairs.extend(pairs)
    except BaseException:
        sorted_pairs.close()
        raise
    _add(usage, call_sums(calls) if with_usage else {})
    iter(sorted_pairs)  # spills the last chunk of a large sort: nothing held until it is read
    return sorted_pairs, usage, bad if count_bad else 0


# The usage of a step's lines is summed per batch of this many lines and the batch sums added
# up: the same grouping as ever, so the latency's float total is the same to the last bit.
USAGE_BATCH = 4096
DROPPED_BATCH = 1000  # the same for the lines a merge leaves out
PAIR_BATCH = 4096


def _scan_and_merge(root: str, step: int, workdir: str, count_bad: bool, with_usage: bool,
                    generation: int | None) -> tuple[dict, int, int]:
    """A step that is not in the final record: read (``_scan_step``) and, when it was on disk
    as the parts were frozen (``generation``), merged, in one pool job (its pairs never travel
    back to the parent); its usage, bad lines and lines in its merged file."""
    pairs, usage, bad = _scan_step(root, step, workdir, count_bad, with_usage)
    if generation is None:  # it came to exist during this finalize: merged next time
        pairs.close()
        return usage, bad, 0
    return usage, bad, _compact(Layout(Path(root)).sink(step), step, pairs, generation)


PARALLEL_BYTES = 64 << 20  # step sinks at least this big are read by a pool of processes


@contextlib.contextmanager
def _pool(layout: Layout, sinks: dict[int, JsonlSink]) -> Iterator[ProcessPoolExecutor | None]:
    """A process per core for the per-step work of a large run, else None (all in this one):
    parsing every line is most of finalize's time, and each step sink is read on its own.
    Spawned, not forked: the producer may hold threads (publishers, a Redis client)."""
    cores = min(len(sinks), os.cpu_count() or 1)
    size = sum(path.stat().st_size for sink in sinks.values() for _, path in sink.files() if path.exists())
    if cores < 2 or size < PARALLEL_BYTES:
        yield None
        return
    with ProcessPoolExecutor(max_workers=cores, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def _submit(pool: ProcessPoolExecutor | None, fn: Callable[..., T], *args: object) -> Callable[[], T]:
    """``fn(*args)`` in the pool (its result when called), or here and now without one."""
    if pool is None:
        result = fn(*args)
        return lambda: result
    return pool.submit(fn, *args).result


def finalize(layout: Layout, steps: list[int], prices: dict | None = None, *,
             seed_failed: int = 0) -> FinalizeReport:
    """Write ``annotations.jsonl``: one record per image (the last step's), sorted by image_id,
    and merge each step sink (main file and parts) into its main file, one line per image.

    Images that failed are listed, not emitted; images with no final record and no failure are
    reported as missing. Records keep their per-call token usage but not its latency (the step
    sinks keep that), so two runs of the same data give the same bytes. ``report.usage`` sums
    the step sinks' token usage (``prices`` adds the cost). Leaves ``summary.json``
    (``producer/summary.py``): what ``status`` shows once a local run is gone.

    Run it on a settled run: a worker appending meanwhile is safe (its part is frozen, and it
    takes a new one), but the done index in Redis then holds offsets into merged parts, which
    ``read_at`` refuses (``StaleOffset``): a task then finds the record again
    (``execute.read_upstream``) and the next enqueue reindexes (``submit.register``).
    The files are written to temp files and renamed, under a lock (``finalize_lock``), so
    readers never see half of one; temp files a killed finalize left behind are removed first.
    """
    with finalize_lock(layout):
        report = FinalizeReport(path=layout.final, seed_failed=seed_failed)
        report.stale_removed = remove_stale_temps(layout)
        final_steps = stepdefs.final_steps(steps)
        sinks = {s: layout.sink(s) for s in ALL_STEPS if s in final_steps or layout.sink(s).exists()}
        # The merged files' generations are reserved *before* the parts are frozen: a writer
        # that opens a part from now on numbers it above its sink's merged generation, so that
        # part is never taken for one this merge holds (and later records win in every reader).
        generations = {s: sink.reserve_generation() for s, sink in sinks.items() if sink.exists()}
        for s, sink in sinks.items():
            sink.freeze(keep=generations.get(s))
        with tempfile.TemporaryDirectory(prefix=_sort_prefix(layout), dir=layout.root) as tmpdir, \
                _pool(layout, sinks) as pool:
            root = str(layout.root)
            # The final steps' sinks are read first, in the pool, while this process sorts the
            # seed and the failures; it then writes the final file (merging the final steps'
            # files in the same pass) while the pool reads and merges each other step in one job.
            jobs = {s: _submit(pool, _scan_step, root, s, tmpdir, True, s in steps) for s in final_steps}
            others = {s: _submit(pool, _scan_and_merge, root, s, tmpdir, False, s in steps, generations.get(s))
                      for s in sinks if s not in final_steps}
            seed, failures = _sort_ids(root, tmpdir, final_steps)
            usage = {s: call_counts((), s) for s in steps}
            latest: dict[int, SortedPairs] = {}
            try:
                for s, job in jobs.items():
                    latest[s], counts, bad = job()
                    if s not in generations:  # it came to exist during this finalize: merged next time
                        latest[s].close()
                    _add(usage[s], counts)
                    report.bad_lines += bad
            except BaseException:
                for pairs in latest.values():
                    pairs.close()
                seed.close()
                failures.close()
                raise
            report.compacted.update(_write_final(layout, steps, final_steps, sinks, latest, seed, failures, report,
                                                 {s: generations[s] for s in final_steps if s in generations}))
            for s, other in others.items():
                counts, _, lines = other()
                if s in usage:
                    _add(usage[s], counts)
                if s in generations:
                    report.compacted[s] = lines
            report.compacted = dict(sorted(report.compacted.items()))
        per_step = {s: {"images": report.compacted.get(s, 0), **usage[s]} for s in steps}
    report.usage = usage_summary(per_step, prices)
    write_summary(layout, report)
    return report


def _sort_ids(root: str, workdir: str, final_steps: list[int]) -> tuple[SortedPairs, SortedPairs]:
    """The seed's image ids and the failures' ``(image_id, step)``, each sorted."""
    layout = Layout(Path(root))
    seed = SortedPairs(((str(rec["image_id"]), off) for off, rec in iter_seed(layout.seed)), Path(workdir))
    failures = SortedPairs(_failure_pairs(layout, final_steps), Path(workdir))
    iter(seed), iter(failures)  # spill the last chunk of a large sort (see _scan_step)
    return seed, failures


def _write_final(layout: Layout, steps: list[int], final_steps: list[int], sinks: dict[int, JsonlSink],
                 latest: dict[int, SortedPairs], seed: SortedPairs, failures: SortedPairs,
                 report: FinalizeReport, generations: dict[int, int]) -> dict[int, int]:
    """``annotations.jsonl``: a merge join of the sorted seed ids, failures and step records.

    The final steps' files (``generations``: those on disk when the parts were frozen) are
    merged in the same pass (``_Merge``): each of their lines is read once, copied raw to the
    merged file and, for a seeded image, parsed for the final record. They replace the step
    files once the final file is in place; returns step -> lines in its merged file."""
    tmp = layout.root / f"{_tmp_prefix(layout)}{socket.gethostname()}-{os.getpid()}.tmp"
    # Built inside the try: a merge that cannot open its temp file (a full or read-only disk)
    # must not leave the ones opened before it behind.
    merging: dict[int, _Merge] = {}
    readers: dict = {}
    try:
        for s in final_steps:
            if s in generations:
                merging[s] = _Merge(sinks[s], s, latest[s], generations[s])
        cursors: dict[int, _Merge | Cursor] = {s: merging.get(s) or Cursor(last_per_key(latest[s]))
                                               for s in final_steps}
        for s in final_steps:
            if s not in merging:
                readers[s] = sinks[s].reader()
        failed = Cursor(failures)
        with open(tmp, "wb") as out:
            for image_id, _ in last_per_key(seed):
                found = {s: cursors[s].take(image_id) for s in final_steps}
                fails = failed.take(image_id)
                if not all(found.values()):
                    done = {s for s, got in found.items() if got}
                    if any(f == ANY_STEP or f not in done for f in fails):
                        report.n_failed += 1
                        if len(report.failed) < LISTED:
                            report.failed.append(image_id)
                    else:
                        report.n_missing += 1
                        if len(report.missing) < LISTED:
                            report.missing.append(image_id)
                    continue
                records, clean = {}, True
                for s in final_steps:
                    got = found[s]
                    line = got if isinstance(got, bytes) else readers[s].read_line_at(got[0])
                    records[s], read_by_orjson = loads_marked(line)
                    clean = clean and read_by_orjson
                out.write(dumps_line(deterministic(final_record(steps, records)), clean))
                report.written += 1
            out.flush()
            os.fsync(out.fileno())
        merged = {s: m.finish() for s, m in merging.items()}  # the rest of each step file, fsynced
        os.replace(tmp, layout.final)
        for m in merging.values():
            m.commit()
        return merged
    finally:
        for r in readers.values():
            r.close()
        for m in merging.values():
            m.close()
        for s, pairs in latest.items():
            if s not in merging:
                pairs.close()
        seed.close()
        failures.close()
        tmp.unlink(missing_ok=True)


class _Merge:
    """A step file merged down to one line per image while its sorted ``(image_id, offset)``
    pairs are walked: the last line of each image copied raw (byte for byte), sorted by image
    id, into a temp file that ``commit`` makes the main file as ``generation`` (reserved
    before the parts were frozen), dropping the merged parts. The lines left out were calls
    paid for: their usage is carried (``JsonlSink.carried_usage``)."""

    _END = ("", -1)

    def __init__(self, sink: JsonlSink, step: int, latest: SortedPairs, generation: int):
        self.sink, self.step, self.latest, self.generation = sink, step, latest, generation
        self.tmp = sink.path.with_name(f".{sink.path.name}.compact-{socket.gethostname()}-{os.getpid()}.tmp")
        self.lines = 0
        self._dropped: list[dict | None] = []  # the ``call`` entries of the lines left out
        self._dropped_usage = call_counts((), step)
        self._reader: SinkReader = sink.reader()
        try:
            self._out = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish or close
        except BaseException:
            self._reader.close()
            raise
        self._pairs = iter(latest)
        try:
            self._head = next(self._pairs, self._END)
        except BaseException:  # a spilled run unreadable: nothing of this merge stays behind
            self.close()
            raise

    def take(self, key: str | None) -> bytes | None:
        """Copy the lines of every image up to ``key`` (all that are left when None); the
        line of ``key`` itself when the step has one."""
        found = None
        head, pairs, end = self._head, self._pairs, self._END
        read, write = self._reader.read_line_at, self._out.write
        while head is not end and (key is None or head[0] <= key):
            nxt = next(pairs, end)
            if nxt is not end and nxt[0] == head[0]:  # a superseded record of the same image
                self._drop(head[1])
            else:
                line = read(head[1])
                write(line)
                self.lines += 1
                if head[0] == key:
                    found = line
            head = nxt
        self._head = head
        return found

    def _drop(self, offset: int) -> None:
        self._dropped.append(call_of(loads(self._reader.read_line_at(offset)), self.step))
        if len(self._dropped) >= DROPPED_BATCH:
            _add(self._dropped_usage, call_sums(self._dropped))
            self._dropped.clear()

    def finish(self) -> int:
        """The remaining lines copied and the temp file fsynced; lines in it."""
        self.take(None)
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        _add(self._dropped_usage, call_sums(self._dropped))
        self._dropped.clear()
        return self.lines

    def commit(self) -> None:
        """The merged file in place of the step's main file (after ``finish``)."""
        self.sink.replace_main(self.tmp, self.generation, {k: v for k, v in self._dropped_usage.items() if v})

    def close(self) -> None:
        """Everything of the merge released and its temp file removed, whatever failed: on a
        full disk closing the temp file flushes its buffer and raises again (the file is closed
        all the same), which must not keep the temp file from being removed."""
        try:
            with contextlib.suppress(OSError):
                self._out.close()
        finally:
            self._reader.close()
            self.tmp.unlink(missing_ok=True)
            self.latest.close()


def _compact(sink: JsonlSink, step: int, latest: SortedPairs, generation: int) -> int:
    """Rewrite the step's main file with the last record per image, sorted by image id (raw
    lines, byte for byte), replace it atomically as ``generation`` and drop the merged parts;
    lines written (``_Merge``, with no final file written beside it)."""
    merge = _Merge(sink, step, latest, generation)
    try:
        n = merge.finish()
        merge.commit()
        return n
    finally:
        merge.close()


def _add(total: dict, more: dict) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0) + v


# A finalize killed mid-write (Ctrl-C, OOM, a lost host) leaves its temp file, as big as the
# output; the next finalize removes it. Finalizes take a lock on the results dir (flock, which NFS
# maps to a byte-range lock, as the sinks do), so whoever holds it knows every temp file there is
# stale, whichever host wrote it; the host name and pid in the name say who did.

def _tmp_prefix(layout: Layout) -> str:
    return f".{layout.final.name}.finalize-"


def _sort_prefix(layout: Layout) -> str:
    return f".{layout.final.name}.sort-"


@contextlib.contextmanager
def finalize_lock(layout: Layout) -> Iterator[None]:
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.root / f".{layout.final.name}.finalize.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temps(layout: Layout) -> list[tuple[str, int]]:
    """Remove the temp files earlier finalizes left in ``results_dir`` (call it holding the
    finalize lock); returns ``(name, bytes)`` of each."""
    removed = []
    prefix = _tmp_prefix(layout)
    # Finalizes before the host name was in the name left ``.annotations.jsonl.<pid>.tmp``.
    old = re.compile(rf"\.{re.escape(layout.final.name)}\.\d+\.tmp")
    sort_prefix = _sort_prefix(layout)
    # ``submit.reindex`` spills to ``.reindex-*`` holding this same lock: any there now is stale.
    reindex_prefix = ".reindex-"
    candidates = list(layout.root.iterdir())
    for step in ALL_STEPS:  # a killed merge of a step file leaves ``.annotations.jsonl.compact-*.tmp``
        folder = layout.sink(step).path.parent
        if folder.is_dir():
            candidates += [p for p in folder.iterdir() if p.name.startswith(f".{layout.sink(step).path.name}.compact-")
                           and p.name.endswith(".tmp")]
    for path in candidates:
        name = path.name
        try:
            if name.startswith((sort_prefix, reindex_prefix)) and path.is_dir():  # a killed sort's runs
                size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                shutil.rmtree(path)
            elif (name.startswith(prefix) and name.endswith(".tmp")) or old.fullmatch(name) or ".compact-" in name:
                size = path.stat().st_size
                path.unlink()
            else:
                continue
        except FileNotFoundError:
            continue
        removed.append((name, size))
    return removed
