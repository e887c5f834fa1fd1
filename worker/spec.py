"""The run spec: TAO's ``image_referring_expression`` layout, validated by pydantic.

A TAO spec file loads unchanged. Dot-notation overrides (``a.b.c=value``, lists as ``[0,2,3]``)
are merged by OmegaConf, whose grammar is the one TAO users already type. Errors name the file,
the line, the key and, for unknown keys, the closest valid one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from worker.errors import ConfigError
from worker.kitti import MAX_BOXES_PER_IMAGE
from worker.stepdefs import ALL_STEPS

SECRET_KEYS = ("api_key",)
#: Seconds a VLM call may take at most (a day): beyond it a timeout is a typo, and some SDKs
#: reject it only at call time ("Timeout value out of range"), on every image.
MAX_TIMEOUT_S = 86_400.0


def _word(synonyms: dict[str, str] | None = None) -> BeforeValidator:
    """A key that takes a word, read as users type it.

    YAML 1.1 (PyYAML for spec files, OmegaConf for ``key=value`` overrides) reads ``on``/``off``/
    ``yes``/``no`` as booleans, so ``structured_output: off`` arrived as ``False`` and was refused.
    A boolean becomes ``on``/``off`` again, case does not matter, and ``synonyms`` map the words
    users say to the key's own values.
    """
    table = synonyms or {}

    def before(value: Any) -> Any:
        if isinstance(value, bool):
            value = "on" if value else "off"
        if isinstance(value, str):
            value = value.strip().lower()
            return table.get(value, value)
        return value

    return BeforeValidator(before)


#: on/yes/true mean "structured output, where the endpoint takes it": that is ``auto``.
_SWITCH = {"on": "auto", "yes": "auto", "true": "auto", "no": "off", "false": "off"}

StructuredOutput = Annotated[Literal["auto", "off"], _word(_SWITCH)]
Backend = Annotated[Literal["gemini", "openai", "offline"], _word()]
BoxFormat = Annotated[Literal["auto", "xyxy_1000", "yxyx_1000", "xyxy_pixels", "xyxy_norm1", "xyxy_smart_resize"],
                      _word()]
OutputFormat = Annotated[Literal["jsonl", "legacy", "both"], _word()]
#: What a re-run redoes: image-steps without a record (missing), also those whose record's
#: fingerprint differs from what the spec would send now (changed), or every one (all).
Reprocess = Annotated[Literal["missing", "changed", "all"], _word()]
Temperature = Annotated[float, Field(ge=0, le=2)]


def _max_concurrency(value: Any) -> int | str:
    """A number of calls (at least 1) or ``auto``, with one error that says both (a union type
    reported one error per member, under member names users never typed)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            n = int(value)
        except ValueError:
            n = None
        if n is not None:
            if n < 1:
                raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to 1, or auto")
            return n
    raise PydanticCustomError("int_or_auto", "Input should be a number of calls (at least 1) or auto")


#: A fixed number of calls in flight, or ``auto``: the fleet's controller finds it (worker/adaptive.py).
MaxConcurrency = Annotated[int | Literal["auto"], PlainValidator(_max_concurrency)]
Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S, description="Seconds per VLM call.")]


class _Strict(BaseModel):
    # allow_inf_nan=False: a "nan" or "inf" anywhere is a typo, refused at load with its key.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


class GeminiSpec(_Strict):
    api_key: str = Field("", description="Prefer GOOGLE_API_KEY in the worker environment.")
    model: str = "gemini-3.1-flash-lite-preview"
    media_resolution: str = "MEDIA_RESOLUTION_LOW"
    temperature: Temperature = 0.3
    max_output_tokens: int = Field(8192, ge=1)
    timeout: Timeout = 120.0
    base_url: str = Field("", description="refexp: proxy or test endpoint; empty = Google's.")
    thinking_budget: int | None = Field(
        None, ge=-1, description="refexp: thinking tokens (-1 = dynamic); null = the least the model allows "
                          "(0 on 2.5 Flash/Lite, MINIMAL/LOW level on 3.x); thinking counts against max_output_tokens.")


class OpenAISpec(_Strict):
    api_key: str = Field("", description="Prefer OPENAI_API_KEY / NVIDIA_API_KEY in the worker env.")
    base_url: str = Field("", description="Empty = the SDK's default (api.openai.com).")
    model_name: str = ""
    temperature: Temperature = 0.7
    max_tokens: int = Field(4096, ge=1)
    timeout: Timeout = 60.0


