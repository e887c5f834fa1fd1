"""Step 1, ``image_caption``: a holistic, location-agnostic scene caption.

Input columns: ``image_path``. Output: ``caption`` (stripped text, reasoning tags removed).
"""

from __future__ import annotations

import re

from worker.errors import ParseError
from worker.steps.options import AnswerContext
from worker.steps.parsing import collapse_repeats, strip_reasoning
from worker.steps.quality import new_quality
from worker.steps.records import with_step

NUMBER = 1
NAME = "image_caption"
INPUTS = ("image_path",)
OUTPUTS = ("caption",)

_FENCE_MARK = re.compile(r"^\s*```[\w+-]*\s*$", re.M)
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:caption|description)(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.I)
# Short answers that are refusals, not captions (a caption never starts like this).
_REFUSAL = re.compile(
    r"^\s*(?:i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i cannot|i am unable|i'?m unable|i'?m not able|"
    r"unable to (?:help|assist|describe|process)|as an ai,? i can)", re.I)


def build_prompt(record: dict, template: str, *, ctx: AnswerContext | None = None) -> tuple[str, dict]:
    return template.strip(), {"kitti_bboxes": record.get("kitti_bboxes") or []}


def parse(text: str, record: dict, *, ctx: AnswerContext | None = None) -> dict:
    """The caption: reasoning, code fences and a ``Caption:`` label removed; refusals rejected."""
    ctx = ctx or AnswerContext()
    repairs: list[str] = []
    caption, thought = strip_reasoning(text)
    if thought:
        repairs.append("reasoning_removed")
    if "```" in caption:
        caption = _FENCE_MARK.sub("", caption).replace("```", "")
        repairs.append("code_fence")
    labelled = _LABEL.sub("", caption, count=1)
    if labelled != caption:
        caption = labelled
        repairs.append("label_removed")
    caption, looped = collapse_repeats(caption.strip())
    if looped:
        repairs.append("repetition_collapsed")
    if not caption:
        raise ParseError("step 1: the answer holds no caption text", raw=text)
    if _REFUSAL.match(caption) and len(caption) < 400:
        raise ParseError("step 1: the model refused to caption the image", raw=text)
    q = new_quality(ctx.mode if ctx.mode else "text", repairs=repairs)
    q["mode"] = "text"
    report = {"repairs": repairs, "quality": q} if repairs else {"quality": q}
    return {"caption": caption, "report": report}


def empty() -> dict:  # pragma: no cover - step 1 always calls the model
    raise AssertionError("step 1 always asks the model")


def record(rec: dict, parsed: dict) -> dict:
    return with_step(rec, NUMBER, {"caption": parsed["caption"]}, parsed.get("report") or None)


def legacy(rec: dict) -> str:
    """``.txt.step1``: the caption, no trailing newline."""
    return rec.get("caption") or ""
