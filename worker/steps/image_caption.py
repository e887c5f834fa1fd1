"""Step 1, ``image_caption``: a holistic, location-agnostic scene caption.

Input columns: ``image_path``. Output: ``caption`` (stripped text, reasoning tags removed).
"""

from __future__ import annotations

import re

from worker.errors import ParseError
from worker.steps.records import with_step

NUMBER = 1
NAME = "image_caption"
INPUTS = ("image_path",)
OUTPUTS = ("caption",)

_THINK = re.compile(r"<think>.*?</think>", re.S)


def build_prompt(record: dict, template: str) -> tuple[str, dict]:
    return template.strip(), {"kitti_bboxes": record.get("kitti_bboxes") or []}


def parse(text: str, record: dict) -> dict:
    caption = _THINK.sub("", text).strip()
    if not caption:
        raise ParseError("step 1: the answer holds no caption text", raw=text)
    return {"caption": caption, "report": {}}


def empty() -> dict:  # pragma: no cover - step 1 always calls the model
    raise AssertionError("step 1 always asks the model")


def record(rec: dict, parsed: dict) -> dict:
    return with_step(rec, NUMBER, {"caption": parsed["caption"]})


def legacy(rec: dict) -> str:
    """``.txt.step1``: the caption, no trailing newline."""
    return rec.get("caption") or ""
