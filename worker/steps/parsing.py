"""Parsers for what real models emit: fenced JSON, NDJSON, truncated arrays, stray prose.

Each parser returns what it could use plus a list of the repairs it had to make, so the quality
report can say how often answers needed help. Finding nothing is the caller's ``ParseError``.

What they cope with, all seen from real models: code fences (closed or not, several, inside JSON
mode), prose before, between and after, single quotes and Python literals (``True``, tuples),
trailing commas, unquoted keys, ``//`` comments, raw newlines inside strings, duplicated keys
(last wins, as every JSON parser does), answers cut by the token limit (the last complete
element is kept, the cut one dropped), repetition loops (identical items or lines dropped, a
phrase repeated over and over collapsed), objects keyed by id, and grounding lines with bullets,
markdown, other separators, single boxes, boxes without the outer brackets, boxes as strings.
Repairs never invent content: whatever is not complete is dropped, and a box is never guessed.
"""

from __future__ import annotations

import difflib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from worker.steps.jsonrepair import close_truncated, decode_json, json_segments, loads_lenient

_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_FENCE_LINE = re.compile(r"^\s*```[a-zA-Z0-9_+-]*\s*$")
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S)
MAX_ANSWER_CHARS = 200_000
# What a box answer may hold, by the boxes it is about: a fenced preamble and some prose, plus
# far more per box than a phrase, a type, a color and a box take (~150 characters in TAO's
# format). Beyond it the model is looping or rambling, and what it adds would be stored.
ANSWER_BASE_CHARS = 8_000
ANSWER_CHARS_PER_BOX = 1_000


@dataclass
class Parsed:
    """Items parsed from an answer and the repairs needed to get them."""

    items: list = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    # lines or objects cut off by truncation (their phrases, when known)
    cut: list[str] = field(default_factory=list)
    # "groups" when the answer was a structured groups object (even an empty one)
    shape: str = ""

    def add(self, *kinds: str) -> None:
        for k in kinds:
            if k and k not in self.repairs:
                self.repairs.append(k)


def repair_counts(repairs: list[str]) -> dict[str, int]:
    """``["code_fence", "skipped_lines:2"]`` -> ``{"code_fence": 1, "skipped_lines": 2}``."""
    out: Counter[str] = Counter()
    for r in repairs:
        kind, _, n = r.partition(":")
        out[kind] += int(n) if n.isdigit() else 1
    return dict(out)


def answer_limit(n_boxes: int) -> int:
    """The most characters an answer about ``n_boxes`` boxes is read up to."""
    return ANSWER_BASE_CHARS + ANSWER_CHARS_PER_BOX * max(0, n_boxes)


def cap_answer(text: str, limit: int) -> tuple[str, int]:
    """``text`` cut to ``limit`` characters (at a line end when one is in the last half), and
    how many characters were cut. Reasoning blocks go first, so they never push out the answer.

    A cut answer reads like one cut by the token limit: complete elements are kept, the cut one
    is dropped (:func:`close_truncated`). Callers count the cut in their quality report.
    """
    if len(text) <= limit:
        return text, 0
    text, _ = strip_reasoning(text)
    if len(text) <= limit:
        return text, 0
    cut = text[:limit]
    newline = cut.rfind("\n")
    if newline >= limit // 2:
        cut = cut[:newline]
    return cut, len(text) - len(cut)


def strip_fences(text: str) -> tuple[str, bool]:
    """The content of the first ``` fenced block (closed or not), or the text unchanged."""
    m = _FENCE.search(text)
    if m:
        return m.group(1).strip(), True
    return text.strip(), False


def fenced_blocks(text: str) -> list[str]:
    """The contents of every ``` fenced block, in order (an unclosed last one included)."""
    return [m.group(1).strip() for m in _FENCE.finditer(text)]


def strip_reasoning(text: str) -> tuple[str, bool]:
    """The text without ``<think>...</think>`` blocks (an unclosed one runs to the end)."""
    out = _THINK.sub("", text)
    return out, out != text


def _dict_items(value: object, result: Parsed) -> list[dict]:
    if isinstance(value, list):
        items = [v for v in value if isinstance(v, dict)]
        if len(items) != len(value):
            result.add("non_object_items_dropped")
        return items
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if len(lists) == 1:
            result.add("wrapped_in_object")
            return [v for v in lists[0] if isinstance(v, dict)]
        if len(value) == 1 and isinstance(next(iter(value.values())), dict):
            inner = next(iter(value.values()))
            if any(isinstance(v, list) and v and isinstance(v[0], dict) for v in inner.values()):
                result.add("wrapped_in_object")
                return _dict_items(inner, result)
        if value and all(isinstance(v, dict) for v in value.values()) and not any(
                k in value for k in ("bbox_2d", "bbox", "box_2d", "box")):
            result.add("keyed_objects")
            return [{"_key": k, **v} for k, v in value.items()]
        return [value]
    return []


