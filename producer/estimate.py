"""``producer estimate``: how many calls and tokens a dataset will take, before any call is made.

Calls per step come from the labels: step 1 asks once per image; steps 0, 2 and 3 ask once per
image that has at least one KITTI box (an image without boxes is recorded without a call). With
``--sample N`` only N images (spread evenly over the sorted file names) have their header and
label read, and the shares are scaled to the whole directory.

Tokens per call are modelled as ``a + b * boxes`` for each step, from one of two sources:

- ``--from-results R``: a finished sample run (say 10 images through ``producer run``). Its step
  sinks hold each call's usage as the API reported it (``meta.<step>.call``); ``a`` and ``b``
  are fitted by least squares on (boxes in the image, tokens), or the mean when the sample
  cannot support a slope. This is the estimate to trust: it is the model's own count, image
  tokens and thinking included. The output names the model that answered the sample; a run of
  the offline teacher (``make demo``) is said to be one, since its text-only counts are no
  model's tokens.
- the spec (the default): the step's real prompt, built from the sampled labels with stand-in
  descriptions, phrases and caption, at 4 characters a token, plus the image tokens the
  provider charges (below); output tokens are the length of a typical answer of that step
  (``DESCRIPTION_CHARS`` per region description, ``CAPTION_TOKENS`` for a caption, grounding
  lines for steps 2 and 3), also at 4 characters a token. Thinking tokens (Gemini 2.5 thinks by
  default) are not in it: expect more output with a thinking model.

Image tokens per provider (documented rules; the image's size after the provider's resizing):

- Gemini 3 and later: by ``gemini.media_resolution``: LOW 280, MEDIUM 560, HIGH 1120,
  ULTRA_HIGH 2240 (unset: HIGH).
- Gemini 2.x and earlier: LOW 64, MEDIUM 256; otherwise 258 per 768x768 tile (258 when both
  sides are at most 384 pixels).
- OpenAI GPT models (``gpt-*``, ``o1``/``o3``/``o4``): 85 + 170 per 512-pixel tile after fitting
  into 2048x2048 and scaling the short side to 768 (``detail: high``).
- Any other OpenAI-compatible server (vLLM, NIM, ...): the Qwen2.5-VL rule, one token per
  28x28-pixel patch (sides rounded to multiples of 28), at most 16384.
- ``offline``: none (it counts only text).

Images above ``vlm.downscale_to_pixels`` are counted at the size they are sent at
(``worker.coords.downscaled_size``), the size the provider's rule then applies to.

Retries are not counted: add the failure rate of the sample run on top. With ``vlm.prices`` in
the spec the estimate also gives the cost (image tokens are input tokens; thinking is output).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from producer.exitcodes import user_errors
from producer.preview import spread_indices
from producer.seed import SeedReport, read_label, scan_image_dir, seed_from_jsonl
from producer.usage import call_cost
from worker.coords import downscaled_size
from worker.errors import ConfigError, InputError
from worker.images import read_size
from worker.kitti import cap_boxes, parse_kitti
from worker.layout import Layout
from worker.spec import Spec, VLMSpec, load_spec
from worker.steps import double_check, grounding_expr, region_expr
from worker.steps.prompts import load_prompts
from worker.steps.records import PIPELINE_NAMES, expression_id, grounding_lines

CHARS_PER_TOKEN = 4
DESCRIPTION_CHARS = 48      # "white sedan driving in the center lane, close by" (the prompt asks < 15 words)
CAPTION_TOKENS = 200        # a scene caption of ~150 words
DEFAULT_SAMPLE = 1000
BOX_STEPS = (0, 2, 3)       # steps that make no call for an image without boxes

GEMINI3_TOKENS = {"MEDIA_RESOLUTION_LOW": 280, "MEDIA_RESOLUTION_MEDIUM": 560, "MEDIA_RESOLUTION_HIGH": 1120,
                  "MEDIA_RESOLUTION_ULTRA_HIGH": 2240}
GEMINI2_TOKENS = {"MEDIA_RESOLUTION_LOW": 64, "MEDIA_RESOLUTION_MEDIUM": 256}


def text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


# --------------------------------------------------------------------------- image tokens


def _gemini_generation(model: str) -> int:
    m = re.match(r"(?:models/)?gemini-(\d+)", model)
    return int(m.group(1)) if m else 3


def image_tokens(vlm: VLMSpec, width: int, height: int) -> tuple[int, str]:
    """Tokens one image costs on the spec's endpoint, and the rule used (see the module doc)."""
    if vlm.backend == "offline":
        return 0, "offline: no image tokens"
    if vlm.backend == "gemini":
        res = vlm.gemini.media_resolution.upper()
        if not res.startswith("MEDIA_RESOLUTION_"):
            res = f"MEDIA_RESOLUTION_{res}"
        if _gemini_generation(vlm.gemini.model) >= 3:
            n = GEMINI3_TOKENS.get(res, GEMINI3_TOKENS["MEDIA_RESOLUTION_HIGH"])
            return n, f"gemini 3: {res} = {n} tokens an image"
        if res in GEMINI2_TOKENS:
            return GEMINI2_TOKENS[res], f"gemini 2: {res} = {GEMINI2_TOKENS[res]} tokens an image"
        if width <= 384 and height <= 384:
            return 258, "gemini 2: 258 tokens (small image)"
        tiles = math.ceil(width / 768) * math.ceil(height / 768)
        return 258 * tiles, "gemini 2: 258 tokens per 768x768 tile"
    name = vlm.openai.model_name.lower().rsplit("/", 1)[-1]
    if name.startswith(("gpt", "o1", "o3", "o4", "chatgpt")):
        w, h = float(width), float(height)
        if max(w, h) > 2048:
            w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
        if min(w, h) > 768:
            w, h = w * 768 / min(w, h), h * 768 / min(w, h)
        tiles = math.ceil(w / 512) * math.ceil(h / 512)
        return 85 + 170 * tiles, "openai gpt: 85 + 170 per 512-px tile"
    patches = max(1, round(height / 28)) * max(1, round(width / 28))
    return min(patches, 16384), "qwen2.5-vl rule: one token per 28x28 patch"


