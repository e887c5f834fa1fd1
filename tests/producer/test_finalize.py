"""finalize: one record per image from the sinks, sorted, last wins, failures listed not emitted."""

from __future__ import annotations

import json

from producer.finalize import finalize
from worker.layout import Layout
from worker.sinks import dumps


def seed(layout: Layout, ids: list[str]) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    with open(layout.seed.path, "w", encoding="utf-8") as f:
        for i in ids:
            f.write(dumps({"image_id": i, "image_path": f"/img/{i}.png", "width": 10, "height": 10,
                           "kitti_bboxes": [], "source": "image_referring_expression",
                           "pipeline_steps": []}) + "\n")


def rec(image_id: str, step: int, **fields) -> dict:
    names = {0: "step0_region_expr", 1: "step1_image_caption", 2: "step2_grounding_expr", 3: "step3_double_check"}
    return {"image_id": image_id, "image_path": f"/img/{image_id}.png", "width": 10, "height": 10,
            "kitti_bboxes": [], **fields, "source": "image_referring_expression", "pipeline_steps": [names[step]]}


def read_final(layout: Layout) -> list[dict]:
    return [json.loads(line) for line in layout.final.read_text(encoding="utf-8").splitlines()]


def test_one_record_per_image_sorted(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["c", "a", "b"])
    for i in ("b", "c", "a"):
        layout.sink(3).append(rec(i, 3, expressions=[{"text": f"x-{i}"}]))
    report = finalize(layout, [0, 1, 2, 3])
    out = read_final(layout)
    assert [r["image_id"] for r in out] == ["a", "b", "c"]
    assert [r["expressions"][0]["text"] for r in out] == ["x-a", "x-b", "x-c"]
    assert report.written == 3
    assert report.failed == [] and report.missing == []
    assert report.path == layout.final