class PriceSpec(_Strict):
    """refexp: what the endpoint charges, for ``producer estimate`` and the run summaries."""

    input_per_million: float = Field(0.0, ge=0, description="Price per million input tokens (prompt + image); "
                                     "0 with output_per_million 0 = no price table, no cost shown.")
    output_per_million: float = Field(0.0, ge=0, description="Price per million output tokens "
                                      "(thinking tokens are billed as output).")
    batch_factor: float = Field(0.5, ge=0, le=1, description="refexp: what a provider batch-mode call costs "
                                "as a fraction of the online price (Gemini Batch Mode and OpenAI's Batch API "
                                "bill about half).")


def batch_switch(value: Any) -> Any:
    """``vlm.batch: on`` (or a YAML boolean) is short for ``{enabled: true}``; anything else as given."""
    if isinstance(value, bool):
        return {"enabled": value}
    word = value.strip().lower() if isinstance(value, str) else None
    if word in ("on", "yes", "true", "off", "no", "false"):
        return {"enabled": word in ("on", "yes", "true")}
    return value


class BatchSpec(_Strict):
    """refexp: provider batch mode (Gemini Batch Mode, OpenAI Batch API): cheaper, answers within a day.

    ``vlm.batch: on`` is short for ``vlm.batch.enabled: true``.
    """

    enabled: bool = Field(False, description="Send step calls as provider batch jobs instead of online calls.")
    max_requests_per_job: int = Field(1000, ge=1, description="Requests gathered into one provider job at most.")
    gather_seconds: float = Field(60.0, gt=0, description="How long requests are gathered before a job that is "
                                  "not full is submitted anyway.")
    poll_seconds: float = Field(60.0, gt=0, description="How often the coordinating worker asks the provider "
                                "about its running jobs.")


# Below this a downscaled image shows too little to describe boxes in (and Qwen-VL's minimum
# is 4x28x28 anyway): a typo, not a choice.
MIN_DOWNSCALE_PIXELS = 256 * 256