# --------------------------------------------------------------------------- the dataset


@dataclass
class DatasetScan:
    """What the labels say: images, and the sampled images' sizes and boxes."""

    images: int
    sampled: list[dict] = field(default_factory=list)   # seed-like records
    unreadable: int = 0

    @property
    def with_boxes_share(self) -> float:
        return sum(1 for r in self.sampled if r["kitti_bboxes"]) / len(self.sampled) if self.sampled else 0.0

    @property
    def boxes_per_image_with_boxes(self) -> float:
        counts = [len(r["kitti_bboxes"]) for r in self.sampled if r["kitti_bboxes"]]
        return sum(counts) / len(counts) if counts else 0.0


class EvenSample:
    """About ``sample`` items spread evenly over a stream whose length is not known in advance,
    in memory for at most ``2 * sample`` of them: every ``stride``-th item is kept, and when
    the kept ones reach twice the sample, every other one is dropped and the stride doubles.
    ``sample`` 0 keeps every item (the user asked for all of them)."""

    def __init__(self, sample: int):
        self.sample, self.stride, self.seen = sample, 1, 0
        self.kept: list = []

    def add(self, item: object) -> None:
        if self.sample <= 0 or self.seen % self.stride == 0:
            self.kept.append(item)
            if self.sample > 0 and len(self.kept) >= 2 * self.sample:
                self.kept = self.kept[::2]
                self.stride *= 2
        self.seen += 1

    def result(self) -> list:
        return [self.kept[i] for i in spread_indices(len(self.kept), self.sample)]


def scan_dataset(spec: Spec, sample: int) -> DatasetScan:
    """Read headers and labels of ``sample`` images (0 = all) spread over the dataset.

    In bounded memory at any number of images (issue 16): the jsonl is streamed through an
    ``EvenSample``, the image folder's names through the external sort seeding uses; only the
    sampled images' records are held."""
    data = spec.ire.data
    if data.input_annotations_jsonl:
        if not Path(data.input_annotations_jsonl).is_file():
            raise ConfigError(f"data.input_annotations_jsonl: file not found: {data.input_annotations_jsonl}")
        kept = EvenSample(sample)
        for rec in seed_from_jsonl(spec, SeedReport()):
            kept.add(rec)
        return DatasetScan(images=kept.seen, sampled=kept.result())
    if not data.image_dir or data.image_dir == "???":
        raise ConfigError("no images: pass --image-dir (or image_referring_expression.data.image_dir=...)")
    image_dir = Path(data.image_dir).expanduser()
    if not image_dir.is_dir():
        raise ConfigError(f"--image-dir: not a directory: {image_dir}")
    label_dir = Path(data.kitti_label_dir).expanduser() if data.kitti_label_dir not in ("", "???") else None
    if label_dir is not None and not label_dir.is_dir():
        raise ConfigError(f"--label-dir: not a directory: {label_dir}")
    with scan_image_dir(image_dir).images as names:  # type: ignore[union-attr]
        scan = DatasetScan(images=names.count)
        wanted = iter(spread_indices(names.count, sample))
        want = next(wanted, None)
        for i, (stem, name) in enumerate(names):
            if i != want:
                continue
            want = next(wanted, None)
            rec = _sample_image(spec, image_dir / name, stem, label_dir)
            if rec is None:
                scan.unreadable += 1
            else:
                scan.sampled.append(rec)
            if want is None:
                break
    return scan