def test_last_record_wins(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a", "b"])
    sink = layout.sink(3)
    sink.append(rec("a", 3, expressions=[{"text": "old"}]))
    sink.append(rec("b", 3, expressions=[]))
    sink.append(rec("a", 3, expressions=[{"text": "new"}]))
    with open(sink.path, "ab") as f:
        f.write(b'{"image_id": "a", "expressions": [{"text": "torn"')
    report = finalize(layout, [0, 1, 2, 3])
    out = read_final(layout)
    assert [r["image_id"] for r in out] == ["a", "b"]
    assert out[0]["expressions"] == [{"text": "new"}]
    assert report.written == 2
    assert report.bad_lines == 1


def test_failed_images_listed_not_emitted(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a", "b", "c", "d"])
    layout.sink(2).append(rec("a", 2, expressions=[]))
    layout.sink(2).append(rec("c", 2, expressions=[]))
    layout.record_failure(image_id="b", step=0, error="boom", attempts=3)
    # c failed once but was retried successfully: it is emitted, not listed
    layout.record_failure(image_id="c", step=2, error="flaky", attempts=1)
    report = finalize(layout, [0, 2])
    assert [r["image_id"] for r in read_final(layout)] == ["a", "c"]
    assert report.failed == ["b"]
    assert report.missing == ["d"]
    assert report.written == 2


def test_steps_0_and_1_are_merged(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a", "b"])
    layout.sink(0).append(rec("a", 0, regions=[{"description": "red car"}]))
    layout.sink(1).append(rec("a", 1, caption="A street."))
    layout.sink(0).append(rec("b", 0, regions=[]))  # b has no caption yet
    report = finalize(layout, [0, 1])
    out = read_final(layout)
    assert [r["image_id"] for r in out] == ["a"]
    a = out[0]
    assert a["regions"] == [{"description": "red car"}]
    assert a["caption"] == "A street."
    assert a["pipeline_steps"] == ["step0_region_expr", "step1_image_caption"]
    assert report.written == 1
    assert report.missing == ["b"]


def test_step_1_only_uses_step_1_records(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a"])
    layout.sink(0).append(rec("a", 0, regions=[{"description": "stale"}]))
    layout.sink(1).append(rec("a", 1, caption="Only the caption."))
    finalize(layout, [1])
    out = read_final(layout)
    assert len(out) == 1
    assert out[0]["caption"] == "Only the caption."
    assert "regions" not in out[0]
    assert out[0]["pipeline_steps"] == ["step1_image_caption"]


def test_last_step_of_a_partial_run_is_used(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a"])
    layout.sink(2).append(rec("a", 2, expressions=[{"text": "step2"}]))
    layout.sink(3).append(rec("a", 3, expressions=[{"text": "step3"}]))
    finalize(layout, [0, 1, 2])
    assert read_final(layout)[0]["expressions"] == [{"text": "step2"}]


def test_rerun_replaces_the_final_file(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a"])
    layout.final.write_text("junk\n")
    layout.sink(3).append(rec("a", 3, expressions=[]))
    finalize(layout, [0, 1, 2, 3])
    assert [r["image_id"] for r in read_final(layout)] == ["a"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_nothing_done_writes_an_empty_file(tmp_path):
    layout = Layout(tmp_path)
    seed(layout, ["a"])
    report = finalize(layout, [0, 1, 2, 3])
    assert layout.final.read_text() == ""
    assert report.written == 0 and report.missing == ["a"]


# --------------------------------------------------------------------------- merging the step files


def step_lines(layout: Layout, step: int) -> list[dict]:
    return [json.loads(line) for line in layout.sink(step).path.read_bytes().splitlines()]


def test_finalize_leaves_each_step_file_with_one_line_per_image(tmp_path):
    """Invariant 3: after finalize the TAO-layout step files hold one line per image (the last
    one, byte for byte), sorted, and the parts are gone."""
    layout = Layout(tmp_path)
    seed(layout, ["a", "b", "c"])
    main = layout.sink(0).path
    main.parent.mkdir(parents=True)
    main.write_text(dumps(rec("c", 0, v="main")) + "\n" + dumps(rec("a", 0, v="main")) + "\n")  # an older run
    Layout(tmp_path, writer="run:1").sink(0).append(rec("a", 0, v="run1"))
    Layout(tmp_path, writer="run:1").sink(0).append(rec("b", 0, v="run1"))
    Layout(tmp_path, writer="run:2").sink(0).append(rec("a", 0, v="run2"))  # force_reprocess: newest
    Layout(tmp_path, writer="run:2").sink(3).append(rec("a", 3, expressions=[]))
    report = finalize(layout, [0, 3])
    assert [(r["image_id"], r["v"]) for r in step_lines(layout, 0)] == [("a", "run2"), ("b", "run1"), ("c", "main")]
    assert [r["image_id"] for r in step_lines(layout, 3)] == ["a"]
    assert report.compacted == {0: 3, 3: 1}
    assert layout.sink(0).part_files() == [] and layout.sink(3).part_files() == []
    assert [r["image_id"] for r in read_final(layout)] == ["a"]
    again = finalize(layout, [0, 3])  # a second finalize changes nothing
    assert [(r["image_id"], r["v"]) for r in step_lines(layout, 0)] == [("a", "run2"), ("b", "run1"), ("c", "main")]
    assert again.written == 1 and again.missing == ["b", "c"]


def test_offsets_from_before_a_merge_are_refused_not_misread(tmp_path):
    """The done index holds offsets into parts; after the merge they name a part that is gone
    (or the older main file): read_at raises StaleOffset instead of reading another image."""
    import pytest

    from worker.sinks import StaleOffset

    layout = Layout(tmp_path)
    seed(layout, ["a", "b"])
    sink = layout.sink(3)
    old = {i: sink.append(rec(i, 3, expressions=[])) for i in ("b", "a")}
    finalize(layout, [3])
    for off in old.values():
        with pytest.raises(StaleOffset):
            sink.read_at(off)
    fresh = sink.latest_offsets()
    assert {i: sink.read_at(off)["image_id"] for i, off in fresh.items()} == {"a": "a", "b": "b"}
    assert all(off >> 40 == sink.main_generation() > 0 for off in fresh.values())
    after = sink.append(rec("a", 3, expressions=[{"text": "later"}]))  # the same writer: a new part
    assert after >> 40 > sink.main_generation()
    assert sink.latest()["a"]["expressions"] == [{"text": "later"}]
    finalize(layout, [3])
    assert [r.get("expressions") for r in step_lines(layout, 3)] == [[{"text": "later"}], []]


def test_a_finalize_stopped_at_any_point_leaves_a_consistent_sink(tmp_path):
    """The merged file's generation is recorded with its inode before the rename: stopped
    before the rename, the old main file and its parts are read; after it, the merged parts are
    ignored even if they were not removed yet."""
    layout = Layout(tmp_path)
    seed(layout, ["a", "b"])
    sink = layout.sink(0)
    sink.append(rec("a", 0, v=1))
    sink.append(rec("b", 0, v=1))
    sink.append(rec("a", 0, v=2))
    expect = {"a": 2, "b": 1}
    # Stopped between recording the generation and the rename:
    generation = sink.reserve_generation()
    sink.freeze(keep=generation)
    merged = sink.path.with_name("merged.tmp")
    merged.write_text(dumps(rec("a", 0, v=2)) + "\n" + dumps(rec("b", 0, v=1)) + "\n")
    info = {"gen": generation, "ino": merged.stat().st_ino, "prev": 0}
    (sink.parts_dir / "main").write_text(json.dumps(info))
    assert {i: r["v"] for i, r in sink.latest().items()} == expect
    # Stopped after the rename, before the merged parts were removed:
    import os
    os.replace(merged, sink.path)
    assert sink.main_generation() == generation
    assert [n for n, _ in sink.part_files()] == [generation]  # only the placeholder (empty)
    assert {i: r["v"] for i, r in sink.latest().items()} == expect
    assert len(step_lines(layout, 0)) == 2
    report = finalize(layout, [0])  # the next finalize finishes the job
    assert report.written == 2 and {r["image_id"]: r["v"] for r in step_lines(layout, 0)} == expect
    assert sink.part_files() == [] and not list(sink.parts_dir.glob("*.merging"))


def test_finalize_sorts_in_bounded_chunks(tmp_path, monkeypatch):
    """Many sorted runs spilled to disk and merged give the same bytes as one in memory."""
    import producer.extsort

    layout = Layout(tmp_path)
    ids = [f"img{(i * 7919) % 250:04d}" for i in range(250)]
    seed(layout, ids)
    for i in ids:
        layout.sink(3).append(rec(i, 3, expressions=[{"text": "old"}]))
    for i in ids[::3]:
        layout.sink(3).append(rec(i, 3, expressions=[{"text": "new"}]))
    for i in ids[::5]:
        layout.record_failure(image_id=i, step="seed", error="x", attempts=1)
    one = finalize(layout, [3])
    in_memory = layout.final.read_bytes(), layout.sink(3).path.read_bytes()
    monkeypatch.setattr(producer.extsort, "CHUNK", 7)
    for i in ids[::3]:  # the same records again, so the result must not change
        layout.sink(3).append(rec(i, 3, expressions=[{"text": "new"}]))
    spilled = finalize(layout, [3])
    assert (layout.final.read_bytes(), layout.sink(3).path.read_bytes()) == in_memory
    assert spilled.written == one.written == 250
    assert sum(1 for r in read_final(layout) if r["expressions"] == [{"text": "new"}]) == len(ids[::3])
    assert not [p for p in tmp_path.iterdir() if ".sort-" in p.name]  # the runs were removed


def test_pairs_added_a_batch_at_a_time_spill_chunk_sized_runs_and_sort_the_same(tmp_path):
    """``SortedPairs.extend`` (finalize adds a step's pairs a batch at a time) spills one run
    per chunk, as ``add`` does, so memory stays one chunk plus one batch, and the order is the
    same as one sort of everything."""
    from producer.extsort import SortedPairs

    pairs = [(f"img{(i * 7919) % 97:03d}", i) for i in range(300)]
    with SortedPairs((), tmp_path, chunk=16) as batched:
        for i in range(0, len(pairs), 40):
            batched.extend(pairs[i:i + 40])
        assert batched.count == 300
        assert len(batched._runs) == 300 // 16 and len(batched._buf) == 300 % 16
        assert list(batched) == sorted(pairs)
    assert not list(tmp_path.iterdir())  # the runs were removed


def test_the_done_index_is_rebuilt_after_a_finalize_merged_the_sinks(tmp_path, redis_client):
    """A resume or retry-failed on the same Redis after a finalize: the index's offsets point
    into merged parts, so the producer sees the sinks' generation changed and reindexes."""
    from producer.submit import index_is_current, reindex
    from worker.runstate import RunState

    layout = Layout(tmp_path)
    seed(layout, ["a", "b"])
    for i in ("b", "a"):
        layout.sink(0).append(rec(i, 0, regions=[]))
    layout.sink(0).append(rec("a", 0, regions=[{"description": "newer"}]))
    state = RunState(redis_client, "run-reindex")
    assert reindex(state, layout) == {0: 2}
    state.set_meta(indexed=True)
    assert index_is_current(state.meta(), layout)
    before = state.done_offset(0, "a")
    assert layout.sink(0).read_at(before)["regions"] == [{"description": "newer"}]
    finalize(layout, [0])
    assert not index_is_current(state.meta(), layout)
    reindex(state, layout)
    assert index_is_current(state.meta(), layout)
    for i in ("a", "b"):
        assert layout.sink(0).read_at(state.done_offset(0, i))["image_id"] == i
    assert layout.sink(0).read_at(state.done_offset(0, "a"))["regions"] == [{"description": "newer"}]


def test_token_usage_counts_the_calls_a_merge_left_out(tmp_path):
    """A superseded record was a call paid for: usage is the same before the merge, after it,
    and after a second finalize."""
    from producer.usage import usage_from_sinks

    layout = Layout(tmp_path)
    seed(layout, ["a", "b"])

    def call(n: int) -> dict:
        return {"meta": {"step0_region_expr": {"call": {"input_tokens": n, "output_tokens": 1, "latency_s": 0.5}}}}

    for image_id, n in (("a", 10), ("b", 20), ("a", 30), ("a", 40)):
        layout.sink(0).append(rec(image_id, 0, regions=[], **call(n)))
    before = usage_from_sinks(layout, [0])
    assert before["steps"]["0"]["calls"] == 4 and before["steps"]["0"]["input_tokens"] == 100
    first = finalize(layout, [0])
    assert len(step_lines(layout, 0)) == 2
    second = finalize(layout, [0])
    assert first.usage == second.usage == before
    assert first.usage["steps"]["0"]["images"] == 2


def test_a_pool_of_processes_gives_the_same_files(tmp_path, monkeypatch):
    """A large run's step sinks are read by a pool (one sink per process): same output, same
    merged step files, same usage, as read in one process."""

    import producer.finalize

    def make(root):
        layout = Layout(root)
        seed(layout, [f"i{n}" for n in range(40)])
        for n in range(40):
            for s in (0, 1, 2, 3):
                layout.sink(s).append(rec(f"i{n}", s, expressions=[], v=n))
        layout.sink(3).append(rec("i7", 3, expressions=[{"text": "again"}]))
        return layout

    one, pooled = make(tmp_path / "one"), make(tmp_path / "pooled")
    a = finalize(one, [0, 1, 2, 3])
    monkeypatch.setattr(producer.finalize, "PARALLEL_BYTES", 0)
    b = finalize(pooled, [0, 1, 2, 3])
    assert one.final.read_bytes() == pooled.final.read_bytes()
    assert [one.sink(s).path.read_bytes() for s in range(4)] == [pooled.sink(s).path.read_bytes() for s in range(4)]
    assert (a.written, a.compacted, a.usage) == (b.written, b.compacted, b.usage) and b.written == 40


def test_the_report_counts_every_image_but_lists_a_bounded_number(tmp_path, monkeypatch):
    """At ten million images not done, the report must not hold ten million ids."""
    import producer.finalize
    from producer.summary import read_summary

    monkeypatch.setattr(producer.finalize, "LISTED", 2)
    layout = Layout(tmp_path)
    seed(layout, [f"m{n}" for n in range(5)] + ["f0", "f1", "f2"])
    for n in range(3):
        layout.record_failure(image_id=f"f{n}", step=3, error="boom", attempts=1)
    report = finalize(layout, [3])
    assert (report.n_failed, report.n_missing) == (3, 5)
    assert report.failed == ["f0", "f1"] and report.missing == ["m0", "m1"]
    summary = read_summary(layout)
    assert (summary["failed"], summary["missing"], summary["images"]) == (3, 5, 8)


def test_find_latest_finds_a_record_a_merge_moved_by_binary_search_then_the_parts(tmp_path):
    layout = Layout(tmp_path)
    ids = [f"im{i:03d}" for i in range(57)]
    seed(layout, ids)
    sink = layout.sink(3)
    for i in reversed(ids):
        sink.append(rec(i, 3, expressions=[{"text": f"old-{i}"}]))
    assert sink.find_latest("im007")[1]["expressions"] == [{"text": "old-im007"}]  # before a merge: scanned
    finalize(layout, [0, 1, 2, 3])
    assert sink.main_generation() > 0
    for i in ids:
        off, found = sink.find_latest(i)
        assert found["expressions"] == [{"text": f"old-{i}"}] and sink.read_at(off) == found
    assert sink.find_latest("im") is None and sink.find_latest("im999") is None and sink.find_latest("a") is None
    sink.append(rec("im010", 3, expressions=[{"text": "new"}]))  # a part after the merged main file wins
    off, found = sink.find_latest("im010")
    assert found["expressions"] == [{"text": "new"}] and sink.read_at(off) == found


def test_a_part_a_writer_opens_during_a_finalize_is_never_taken_for_a_merged_one(tmp_path):
    """The steps of ``finalize`` one by one, a writer appending between them: the part it opens
    after the freeze numbers above the merged generation, so every reader agrees its records
    are the newest, and the next finalize merges them instead of deleting them."""
    from producer.extsort import SortedPairs, last_per_key
    from producer.finalize import _compact
    from worker.sinks import JsonlSink

    layout = Layout(tmp_path)
    seed(layout, ["im0", "im1", "im2"])
    writer = JsonlSink(layout.sink(0).path, parts=True, writer="w")  # one long-lived writer process
    writer.append(rec("im0", 0, v="old"))
    writer.append(rec("im1", 0, v="old"))
    sink = layout.sink(0)
    generation = sink.reserve_generation()
    sink.freeze(keep=generation)
    work = tmp_path / "sort"
    work.mkdir()
    latest = SortedPairs(((str(r["image_id"]), off) for off, r in sink.scan()), work)
    iter(latest)
    writer.append(rec("im0", 0, v="newer"))  # its part was frozen: it takes a new one, mid-finalize
    writer.append(rec("im2", 0, v="new"))
    _compact(sink, 0, latest, generation)
    writer.append(rec("im1", 0, v="newer"))
    expect = {"im0": "newer", "im1": "newer", "im2": "new"}
    assert {i: r["v"] for i, r in sink.latest().items()} == expect  # scan order
    with SortedPairs(((str(r["image_id"]), off) for off, r in sink.scan()), work) as pairs:
        by_sort = {i: sink.read_at(off)["v"] for i, off in last_per_key(pairs)}
    assert by_sort == expect  # sort order (finalize's and reindex's) agrees
    finalize(layout, [0])
    assert {r["image_id"]: r["v"] for r in step_lines(layout, 0)} == expect
    assert {r["image_id"]: r["v"] for r in read_final(layout)} == expect


def test_a_reindex_replaces_the_done_index_so_entries_whose_record_is_gone_are_not_done(tmp_path, redis_client):
    """A populated index is rebuilt, not overlaid: an image whose record left the sink (a step
    dir deleted to redo it) is no longer done; a mark set while the sink was being read (its
    record readable at that offset) is kept."""
    import shutil

    from producer.submit import reindex
    from worker.runstate import RunState

    layout = Layout(tmp_path)
    seed(layout, ["a", "b", "c"])
    for i in ("a", "b"):
        layout.sink(0).append(rec(i, 0, regions=[]))
        layout.sink(1).append(rec(i, 1, caption=i))
    state = RunState(redis_client, "run-replace")
    state.mark_done(0, "gone", 123)  # an entry whose record is in no sink
    assert reindex(state, layout) == {0: 2, 1: 2}
    assert state.done_offset(0, "gone") is None and state.done_offset(0, "a") is not None
    shutil.rmtree(layout.sink(1).path.parent)  # redo step 1
    finalize(layout, [0])
    reindex(state, layout)
    assert [state.counts([0, 1])[s]["done"] for s in (0, 1)] == [2, 0]
    late = layout.sink(0).append(rec("c", 0, regions=[]))  # as if marked after the rebuild read the sink
    state.mark_done(0, "c", late)
    read = {i: state.done_offset(0, i) for i in ("a", "b")}  # what the rebuild read from the sink
    with layout.sink(0).reader() as reader:
        from producer.submit import _record_at
        assert state.replace_done(0, iter(sorted(read.items())), lambda i, off: _record_at(reader, i, off)) == 3
    assert state.done_offset(0, "c") == late and {i: state.done_offset(0, i) for i in read} == read


def test_finalize_warns_when_the_run_still_has_images_in_flight(tmp_path, redis_client, redis_url, monkeypatch):
    """finalize needs no Redis, but when the run's Redis answers and images are still in flight
    it says they will be listed as missing, and what to run; a dead Redis only loses the warning."""
    from typer.testing import CliRunner

    from producer.cli import app
    from tests.producer.test_preview import make_run
    from worker.runstate import RunState

    run = make_run(tmp_path)  # run_id "test"
    monkeypatch.delenv("REFEXP_STATE_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", redis_url)
    quiet = CliRunner().invoke(app, ["finalize", "--results-dir", str(run.root)])
    assert "in flight" not in quiet.output and (run.root / "annotations.jsonl").exists()
    RunState(redis_client, "test").mark_queued({"a": 0, "b": 10})
    busy = CliRunner().invoke(app, ["finalize", "--results-dir", str(run.root)])
    assert "warning: 2 images of this run are still in flight" in busy.output
    assert f"producer wait --results-dir {run.root}" in busy.output
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    gone = CliRunner().invoke(app, ["finalize", "--results-dir", str(run.root)])
    assert "in flight" not in gone.output and "wrote" in gone.output


def test_the_final_file_holds_the_bytes_json_writes_whatever_the_values(tmp_path, monkeypatch):
    """Records are encoded with orjson where that gives ``dumps``'s bytes, with ``json`` where it
    would not (floats ``repr`` writes with an exponent, NaN that only ``json`` reads, integers
    past 64 bits): the final file is what ``dumps`` of each final record gives, line for line,
    read by one process or by a pool (which also merges the step file in the same pass). The
    records are read as finalize always read them (``loads``: orjson, then ``json``)."""
    import producer.finalize
    from worker.sinks import loads
    from worker.steps import final_record
    from worker.steps.records import deterministic

    values = [0.5, 1e-05, -8.87e-05, 0.0001, 1e16, 1.5e-07, 123456789.125, 2**63, 2**70, -0.0, "é\u2028\x00\"\\",
              "white-ish 1e-5 0.00001", "\U0001F600", None, True]
    lines = {f"i{n:02d}": dumps(rec(f"i{n:02d}", 3, v=v, expressions=[],
                                    meta={"step3_double_check": {"call": {"input_tokens": 1, "latency_s": 0.25}}}))
             for n, v in enumerate(values)}
    lines["i90"] = '{"image_id":"i90","v":NaN,"w":1e-7,"pipeline_steps":["step3_double_check"]}'  # json reads it
    lines["i91"] = '{"image_id":"i91","v":0.0000887,"w":1E400,"pipeline_steps":[]}'
    lines["i92"] = '{"image_id":"i92","v":18446744073709551616,"w":[1.0,2.50],"pipeline_steps":[]}'
    expect = "".join(dumps(deterministic(final_record([0, 1, 2, 3], {3: loads(line.encode())}))) + "\n"
                     for _, line in sorted(lines.items())).encode("utf-8")
    for pooled in (False, True):
        layout = Layout(tmp_path / f"pooled-{pooled}")
        seed(layout, sorted(lines))
        layout.sink(3).path.parent.mkdir(parents=True)
        layout.sink(3).path.write_text("".join(line + "\n" for line in lines.values()), encoding="utf-8")
        monkeypatch.setattr(producer.finalize, "PARALLEL_BYTES", 0 if pooled else 64 << 20)
        report = finalize(layout, [0, 1, 2, 3])
        assert (report.written, report.bad_lines) == (len(lines), 0)
        assert layout.final.read_bytes() == expect
        assert layout.sink(3).path.read_text(encoding="utf-8").split("\n")[:-1] == [lines[i] for i in sorted(lines)]


def test_the_usage_sums_keep_their_batches_so_the_latency_total_is_the_same_to_the_bit(tmp_path):
    """The latency a step's lines used (a float) is summed in batches of ``USAGE_BATCH`` lines in
    file order and the batch sums added, and the carried usage of the lines a merge leaves out in
    batches of ``DROPPED_BATCH`` in image order: the grouping finalize always had, so its files
    and summary keep their bytes. Latencies chosen so another grouping gives other bits."""
    from producer.finalize import DROPPED_BATCH, USAGE_BATCH
    from producer.usage import call_sums

    layout = Layout(tmp_path)
    n = USAGE_BATCH + 700
    ids = [f"img{i:05d}" for i in range(n)]
    seed(layout, ids)
    latencies = [0.1 + (k % 97) * 0.013 + k * 1e-7 for k in range(2 * n)]
    calls = [{"input_tokens": 10, "output_tokens": 2, "latency_s": lat} for lat in latencies]
    lines = []
    for k, i in enumerate(ids):  # each image twice: an older record, then the one that stays
        lines.append((k, rec(i, 3, meta={"step3_double_check": {"call": calls[2 * k]}})))
        lines.append((k, rec(i, 3, meta={"step3_double_check": {"call": calls[2 * k + 1]}})))
    layout.sink(3).path.parent.mkdir(parents=True)
    layout.sink(3).path.write_text("".join(dumps(r) + "\n" for _, r in lines), encoding="utf-8")

    def batched(entries: list[dict], size: int, total: float = 0.0) -> float:
        for i in range(0, len(entries), size):
            total = total + call_sums(entries[i:i + size])["latency_s"]
        return total

    assert batched(calls, USAGE_BATCH) != sum(c["latency_s"] for c in calls)  # the grouping shows
    report = finalize(layout, [3])
    assert report.written == n
    carried = layout.sink(3).carried_usage()
    assert carried["calls"] == n
    assert carried["latency_s"] == batched(calls[0::2], DROPPED_BATCH)
    from producer.finalize import _scan_step  # a second read sees the merged file and the carried usage
    pairs, usage, _ = _scan_step(str(tmp_path), 3, str(tmp_path), False, True)
    pairs.close()
    assert usage["latency_s"] == batched(calls[1::2], USAGE_BATCH, carried["latency_s"])


def test_a_full_disk_at_any_point_of_a_finalize_leaves_no_temp_file_and_the_records_as_they_were(tmp_path,
                                                                                                 monkeypatch):
    """A finalize on a disk that fills up at one point or another (a real tmpfs, filled to a
    different level each time; sorts in memory, then spilling runs) either finishes or raises: it
    leaves no temp file or sort dir behind, the previous ``annotations.jsonl`` stays whole when it
    raised, and every step sink holds the same last record per image as before (merged or not).
    A merge whose temp file could not be flushed used to leave it behind (closing it raised
    again, before the unlink)."""
    import producer.extsort
    from tests.support.faults import fill, free_bytes, tmpfs

    ids = [f"img{i:03d}" for i in range(60)]
    with tmpfs(tmp_path / "vol", "4m") as vol:
        for chunk in (producer.extsort.CHUNK, 16):
            monkeypatch.setattr(producer.extsort, "CHUNK", chunk)
            layout = Layout(vol / f"results-{chunk}")
            seed(layout, ids)
            for step in (2, 3):
                for i in ids:
                    layout.sink(step).append(rec(i, step, expressions=[{"text": f"{i}-{'x' * 300}"}]))
            finalize(layout, [2, 3])
            outcomes = set()
            for leave in (0, 2_000, 8_000, 20_000, 60_000, 130_000, 300_000, 1_000_000):
                for i in ids[::4]:  # newer records in new parts: every finalize has a merge to do
                    for step in (2, 3):
                        layout.sink(step).append(rec(i, step, expressions=[{"text": f"{leave}-{i}"}]))
                final_before = layout.final.read_bytes()
                latest_before = {s: layout.sink(s).latest() for s in (2, 3)}
                filler = fill(vol, leave=leave)
                try:
                    finalize(layout, [2, 3])
                    outcomes.add("done")
                except OSError:
                    outcomes.add("raised")
                    assert layout.final.read_bytes() == final_before
                finally:
                    filler.unlink()
                left = [p for p in vol.rglob("*") if p.name.endswith(".tmp") or ".sort-" in p.name]
                assert left == [], f"left behind with {leave} bytes free, chunk {chunk}: {left}"
                assert {s: layout.sink(s).latest() for s in (2, 3)} == latest_before
            assert outcomes == {"done", "raised"}  # the levels covered both
            assert free_bytes(vol) > 0
            finalize(layout, [2, 3])
            assert [r["image_id"] for r in read_final(layout)] == ids
