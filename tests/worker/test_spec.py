"""The spec loader: TAO files load unchanged, overrides merge, and errors point at the mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from worker.errors import ConfigError
from worker.spec import Spec, default_spec_yaml, load_spec

# TAO's shipped nvidia_tao_ds/auto_label/experiment_specs/image_referring_expression.yaml, verbatim.
TAO_SPEC = """\
results_dir: ???
autolabel_type: "image_referring_expression"

image_referring_expression:
  vlm:
    backend: "gemini"
    gemini:
      api_key: ""                               # Set GOOGLE_API_KEY env var or fill in here
      model: "gemini-3.1-flash-lite-preview"
      media_resolution: "MEDIA_RESOLUTION_HIGH"
      temperature: 0.3
      max_output_tokens: 8192
      timeout: 120

  workflow:
    steps: ["0", "1", "2", "3"]
    max_workers: 4
    force_reprocess: false
    output_format: "both"   # "jsonl", "legacy", or "both"

  data:
    image_dir: ???                  # Directory containing input images (.jpg/.png)
    kitti_label_dir: ???            # Directory containing KITTI-format label files
    input_annotations_jsonl: ""     # Optional: pre-seeded annotations.jsonl to resume from
"""

# The documented openai block (references/configuration.md).
TAO_OPENAI_BLOCK = """\
    openai:
      api_key: ""
      base_url: "https://inference-api.nvidia.com/v1"
      model_name: ""
      temperature: 0.7
      max_tokens: 4096
      timeout: 60
"""

STEPS_KEY = "image_referring_expression.workflow.steps"


@pytest.fixture
def tao_file(tmp_path):
    p = tmp_path / "image_referring_expression.yaml"
    p.write_text(TAO_SPEC)
    return p


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- TAO compatibility


def test_tao_spec_loads_unchanged(tao_file):
    spec = load_spec(tao_file)
    ire = spec.image_referring_expression
    assert spec.autolabel_type == "image_referring_expression"
    assert ire.vlm.backend == "gemini"
    assert ire.vlm.gemini.model == "gemini-3.1-flash-lite-preview"
    assert ire.vlm.gemini.media_resolution == "MEDIA_RESOLUTION_HIGH"
    assert ire.vlm.gemini.temperature == pytest.approx(0.3)
    assert ire.vlm.gemini.max_output_tokens == 8192
    assert ire.vlm.gemini.timeout == 120
    assert ire.workflow.steps == [0, 1, 2, 3]
    assert ire.workflow.max_workers == 4
    assert ire.workflow.force_reprocess is False
    assert ire.workflow.output_format == "both"
    assert ire.data.input_annotations_jsonl == ""
    # '???' (OmegaConf "missing") is kept as a marker for the producer to check, not a crash.
    assert spec.results_dir == "???"
    assert ire.data.image_dir == "???"
    assert ire.data.kitti_label_dir == "???"


def test_tao_spec_with_openai_block_loads(tmp_path):
    text = TAO_SPEC.replace("  workflow:\n", TAO_OPENAI_BLOCK + "\n  workflow:\n", 1)
    spec = load_spec(write(tmp_path, text))
    oa = spec.ire.vlm.openai
    assert oa.base_url == "https://inference-api.nvidia.com/v1"
    assert oa.temperature == pytest.approx(0.7)
    assert oa.max_tokens == 4096
    assert oa.timeout == 60


def test_tao_cli_overrides_fill_the_missing_values(tao_file):
    spec = load_spec(tao_file, [
        "results_dir=/out",
        "image_referring_expression.data.image_dir=/data/images",
        "image_referring_expression.data.kitti_label_dir=/data/labels",
        "image_referring_expression.vlm.gemini.api_key=secret-key",
    ])
    assert spec.results_dir == "/out"
    assert spec.ire.data.image_dir == "/data/images"
    assert spec.ire.data.kitti_label_dir == "/data/labels"
    assert spec.ire.vlm.gemini.api_key == "secret-key"
    # untouched values stay as the file set them
    assert spec.ire.workflow.max_workers == 4


# --------------------------------------------------------------------------- defaults


def test_defaults_without_a_file():
    spec = load_spec()
    ire = spec.ire
    assert spec.autolabel_type == "image_referring_expression"
    assert ire.vlm.backend == "gemini"
    assert ire.workflow.prompts_file == ""
    assert ire.data.image_dir == ""
    assert ire.data.kitti_label_dir == ""
    assert ire.data.input_annotations_jsonl == ""
    # refexp additions, with the defaults the issue names
    assert ire.vlm.max_concurrency == 16
    assert ire.vlm.requests_per_minute == 0
    assert ire.vlm.max_retries == 5
    assert ire.data.ignore_types == ["DontCare"]
    assert ire.vlm.gemini.base_url == ""


def test_defaults_match_tao_dataclasses():
    """TAO's TestImageREConfig: ImageREWorkflowConfig / ImageREDataConfig / LLMBackendConfig defaults."""
    ire = load_spec().ire
    assert ire.workflow.steps == [0, 1, 2, 3]
    assert ire.workflow.max_workers == 4
    assert ire.workflow.output_format == "jsonl"
    assert ire.workflow.force_reprocess is False
    g, o = ire.vlm.gemini, ire.vlm.openai
    assert (g.api_key, g.model, g.temperature, g.max_output_tokens, g.timeout) == (
        "", "gemini-3.1-flash-lite-preview", 0.3, 8192, 120)
    assert (o.api_key, o.base_url, o.model_name, o.temperature, o.max_tokens, o.timeout) == (
        "", "", "", 0.7, 4096, 60)


