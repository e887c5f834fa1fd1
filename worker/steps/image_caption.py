"""Step 1, ``image_caption``: a holistic, location-agnostic scene caption.

Input columns: ``image_path``. Output: ``caption`` (stripped text, reasoning tags removed, at
most ``MAX_CAPTION_CHARS``).

A caption is prose. An answer that is JSON is the answer to another prompt (a region list, a
groups object: an endpoint mixing up requests, or a model that kept the last schema): it is a
``ParseError``, retried like a wrong shape at steps 0, 2 and 3, unless it is a caption wrapped
in JSON (``{"caption": "..."}``), which is unwrapped.
"""

from __future__ import annotations

import re

from worker.errors import ParseError
from worker.stepdefs import for_module
from worker.steps.jsonrepair import decode_json
from worker.steps.options import AnswerContext
from worker.steps.parsing import MAX_ANSWER_CHARS, collapse_repeats, strip_reasoning
from worker.steps.quality import new_quality
from worker.steps.records import with_step

DEF = for_module(__name__)  # number, name and policy: worker/stepdefs.py


# A caption is a paragraph or two; TAO's prompt asks for nothing longer. Past this the model
# is rambling (or looping without repeating itself exactly), and every character is stored.
MAX_CAPTION_CHARS = 6_000
_CAPTION_KEYS = ("caption", "image_caption", "description", "text")
# Keys of the other steps' answers (and their schemas): JSON holding them is not a caption.
_STEP_KEYS = frozenset({"regions", "objects", "groups", "expressions", "bbox_2d", "bbox", "box_2d", "box_ids",
                        "boxes", "phrase", "id", "type", "color"})
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
    caption = _unwrap_json(caption.strip(), text, repairs)
    caption, cut = _cap(caption)
    if cut:
        repairs.append("oversized_answer_cut")
    caption, looped = collapse_repeats(caption.strip())
    if looped:
        repairs.append("repetition_collapsed")
    if not caption:
        raise ParseError("step 1: the answer holds no caption text", raw=text)
    if _REFUSAL.match(caption) and len(caption) < 400:
        raise ParseError("step 1: the model refused to caption the image", raw=text)
    q = new_quality(ctx.mode if ctx.mode else "text", repairs=repairs, answers_cut=int(bool(cut)))
    q["mode"] = "text"
    report = {"repairs": repairs, "quality": q} if repairs else {"quality": q}
    return {"caption": caption, "report": report}


def _cap(caption: str) -> tuple[str, int]:
    """At most MAX_CAPTION_CHARS, cut after the last whole sentence when one ends in the last
    half (else at a word); returns the caption and the characters cut."""
    if len(caption) <= MAX_CAPTION_CHARS:
        return caption, 0
    head = caption[:MAX_CAPTION_CHARS]
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", head)]
    if ends and ends[-1] >= MAX_CAPTION_CHARS // 2:
        head = head[: ends[-1]]
    elif " " in head[MAX_CAPTION_CHARS // 2:]:
        head = head[: head.rindex(" ")]
    return head, len(caption) - len(head)


def _keys(value: object) -> list[str]:
    if isinstance(value, dict):
        return [str(k) for k in value]
    if isinstance(value, list):
        return [str(k) for v in value if isinstance(v, dict) for k in v]
    return []


def _unwrap_json(caption: str, raw: str, repairs: list[str]) -> str:
    """The caption an answer holds when it is JSON: a ``{"caption": ...}`` string, unwrapped;
    any other JSON (another step's answer) raises ParseError naming what it holds."""
    if caption.startswith(("{", "[")):
        got = decode_json(caption[:MAX_ANSWER_CHARS])
        value = got[0] if got is not None else None
        if isinstance(value, dict):
            inner = next((value[k] for k in _CAPTION_KEYS if isinstance(value.get(k), str) and value[k].strip()),
                         None)
            if inner is not None and not _STEP_KEYS.intersection(value) - {"text"}:
                repairs.append("caption_from_json")
                return inner.strip()
        keys = list(dict.fromkeys(_keys(value)))[:6]
        what = (f"JSON with the keys {', '.join(keys)}" if keys else
                "JSON" if value is not None else "JSON-like data (cut, or too deeply nested to read)")
        raise ParseError(f"step 1: the answer is {what}, not a caption (an answer to another step's "
                         "prompt or schema)", raw=raw)
    got = decode_json(caption[:MAX_ANSWER_CHARS]) if "{" in caption else None
    if got is not None and _STEP_KEYS.intersection(_keys(got[0])) - {"text", "type", "color", "id"}:
        keys = list(dict.fromkeys(_keys(got[0])))[:6]
        raise ParseError(f"step 1: the answer holds JSON with the keys {', '.join(keys)} (another step's "
                         "answer), not a caption", raw=raw)
    return caption


def n_items(record: dict) -> int:
    """A caption covers no boxes."""
    return 0


def empty() -> dict:  # pragma: no cover - step 1 always calls the model
    raise AssertionError("step 1 always asks the model")


def record(rec: dict, parsed: dict) -> dict:
    return with_step(rec, DEF.number, {"caption": parsed["caption"]}, parsed.get("report") or None)


def legacy(rec: dict) -> str:
    """``.txt.step1``: the caption, no trailing newline."""
    return rec.get("caption") or ""