class VLMSpec(_Strict):
    backend: Backend = "gemini"
    gemini: GeminiSpec = GeminiSpec()
    openai: OpenAISpec = OpenAISpec()
    # refexp additions
    max_concurrency: MaxConcurrency = Field(
        16, description="Fleet-wide VLM calls in flight per endpoint; auto = found from what the calls see "
        "(latency against its floor, 429/503, timeouts), up to max_concurrency_ceiling.")
    max_concurrency_ceiling: int = Field(
        256, ge=1, description="refexp: with max_concurrency: auto, the most calls in flight it may allow.")
    requests_per_minute: int = Field(0, ge=0, description="Fleet-wide per endpoint; 0 = unlimited.")
    max_retries: int = Field(5, ge=0, description="Retries of a retryable VLM failure per image-step.")
    max_image_pixels: int = Field(64_000_000, ge=1, description="Larger images fail (bomb guard).")
    downscale_to_pixels: int = Field(
        0, description="0 (default) = send images as they are; N = send any image above N pixels "
        "resized to at most N (aspect kept; converted once per image). Cuts image tokens and upload; "
        "unlike max_image_pixels, no image fails because of it.")
    structured_output: StructuredOutput = Field(
        "auto", description="auto: JSON schema + box ids where the endpoint takes them (falls back to the "
                           "text prompt once per endpoint); off: TAO's text prompts (on/yes/true = auto, "
                           "no/false = off).")
    box_format: BoxFormat = Field(
        "auto", description="How the model writes boxes; auto = by model name (worker/coords.py).")
    prices: PriceSpec = Field(PriceSpec(), description="Optional price table {input_per_million, "
                              "output_per_million} in your currency; all 0 (the default) = none.")
    batch: BatchSpec = Field(BatchSpec(), description="refexp: provider batch mode; off by default.")

    @field_validator("batch", mode="before")
    @classmethod
    def _batch_switch(cls, value: Any) -> Any:
        return batch_switch(value)


    @field_validator("downscale_to_pixels", mode="before")
    @classmethod
    def _downscale(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("off", "none", "no", "false", ""):
            return 0
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a pixel count (0 = off, or e.g. 1000000 for about 1 Mpx)") from None
        if n < 0:
            raise ValueError("must be 0 (off) or a pixel count")
        if n != 0 and n < MIN_DOWNSCALE_PIXELS:
            raise ValueError(
                f"{n} pixels is too small to send (at least {MIN_DOWNSCALE_PIXELS}, i.e. 256x256; 0 = off). "
                "This option resizes what is sent; to refuse large images use vlm.max_image_pixels")
        return n


class WorkflowSpec(_Strict):
    steps: list[int] = Field(default_factory=lambda: list(ALL_STEPS))
    max_workers: int = Field(4, ge=1)
    force_reprocess: bool = False
    reprocess: Reprocess = Field("missing", description="refexp: what a re-run redoes: missing (image-steps "
                                 "without a record), changed (also records the current spec would ask "
                                 "differently: model, prompt, generation parameters, image), all "
                                 "(= force_reprocess).")
    output_format: OutputFormat = "jsonl"
    prompts_file: str = Field("", description="refexp: YAML of step name -> prompt template.")
    # TAO keeps these for its LLM client; image pipelines ignore them. Accepted so TAO specs load.
    long_video_threshold_sec: float = Field(60, ge=0)
    long_video_sample_fps: float = Field(0.5, gt=0)
    long_video_max_frames: int = Field(60, ge=1)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, value: Any) -> Any:
        if isinstance(value, (str, int)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            return value
        out = []
        for v in value:
            try:
                n = int(v)
            except (TypeError, ValueError):
                raise ValueError(f"step {v!r} is not one of 0, 1, 2, 3") from None
            if n not in ALL_STEPS:
                raise ValueError(f"step {v!r} is not one of 0, 1, 2, 3")
            out.append(n)
        if not out:
            raise ValueError("at least one step must run")
        return sorted(set(out))

    @model_validator(mode="after")
    def _one_reprocess(self) -> WorkflowSpec:
        """``force_reprocess`` (TAO's key) and ``reprocess`` say one thing: ``force_reprocess:
        true`` is ``reprocess: all``. Both given and saying different things is refused, naming
        both; otherwise each is set from the other, so code may read either."""
        given = self.model_fields_set
        if "force_reprocess" in given and "reprocess" in given and self.force_reprocess != (self.reprocess == "all"):
            raise ValueError(
                f"image_referring_expression.workflow.force_reprocess={str(self.force_reprocess).lower()} and "
                f"image_referring_expression.workflow.reprocess={self.reprocess} disagree "
                "(force_reprocess: true is reprocess: all); set only one of them")
        if self.force_reprocess and self.reprocess != "all":
            object.__setattr__(self, "reprocess", "all")
        if self.reprocess == "all" and not self.force_reprocess:
            object.__setattr__(self, "force_reprocess", True)
        return self


class DataSpec(_Strict):
    image_dir: str = ""
    kitti_label_dir: str = ""
    input_annotations_jsonl: str = ""
    ignore_types: list[str] = Field(default_factory=lambda: ["DontCare"])
    max_boxes_per_image: int = Field(MAX_BOXES_PER_IMAGE, ge=1)


class ReferringSpec(_Strict):
    vlm: VLMSpec = VLMSpec()
    workflow: WorkflowSpec = WorkflowSpec()
    data: DataSpec = DataSpec()


class Spec(_Strict):
    results_dir: str = ""
    autolabel_type: Literal["image_referring_expression"] = "image_referring_expression"
    image_referring_expression: ReferringSpec = ReferringSpec()
    # TAO's ExperimentConfig keys for other pipelines and GPUs: accepted, unused here.
    gpu_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0])
    num_gpus: int = Field(1, ge=0)
    batch_size: int = Field(4, ge=1)
    num_workers: int = Field(8, ge=0)
    mal: dict | None = None
    grounding_dino: dict | None = None
    video_reasoning_annotation: dict | None = None
    image_grounding: dict | None = None
    vllm_captioning: dict | None = None

    # convenience
    @property
    def ire(self) -> ReferringSpec:
        return self.image_referring_expression

    def public_dict(self) -> dict:
        """The spec as a plain dict with every secret blanked: what may reach Redis and files.

        ``workflow.reprocess`` says what ``force_reprocess`` would, so only it is written, and
        only when it is not the default: a ``run.spec.yaml`` given back with either key
        overridden then holds at most the one its run chose."""
        data = self.model_dump(mode="json")
        wf = data["image_referring_expression"]["workflow"]
        wf.pop("force_reprocess", None)
        if wf.get("reprocess") == "missing":
            wf.pop("reprocess")
        _blank_secrets(data)
        return data


def _blank_secrets(node: Any) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in SECRET_KEYS and v:
                node[k] = ""
            else:
                _blank_secrets(v)


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(loc: tuple) -> type[BaseModel]:
    model: type[BaseModel] = Spec
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return model


def _key_lines(text: str) -> dict[str, int]:
    """``dotted.key -> line number`` for every mapping key in a YAML document."""
    out: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                out[key] = k.start_mark.line + 1
                walk(v, key + ".")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                out[f"{prefix}{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}{i}.")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return out
    if root is not None:
        walk(root, "")
    return out


#: pydantic error types meaning "a list / a scalar where a mapping belongs" or the reverse.
_SHAPE_ERRORS = {"model_type": "a mapping", "dict_type": "a mapping", "list_type": "a list"}


