"""JSON schemas for structured mode, one per step that has boxes.

Deliberately shallow and plain: object-rooted, no numeric bounds, no ``$ref``, no enums —
Gemini rejects schemas whose constraints make "too many states" or nest deeply, and every
OpenAI-compatible server (OpenAI, vLLM >= 0.12 with xgrammar/guidance, NIM 2.x) takes these.
Clients adapt them to their API (OpenAI's strict mode wants ``additionalProperties: false``).
"""

from __future__ import annotations

import copy

_STR = {"type": "string"}

REGIONS = {
    "type": "object",
    "properties": {
        "objects": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"id": {"type": "integer"}, "type": _STR, "color": _STR, "description": _STR},
                "required": ["id", "type", "color", "description"],
            },
        },
    },
    "required": ["objects"],
}

GROUPS = {
    "type": "object",
    "properties": {
        "groups": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"phrase": _STR, "box_ids": {"type": "array", "items": {"type": "integer"}}},
                "required": ["phrase", "box_ids"],
            },
        },
    },
    "required": ["groups"],
}

SCHEMAS: dict[str, dict] = {"region_expr": REGIONS, "grounding_expr": GROUPS, "double_check": GROUPS}


def schema_for(step_name: str) -> dict | None:
    """A fresh copy of the step's schema (callers may adapt it), or None (step 1: free text)."""
    s = SCHEMAS.get(step_name)
    return copy.deepcopy(s) if s is not None else None