def _dedupe(items: list, result: Parsed) -> list:
    seen: set[str] = set()
    out = []
    dropped = 0
    for it in items:
        key = json.dumps(it, sort_keys=True, default=str)
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        out.append(it)
    if dropped:
        result.repairs.append(f"repetition:{dropped}")
    return out


def _cut(text: str, result: Parsed) -> str:
    if len(text) > MAX_ANSWER_CHARS:
        result.add("oversized_answer_cut")
        return text[:MAX_ANSWER_CHARS]
    return text


def _json_values(text: str, result: Parsed) -> Iterator[tuple[object, list[str]]]:
    """(value, repairs) for each fenced block, or the whole text, that decodes as JSON."""
    for body in _bodies(_cut(text, result), result):
        got = decode_json(body)
        if got is not None:
            yield got


def _bodies(text: str, result: Parsed) -> list[str]:
    text, thought = strip_reasoning(text)
    if thought:
        result.add("reasoning_removed")
    blocks = fenced_blocks(text)
    if blocks:
        result.add("code_fence")
        rest = _FENCE.sub("\n", text)
        return [*blocks, rest] if rest.strip() else blocks
    return [text.strip()]


def parse_json_objects(text: str) -> Parsed:
    """A list of JSON objects from a model answer.

    The first fenced block (or the whole text) that holds a JSON value gives the items: an
    array's objects, the one list of objects an object wraps (``{"regions": [...]}``), the
    values of an object keyed by id, or a single object. Identical items (repetition loops)
    are dropped.
    """
    result = Parsed()
    for value, repairs in _json_values(text, result):
        items = _dict_items(value, result)
        if not items:
            continue
        result.add(*repairs)
        result.items = _dedupe(items, result)
        return result
    return result


# --------------------------------------------------------------------------- repetition

_REPEAT = re.compile(r"(\b.{3,80}?)(?:[\s,;]*\1){2,}", re.S)


def collapse_repeats(text: str) -> tuple[str, bool]:
    """A phrase repeated three or more times in a row, kept once (repetition loops)."""
    out = _REPEAT.sub(r"\1", text)
    return out, out != text


def norm_phrase(text: str) -> str:
    """A phrase for comparison: lower case, no quotes, markup or punctuation, single spaces."""
    t = re.sub(r"[*_`\"'“”‘’]", "", str(text)).lower()
    t = re.sub(r"[^\w\s-]", " ", t)
    return " ".join(w for w in t.split() if w not in ("the", "a", "an"))


# --------------------------------------------------------------------------- grounding lines

_BULLET = r"(?:[-*•]\s+|\d+[.)]\s+)?"
_GROUNDING_LINE = re.compile(
    rf"^\s*{_BULLET}(?P<phrase>[^\n]*?)\s*(?::|->|=>|=|\s[-–—]\s)\s*(?P<boxes>[\[(].*)$")
_GROUP_LABEL = re.compile(r"^(?:group|line|expression|phrase)\s*#?\d+\s*[:.)\-–]\s*", re.I)


def _box_list(raw: str) -> tuple[list | None, list[str], bool]:
    """The boxes of a line's ``[...]`` part: (boxes, repairs, complete)."""
    raw = raw.strip().rstrip(",;.")
    got = loads_lenient(raw)
    if got is not None and isinstance(got[0], list):
        value, reps = got
        complete = not any(r.startswith("truncated") for r in reps)
        return value, [r for r in reps if not r.startswith("truncated")], complete
    spans = json_segments(raw)
    if not spans or spans[0][0] != 0:
        return None, [], True
    if not spans[0][2]:
        return None, [], False  # the brackets never close
    if len(spans) > 1 and all(sp[2] for sp in spans):
        # "[1, 2, 3, 4], [5, 6, 7, 8]": single boxes without the outer brackets
        got = loads_lenient("[" + raw[: spans[-1][1]] + "]")
        if got is not None and isinstance(got[0], list):
            return got[0], [*got[1], "unwrapped_boxes"], True
    got = loads_lenient(raw[: spans[0][1]])
    if got is not None and isinstance(got[0], list):
        return got[0], [*got[1], "text_after_boxes"], True
    return None, [], True