def _kind(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"the boolean {value} (YAML reads yes/no/on/off as booleans)"
    for types, word in (((dict,), "a mapping"), ((list, tuple), "a list"), ((int, float), "a number"),
                        ((str,), "a string")):
        if isinstance(value, types):
            return word
    return f"a {type(value).__name__}"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def _format_errors(errors: list[dict], source: str, lines: dict[str, int], overrides: set[str]) -> str:
    msgs = []
    for err in errors:
        loc = tuple(str(p) for p in err["loc"])
        dotted = ".".join(loc)
        where = source
        if any(k == dotted or k.startswith(dotted + ".") for k in overrides):
            where = "command-line override"
        elif dotted in lines:
            where = f"{source}:{lines[dotted]}"
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            close = difflib.get_close_matches(loc[-1], _valid_keys(parent), n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join((*loc[:-1], close[0]))}'?" if close else ""
            valid = ", ".join(_valid_keys(parent))
            msgs.append(f"{where}: unknown key '{dotted}'{hint} (valid here: {valid})")
        elif err["type"] == "model_type":
            keys = ", ".join(_valid_keys(_model_at(loc)))
            msgs.append(f"{where}: '{dotted}' must be a mapping of its keys ({keys}), not {_kind(value)}: "
                        f"{_short(value)}")
        elif err["type"] in _SHAPE_ERRORS:
            msgs.append(f"{where}: '{dotted}' must be {_SHAPE_ERRORS[err['type']]}, not {_kind(value)}: "
                        f"{_short(value)}")
        else:
            msgs.append(f"{where}: '{dotted}' = {_short(value)}: {err['msg']}")
    return "invalid spec:\n  " + "\n  ".join(msgs)


def _check_shapes(data: Any, source: str, lines: dict[str, int], overrides: set[str]) -> None:
    """Refuse a list (or a value) where the spec has a mapping, and the reverse, before merging.

    OmegaConf cannot merge a list into a mapping: it raised a bare ``TypeError`` ("Cannot merge
    incompatible container types") naming neither the key nor the file. Only the shape errors are
    raised here; every other mistake is reported by the full validation after the merge.
    """
    try:
        Spec.model_validate(data)
    except ValidationError as exc:
        # (An empty section, None, may still be filled by an override: the full validation decides.)
        shape = [e for e in exc.errors() if e["type"] in _SHAPE_ERRORS and e.get("input") is not None]
        if shape:
            raise ConfigError(_format_errors(shape, source, lines, overrides)) from None


def _batch_as_mapping(tree: Any) -> Any:
    """``vlm.batch`` given as a word becomes its mapping *before* the layers are merged: merged as
    a word, a later ``vlm.batch.gather_seconds=2`` replaced it with a mapping that said nothing of
    ``enabled``, and batch mode was off without a word."""
    vlm = ((tree or {}).get("image_referring_expression") or {}).get("vlm") if isinstance(tree, dict) else None
    if isinstance(vlm, dict) and "batch" in vlm and not isinstance(vlm["batch"], dict):
        vlm["batch"] = batch_switch(vlm["batch"])
    return tree


def load_spec(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Load a spec file (or the defaults), apply ``key=value`` overrides, validate.

    Raises ConfigError with file:line for anything wrong.
    """
    source = str(path) if path else "<defaults>"
    text = ""
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"spec file not found: {p}")
        text = p.read_text(encoding="utf-8")
    try:
        loaded = yaml.safe_load(text) if text else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{source}: the spec must be a mapping at the top level, not a {type(loaded).__name__}")
    lines = _key_lines(text)
    _check_shapes(loaded or {}, source, lines, set())
    loaded = _batch_as_mapping(loaded)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    extra = OmegaConf.create({})
    for item in overrides:  # one at a time, so an error names the override it is about
        key = item.split("=", 1)[0].strip()
        try:
            one = OmegaConf.from_dotlist([item])
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command-line override {item!r}: {exc}") from None
        _check_shapes(OmegaConf.to_container(one, resolve=False), source, {}, {key})
        if key.endswith("vlm.batch"):
            one = OmegaConf.create(_batch_as_mapping(OmegaConf.to_container(one, resolve=False)))
        try:
            extra = OmegaConf.merge(extra, one)
        except (OmegaConfBaseException, TypeError, ValueError) as exc:
            raise ConfigError(f"command-line override {item!r} does not fit the overrides before it "
                              f"({exc}): give '{key}' one value, as a whole") from None
    try:
        merged = OmegaConf.merge(OmegaConf.create(loaded or {}), extra)
        data = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        # TypeError/ValueError are OmegaConf's too, for shapes the checks above do not model
        # (the free-form ``dict`` keys of TAO's other pipelines).
        raise ConfigError(f"{source}: cannot apply the overrides {list(overrides)}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the spec must be a mapping at the top level")
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc.errors(), source, lines, keys)) from None


def default_spec_yaml() -> str:
    """The default spec as YAML (what ``producer default-spec`` prints)."""
    return yaml.safe_dump(Spec().model_dump(mode="json", exclude_none=True), sort_keys=False)
