"""Append-only JSONL sinks: offsets, torn lines, last-wins, and concurrent writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from worker.sinks import JsonlSink, ReadStats, dumps, write_atomic

REPO = Path(__file__).resolve().parents[2]


def rec(image_id: str, **extra) -> dict:
    return {"image_id": image_id, **extra}


# --------------------------------------------------------------------------- append / read_at


def test_append_returns_offsets_usable_by_read_at(tmp_path):
    sink = JsonlSink(tmp_path / "s" / "annotations.jsonl", fsync=False)
    offsets = [sink.append(rec(f"img{i}", n=i, text="é" * i)) for i in range(5)]
    assert offsets[0] == 0
    assert offsets == sorted(offsets) and len(set(offsets)) == 5
    for i, off in enumerate(offsets):
        assert sink.read_at(off) == rec(f"img{i}", n=i, text="é" * i)


def test_append_writes_one_compact_line_per_record(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl")
    sink.append({"image_id": "a", "caption": "ünïcode"})
    sink.append({"image_id": "b"})
    raw = sink.path.read_bytes()
    assert raw == (dumps({"image_id": "a", "caption": "ünïcode"}) + "\n" + dumps({"image_id": "b"}) + "\n").encode()
    assert "ünïcode".encode() in raw  # not \u-escaped
    assert b", " not in raw


def test_append_creates_parent_dirs(tmp_path):
    sink = JsonlSink(tmp_path / "x" / "y" / "z.jsonl", fsync=False)
    sink.append(rec("a"))
    assert sink.path.is_file()


def test_read_at_rejects_an_incomplete_line(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    sink.append(rec("a"))
    with open(sink.path, "ab") as f:
        f.write(b'{"image_id": "b"')
    with pytest.raises(ValueError):
        sink.read_at(sink.path.stat().st_size - len(b'{"image_id": "b"'))


# --------------------------------------------------------------------------- scan / torn lines


def test_scan_of_missing_file_is_empty(tmp_path):
    sink = JsonlSink(tmp_path / "none.jsonl")
    assert list(sink.scan()) == []
    assert sink.latest_offsets() == {}


def test_torn_last_line_skipped_by_scan(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    sink.append(rec("a", v=1))
    with open(sink.path, "ab") as f:
        f.write(b'{"image_id": "b", "v": 2')  # a writer crashed mid-line
    stats = ReadStats()
    assert [r for _, r in sink.scan(stats)] == [rec("a", v=1)]
    assert stats.lines == 2
    assert stats.bad_lines == 1


def test_torn_line_that_is_valid_json_but_unterminated_is_skipped(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    sink.path.write_bytes(b'{"image_id": "a"}\n{"image_id": "b"}')
    assert list(sink.latest()) == ["a"]


def test_next_append_seals_a_torn_line(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    sink.append(rec("a", v=1))
    with open(sink.path, "ab") as f:
        f.write(b'{"image_id": "b", "v"')
    off = sink.append(rec("c", v=3))
    assert sink.read_at(off) == rec("c", v=3)
    lines = sink.path.read_bytes().split(b"\n")
    assert lines[1] == b'{"image_id": "b", "v"'  # isolated on its own line
    assert json.loads(lines[2]) == rec("c", v=3)
    stats = ReadStats()
    assert [r["image_id"] for _, r in sink.scan(stats)] == ["a", "c"]
    assert stats.bad_lines == 1


def test_scan_skips_garbage_and_records_without_image_id(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    sink.path.write_bytes(b'{"image_id": "a"}\nnot json\n[1, 2]\n{"no_id": 1}\n\n{"image_id": "b"}\n')
    stats = ReadStats()
    assert [r["image_id"] for _, r in sink.scan(stats)] == ["a", "b"]
    assert stats.bad_lines == 4


def test_lines_read_as_the_json_module_reads_them(tmp_path):
    """Sink lines are parsed with orjson where it can; what it refuses and ``json`` takes (NaN,
    an escaped lone surrogate) still reads, with the same values, and invalid UTF-8 is still a
    bad line."""
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    lines = [b'{"image_id":"nan","v":NaN}\n', b'{"image_id":"sur","v":"\\ud800x"}\n',
             b'{"image_id":"utf","v":"\xc3\xa9"}\n']
    sink.path.write_bytes(b"".join(lines) + b'{"image_id":"bad","v":"\xff"}\n')
    stats = ReadStats()
    got = {r["image_id"]: r["v"] for _, r in sink.scan(stats)}
    want = {json.loads(line)["image_id"]: json.loads(line)["v"] for line in lines}
    assert got.keys() == want.keys() and got["nan"] != got["nan"]  # NaN: not equal to itself
    assert {k: v for k, v in got.items() if k != "nan"} == {k: v for k, v in want.items() if k != "nan"}
    assert stats.bad_lines == 1
    for off, _ in sink.scan():
        assert sink.read_at(off)["image_id"] in want


def test_scan_offsets_match_read_at(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    for i in range(3):
        sink.append(rec(f"i{i}", pad="x" * (i * 10)))
    for off, r in sink.scan():
        assert sink.read_at(off) == r


# --------------------------------------------------------------------------- last wins


def test_latest_offsets_last_wins(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    sink.append(rec("a", v=1))
    off_b = sink.append(rec("b", v=1))
    off_a2 = sink.append(rec("a", v=2))
    with open(sink.path, "ab") as f:
        f.write(b'{"image_id": "a", "v": 3')  # torn: must not win
    offsets = sink.latest_offsets()
    assert offsets == {"a": off_a2, "b": off_b}
    assert sink.read_at(offsets["a"]) == rec("a", v=2)
    assert sink.latest() == {"a": rec("a", v=2), "b": rec("b", v=1)}


# --------------------------------------------------------------------------- concurrency

_WRITER = textwrap.dedent(
    """
    import sys, threading
    from worker.sinks import JsonlSink

    path, tag, n, threads, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    import os, time
    while not os.path.exists(go):  # start together
        time.sleep(0.001)
    sink = JsonlSink(path)
    pad = tag * 3000  # big lines make interleaving visible if locking were broken

    def work(t):
        for i in range(t, n, threads):
            sink.append({"image_id": f"{tag}-{i}", "proc": tag, "i": i, "pad": pad})

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    """
)


def _two_processes(tmp_path, threads: int):
    path = tmp_path / "shared" / "annotations.jsonl"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), tag, "1000", str(threads), str(go)],
                         cwd=REPO, env=env, stderr=subprocess.PIPE)
        for tag in ("A", "B")
    ]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert len(lines) == 2000
    seen = set()
    for line in lines:
        r = json.loads(line)  # every line is one whole record
        assert r["pad"] == r["proc"] * 3000
        assert r["image_id"] == f"{r['proc']}-{r['i']}"
        seen.add(r["image_id"])
    assert seen == {f"{t}-{i}" for t in "AB" for i in range(1000)}
    sink = JsonlSink(path)
    stats = ReadStats()
    assert len(sink.latest_offsets(stats)) == 2000
    assert stats.bad_lines == 0


def test_two_processes_append_1000_each(tmp_path):
    _two_processes(tmp_path, threads=1)


def test_two_processes_with_four_threads_each(tmp_path):
    _two_processes(tmp_path, threads=4)


def test_threads_in_one_process(tmp_path):
    sink = JsonlSink(tmp_path / "a.jsonl", fsync=False)
    offsets: list[int] = []
    lock = threading.Lock()

    def work(t):
        for i in range(200):
            off = sink.append(rec(f"{t}-{i}", pad="p" * 2000))
            with lock:
                offsets.append(off)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(set(offsets)) == 1600
    assert len(sink.latest()) == 1600
    assert sink.path.read_bytes().count(b"\n") == 1600


# --------------------------------------------------------------------------- write_atomic


def test_write_atomic_creates_and_replaces(tmp_path):
    p = tmp_path / "labels" / "a.txt.step1"
    write_atomic(p, "first")
    assert p.read_text() == "first"
    write_atomic(p, "second ünï\n")
    assert p.read_text(encoding="utf-8") == "second ünï\n"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.txt.step1"]  # no temp file left


def test_write_atomic_empty_text(tmp_path):
    p = tmp_path / "a.txt.step2"
    write_atomic(p, "")
    assert p.exists() and p.stat().st_size == 0


def test_an_append_that_does_not_fit_leaves_the_file_as_it_was(tmp_path):
    """On a full disk the line is written in part or not at all: the append raises and cuts the
    part off again, so no reader ever sees a torn line and nothing points at one (a real tmpfs)."""
    from tests.support.faults import fill, tmpfs

    with tmpfs(tmp_path / "vol", "1m") as vol:
        sink = JsonlSink(vol / "s.jsonl")
        first = sink.append({"image_id": "a", "x": 1})
        before = sink.path.read_bytes()
        filler = fill(vol, leave=100)  # room for part of the next line only
        big = {"image_id": "b", "text": "y" * 10_000}
        with pytest.raises(OSError):
            sink.append(big)
        assert sink.path.read_bytes() == before
        filler.unlink()
        second = sink.append(big)
        assert second == len(before) and first == 0
        stats = ReadStats()
        assert sorted(sink.latest_offsets(stats)) == ["a", "b"] and stats.bad_lines == 0


def test_write_atomic_leaves_no_temporary_file_when_the_disk_is_full(tmp_path):
    from tests.support.faults import fill, tmpfs
    from worker.sinks import write_atomic

    with tmpfs(tmp_path / "vol", "1m") as vol:
        fill(vol)
        with pytest.raises(OSError):
            write_atomic(vol / "labels" / "a.txt.step0", "x" * 5000)
        assert [p.name for p in (vol / "labels").iterdir()] == []


# --------------------------------------------------------------------------- parts (step sinks)

_PART_WRITER = _WRITER.replace("sink = JsonlSink(path)", "sink = JsonlSink(path, parts=True)")


def test_part_writers_each_append_to_their_own_part_without_a_lock(tmp_path):
    path = tmp_path / "step_0" / "annotations.jsonl"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", _PART_WRITER, str(path), tag, "500", "4", str(go)],
                              cwd=REPO, env=env, stderr=subprocess.PIPE) for tag in ("A", "B")]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    sink = JsonlSink(path)  # a reader needs no flag: it always sees the main file and the parts
    assert path.read_bytes() == b""  # the main file exists (so "is there a sink" is one path) but is empty
    parts = sink.part_files()
    assert [n for n, _ in parts] == [1, 2]
    for _, part in parts:  # one writer per part: every line of a part is one process's
        procs_in_part = {json.loads(line)["proc"] for line in part.read_bytes().splitlines()}
        assert len(procs_in_part) == 1
    stats = ReadStats()
    offsets = sink.latest_offsets(stats)
    assert len(offsets) == 1000 and stats.bad_lines == 0
    for image_id, off in offsets.items():
        assert sink.read_at(off)["image_id"] == image_id


def test_a_later_run_writes_a_later_part_and_its_record_wins(tmp_path):
    """force_reprocess: the new record of an image that has one in the main file and in an
    older part wins, because a writer takes a new part (a higher number) per run."""
    path = tmp_path / "annotations.jsonl"
    path.write_text(dumps(rec("x", v=0)) + "\n" + dumps(rec("y", v=0)) + "\n")
    first = JsonlSink(path, parts=True, writer="run:1").append(rec("x", v=1))
    second = JsonlSink(path, parts=True, writer="run:2").append(rec("x", v=2))
    late = JsonlSink(path, parts=True, writer="run:1").append(rec("y", v=1))  # run 1's task, still in flight
    sink = JsonlSink(path)
    assert [n for n, _ in sink.part_files()] == [1, 2]  # a part per run, not a new one per switch
    assert (first >> 40, second >> 40, late >> 40) == (1, 2, 1)
    assert sink.read_at(first) == rec("x", v=1) and sink.read_at(second) == rec("x", v=2)
    assert sink.read_at(0) == rec("x", v=0)  # offsets into the main file are plain byte offsets
    assert sink.latest() == {"x": rec("x", v=2), "y": rec("y", v=1)}


def test_a_forked_child_never_shares_its_parents_part(tmp_path):
    import multiprocessing

    path = tmp_path / "annotations.jsonl"
    parent = JsonlSink(path, parts=True).append(rec("parent"))
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=lambda: JsonlSink(path, parts=True).append(rec("child")))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    JsonlSink(path, parts=True).append(rec("parent2"))
    sink = JsonlSink(path)
    by_part = {}
    for off, r in sink.scan():
        by_part.setdefault(off >> 40, []).append(r["image_id"])
    assert parent >> 40 == 1
    assert by_part == {1: ["parent", "parent2"], 2: ["child"]}


def test_a_torn_last_line_of_a_part_is_skipped_and_sealed(tmp_path):
    path = tmp_path / "annotations.jsonl"
    JsonlSink(path, parts=True, writer="w1").append(rec("a"))
    ((_, part),) = JsonlSink(path).part_files()
    with open(part, "ab") as f:
        f.write(b'{"image_id": "b", "tor')  # the writer was killed mid-line
    stats = ReadStats()
    assert JsonlSink(path).latest_offsets(stats).keys() == {"a"} and stats.bad_lines == 1
    off = JsonlSink(path, parts=True, writer="w1").append(rec("c"))  # same process: seals, then appends
    assert JsonlSink(path).read_at(off) == rec("c")
    stats = ReadStats()
    assert JsonlSink(path).latest_offsets(stats).keys() == {"a", "c"} and stats.bad_lines == 1


def test_a_writer_whose_part_is_frozen_for_a_merge_moves_to_a_new_part(tmp_path):
    path = tmp_path / "annotations.jsonl"
    sink = JsonlSink(path, parts=True)
    first = sink.append(rec("a"))
    assert JsonlSink(path).freeze() == [1]
    second = sink.append(rec("b"))
    assert (first >> 40, second >> 40) == (1, 2)
    reader = JsonlSink(path)
    assert [p.name for _, p in reader.part_files()] == ["000001.jsonl.merging", "000002.jsonl"]
    assert reader.read_at(first) == rec("a") and reader.read_at(second) == rec("b")


def test_a_full_disk_under_a_part_leaves_it_as_it_was(tmp_path):
    from tests.support.faults import fill, tmpfs

    with tmpfs(tmp_path / "vol", "1m") as vol:
        sink = JsonlSink(vol / "s.jsonl", parts=True)
        sink.append({"image_id": "a", "x": 1})
        ((_, part),) = sink.part_files()
        before = part.read_bytes()
        filler = fill(vol, leave=100)
        big = {"image_id": "b", "text": "y" * 10_000}
        with pytest.raises(OSError):
            sink.append(big)
        assert part.read_bytes() == before
        filler.unlink()
        off = sink.append(big)
        assert off == 1 << 40 | len(before)
        stats = ReadStats()
        assert sorted(sink.latest_offsets(stats)) == ["a", "b"] and stats.bad_lines == 0


def test_a_reader_reads_lines_longer_than_its_first_read_and_refuses_a_torn_last_one(tmp_path):
    """``SinkReader`` reads a line with one ``pread`` of 4 KB, more when the line is longer: a
    line of any length (also one ending right at a read's edge) comes back whole, and a last
    line with no newline is refused, as a buffered ``readline`` did."""
    from worker.sinks import SinkReader

    sink = JsonlSink(tmp_path / "s.jsonl")
    base = len(dumps({"image_id": "a", "x": ""}) + "\n")
    sizes = [10, SinkReader._GUESS - base, SinkReader._GUESS - base + 1, 3 * SinkReader._GUESS, 40_000]
    offsets = [sink.append({"image_id": "a", "x": "y" * n}) for n in sizes]
    with open(sink.path, "ab") as f:
        f.write(b'{"image_id":"torn","x":"' + b"z" * 9000)
    torn = sink.path.stat().st_size - 9000 - len(b'{"image_id":"torn","x":"')
    with sink.reader() as reader:
        for n, off in zip(sizes, offsets, strict=True):
            line = reader.read_line_at(off)
            assert line == (dumps({"image_id": "a", "x": "y" * n}) + "\n").encode()
        with pytest.raises(ValueError):
            reader.read_line_at(torn)
    assert len(sink.path.read_bytes().split(b"\n")[1]) + 1 == SinkReader._GUESS  # a line of exactly one read