def _sample_image(spec: Spec, path: Path, stem: str, label_dir: Path | None) -> dict | None:
    """A seed-like record of one sampled image (its size and capped boxes), or None when its
    image or label cannot be read (seeding leaves such an image out too)."""
    data = spec.ire.data
    try:
        w, h = read_size(path, max_pixels=spec.ire.vlm.max_image_pixels)
    except InputError:
        return None
    boxes: list[list] = []
    if label_dir is not None:
        try:
            text = read_label(label_dir / f"{stem}.txt") or ""
        except InputError:
            return None
        parsed = parse_kitti(text, width=w, height=h, ignore_types=data.ignore_types)
        boxes = [[*b["bbox"], b["type"]] for b in cap_boxes(parsed.boxes, data.max_boxes_per_image)[0]]
    return {"image_id": stem, "image_path": str(path), "width": w, "height": h, "kitti_bboxes": boxes}


# --------------------------------------------------------------------------- token models


@dataclass
class LinearTokens:
    """Tokens per call = ``a + b * boxes``."""

    a: float
    b: float = 0.0

    def at(self, boxes: float) -> float:
        return self.a + self.b * boxes


def fit(points: list[tuple[float, float]]) -> LinearTokens:
    """Least squares ``y = a + b x``; the mean when x does not vary or the fit goes negative."""
    if not points:
        return LinearTokens(0.0)
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return LinearTokens(my)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    if a < 0 or b < 0:
        return LinearTokens(my)
    return LinearTokens(a, b)


def _stand_in_regions(rec: dict) -> list[dict]:
    filler = "x" * DESCRIPTION_CHARS
    return [{"bbox": b[:4], "type": str(b[4]).lower(), "color": "white", "description": filler, "kitti_index": i}
            for i, b in enumerate(rec["kitti_bboxes"])]


