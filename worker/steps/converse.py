"""One step's conversation with the model: which prompt, how many tokens, and what to do when
the answer is cut or the endpoint refuses a schema.

1. **Mode.** With ``vlm.structured_output: auto`` a step that has boxes (0, 2, 3) sends its
   structured prompt (ids, no coordinates to copy back) with a JSON schema, if the client can
   send one (``client.structured_output``) and this endpoint has not refused one before. An
   endpoint that answers the schema with 400/422 (``StructuredOutputRejected``) is remembered
   for the life of the process, a notice is logged once, and the same call is made again with
   the text prompt. If that fails with a permanent error too, the schema was not the problem:
   the endpoint is forgotten again and the error raised.
2. **Budget.** The output budget is sized from the number of boxes (never below the configured
   one; Gemini only may go above it on the first call, since its limit is known — 65536 from
   2.5 on), thinking included when a budget is set.
3. **Truncation** (``MAX_TOKENS``/``length``, or an answer cut before any text): once, with
   twice the budget (up to the ceiling). Steps 0 and 3 keep what the cut answer holds and
   re-ask only about the missing ids (KITTI boxes, groups) and merge; steps 1 and 2 ask again
   whole. If the retry fails for good, the cut answer is used as it is (flagged ``truncated``).
   A step-0 answer cut off *without* a truncation finish reason (its JSON ends mid-object,
   ``cut_off``) that skipped KITTI boxes gets the same one re-ask about them, in both modes.

Pure: no Celery, no Redis; the client is passed in.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from types import ModuleType

from worker.clients.base import (
    EmptyText,
    StructuredOutputRejected,
    TruncatedAnswer,
    VLMClient,
    VLMRequest,
    VLMResponse,
    check_answer,
)
from worker.errors import ClientError, EmptyAnswer, InputError, ParseError, PermanentClientError
from worker.images import DEFAULT_MAX_PIXELS, ImagePayload, load_payload
from worker.stepdefs import StepDef
from worker.steps.fingerprint import Sent
from worker.steps.options import STRUCTURED, TEXT, AnswerContext, StepOptions
from worker.steps.prompts import template_for
from worker.steps.schemas import schema_for

log = logging.getLogger("refexp.steps")

CLEAN_STOPS = ("stop", "STOP", "end_turn")

# The overhead of an answer, in output tokens (what each box adds is the step's
# ``StepDef.tokens_per_box``: text mode repeats coordinates, structured mode does not).
BASE_TOKENS = 512

_rejected: set[str] = set()
_lock = threading.Lock()


def forget_rejections() -> None:
    """Forget which endpoints refused a schema (tests; a new run in the same process)."""
    with _lock:
        _rejected.clear()


def _rejected_endpoint(key: str) -> bool:
    with _lock:
        return key in _rejected


def _endpoint(client: VLMClient, options: StepOptions) -> str:
    return options.endpoint or getattr(client, "name", "") or type(client).__name__


def supports_structured(client: VLMClient) -> bool:
    """Whether the client can send a response schema (``VLMClient.structured_output``)."""
    return bool(getattr(client, "structured_output", False))


def structured_ok(client: VLMClient, options: StepOptions) -> bool:
    """Whether this process would send a schema to the client's endpoint now: the client can,
    and the endpoint has not refused one (see the module docstring, 1)."""
    return supports_structured(client) and not _rejected_endpoint(_endpoint(client, options))


def checked_payload(record: dict, max_pixels: int, options: StepOptions | None = None) -> ImagePayload:
    """The image to send, after checking it still has the size it was seeded with: the KITTI
    boxes (and the 0-1000 boxes the prompt shows) are in pixels of that size, so an image
    replaced since would be described with boxes that no longer fit it, and silently.
    ``options`` say whether it is downscaled and where converted images are kept."""
    options = options or StepOptions()
    image = load_payload(record["image_path"], max_pixels=max_pixels,
                         downscale_to_pixels=options.downscale_to_pixels,
                         cache_dir=options.image_cache_dir or None)
    seeded = (int(record.get("width") or 0), int(record.get("height") or 0))
    if all(seeded) and (image.width, image.height) != seeded:
        raise InputError(
            f"{image.path}: the image is {image.width}x{image.height} now but was {seeded[0]}x{seeded[1]} when "
            "seeded (replaced since?): its boxes are for the old size. Run the same `producer enqueue` again to "
            "seed it anew (image-steps already done keep the old size: add "
            "image_referring_expression.workflow.force_reprocess=true to redo them)")
    return image


def budget(d: StepDef, n: int, mode: str, options: StepOptions) -> int | None:
    """The first call's output budget, or None to leave the client's configured one."""
    if not options.max_tokens:
        return None
    need = BASE_TOKENS + d.tokens_per_box.get(mode, 0) * n + max(0, options.thinking_budget or 0)
    if not options.grow_first_call:
        return options.max_tokens
    return min(max(options.max_tokens, need), max(options.token_ceiling, options.max_tokens))


def _bigger(tokens: int | None, options: StepOptions) -> int | None:
    if tokens is None:
        return None
    return min(2 * tokens, max(options.token_ceiling, tokens))


@dataclass
class Exchange:
    """What a step's conversation produced: the parsed result and the (combined) response."""

    parsed: dict
    response: VLMResponse | None
    sent: Sent | None = None  # the first request as sent (after any fallback): the fingerprint's
    image_sha256: str = ""    # the image file's hash, when the step asked about it
    schema_refused: bool = False  # text was sent because this endpoint refused a schema (now or before)


