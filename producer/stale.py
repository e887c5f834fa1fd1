"""Which done image-steps are stale against a spec: their record's fingerprint is not what the
spec would send now (``worker/steps/fingerprint.py``), or a step they read is stale.

``producer estimate`` and ``producer status --stale`` say how many there are per step and what
redoing them would cost; ``workflow.reprocess: changed`` is what redoes them (the workers make
the same comparison, ``worker/execute.py::keep_if_current``). The check is the worker's: the
first request rebuilt from the image's seed line and the upstream records, the image's content
hash (``worker.images.content_hash``: each image read and hashed once; no hash file is written,
since the workers keep those only while an image is in flight), no model call.

It reads every step sink once and every image's hash, in bounded memory: the sinks' ``(image_id,
offset)`` pairs are sorted externally and merge-joined with the seed, as finalize does
(``producer/extsort.py``). The cost of a redo is counted from what the stale records' own calls
took (``meta.<step>.call``), at the spec's prices.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from producer.extsort import Cursor, SortedPairs, last_per_key
from producer.seed import iter_seed
from producer.usage import call_cost
from worker.budget import endpoint_key
from worker.errors import InputError
from worker.layout import Layout
from worker.spec import Spec
from worker.stepdefs import ALL_STEPS, STEP
from worker.steps import STEPS, StepOptions, expected_fingerprints, fingerprint, input_record
from worker.steps.converse import plan
from worker.steps.prompts import load_prompts

#: Backends whose clients send a response schema (``VLMClient.structured_output``).
STRUCTURED_BACKENDS = ("gemini", "openai")


@dataclass
class StepStale:
    step: int
    done: int = 0            # image-steps with a record
    stale: int = 0           # of those, redone by `reprocess: changed`
    no_fingerprint: int = 0  # of the stale, records written before fingerprints existed
    upstream: int = 0        # of the stale, stale because a step they read is
    calls: int = 0           # of the stale, those whose redo asks the model
    input_tokens: int = 0    # what the stale records' calls took
    output_tokens: int = 0   # (thinking included)


@dataclass
class StaleReport:
    steps: list[StepStale]
    images_unreadable: int = 0  # images whose hash could not be taken (their steps count as stale)
    cost: float | None = None

    @property
    def stale(self) -> int:
        return sum(s.stale for s in self.steps)

    def to_json(self) -> dict:
        return {"steps": [asdict(s) for s in self.steps], "stale": self.stale,
                "images_unreadable": self.images_unreadable, "cost": self.cost}


def _sorted_latest(sink, workdir: Path) -> SortedPairs:
    return SortedPairs(((str(rec["image_id"]), off) for off, rec in sink.scan()), workdir)


def stale_report(spec: Spec, layout: Layout | None = None, templates: dict[str, str] | None = None) -> StaleReport:
    """How many done image-steps of ``spec``'s results dir are stale against ``spec``."""
    layout = layout or Layout(Path(spec.results_dir))
    steps = sorted(spec.ire.workflow.steps)
    templates = templates if templates is not None else load_prompts(spec.ire.workflow.prompts_file)
    vlm = spec.ire.vlm
    # No image cache: a hash file written here for every image would stay (the workers drop an
    # image's folder when it settles); each image is read and hashed once instead.
    options = StepOptions.from_vlm(vlm, endpoint=endpoint_key(vlm))
    structured = vlm.backend in STRUCTURED_BACKENDS
    report = StaleReport([StepStale(s) for s in steps])
    per = {s.step: s for s in report.steps}
    sinks = {s: layout.sink(s) for s in ALL_STEPS if layout.sink(s).exists()}
    if not sinks or not layout.seed.exists():
        return report
    with tempfile.TemporaryDirectory(prefix=".stale-", dir=layout.root) as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        seed = stack.enter_context(SortedPairs(((str(r["image_id"]), off) for off, r in iter_seed(layout.seed)),
                                               workdir))
        cursors = {s: Cursor(last_per_key(stack.enter_context(_sorted_latest(sink, workdir))))
                   for s, sink in sinks.items()}
        readers = {s: sink.reader() for s, sink in sinks.items()}
        for r in readers.values():
            stack.callback(r.close)
        seed_reader = layout.seed.reader()
        stack.callback(seed_reader.close)
        for image_id, seed_off in last_per_key(seed):
            found = {s: c.take(image_id) for s, c in cursors.items()}
            records = {s: json.loads(readers[s].read_line_at(offs[-1])) for s, offs in found.items() if offs}
            if not any(s in records for s in steps):
                continue
            seed_rec = json.loads(seed_reader.read_line_at(seed_off))
            report.images_unreadable += _check_image(image_id, seed_rec, records, steps, templates, options,
                                                     structured, per)
    report.cost = call_cost(vlm.prices.model_dump(), sum(s.input_tokens for s in report.steps),
                            sum(s.output_tokens for s in report.steps))
    return report


