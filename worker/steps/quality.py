"""The quality report every step leaves in ``record["meta"][<step>]["quality"]``.

One shape for all four steps, so ``producer status`` can add them up per step without knowing
the steps. Every key is always present; counts that do not apply to a step stay 0.

=====================  =====================================================================
key                    meaning
=====================  =====================================================================
mode                   ``text`` (TAO prompt) or ``structured`` (JSON schema, ids)
box_format             the format the answer's boxes were read in (``worker.coords``); ""
                       when the answer carried ids, not boxes
fallback               ``structured_rejected`` when the endpoint refused the schema and the
                       text prompt was used instead; else ""
finish_reason          the last call's finish reason as the API gave it
calls                  VLM calls this step made (1 + truncation retries + re-asks)
reasks                 calls that asked again about missing ids only
truncated              the answer used was still cut after the retry (bool)
repairs                kind -> count of what parsing had to fix (``code_fence``, ...)
boxes_expected         boxes (or ids) the model was asked about
boxes_returned         boxes or ids found in the answer
boxes_matched          of those, joined to a KITTI box / region / original box (id or IoU>=0.5)
boxes_flagged          kept but joined to nothing (step 2 ``matched: false``)
hallucinated_dropped   boxes or ids that join nothing and were dropped
duplicates_dropped     boxes or ids joined to something already claimed (dropped)
ambiguous_dropped      boxes another box convention would join elsewhere, with nothing to
                       tell which is meant (dropped rather than guessed)
invalid_boxes          wrong length, NaN, out of range, no area
kitti_skipped          input boxes the model left out (step 0: KITTI boxes without a
                       region; step 2: regions in no group; step 3: boxes left unverified
                       because the answer was cut)
answers_cut            answers longer than the step reads (a caption: a few KB; a box
                       answer: ``worker.steps.parsing.answer_limit`` of its boxes), cut to
                       that size before parsing (the repair ``oversized_answer_cut`` too)
=====================  =====================================================================
"""

from __future__ import annotations

from worker.steps.parsing import repair_counts

COUNTS = ("calls", "reasks", "boxes_expected", "boxes_returned", "boxes_matched", "boxes_flagged",
          "hallucinated_dropped", "duplicates_dropped", "ambiguous_dropped", "invalid_boxes", "kitti_skipped",
          "answers_cut")
KEYS = ("mode", "box_format", "fallback", "finish_reason", "truncated", "repairs", *COUNTS)


def new_quality(mode: str = "text", box_format: str = "", repairs: list[str] | None = None, **counts) -> dict:
    q: dict = {"mode": mode, "box_format": box_format, "fallback": "", "finish_reason": "", "truncated": False,
               "repairs": repair_counts(repairs or [])}
    for k in COUNTS:
        q[k] = int(counts.get(k, 0))
    extra = set(counts) - set(COUNTS)
    if extra:
        raise KeyError(f"unknown quality keys: {sorted(extra)}")
    return {k: q[k] for k in KEYS}


def merge_quality(a: dict, b: dict) -> dict:
    """Two parts of one step (first answer and a re-ask) as one report."""
    out = dict(a)
    for k in COUNTS:
        out[k] = int(a.get(k, 0)) + int(b.get(k, 0))
    reps = dict(a.get("repairs") or {})
    for k, v in (b.get("repairs") or {}).items():
        reps[k] = reps.get(k, 0) + v
    out["repairs"] = reps
    out["box_format"] = a.get("box_format") or b.get("box_format", "")
    return out