def test_tao_workflow_long_video_keys_accepted(tmp_path):
    p = write(tmp_path, "image_referring_expression:\n  workflow:\n    long_video_threshold_sec: 30\n"
                        "    long_video_sample_fps: 1.0\n    long_video_max_frames: 10\n")
    assert load_spec(p).ire.workflow.max_workers == 4


def test_shipped_default_config_loads():
    cfg = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
    spec = load_spec(cfg)
    assert spec.ire.workflow.output_format == "both"
    assert spec.ire.workflow.steps == [0, 1, 2, 3]


def test_empty_file_gives_defaults(tmp_path):
    assert load_spec(write(tmp_path, "")) == Spec()


# --------------------------------------------------------------------------- overrides


def test_override_steps_list_of_ints():
    spec = load_spec(None, [f"{STEPS_KEY}=[0,2,3]"])
    assert spec.ire.workflow.steps == [0, 2, 3]


def test_override_steps_list_of_strings():
    spec = load_spec(None, [f'{STEPS_KEY}=["0","1"]'])
    assert spec.ire.workflow.steps == [0, 1]


def test_steps_as_strings_in_file_are_ints(tmp_path):
    p = write(tmp_path, 'image_referring_expression:\n  workflow:\n    steps: ["1", "0"]\n')
    assert load_spec(p).ire.workflow.steps == [0, 1]


def test_override_beats_file(tao_file):
    spec = load_spec(tao_file, [f"{STEPS_KEY}=[1]", "image_referring_expression.workflow.max_workers=2"])
    assert spec.ire.workflow.steps == [1]
    assert spec.ire.workflow.max_workers == 2


def test_override_bool_and_float():
    spec = load_spec(None, [
        "image_referring_expression.workflow.force_reprocess=true",
        "image_referring_expression.vlm.gemini.temperature=0.5",
    ])
    assert spec.ire.workflow.force_reprocess is True
    assert spec.ire.vlm.gemini.temperature == pytest.approx(0.5)


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_spec(None, ["image_referring_expression.workflow.steps"])


@pytest.mark.parametrize("bad", ["[5]", "[0,x]", "[]"])
def test_bad_steps_are_rejected(bad):
    with pytest.raises(ConfigError) as exc:
        load_spec(None, [f"{STEPS_KEY}={bad}"])
    assert STEPS_KEY in str(exc.value)


# --------------------------------------------------------------------------- errors


