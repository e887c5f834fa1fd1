"""Lenient JSON: what models write instead of JSON, made readable.

Real answers carry Python literals (``True``, ``None``), single quotes, trailing commas, comments,
unquoted keys, duplicated keys, a cut-off tail and prose around the JSON. ``repair_json`` fixes
what can be fixed token by token, ``close_truncated`` closes what a token limit cut off (to
``MAX_DEPTH`` levels: deeper is given up, it was quadratic), and ``decode_json`` finds the JSON
values in a whole answer. The answer grammars of the steps are in ``parsing.py``. Pure: no
Celery, no Redis.
"""

from __future__ import annotations

import json
import re

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PY_LITERALS = {"True": "true", "False": "false", "None": "null"}
_CLOSERS = {"[": "]", "{": "}"}


def _prev_significant(out: list[str]) -> str:
    for chunk in reversed(out):
        s = chunk.rstrip()
        if s:
            return s[-1]
    return ""


def _next_significant(s: str, i: int) -> str:
    n = len(s)
    while i < n and s[i] in " \t\r\n":
        i += 1
    return s[i] if i < n else ""


def repair_json(s: str) -> tuple[str, list[str]]:
    """JSON-ish text as JSON: the repairs models need, applied outside strings only.

    Single-quoted strings become double-quoted (an apostrophe inside a word stays), trailing
    commas go, ``True/False/None`` and tuples become JSON, bare keys are quoted, ``//``
    comments are dropped and raw newlines inside strings are escaped. Unterminated strings are
    left unterminated: closing a cut answer is :func:`close_truncated`'s job.
    """
    out: list[str] = []
    repairs: list[str] = []
    i, n = 0, len(s)

    def note(kind: str) -> None:
        if kind not in repairs:
            repairs.append(kind)

    while i < n:
        c = s[i]
        if c == '"':
            j = i + 1
            buf = ['"']
            while j < n:
                d = s[j]
                if d == "\\" and j + 1 < n:
                    buf.append(s[j:j + 2])
                    j += 2
                    continue
                if d == '"':
                    buf.append('"')
                    j += 1
                    break
                if d in "\n\r\t":
                    buf.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[d])
                    note("control_char")
                else:
                    buf.append(d)
                j += 1
            out.append("".join(buf))
            i = j
            continue
        if c == "'" and _prev_significant(out) in ("", "{", "[", ",", ":", "("):
            j = i + 1
            buf = []
            closed = False
            while j < n:
                d = s[j]
                if d == "\\" and j + 1 < n:
                    buf.append(s[j + 1] if s[j + 1] in "'\"\\" else s[j:j + 2])
                    j += 2
                    continue
                if d == "'" and _next_significant(s, j + 1) in ("", ",", "}", "]", ":", ")"):
                    closed = True
                    j += 1
                    break
                buf.append(d)
                j += 1
            text = json.dumps("".join(buf), ensure_ascii=False)
            out.append(text if closed else text[:-1])
            note("single_quotes")
            i = j
            continue
        if c == "/" and i + 1 < n and s[i + 1] == "/":
            while i < n and s[i] != "\n":
                i += 1
            note("comment")
            continue
        if c == ",":
            nxt = _next_significant(s, i + 1)
            if nxt in ("]", "}", ")"):
                note("trailing_comma")
                i += 1
                continue
        if c == "(" and _prev_significant(out) in ("", "[", ",", ":"):
            out.append("[")
            note("python_literal")
            i += 1
            continue
        if c == ")":
            out.append("]")
            note("python_literal")
            i += 1
            continue
        if c.isalpha() or c == "_":
            m = _IDENT.match(s, i)
            word = m.group(0)
            if word in _PY_LITERALS:
                out.append(_PY_LITERALS[word])
                note("python_literal")
            elif word in ("true", "false", "null"):
                out.append(word)
            elif _prev_significant(out) in ("{", ",") and _next_significant(s, m.end()) == ":":
                out.append(json.dumps(word))
                note("unquoted_key")
            else:
                out.append(word)
            i = m.end()
            continue
        out.append(c)
        i += 1
    return "".join(out), repairs


MAX_DEPTH = 64


