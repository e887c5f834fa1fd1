"""What a step needs to know about the model besides the prompt: answer mode and box convention.

``StepOptions`` is resolved once per run from the ``vlm`` spec section; ``AnswerContext`` is what
one prompt/parse pair runs with (the mode actually used, the convention, whether the answer was
cut, and, for a re-ask, the subset of ids asked about).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from worker.coords import Convention, Frame, convention_for
from worker.steps.fingerprint import generation

TEXT = "text"
STRUCTURED = "structured"


@dataclass(frozen=True)
class StepOptions:
    """Per-run options of the step runner, from ``vlm.*``.

    :param structured_output: ``auto`` (JSON schema where the endpoint takes it, ids instead of
        coordinates) or ``off`` (TAO's text prompts and formats).
    :param box_format: ``auto`` (the model table in ``worker.coords``) or a format name.
    :param model: the model name, for the convention table and the thinking defaults.
    :param max_tokens: the configured output budget (``max_output_tokens`` / ``max_tokens``).
    :param token_ceiling: the most a budget may grow to (sized from boxes, or after truncation).
    :param endpoint: the endpoint key (``worker.budget.endpoint_key``, the budget's) the
        structured-output fallback is remembered under; "" uses the client's name.
    :param grow_first_call: whether the first call's budget may exceed ``max_tokens`` when many
        boxes need it (Gemini: its output limit is known; OpenAI-compatible servers refuse a
        budget beyond their context, so only the truncation retry grows there).
    :param thinking_budget: Gemini's thinking budget, added to a sized budget when positive.
    :param downscale_to_pixels: ``vlm.downscale_to_pixels`` (0 = off): images above it are sent
        resized, and boxes in a pixel format are written and read in the sent size.
    :param image_cache_dir: where converted images are kept once per image (``worker.images``;
        ``<results_dir>/.image-cache``); "" converts on every call.
    :param generation: what the client adds to every request (backend, model, temperature, ...:
        ``fingerprint.generation``), for each record's fingerprint.
    """

    structured_output: str = "auto"
    box_format: str = "auto"
    model: str = ""
    max_tokens: int = 0
    token_ceiling: int = 0
    endpoint: str = ""
    grow_first_call: bool = False
    thinking_budget: int | None = None
    downscale_to_pixels: int = 0
    image_cache_dir: str = ""
    generation: tuple = ()

    @property
    def convention(self) -> Convention:
        return convention_for(self.model, self.box_format)

    @classmethod
    def from_vlm(cls, vlm, endpoint: str = "", *, image_cache_dir: str = "") -> StepOptions:
        """Options from a ``VLMSpec`` (duck-typed, so tests may pass a namespace)."""
        backend = getattr(vlm, "backend", "")
        structured = getattr(vlm, "structured_output", "off")
        box_format = getattr(vlm, "box_format", "auto")
        thinking = None
        if backend == "gemini":
            model, max_tokens = vlm.gemini.model, vlm.gemini.max_output_tokens
            ceiling = gemini_output_ceiling(model, max_tokens)
            thinking = getattr(vlm.gemini, "thinking_budget", None)
        elif backend == "openai":
            model, max_tokens = vlm.openai.model_name, vlm.openai.max_tokens
            ceiling = 2 * max_tokens  # a server refuses budgets beyond its context: grow only on retry
        else:
            model, max_tokens, ceiling = backend, 0, 0
        return cls(structured_output=structured, box_format=box_format, model=model, max_tokens=max_tokens,
                   token_ceiling=ceiling, endpoint=endpoint, grow_first_call=backend == "gemini",
                   thinking_budget=thinking, downscale_to_pixels=int(getattr(vlm, "downscale_to_pixels", 0) or 0),
                   image_cache_dir=image_cache_dir, generation=generation(vlm))


def gemini_output_ceiling(model: str, configured: int) -> int:
    """The output-token limit of a Gemini model: 65536 from 2.5 on, 8192 before."""
    name = model.lower()
    if any(old in name for old in ("gemini-1.", "gemini-2.0", "gemini-pro", "gemini-1")):
        return max(configured, 8192)
    return max(configured, 65536)


@dataclass(frozen=True)
class AnswerContext:
    """How one answer is read.

    :param mode: ``text`` or ``structured`` (the prompt that was sent).
    :param convention: how the model writes boxes (``worker.coords``).
    :param truncated: the answer was cut by the token limit: its last line or object is
        incomplete, and what it does not mention was not seen rather than left out.
    :param only: the ids a re-ask asked about (KITTI indices for step 0, expression indices
        for step 3); None for a first ask.
    :param downscale_to_pixels: ``vlm.downscale_to_pixels`` (0 = off): the image is sent at
        ``coords.downscaled_size``, so boxes in a pixel format are in that size (``frame``).
    """

    mode: str = TEXT
    convention: Convention = field(default_factory=Convention)
    truncated: bool = False
    only: tuple[int, ...] | None = None
    downscale_to_pixels: int = 0

    def frame(self, record: dict) -> Frame:
        """The record's image as the model sees it: pixel-frame boxes are in the sent size."""
        return Frame.for_image(int(record["width"]), int(record["height"]), self.downscale_to_pixels)

    def but(self, **changes) -> AnswerContext:
        return replace(self, **changes)