def test_unknown_key_in_file_names_key_line_and_suggestion(tmp_path):
    p = write(tmp_path, "results_dir: /r\nimage_referring_expression:\n  workflow:\n    max_wokers: 4\n")
    with pytest.raises(ConfigError) as exc:
        load_spec(p)
    msg = str(exc.value)
    assert "image_referring_expression.workflow.max_wokers" in msg
    assert f"{p}:4" in msg
    assert "did you mean 'image_referring_expression.workflow.max_workers'" in msg


def test_unknown_top_level_key_suggests_closest(tmp_path):
    p = write(tmp_path, "result_dir: /r\n")
    with pytest.raises(ConfigError) as exc:
        load_spec(p)
    msg = str(exc.value)
    assert "'result_dir'" in msg
    assert f"{p}:1" in msg
    assert "did you mean 'results_dir'" in msg


def test_unknown_key_in_override_names_override_and_suggestion():
    with pytest.raises(ConfigError) as exc:
        load_spec(None, ["image_referring_expression.vlm.gemni.model=x"])
    msg = str(exc.value)
    assert "image_referring_expression.vlm.gemni" in msg
    assert "command-line override" in msg
    assert "did you mean 'image_referring_expression.vlm.gemini'" in msg


def test_wrong_type_in_file_names_key_value_and_line(tmp_path):
    p = write(tmp_path, "image_referring_expression:\n  workflow:\n    max_workers: lots\n")
    with pytest.raises(ConfigError) as exc:
        load_spec(p)
    msg = str(exc.value)
    assert "image_referring_expression.workflow.max_workers" in msg
    assert "'lots'" in msg
    assert f"{p}:3" in msg


def test_wrong_type_in_override_names_key_and_value():
    with pytest.raises(ConfigError) as exc:
        load_spec(None, ["image_referring_expression.workflow.max_workers=abc"])
    msg = str(exc.value)
    assert "image_referring_expression.workflow.max_workers" in msg
    assert "'abc'" in msg