CUT_REPAIRS = ("truncated_array", "truncated_object")


def cut_off(parsed: dict) -> bool:
    """Whether a parse had to close the answer's JSON after its last whole element: the answer
    stopped mid-object, whatever finish reason the API gave."""
    repairs = (parsed.get("report") or {}).get("repairs") or []
    return any(r in CUT_REPAIRS for r in repairs)


def _sum_usage(responses: list[VLMResponse]) -> dict:
    total: dict = {}
    for r in responses:
        for k, v in (r.usage or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                total[k] = total.get(k, 0) + v
    return total


class _Conversation:
    def __init__(self, d: StepDef, mod: ModuleType, record: dict, client: VLMClient, templates: dict[str, str],
                 options: StepOptions, max_pixels: int):
        self.d, self.step, self.mod, self.record, self.client = d, d.number, mod, record, client
        self.templates, self.options, self.max_pixels = templates, options, max_pixels
        self.responses: list[VLMResponse] = []
        self.reasks = 0
        self.n_calls = 0
        self.fallback = ""
        self.image = None
        self.sent: Sent | None = None
        self.schema_refused = False

    def build(self, ctx: AnswerContext):
        template = template_for(self.templates, self.d.name, ctx.mode == STRUCTURED)
        return self.mod.build_prompt(self.record, template, ctx=ctx)

    def call(self, ctx: AnswerContext, built, tokens: int | None) -> tuple[VLMResponse | None, bool]:
        """One request: (response, truncated). An answer cut before any text is (None, True)."""
        prompt, hint = built
        if self.image is None:
            self.image = checked_payload(self.record, self.max_pixels, self.options)
        schema = schema_for(self.d.name) if ctx.mode == STRUCTURED else None
        request = VLMRequest(image=self.image, prompt=prompt, step=self.d.name, hint=hint,
                             response_schema=schema, schema_name=f"refexp_{self.d.name}" if schema else "",
                             max_tokens=tokens)
        self.n_calls += 1
        try:
            response = self.client.generate(request)
        except TruncatedAnswer:
            return None, True
        except EmptyText as exc:
            if not self.d.empty_means_none_kept or exc.finish_reason not in CLEAN_STOPS:
                raise
            # keep the clean stop: parse() turns it into "every box removed"
            response = VLMResponse(text="", finish_reason=exc.finish_reason)
        self.responses.append(response)
        truncated = bool(response.truncated)
        if response.text and response.text.strip() and not truncated:
            # clients check finish reasons; a test double may not, so check again (cheap)
            truncated = check_answer(getattr(self.client, "name", "client"), response.text, response.finish_reason)
        return response, truncated

    def planned(self, ctx: AnswerContext, built, tokens: int | None) -> Sent:
        """What the fingerprint holds of a first request: mode, prompt, schema, budget as sent."""
        return Sent(mode=ctx.mode, prompt=built[0], schema=schema_for(self.d.name) if ctx.mode == STRUCTURED else None,
                    max_tokens=int(tokens or self.options.max_tokens or 0))

    def first_call(self, ctx: AnswerContext, tokens: int | None):
        built = self.build(ctx)
        if built is None:
            return ctx, None, None, False
        if ctx.mode != STRUCTURED:
            self.sent = self.planned(ctx, built, tokens)
            response, truncated = self.call(ctx, built, tokens)
            return ctx, built, response, truncated
        key = _endpoint(self.client, self.options)
        try:
            self.sent = self.planned(ctx, built, tokens)
            response, truncated = self.call(ctx, built, tokens)
            return ctx, built, response, truncated
        except StructuredOutputRejected as exc:
            with _lock:
                first = key not in _rejected
                _rejected.add(key)
            if first:
                log.warning("%s refused a response schema (%s); using the text prompts for this endpoint "
                            "from now on (vlm.structured_output: off silences this)", key, exc)
            self.fallback = "structured_rejected"
            self.schema_refused = True
        ctx = ctx.but(mode=TEXT)
        built = self.build(ctx)
        self.sent = self.planned(ctx, built, tokens)
        try:
            response, truncated = self.call(ctx, built, tokens)
        except PermanentClientError:
            with _lock:
                _rejected.discard(key)  # the text request fails too: the schema was not the cause
            raise
        return ctx, built, response, truncated

    def parse(self, response: VLMResponse | None, ctx: AnswerContext) -> dict:
        if response is None or not (response.text and response.text.strip()):
            if (self.d.empty_means_none_kept and response is not None and response.finish_reason in CLEAN_STOPS
                    and ctx.only is None):
                # The step-3 prompt says to omit every line whose boxes were all removed, so a
                # cleanly finished empty answer means "nothing survived".
                return self.mod.all_removed(self.record)
            finish = response.finish_reason if response is not None else "cut before any text"
            raise EmptyAnswer(f"step {self.step}: the model returned no text (finish: {finish})")
        return self.mod.parse(response.text, self.record, ctx=ctx)

    def start(self, structured: bool) -> tuple[AnswerContext, int | None]:
        """The first call's answer context and budget. ``structured``: whether a schema may be
        sent (``structured_ok``)."""
        options = self.options
        mode = TEXT
        if options.structured_output == "auto" and schema_for(self.d.name) is not None and structured:
            mode = STRUCTURED
        ctx = AnswerContext(mode=mode, convention=options.convention, downscale_to_pixels=options.downscale_to_pixels)
        return ctx, budget(self.d, self.mod.n_items(self.record), mode, options)

    def run(self) -> Exchange:
        ok = structured_ok(self.client, self.options)
        ctx, tokens = self.start(ok)
        # Text because the endpoint refused a schema before (in this process): the record says
        # so, for a fingerprint check in a process that does not know it yet.
        self.schema_refused = (not ok and supports_structured(self.client)
                               and self.start(True)[0].mode == STRUCTURED)
        ctx, built, response, truncated = self.first_call(ctx, tokens)
        if built is None:
            return Exchange(self.mod.empty(), None)
        parsed = None
        if truncated:
            parsed, response, truncated = self.after_truncation(ctx, response, tokens)
        if parsed is None:
            parsed = self.parse(response, ctx.but(truncated=truncated))
            if not truncated and self.d.reask_silent_cut and parsed.get("missing") and cut_off(parsed):
                # Cut off without saying so (finish "stop", last object incomplete): the boxes
                # it never reached are known, so ask about them as after a MAX_TOKENS cut.
                parsed, response, truncated = self.reask(ctx, parsed, response, tokens, optional=True)
        return self.finish(parsed, response, ctx, truncated)

    def reask(self, ctx: AnswerContext, partial: dict, response: VLMResponse | None, tokens: int | None, *,
              optional: bool = False):
        """(merged, response, still truncated) after asking again about ``partial["missing"]``
        only; when that fails, the partial answer is kept, flagged truncated. ``optional``: the
        answer was usable as it came (a silent cut), so a transient error of the re-ask (429,
        5xx, timeout) keeps it too, instead of failing the whole step into a retry."""
        missing = partial.get("missing") or []
        self.reasks += 1
        ask = ctx.but(only=tuple(missing))
        keep_on = (PermanentClientError, ParseError, EmptyAnswer) + ((ClientError,) if optional else ())
        try:
            again, cut = self.call(ask, self.build(ask), tokens)
            more = self.parse(again, ask.but(truncated=cut))
        except keep_on as exc:
            log.info("step %s: the re-ask about %d missing ids failed (%s); keeping the cut answer",
                     self.step, len(missing), exc)
            return partial, response, True
        merged = self.mod.merge(partial, more, self.record)
        return merged, again, cut

    def after_truncation(self, ctx: AnswerContext, response: VLMResponse | None, tokens: int | None):
        """(parsed or None, response, still truncated) after the one retry a cut answer gets."""
        bigger = _bigger(tokens, self.options)
        partial = None
        if self.d.reask_missing and response is not None:
            try:
                partial = self.mod.parse(response.text, self.record, ctx=ctx.but(truncated=True))
            except ParseError:
                partial = None
        if partial is not None:
            if not partial.get("missing"):
                return partial, response, False
            return self.reask(ctx, partial, response, bigger)
        try:
            again, cut = self.call(ctx, self.build(ctx), bigger)
        except PermanentClientError:
            if response is None:
                raise
            return None, response, True
        if again is None and response is not None:
            return None, response, True
        return None, again, cut

    def finish(self, parsed: dict, response: VLMResponse | None, ctx: AnswerContext, truncated: bool) -> Exchange:
        parsed = dict(parsed)
        parsed.pop("missing", None)
        report = dict(parsed.get("report") or {})
        q = dict(report.get("quality") or {})
        if q:
            q.update({"mode": ctx.mode, "fallback": self.fallback, "calls": self.n_calls, "reasks": self.reasks,
                      "truncated": bool(truncated),
                      "finish_reason": response.finish_reason if response is not None else ""})
            report["quality"] = q
            parsed["report"] = report
        combined = None
        if self.responses:
            last = response if response is not None else self.responses[-1]
            combined = replace(last, usage=_sum_usage(self.responses)) if len(self.responses) > 1 else last
        return Exchange(parsed, combined, self.sent, self.image.sha256 if self.image is not None else "",
                        self.schema_refused)


def converse(d: StepDef, mod: ModuleType, record: dict, client: VLMClient, templates: dict[str, str], *,
             options: StepOptions | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> Exchange:
    """Ask the model about one image-step and parse the answer (see the module docstring).

    ``d`` says the step's policy (re-asks, empty answers, tokens per box: ``worker/stepdefs.py``);
    ``mod`` holds its prompt, parse and record functions. Raises the errors of ``worker.errors``;
    the caller decides about retries and failures.
    """
    return _Conversation(d, mod, record, client, templates, options or StepOptions(), max_pixels).run()


def plan(d: StepDef, mod: ModuleType, record: dict, templates: dict[str, str], *, options: StepOptions,
         structured: bool, fallback: bool = False) -> Sent | None:
    """The first request ``converse`` would send for this record, without sending it (None: it
    would ask nothing). ``structured``: whether a schema may be sent (``structured_ok``);
    ``fallback``: the text request that follows an endpoint refusing the schema (same budget).
    Reads no image: the fingerprint takes the image's hash."""
    conv = _Conversation(d, mod, record, None, templates, options, DEFAULT_MAX_PIXELS)  # type: ignore[arg-type]
    ctx, tokens = conv.start(structured)
    if fallback and ctx.mode == STRUCTURED:
        ctx = ctx.but(mode=TEXT)
    built = conv.build(ctx)
    return None if built is None else conv.planned(ctx, built, tokens)