def close_truncated(s: str) -> str | None:
    """A cut JSON text closed after its last complete array element, or None if none is.

    Only an element that closes inside an array (``}`` or ``]`` whose parent is ``[``) is a safe
    cut point, so a cut object is dropped whole rather than kept without its last fields.
    No real answer nests deeper than a few levels; past ``MAX_DEPTH`` we give up rather than
    copy a deep bracket stack at every cut point (quadratic on adversarial answers).
    """
    stack: list[str] = []
    safe: tuple[int, list[str]] | None = None
    in_str = esc = False
    start = -1
    for i, ch in enumerate(s):
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
        elif ch in "[{":
            if start < 0:
                start = i
            stack.append(ch)
            if len(stack) > MAX_DEPTH:
                return None
        elif ch in "]}":
            if not stack or _CLOSERS[stack[-1]] != ch:
                return None
            stack.pop()
            if stack and stack[-1] == "[":
                safe = (i + 1, list(stack))
            if not stack:
                return None  # complete: nothing to close
    if start < 0 or not stack or safe is None:
        return None
    end, open_ = safe
    return s[start:end] + "".join(_CLOSERS[b] for b in reversed(open_))


class _Dupes:
    """``object_pairs_hook`` that keeps the last value of a repeated key and counts repeats."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, pairs: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for k, v in pairs:
            if k in out:
                self.count += 1
            out[k] = v
        return out


def _loads(s: str) -> tuple[object, int]:
    hook = _Dupes()
    return json.loads(s, object_pairs_hook=hook), hook.count


def loads_lenient(s: str) -> tuple[object, list[str]] | None:
    """``json.loads`` and, failing that, :func:`repair_json` and :func:`close_truncated`."""
    s = s.strip()
    if not s:
        return None
    attempts: list[tuple[str, list[str]]] = [(s, [])]
    fixed, repairs = repair_json(s)
    if fixed != s:
        attempts.append((fixed, repairs))
    closed = close_truncated(fixed)
    if closed is not None:
        kind = "truncated_array" if closed.lstrip().startswith("[") else "truncated_object"
        attempts.append((closed, [*repairs, kind]))
    for text, reps in attempts:
        try:
            value, dupes = _loads(text)
        except (ValueError, RecursionError):
            continue
        if dupes:
            reps = [*reps, "duplicate_key"]
        return value, reps
    return None


# Kept for callers of the old name.
_loads_lenient = loads_lenient


def json_segments(text: str) -> list[tuple[int, int, bool]]:
    """Top-level ``[...]``/``{...}`` spans of ``text``: (start, end, closed). Strings are
    tracked only inside a span, so quotes and apostrophes in prose do not confuse it."""
    out = []
    depth, start, in_str, esc, quote = 0, -1, False, False, ""
    for i, ch in enumerate(text):
        if depth and in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                in_str = False
            continue
        if depth and ch in "\"'":
            if ch == '"' or text[i - 1] in "[{,: \n\t":
                in_str, quote = True, ch
            continue
        if ch in "[{":
            if depth == 0:
                start = i
            depth += 1
        elif ch in "]}" and depth:
            depth -= 1
            if depth == 0:
                out.append((start, i + 1, True))
    if depth and start >= 0:
        out.append((start, len(text), False))
    return out


def _objects_in(text: str) -> list[dict]:
    """Every top-level ``{...}`` in ``text`` that decodes to an object (NDJSON, prose)."""
    out = []
    for s, e, closed in json_segments(text):
        if closed and text[s] == "{":
            got = loads_lenient(text[s:e])
            if got is not None and isinstance(got[0], dict):
                out.append(got[0])
    return out


def decode_json(body: str) -> tuple[object, list[str]] | None:
    """The JSON value an answer holds, wherever it sits in the text, and the repairs made."""
    got = loads_lenient(body)
    if got is not None and isinstance(got[0], (list, dict)):
        return got
    values = []
    for s, e, _closed in json_segments(body):
        got = loads_lenient(body[s:e])
        if got is not None and isinstance(got[0], (list, dict)):
            values.append((got, s, e))
    if not values:
        return None
    outside = body[: values[0][1]] + "".join(
        body[values[k][2]: values[k + 1][1]] for k in range(len(values) - 1)) + body[values[-1][2]:]
    prose = bool(outside.strip(" \t\r\n,;"))
    if len(values) == 1:
        (value, reps), _, _ = values[0]
        return value, [*reps, *(["prose_around_json"] if prose else [])]
    if all(isinstance(v[0][0], dict) for v in values):
        reps = [r for v in values for r in v[0][1]]
        return [v[0][0] for v in values], [*reps, "prose_around_json" if prose else "ndjson"]
    # several arrays: the one holding the most objects (the last on ties)
    best = max(values, key=lambda v: (sum(isinstance(x, dict) for x in v[0][0]) if isinstance(v[0][0], list)
                                      else 1, v[1]))
    (value, reps), _, _ = best
    return value, [*reps, "several_json_values"]