def test_invalid_choice_names_key(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_spec(None, ["image_referring_expression.vlm.backend=claude"])
    assert "image_referring_expression.vlm.backend" in str(exc.value)
    assert "'claude'" in str(exc.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


def test_invalid_yaml_names_file(tmp_path):
    p = write(tmp_path, "results_dir: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_spec(p)
    assert str(p) in str(exc.value)


def test_top_level_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError):
        load_spec(write(tmp_path, "- a\n- b\n"))


# --------------------------------------------------------------------------- secrets & round trip


def test_public_dict_blanks_api_keys():
    spec = load_spec(None, [
        "image_referring_expression.vlm.gemini.api_key=g-secret",
        "image_referring_expression.vlm.openai.api_key=o-secret",
        "image_referring_expression.vlm.gemini.model=m1",
    ])
    assert spec.ire.vlm.gemini.api_key == "g-secret"  # the spec itself keeps it
    public = spec.public_dict()
    vlm = public["image_referring_expression"]["vlm"]
    assert vlm["gemini"]["api_key"] == ""
    assert vlm["openai"]["api_key"] == ""
    assert vlm["gemini"]["model"] == "m1"
    assert "secret" not in repr(public)


def test_default_spec_yaml_round_trips(tmp_path):
    text = default_spec_yaml()
    data = yaml.safe_load(text)
    assert "image_referring_expression" in data
    assert set(data["image_referring_expression"]) == {"vlm", "workflow", "data"}
    p = write(tmp_path, text, "default.yaml")
    assert load_spec(p) == Spec()


# --------------------------------------------------------------------------- issue 13, items 5 and 6


@pytest.mark.parametrize(("typed", "expected"), [
    ("off", "off"), ("Off", "off"), ("no", "off"), ("false", "off"),
    ("on", "auto"), ("yes", "auto"), ("true", "auto"), ("auto", "auto"), ("AUTO", "auto"),
])
def test_structured_output_words_as_typed_in_yaml_and_on_the_command_line(tmp_path, typed, expected):
    key = "image_referring_expression.vlm.structured_output"
    assert load_spec(None, [f"{key}={typed}"]).ire.vlm.structured_output == expected
    p = write(tmp_path, f"image_referring_expression:\n  vlm:\n    structured_output: {typed}\n")
    assert load_spec(p).ire.vlm.structured_output == expected


def test_word_keys_take_any_case_and_a_boolean_is_named_as_the_word_it_was():
    spec = load_spec(None, ["image_referring_expression.vlm.backend=OpenAI",
                            "image_referring_expression.workflow.output_format=Both",
                            "image_referring_expression.vlm.box_format=XYXY_1000",
                            "image_referring_expression.vlm.openai.model_name=m"])
    assert (spec.ire.vlm.backend, spec.ire.workflow.output_format, spec.ire.vlm.box_format) == (
        "openai", "both", "xyxy_1000")
    with pytest.raises(ConfigError, match=r"'image_referring_expression.vlm.backend' = 'off': Input should be "
                                          r"'gemini', 'openai' or 'offline'"):
        load_spec(None, ["image_referring_expression.vlm.backend=no"])


@pytest.mark.parametrize(("override", "message"), [
    ("vlm.openai.timeout=-1", "greater than 0"),
    ("vlm.openai.timeout=0", "greater than 0"),
    ("vlm.gemini.timeout=1e9", "less than or equal to 86400"),
    ("vlm.gemini.timeout=nan", "finite number"),
    ("vlm.openai.temperature=inf", "finite number"),
    ("vlm.gemini.temperature=-0.1", "greater than or equal to 0"),
    ("vlm.openai.temperature=2.5", "less than or equal to 2"),
    ("vlm.gemini.max_output_tokens=0", "greater than or equal to 1"),
    ("vlm.openai.max_tokens=-5", "greater than or equal to 1"),
    ("vlm.gemini.thinking_budget=-2", "greater than or equal to -1"),
    ("vlm.prices.input_per_million=-1", "greater than or equal to 0"),
    ("workflow.max_workers=0", "greater than or equal to 1"),
    ("workflow.long_video_sample_fps=0", "greater than 0"),
    ("data.max_boxes_per_image=0", "greater than or equal to 1"),
])
def test_nonsense_numbers_are_refused_at_load_naming_the_key(override, message):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as info:
        load_spec(None, [f"image_referring_expression.{key}={value}"])
    assert f"command-line override: 'image_referring_expression.{key}' = " in str(info.value)
    assert message in str(info.value)


def test_top_level_nonsense_numbers_are_refused_too(tmp_path):
    p = write(tmp_path, "results_dir: /r\nbatch_size: 0\ngpu_ids: [-1]\n")
    with pytest.raises(ConfigError) as info:
        load_spec(p)
    assert f"{p}:2: 'batch_size' = 0" in str(info.value) and f"{p}:3: 'gpu_ids.0' = -1" in str(info.value)


@pytest.mark.parametrize("text", [
    "image_referring_expression:\n  vlm:\n    - backend: openai\n",
    "image_referring_expression:\n  vlm: openai\n",
    "image_referring_expression: [vlm]\n",
])
def test_a_list_or_value_where_a_mapping_belongs_names_the_key_with_or_without_overrides(tmp_path, text):
    p = write(tmp_path, text)
    for overrides in ([], ["image_referring_expression.vlm.backend=openai", "results_dir=/r"]):
        with pytest.raises(ConfigError) as info:  # was a bare TypeError from OmegaConf with overrides
            load_spec(p, overrides)
        assert f"{p}:" in str(info.value) and "must be a mapping of its keys" in str(info.value)


def test_an_override_of_the_wrong_shape_is_named():
    with pytest.raises(ConfigError, match=r"command-line override: 'image_referring_expression.vlm' must be a "
                                          r"mapping of its keys \(backend, .*\), not a string: 'openai'"):
        load_spec(None, ["image_referring_expression.vlm=openai"])
    with pytest.raises(ConfigError, match=r"'image_referring_expression.workflow.steps' must be a list, not a "
                                          r"mapping"):
        load_spec(None, [f"{STEPS_KEY}=[0,1]", f"{STEPS_KEY}.x=1"])


def test_an_empty_section_filled_by_an_override_still_loads(tmp_path):
    p = write(tmp_path, "image_referring_expression:\n  vlm:\n")
    assert load_spec(p, ["image_referring_expression.vlm.backend=offline"]).ire.vlm.backend == "offline"


def test_downscale_to_pixels_is_off_by_default_and_checked():
    key = "image_referring_expression.vlm.downscale_to_pixels"
    assert load_spec(None, []).ire.vlm.downscale_to_pixels == 0
    assert load_spec(None, [f"{key}=1000000"]).ire.vlm.downscale_to_pixels == 1_000_000
    assert load_spec(None, [f"{key}=off"]).ire.vlm.downscale_to_pixels == 0
    with pytest.raises(ConfigError) as exc:
        load_spec(None, [f"{key}=5000"])
    assert "at least 65536" in str(exc.value) and "vlm.max_image_pixels" in str(exc.value) and key in str(exc.value)
    with pytest.raises(ConfigError, match="is not a pixel count"):
        load_spec(None, [f"{key}=1M"])
    with pytest.raises(ConfigError, match=r"must be 0 \(off\)"):
        load_spec(None, [f"{key}=-1"])


WF = "image_referring_expression.workflow"


@pytest.mark.parametrize(("given", "force", "reprocess"), [
    ([], False, "missing"),
    ([f"{WF}.force_reprocess=true"], True, "all"),
    ([f"{WF}.reprocess=all"], True, "all"),
    ([f"{WF}.reprocess=changed"], False, "changed"),
    ([f"{WF}.reprocess=CHANGED", f"{WF}.force_reprocess=false"], False, "changed"),
    ([f"{WF}.reprocess=all", f"{WF}.force_reprocess=true"], True, "all"),
])
def test_reprocess_and_force_reprocess_say_one_thing(given, force, reprocess):
    wf = load_spec(None, given).ire.workflow
    assert (wf.force_reprocess, wf.reprocess) == (force, reprocess)


@pytest.mark.parametrize(("force", "reprocess"), [("true", "changed"), ("true", "missing"), ("false", "all")])
def test_force_reprocess_and_reprocess_disagreeing_is_a_config_error_naming_both(force, reprocess):
    with pytest.raises(ConfigError) as exc:
        load_spec(None, [f"{WF}.force_reprocess={force}", f"{WF}.reprocess={reprocess}"])
    assert f"{WF}.force_reprocess={force}" in str(exc.value) and f"{WF}.reprocess={reprocess}" in str(exc.value)


def test_the_public_spec_holds_reprocess_alone_so_an_override_of_either_key_loads(tmp_path):
    public = load_spec(None, [f"{WF}.force_reprocess=true"]).public_dict()
    assert public["image_referring_expression"]["workflow"]["reprocess"] == "all"
    assert "force_reprocess" not in public["image_referring_expression"]["workflow"]
    path = tmp_path / "run.spec.yaml"
    path.write_text(yaml.safe_dump(load_spec(None, []).public_dict()))  # the default: neither key
    assert load_spec(path, [f"{WF}.reprocess=changed"]).ire.workflow.reprocess == "changed"
    assert load_spec(path, [f"{WF}.force_reprocess=true"]).ire.workflow.reprocess == "all"
    path.write_text(yaml.safe_dump(load_spec(None, [f"{WF}.reprocess=changed"]).public_dict()))
    assert load_spec(path).ire.workflow.reprocess == "changed"
    with pytest.raises(ConfigError, match="disagree"):  # the file says changed: override reprocess instead
        load_spec(path, [f"{WF}.force_reprocess=true"])


def test_max_concurrency_is_a_number_or_auto_with_one_clear_error():
    import re

    from worker.spec import VLMSpec

    assert VLMSpec(max_concurrency="AUTO").max_concurrency == "auto"
    assert VLMSpec(max_concurrency="24").max_concurrency == 24
    assert VLMSpec().max_concurrency_ceiling == 256
    for bad, says in ((0, "greater than or equal to 1, or auto"), ("lots", "a number of calls (at least 1) or auto"),
                      (2.5, "a number of calls"), (True, "a number of calls")):
        with pytest.raises(ValueError, match=re.escape(says)):
            VLMSpec(max_concurrency=bad)