def _check_image(image_id: str, seed: dict, records: dict[int, dict], steps: list[int], templates: dict[str, str],
                 options: StepOptions, structured: bool, per: dict[int, StepStale]) -> int:
    """Count one image's steps into ``per``; returns 1 when its image could not be hashed."""
    stale: dict[int, bool] = {}
    unreadable = 0
    for s in steps:
        rec = records.get(s)
        if rec is None:
            continue
        count = per[s]
        count.done += 1
        d = STEP[s]
        record = input_record(s, seed if d.reads_seed else {}, {u: records[u] for u in d.reads if u in records})
        have = fingerprint.of_record(rec, s)
        if have is None:
            is_stale, why = True, "no_fingerprint"
        elif any(stale.get(u) for u in d.reads):
            is_stale, why = True, "upstream"
        else:
            try:
                want = expected_fingerprints(s, record, templates, options, structured=structured,
                                             fell_back=fingerprint.fell_back(rec, s))
            except InputError:
                unreadable = 1
                want = set()
            is_stale, why = have not in want, ""
        stale[s] = is_stale
        if not is_stale:
            continue
        count.stale += 1
        if why:
            setattr(count, why, getattr(count, why) + 1)
        if plan(d, STEPS[s], record, templates, options=options, structured=structured) is not None:
            count.calls += 1
        call = ((rec.get("meta") or {}).get(d.record_name) or {}).get("call") or {}
        count.input_tokens += int(call.get("input_tokens") or 0)
        count.output_tokens += int(call.get("output_tokens") or 0) + int(call.get("thinking_tokens") or 0)
    return unreadable


def format_stale(report: StaleReport, spec: Spec) -> Iterator[str]:
    """The table ``producer estimate`` and ``producer status --stale`` print."""
    mode = spec.ire.workflow.reprocess
    yield (f"done image-steps stale against this spec (workflow.reprocess: {mode}"
           + {"changed": ": a re-run redoes these", "all": ": a re-run redoes everything",
              "missing": ": kept; workflow.reprocess=changed redoes them"}[mode] + ")")
    yield f"  {'step':<6}{'done':>10}{'stale':>10}{'calls':>10}{'input tokens':>16}{'output tokens':>16}"
    for s in report.steps:
        yield f"  {s.step:<6}{s.done:>10,}{s.stale:>10,}{s.calls:>10,}{s.input_tokens:>16,}{s.output_tokens:>16,}"
    notes = []
    no_fp = sum(s.no_fingerprint for s in report.steps)
    if no_fp:
        notes.append(f"{no_fp} record(s) carry no fingerprint (written before fingerprints existed): counted stale")
    if report.images_unreadable:
        notes.append(f"{report.images_unreadable} image(s) could not be read: their steps count as stale")
    if report.stale:
        cost = "" if report.cost is None else f", about {report.cost:.4g} at vlm.prices"
        yield f"  redoing them: {sum(s.calls for s in report.steps):,} calls (tokens as their last calls took{cost})"
    for n in notes:
        yield f"note: {n}"