def parse_grounding_lines(text: str, *, truncated: bool = False) -> Parsed:
    """``<phrase>: [[x1, y1, x2, y2], ...]`` lines -> ``[(phrase, [box, ...]), ...]``.

    Lines that do not have this shape are skipped (and counted); a single flat box
    ``[x1, y1, x2, y2]`` is taken as a list of one; boxes written as strings are decoded.
    Phrases lose surrounding quotes, markup and ``Group 1:`` labels. A line whose brackets do
    not close keeps its complete boxes, unless the answer was ``truncated`` and it is the last
    line: then it is reported in ``cut`` (its phrase) and left out, since its unseen boxes were
    not removed, only cut. An answer in JSON (``{"phrase": [[...]]}`` or a list of
    ``{"phrase", "boxes"}``) is read too. Identical lines (repetition loops) count once.
    """
    result = Parsed()
    text = _cut(text, result)
    text, thought = strip_reasoning(text)
    if thought:
        result.add("reasoning_removed")
    if "```" in text:
        result.add("code_fence")
        text = "\n".join(line for line in text.splitlines() if not _FENCE_LINE.match(line)).replace("```", "")
    from_json = _grounding_from_json(text)
    if from_json is not None:
        items, reps = from_json
        result.add(*reps, "json_groups")
        result.items = items
        return result
    lines = [ln for ln in text.splitlines() if ln.strip()]
    skipped = 0
    seen: set[str] = set()
    repeats = 0
    for idx, line in enumerate(lines):
        m = _GROUNDING_LINE.match(line)
        if not m:
            skipped += 1
            continue
        phrase = clean_phrase(m.group("phrase"), result)
        boxes, reps, complete = _box_list(m.group("boxes"))
        last = idx == len(lines) - 1
        if not complete:
            if truncated and last:
                if phrase:
                    result.cut.append(phrase)
                result.add("truncated_line")
                continue
            salvage = close_truncated(m.group("boxes").strip())
            got = loads_lenient(salvage) if salvage else None
            if got is None or not isinstance(got[0], list):
                skipped += 1
                continue
            boxes, reps = got[0], [*got[1], "unclosed_brackets"]
        if boxes is None:
            skipped += 1
            continue
        if not phrase:
            skipped += 1
            continue
        result.add(*reps)
        if boxes and all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in boxes) \
                and len(boxes) == 4 and not all(isinstance(v, str) and "[" in v for v in boxes):
            boxes = [boxes]
            result.add("flat_box")
        elif len(boxes) == 2 and all(isinstance(p, list) and len(p) == 2 for p in boxes):
            boxes = [boxes]  # [[x1, y1], [x2, y2]]: one box as its two corners
            result.add("corner_pairs")
        kept = []
        for b in boxes:
            if isinstance(b, (list, tuple, dict)):
                kept.append(list(b) if isinstance(b, tuple) else b)
            elif isinstance(b, str) and re.search(r"\d", b) and "[" in b:
                kept.append(b)
                result.add("box_as_string")
        key = json.dumps([phrase, kept], default=str)
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        result.items.append((phrase, kept))
    if skipped:
        result.repairs.append(f"skipped_lines:{skipped}")
    if repeats:
        result.repairs.append(f"repeated_line:{repeats}")
    return result


def clean_phrase(raw: str, result: Parsed | None = None) -> str:
    phrase = raw.strip().strip("*_`\"'“”").strip().rstrip(":").strip().strip("*_`\"'“”").strip()
    labelled = _GROUP_LABEL.sub("", phrase)
    if labelled != phrase and labelled:
        phrase = labelled.strip().strip("*_`\"'“”").strip()
        if result is not None:
            result.add("group_label")
    collapsed, looped = collapse_repeats(phrase)
    if looped and result is not None:
        result.add("repetition_collapsed")
    return collapsed


def field_of(obj: dict, keys: tuple[str, ...], want: type | tuple[type, ...] = object):
    """The value of the first of ``keys`` present in ``obj`` (of type ``want``), else of a key
    that is a near miss of one of them (a typo, or a byte lost to bad UTF-8: ``"phras\ufffd"``)."""
    for k in keys:
        if k in obj and isinstance(obj[k], want):
            return obj[k]
    for name, value in obj.items():
        if not isinstance(value, want) or not isinstance(name, str):
            continue
        clean = re.sub(r"[^a-z_]", "", name.lower())
        if clean and difflib.get_close_matches(clean, keys, n=1, cutoff=0.8):
            return value
    return None


_PHRASE_KEYS = ("phrase", "text", "expression", "description", "label", "name", "group")
_BOXES_KEYS = ("boxes", "bboxes", "bbox_2d", "bbox", "box_2d", "bounding_boxes", "coordinates")


def _as_boxes(v: object) -> list | None:
    """A JSON value as a list of boxes: a flat box is a list of one."""
    if not isinstance(v, list):
        return None
    if len(v) == 4 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return [v]
    if all(isinstance(b, (list, str, dict)) for b in v):
        return v
    return None


