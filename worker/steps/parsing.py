"""Parsers for what real models emit: fenced JSON, NDJSON, truncated arrays, stray prose.

Each parser returns what it could use plus a list of the repairs it had to make, so the quality
report can say how often answers needed help. Finding nothing is the caller's ``ParseError``.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|\Z)", re.S)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
MAX_ANSWER_CHARS = 200_000


@dataclass
class Parsed:
    """Items parsed from an answer and the repairs needed to get them."""

    items: list = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)


def strip_fences(text: str) -> tuple[str, bool]:
    """The content of the first ``` fenced block (closed or not), or the text unchanged."""
    m = _FENCE.search(text)
    if m:
        return m.group(1).strip(), True
    return text.strip(), False


def _loads_lenient(s: str) -> tuple[object, list[str]] | None:
    """``json.loads`` and, failing that, the usual repairs: trailing commas, Python literals."""
    try:
        return json.loads(s), []
    except (ValueError, RecursionError):
        pass
    fixed = _TRAILING_COMMA.sub(r"\1", s)
    if fixed != s:
        try:
            return json.loads(fixed), ["trailing_comma"]
        except (ValueError, RecursionError):
            pass
    try:
        value = ast.literal_eval(fixed)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    if isinstance(value, (list, dict)):
        return value, ["python_literal"]
    return None


def _objects_in(text: str) -> list[dict]:
    """Every balanced top-level ``{...}`` in ``text`` that decodes to an object.

    This is how truncated arrays and NDJSON both come apart: complete objects survive, the cut
    one at the end is dropped.
    """
    out: list[dict] = []
    depth, start, in_str, esc = 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0 and start >= 0:
                got = _loads_lenient(text[start : i + 1])
                if got is not None and isinstance(got[0], dict):
                    out.append(got[0])
                start = -1
    return out


def parse_json_objects(text: str) -> Parsed:
    """A list of JSON objects from a model answer.

    Tries, in order: the whole (de-fenced) text as an array or object; then every complete
    object found in it (NDJSON, truncated arrays, prose around the JSON).
    """
    result = Parsed()
    if len(text) > MAX_ANSWER_CHARS:
        text = text[:MAX_ANSWER_CHARS]
        result.repairs.append("oversized_answer_cut")
    body, fenced = strip_fences(text)
    if fenced:
        result.repairs.append("code_fence")
    got = _loads_lenient(body)
    if got is not None:
        value, repairs = got
        result.repairs.extend(repairs)
        if isinstance(value, dict):
            # {"regions": [...]} or a single object
            lists = [v for v in value.values() if isinstance(v, list) and v and isinstance(v[0], dict)]
            if len(lists) == 1:
                result.items = list(lists[0])
                result.repairs.append("wrapped_in_object")
            else:
                result.items = [value]
            return result
        if isinstance(value, list):
            result.items = [v for v in value if isinstance(v, dict)]
            if len(result.items) != len(value):
                result.repairs.append("non_object_items_dropped")
            return result
    objects = _objects_in(body)
    if objects:
        stripped = body.lstrip()
        if stripped.startswith("[") and not stripped.rstrip().endswith("]"):
            result.repairs.append("truncated_array")
        elif not stripped.startswith(("[", "{")):
            result.repairs.append("prose_around_json")
        else:
            result.repairs.append("ndjson")
        result.items = objects
    return result


_GROUNDING_LINE = re.compile(r"^\s*(?:[-*•]\s+|\d+[.)]\s+)?(?P<phrase>[^\n]+?)\s*:\s*(?P<boxes>\[.*\])\s*$")


def parse_grounding_lines(text: str) -> Parsed:
    """``<phrase>: [[x1, y1, x2, y2], ...]`` lines -> ``[(phrase, [box, ...]), ...]``.

    Lines that do not have this shape are skipped (and counted); a single flat box
    ``[x1, y1, x2, y2]`` is taken as a list of one. Phrases lose surrounding quotes and markup.
    """
    result = Parsed()
    if len(text) > MAX_ANSWER_CHARS:
        text = text[:MAX_ANSWER_CHARS]
        result.repairs.append("oversized_answer_cut")
    body, fenced = strip_fences(text)
    if fenced:
        result.repairs.append("code_fence")
    skipped = 0
    for line in body.splitlines():
        if not line.strip():
            continue
        m = _GROUNDING_LINE.match(line)
        if not m:
            skipped += 1
            continue
        got = _loads_lenient(m.group("boxes"))
        if got is None or not isinstance(got[0], list):
            skipped += 1
            continue
        boxes = got[0]
        if boxes and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in boxes):
            boxes = [boxes]
            result.repairs.append("flat_box")
        phrase = m.group("phrase").strip().strip("*_`\"'").strip()
        if not phrase:
            skipped += 1
            continue
        result.items.append((phrase, [b for b in boxes if isinstance(b, list)]))
    if skipped:
        result.repairs.append(f"skipped_lines:{skipped}")
    return result
