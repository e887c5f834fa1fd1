"""Record helpers shared by the steps: canonical key order, merging, deterministic ids.

A record is the reference's unified schema (``image_id, image_path, width, height,
kitti_bboxes, regions, caption, expressions, source, pipeline_steps``) plus ``meta``, where
each step leaves what it had to repair or drop, so quality is visible per image.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from worker.stepdefs import PIPELINE

SOURCE = "image_referring_expression"
PIPELINE_NAMES = {d.number: d.record_name for d in PIPELINE}
_ORDER = (
    "image_id", "image_path", "width", "height", "kitti_bboxes", "regions", "caption",
    "expressions", "source", "pipeline_steps", "meta",
)


def canonical(record: dict) -> dict:
    """The record with keys in schema order (extra keys after), so output bytes are stable."""
    out = {k: record[k] for k in _ORDER if k in record}
    out.update({k: v for k, v in record.items() if k not in out})
    return out


def merge(*records: dict | None) -> dict:
    """Later records win field by field; ``pipeline_steps`` and ``meta`` are unioned in order."""
    out: dict = {}
    steps: list[str] = []
    meta: dict = {}
    for rec in records:
        if not rec:
            continue
        for k, v in rec.items():
            if k == "pipeline_steps":
                steps.extend(s for s in v if s not in steps)
            elif k == "meta":
                meta.update(v)
            else:
                out[k] = v
    out["pipeline_steps"] = steps
    if meta:
        out["meta"] = meta
    return canonical(out)


def with_step(record: dict, step: int, fields: dict, meta: dict | None = None) -> dict:
    """A copy of ``record`` with ``fields`` set and ``step`` appended to ``pipeline_steps``."""
    out = dict(record)
    out.update(fields)
    steps = [s for s in record.get("pipeline_steps", []) if s != PIPELINE_NAMES[step]]
    out["pipeline_steps"] = [*steps, PIPELINE_NAMES[step]]
    if meta is not None:
        out["meta"] = {**record.get("meta", {}), PIPELINE_NAMES[step]: meta}
    out.setdefault("source", SOURCE)
    return canonical(out)


def expression_id(image_id: str, k: int) -> str:
    return f"{image_id}/expr_{k}"


def bbox_id(image_id: str, k: int) -> str:
    return f"{image_id}/box_{k}"


def grounding_lines(expressions: Iterable[dict]) -> list[str]:
    """``<phrase>: [[x1, y1, x2, y2], ...]`` lines in the model's 0-1000 space (TAO's format)."""

    lines = []
    for expr in expressions:
        boxes = [list(inst["bbox_2d"]) for inst in expr.get("instances", []) if inst.get("bbox_2d")]
        if not boxes:
            continue
        text = expr.get("text", "").strip() or "object"
        lines.append(f"{text}: {json.dumps(boxes)}")
    return lines


def deterministic(record: dict) -> dict:
    """The record without what differs between two identical runs: each call's ``latency_s``."""
    meta = record.get("meta")
    if not meta or not any(isinstance(m, dict) and "latency_s" in (m.get("call") or {}) for m in meta.values()):
        return record
    clean = {}
    for name, m in meta.items():
        if isinstance(m, dict) and isinstance(m.get("call"), dict):
            m = {**m, "call": {k: v for k, v in m["call"].items() if k != "latency_s"}}
        clean[name] = m
    return {**record, "meta": clean}