def _grounding_from_json(text: str) -> tuple[list, list[str]] | None:
    """Grounding groups an answer wrote as JSON, or None when it is not JSON of that shape."""
    body = text.strip()
    if not body.startswith(("{", "[")):
        return None
    got = decode_json(body)
    if got is None:
        return None
    value, reps = got
    items: list = []
    if isinstance(value, dict) and isinstance(value.get("groups"), list):
        value = value["groups"]
    if isinstance(value, dict) and any(isinstance(value.get(k), str) for k in _PHRASE_KEYS):
        value = [value]
    if isinstance(value, dict):
        for k, v in value.items():
            boxes = _as_boxes(v)
            if boxes is not None:
                items.append((clean_phrase(str(k)), boxes))
    elif isinstance(value, list):
        for obj in value:
            if not isinstance(obj, dict):
                continue
            phrase = next((obj[k] for k in _PHRASE_KEYS if isinstance(obj.get(k), str)), None)
            boxes = next((_as_boxes(obj[k]) for k in _BOXES_KEYS if _as_boxes(obj.get(k)) is not None), None)
            if phrase is None or boxes is None:
                continue
            items.append((clean_phrase(phrase), boxes))
    if not items:
        return None
    return items, reps


# --------------------------------------------------------------------------- ids (structured)

_ID = re.compile(r"^\s*(?:#|id\s*[:=]?\s*|box\s*[_#-]?\s*|obj(?:ect)?\s*[_#-]?\s*)?(\d+)(?:\.0+)?\s*$", re.I)
_ID_KEYS = ("id", "box_id", "object_id", "idx", "index", "_key")
_IDS_KEYS = ("box_ids", "ids", "boxes", "box_id", "members", "objects", "items", "object_ids")


def as_id(value: object) -> int | None:
    """An id a model wrote: ``3``, ``"3"``, ``3.0``, ``"#3"``, ``"id 3"``, ``"box_3"``."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value.is_integer() and value >= 0 else None
    if isinstance(value, str):
        m = _ID.match(value)
        return int(m.group(1)) if m else None
    if isinstance(value, dict):
        for k in _ID_KEYS:
            if k in value:
                return as_id(value[k])
    return None


def item_id(item: dict) -> int | None:
    """The id an object carries; a key it was filed under counts only when it is a bare number
    (``{"3": {...}}``), never a name like ``object_1`` (1-based or 0-based, nobody knows)."""
    for k in _ID_KEYS:
        if k in item:
            if k == "_key" and not str(item[k]).strip().isdigit():
                return None
            return as_id(item[k])
    return None


def parse_groups(text: str) -> Parsed:
    """``{"groups": [{"phrase", "box_ids"}]}`` -> ``[(phrase, [ids], [bad id values])]``.

    Accepts a bare list of groups, other key names (``text``, ``ids``...), ids as strings
    (``"3"``, ``"#3"``, ``"box_3"``) and groups keyed by phrase (``{"red cars": [1, 2]}``).
    Returns no items when the answer is not shaped like that (the caller falls back to lines).
    """
    result = Parsed()
    for value, reps in _json_values(text, result):
        groups: list = []
        if isinstance(value, dict):
            inner = next((value[k] for k in ("groups", "expressions", "results") if isinstance(value.get(k), list)),
                         None)
            if inner is not None:
                result.shape = "groups"
            if inner is None:
                lists = [v for v in value.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
                inner = lists[0] if len(lists) == 1 else None
                if inner is not None:
                    result.shape = "groups"
            if inner is not None:
                value = inner
            elif all(isinstance(v, list) for v in value.values()):
                groups = [(clean_phrase(str(k), result), v, []) for k, v in value.items()]
                result.add("keyed_groups")
        if isinstance(value, list):
            for obj in value:
                if not isinstance(obj, dict):
                    continue
                phrase = field_of(obj, _PHRASE_KEYS, str)
                ids = field_of(obj, _IDS_KEYS, (list, int, str))
                if phrase is None or ids is None or ids is phrase:
                    continue
                if not isinstance(ids, list):
                    ids = [ids]
                groups.append((clean_phrase(phrase, result), ids, []))
        if not groups:
            if result.shape:
                result.add(*reps)
                return result  # a well-formed answer with no groups
            continue
        result.shape = "groups"
        result.add(*reps)
        out = []
        for phrase, raw_ids, _ in groups:
            ids, bad = [], []
            for v in raw_ids:
                i = as_id(v)
                if i is None:
                    bad.append(v)
                else:
                    if isinstance(v, str):
                        result.add("id_as_string")
                    ids.append(i)
            out.append((phrase, ids, bad))
        result.items = _dedupe(out, result)
        return result
    return result
