"""The four steps as pure functions, and the one runner that drives any of them.

Each step module has ``build_prompt(record, template) -> (prompt, hint) | None``,
``parse(text, record) -> parsed`` (raises ParseError), ``empty()``, ``record(rec, parsed)`` and
``legacy(rec) -> str``. Nothing here imports Celery or Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from worker.clients.base import VLMClient, VLMRequest, VLMResponse
from worker.errors import EmptyAnswer
from worker.images import DEFAULT_MAX_PIXELS, load_payload
from worker.steps import double_check, grounding_expr, image_caption, region_expr
from worker.steps.records import merge

CLEAN_STOPS = ("stop", "STOP", "end_turn")

STEPS: dict[int, ModuleType] = {0: region_expr, 1: image_caption, 2: grounding_expr, 3: double_check}

# Which earlier steps a step reads: required, and used when present.
REQUIRES: dict[int, tuple[int, ...]] = {0: (), 1: (), 2: (0,), 3: (2,)}
USES: dict[int, tuple[int, ...]] = {0: (), 1: (), 2: (0, 1), 3: (2,)}


@dataclass
class StepOutcome:
    """A finished step: the record for the sink, the legacy file text, and the raw answer."""

    record: dict
    legacy: str
    response: VLMResponse | None = None


def input_record(step: int, seed: dict, upstream: dict[int, dict]) -> dict:
    """The record a step works on: the seed merged with the upstream records it uses."""
    if step == 3:
        return merge(upstream[2])
    return merge(seed, *(upstream.get(s) for s in USES[step]))


def run_step(
    step: int,
    record: dict,
    client: VLMClient,
    templates: dict[str, str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> StepOutcome:
    """Build the prompt, ask the model (unless nothing needs asking), parse, build the record.

    Raises the errors of ``worker.errors``: the caller decides about retries and failures.
    """
    mod = STEPS[step]
    call = mod.build_prompt(record, templates[mod.NAME])
    response = None
    if call is None:
        parsed = mod.empty()
    else:
        prompt, hint = call
        image = load_payload(record["image_path"], max_pixels=max_pixels)
        response = client.generate(VLMRequest(image=image, prompt=prompt, step=mod.NAME, hint=hint))
        if response.text and response.text.strip():
            parsed = mod.parse(response.text, record)
        elif step == 3 and response.finish_reason in CLEAN_STOPS:
            # The step-3 prompt says to omit every line whose boxes were all removed, so a
            # cleanly finished empty answer means "nothing survived" (flagged in meta).
            parsed = double_check.all_removed(record)
        else:
            raise EmptyAnswer(f"step {step}: the model returned no text (finish: {response.finish_reason})")
    out = mod.record(record, parsed)
    return StepOutcome(record=out, legacy=mod.legacy(out), response=response)


def final_record(steps: list[int], records: dict[int, dict]) -> dict:
    """The record ``annotations.jsonl`` holds: the last step's, or steps 0 and 1 merged."""
    if 3 in steps or 2 in steps:
        return records[max(s for s in steps if s >= 2)]
    return merge(*(records.get(s) for s in (0, 1)))