def _stand_in_expressions(rec: dict) -> list[dict]:
    """Groups as a model makes them: one per type, and one of all the boxes when there are types."""
    w, h = int(rec["width"]), int(rec["height"])
    boxes = rec["kitti_bboxes"]
    groups: dict[str, list[int]] = {}
    for i, b in enumerate(boxes):
        groups.setdefault(str(b[4]), []).append(i)
    members = list(groups.values()) + ([list(range(len(boxes)))] if len(groups) > 1 else [])
    return [{"expression_id": expression_id(rec["image_id"], k), "text": "y" * (DESCRIPTION_CHARS // 2),
             "instances": [{"bbox_2d": region_expr.prompt_box(boxes[i], w, h)} for i in group]}
            for k, group in enumerate(members)]


def spec_samples(spec: Spec, scan: DatasetScan) -> tuple[dict[int, list[tuple[float, float, float]]], str]:
    """``step -> [(boxes, input, output)]`` per sampled image that would make a call, from the spec."""
    templates = load_prompts(spec.ire.workflow.prompts_file)
    vlm = spec.ire.vlm
    out: dict[int, list[tuple[float, float, float]]] = {s: [] for s in spec.ire.workflow.steps}
    rules = set()
    caption = "z" * (CAPTION_TOKENS * CHARS_PER_TOKEN)
    for rec in scan.sampled:
        sent = downscaled_size(int(rec["width"]), int(rec["height"]), vlm.downscale_to_pixels)
        img, rule = image_tokens(vlm, *sent)
        if vlm.downscale_to_pixels:
            rule += f" (of the image sent: vlm.downscale_to_pixels={vlm.downscale_to_pixels})"
        rules.add(rule)
        n = len(rec["kitti_bboxes"])
        for step in out:
            if step == 1:
                prompt, answer_tokens = templates["image_caption"], CAPTION_TOKENS
            elif n == 0:
                continue
            elif step == 0:
                prompt = region_expr.build_prompt(rec, templates["region_expr"])[0]
                answer = json.dumps([{"bbox_2d": region_expr.prompt_box(b, rec["width"], rec["height"]),
                                      "type": r["type"], "color": r["color"], "description": r["description"]}
                                     for b, r in zip(rec["kitti_bboxes"], _stand_in_regions(rec), strict=True)])
                answer_tokens = text_tokens(answer)
            elif step == 2:
                with_regions = {**rec, "regions": _stand_in_regions(rec),
                                "caption": caption if 1 in spec.ire.workflow.steps else ""}
                prompt = grounding_expr.build_prompt(with_regions, templates["grounding_expr"])[0]
                answer_tokens = text_tokens(_grounding_text(rec))
            else:
                prompt = double_check.build_prompt({**rec, "expressions": _stand_in_expressions(rec)},
                                                   templates["double_check"])[0]
                answer_tokens = text_tokens(_grounding_text(rec))
            out[step].append((n, text_tokens(prompt) + img, answer_tokens))
    return out, "; ".join(sorted(rules))


def _grounding_text(rec: dict) -> str:
    return "\n".join(grounding_lines(_stand_in_expressions(rec)))


OFFLINE_MODEL = "offline"   # what the offline teacher records as its model (worker.clients.offline.MODEL)


def results_samples(results_dir: Path, steps: list[int]) -> tuple[dict[int, list[tuple[float, float, float]]],
                                                                   list[str]]:
    """``step -> [(boxes, input, output + thinking)]`` from a sample run's step sinks, and the models
    that answered those calls (sorted): the figures are that model's, whatever the spec now says."""
    layout = Layout(results_dir)
    if not layout.root.is_dir():
        raise ConfigError(f"--from-results: not a directory: {results_dir}")
    out: dict[int, list[tuple[float, float, float]]] = {}
    models: set[str] = set()
    found = False
    for step in steps:
        latest: dict[str, tuple[float, float, float]] = {}
        for _, rec in layout.sink(step).scan():
            call = ((rec.get("meta") or {}).get(PIPELINE_NAMES[step]) or {}).get("call")
            if call:
                latest[rec["image_id"]] = (len(rec.get("kitti_bboxes") or []), float(call.get("input_tokens") or 0),
                                           float(call.get("output_tokens") or 0) + float(call.get("thinking_tokens")
                                                                                         or 0))
                if call.get("model"):
                    models.add(str(call["model"]))
        out[step] = list(latest.values())
        found = found or bool(latest)
    if not found:
        raise ConfigError(f"--from-results {results_dir}: no call usage in its step sinks (run a sample with "
                          "this version first: `producer run ... --results-dir R` on a few images)")
    return out, sorted(models)


def spec_model(vlm: VLMSpec) -> str:
    """The model the spec asks for (``offline`` for the offline teacher)."""
    return {"gemini": vlm.gemini.model, "openai": vlm.openai.model_name}.get(vlm.backend, OFFLINE_MODEL)


def _same_model(measured: str, wanted: str) -> bool:
    """``models/gemini-2.5-flash-001`` measured for ``gemini-2.5-flash`` asked is the same model."""
    a, b = measured.lower().removeprefix("models/"), wanted.lower().removeprefix("models/")
    return bool(a and b) and (a.startswith(b) or b.startswith(a))


def offline_stand_in(measured_on: list[str], wanted: str) -> bool:
    """The sample run was answered by the offline teacher only, and the spec asks for a model."""
    return measured_on == [OFFLINE_MODEL] and wanted != OFFLINE_MODEL


def measured_source(results_dir: Path, models: list[str], wanted: str) -> tuple[str, str, list[str]]:
    """(tokens-from line, image-tokens line, notes) for figures measured on ``models``.

    Why: a sample run made by the offline teacher (``make demo``) counts text at 4 characters a
    token and no image at all; printed under a Gemini header as "measured" it would pass for
    Gemini's own figures. Say whose figures they are.
    """
    if models == [OFFLINE_MODEL]:
        source = f"sample run {results_dir}, answered by the offline teacher (not a model)"
        rule = "none: the offline teacher counts only text, 4 characters a token"
        notes = [] if wanted == OFFLINE_MODEL else [
            f"these figures come from the offline teacher, not {wanted}: they show the shape of the run "
            f"(calls, prompt sizes), not its tokens or cost; run a few images on {wanted} "
            "(`producer run -c SPEC ... --results-dir PILOT`) and use --from-results PILOT"]
        return source, rule, notes
    who = ", ".join(models) if models else "the model (not recorded)"
    source = f"sample run {results_dir}, answered by {who}"
    notes = []
    if OFFLINE_MODEL in models:
        notes.append("part of the sample was answered by the offline teacher: its calls count no image tokens")
    if models and not any(_same_model(m, wanted) for m in models):
        notes.append(f"measured on {who}, but the spec asks for {wanted}: its tokens per call may differ")
    return source, "measured (image tokens are in the reported input)", notes


# --------------------------------------------------------------------------- the estimate


@dataclass
class StepEstimate:
    step: int
    calls: int
    input_tokens: int
    output_tokens: int
    input_per_call: float
    output_per_call: float
    basis: int          # how many sampled calls the per-call numbers rest on


@dataclass
class Estimate:
    images: int
    sampled: int
    with_boxes_share: float
    boxes_per_image_with_boxes: float
    source: str
    image_rule: str
    steps: list[StepEstimate]
    input_tokens: int
    output_tokens: int
    cost: float | None
    prices: dict | None
    notes: list[str]
    measured_on: list[str] = field(default_factory=list)  # models that answered the sample run's calls
    stale: dict | None = None  # results_dir holds records: how many are stale against this spec (producer/stale.py)


def estimate(spec: Spec, *, sample: int = DEFAULT_SAMPLE, from_results: Path | None = None,
             stale: bool = False) -> Estimate:
    """The calls, tokens and cost of ``spec`` on its dataset; with ``stale``, also how many of
    the records already in ``spec.results_dir`` are stale against it (``producer/stale.py``:
    reads every record and image hash there, so only when asked: ``--results-dir``)."""
    scan = scan_dataset(spec, sample)
    steps = spec.ire.workflow.steps
    readable = len(scan.sampled)
    scale = scan.images / (readable + scan.unreadable) if readable + scan.unreadable else 0.0
    usable = round(readable * scale)
    with_boxes = round(sum(1 for r in scan.sampled if r["kitti_bboxes"]) * scale)
    mean_boxes = scan.boxes_per_image_with_boxes
    notes = []
    if scan.unreadable:
        notes.append(f"{round(scan.unreadable * scale)} images look unreadable (no calls counted for them)")
    measured_on: list[str] = []
    if from_results is not None:
        samples, measured_on = results_samples(Path(from_results).expanduser().resolve(), steps)
        source, rule, why = measured_source(from_results, measured_on, spec_model(spec.ire.vlm))
        notes.extend(why)
        if spec.ire.vlm.downscale_to_pixels:
            notes.append("measured input tokens are for the size the sample run sent; run the sample with the same "
                         f"vlm.downscale_to_pixels ({spec.ire.vlm.downscale_to_pixels}) to count downscaled images")
    else:
        samples, rule = spec_samples(spec, scan)
        source = "spec (prompt characters / 4 + image tokens; typical answer lengths)"
        notes.append("spec-based: real answers vary; run 10 images and use --from-results for a measured estimate")
    out = []
    for step in steps:
        pts = samples.get(step, [])
        tin = fit([(x, i) for x, i, _ in pts])
        tout = fit([(x, o) for x, _, o in pts])
        if step == 1:
            calls, boxes = usable, (mean_boxes * with_boxes / usable if usable else 0.0)
        else:
            calls, boxes = with_boxes, mean_boxes
        per_in, per_out = tin.at(boxes), tout.at(boxes)
        if not pts and calls:
            notes.append(f"step {step}: no sampled call to measure; its tokens are counted as 0")
        out.append(StepEstimate(step, calls, round(per_in * calls), round(per_out * calls),
                                round(per_in, 1), round(per_out, 1), len(pts)))
    total_in = sum(s.input_tokens for s in out)
    total_out = sum(s.output_tokens for s in out)
    prices = spec.ire.vlm.prices.model_dump()
    if spec.ire.vlm.batch.enabled:  # every first call goes in a batch job (re-asks, online, are not counted)
        cost = call_cost(prices, total_in, total_out, batch_input_tokens=total_in, batch_output_tokens=total_out)
    else:
        cost = call_cost(prices, total_in, total_out)
    if offline_stand_in(measured_on, spec_model(spec.ire.vlm)):
        cost = None  # the offline teacher's counts priced as a model's would be a made-up bill
    return Estimate(images=scan.images, sampled=readable + scan.unreadable, with_boxes_share=scan.with_boxes_share,
                    boxes_per_image_with_boxes=round(mean_boxes, 2), source=source, image_rule=rule, steps=out,
                    input_tokens=total_in, output_tokens=total_out, cost=None if cost is None else round(cost, 6),
                    prices=prices if cost is not None else None, notes=notes, measured_on=measured_on,
                    stale=_stale(spec) if stale else None)


def _stale(spec: Spec) -> dict | None:
    """When the spec's results dir already holds records: how many are stale against the spec
    and what redoing them costs (``producer/stale.py``); None for a results dir with none."""
    from producer.stale import stale_report

    if not spec.results_dir or not Layout(Path(spec.results_dir)).seed.exists():
        return None
    return stale_report(spec).to_json()


def format_estimate(e: Estimate, spec: Spec) -> Iterator[str]:
    vlm = spec.ire.vlm
    model = spec_model(vlm)
    target = "offline teacher" if vlm.backend == "offline" else f"{vlm.backend} {model}"
    yield (f"{e.images} images (labels read for {e.sampled}: {e.with_boxes_share:.0%} have boxes, "
           f"{e.boxes_per_image_with_boxes:g} boxes each) · spec: {target}")
    yield f"tokens from: {e.source}"
    yield f"image tokens: {e.image_rule}"
    yield f"  {'step':<6}{'calls':>10}{'input tokens':>16}{'output tokens':>16}{'per call in / out':>22}"
    for s in e.steps:
        per = f"{s.input_per_call:,.0f} / {s.output_per_call:,.0f}"
        yield f"  {s.step:<6}{s.calls:>10,}{s.input_tokens:>16,}{s.output_tokens:>16,}{per:>22}"
    yield f"  {'total':<6}{sum(s.calls for s in e.steps):>10,}{e.input_tokens:>16,}{e.output_tokens:>16,}"
    if offline_stand_in(e.measured_on, model):
        yield f"cost: not estimated (the figures come from the offline teacher, not {model})"
    elif e.cost is not None and e.prices:
        amount = f"{e.cost:,.2f}" if e.cost >= 10 else f"{e.cost:.4g}"
        batch = (f", at batch prices: x{e.prices.get('batch_factor', 0.5):g} (vlm.batch)"
                 if vlm.batch.enabled else "")
        yield (f"cost: {amount} (input {e.prices['input_per_million']:g} / output "
               f"{e.prices['output_per_million']:g} per million tokens{batch}; retries not included)")
    else:
        yield "cost: set vlm.prices.input_per_million / output_per_million in the spec to see it"
    for n in e.notes:
        yield f"note: {n}"
    if e.stale is not None:
        from producer.stale import StaleReport, StepStale, format_stale

        report = StaleReport([StepStale(**s) for s in e.stale["steps"]], e.stale["images_unreadable"], e.stale["cost"])
        yield from format_stale(report, spec)


# --------------------------------------------------------------------------- command line


def register(app: typer.Typer) -> None:
    """Add ``producer estimate`` to ``app``."""

    @app.command("estimate")
    def estimate_cmd(
        overrides: Annotated[list[str] | None, typer.Argument(help="Dot-notation overrides, key.path=value.")]
        = None,
        spec: Annotated[Path | None, typer.Option("-c", "--spec", help="Spec YAML (TAO layout).")] = None,
        image_dir: Annotated[Path | None, typer.Option("--image-dir", help="= ...data.image_dir")] = None,
        label_dir: Annotated[Path | None, typer.Option("--label-dir", help="= ...data.kitti_label_dir")] = None,
        sample: Annotated[int, typer.Option("--sample", min=0, help="Read the labels of this many images, "
                                                                     "spread evenly (0 = all).")] = DEFAULT_SAMPLE,
        from_results: Annotated[Path | None, typer.Option("--from-results", help="A sample run's results_dir: "
                                                          "use its measured token usage.")] = None,
        results_dir: Annotated[Path | None, typer.Option(
            "--results-dir", help="= results_dir: when it holds records, also count those stale against this spec "
                                  "(what workflow.reprocess=changed would redo) and their cost.")] = None,
        json_: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    ) -> None:
        """Predict calls, tokens and cost for a dataset before any call is made."""
        extra = list(overrides or [])
        if results_dir is not None:
            extra.append(f"results_dir={results_dir}")
        if image_dir is not None:
            extra.append(f"image_referring_expression.data.image_dir={image_dir}")
        if label_dir is not None:
            extra.append(f"image_referring_expression.data.kitti_label_dir={label_dir}")
        with user_errors():
            s = load_spec(spec, extra)
            e = estimate(s, sample=sample, from_results=from_results, stale=results_dir is not None)
        if json_:
            typer.echo(json.dumps(asdict(e)))
        else:
            for line in format_estimate(e, s):
                typer.echo(line)
