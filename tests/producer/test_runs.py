"""Up-front checks of a run's paths and step wiring, and path normalisation."""

from __future__ import annotations

import pytest

from producer.runs import check_paths, check_wiring, normalise
from worker.errors import ConfigError
from worker.layout import Layout
from worker.spec import load_spec

D = "image_referring_expression.data"
W = "image_referring_expression.workflow"


def spec(**kv):
    return load_spec(None, [f"{k}={v}" for k, v in kv.items()])


@pytest.fixture
def dirs(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    return images, labels, tmp_path / "results"


def ok_spec(dirs, **more):
    images, labels, results = dirs
    return spec(results_dir=results, **{f"{D}.image_dir": images, f"{D}.kitti_label_dir": labels, **more})


# --------------------------------------------------------------------------- check_paths


def test_good_paths_pass_and_results_dir_is_created(dirs):
    check_paths(ok_spec(dirs))
    assert dirs[2].is_dir()


@pytest.mark.parametrize("value", ["", "???"])
def test_results_dir_not_set(dirs, value):
    images, labels, _ = dirs
    s = spec(results_dir=f"'{value}'", **{f"{D}.image_dir": images, f"{D}.kitti_label_dir": labels})
    with pytest.raises(ConfigError, match="results_dir is not set"):
        check_paths(s)


@pytest.mark.parametrize("value", ["", "???"])
def test_image_dir_not_set(dirs, value):
    s = spec(results_dir=dirs[2], **{f"{D}.image_dir": f"'{value}'"})
    with pytest.raises(ConfigError) as exc:
        check_paths(s)
    assert "data.image_dir" in str(exc.value)
    assert "not set" in str(exc.value)


def test_image_dir_missing(dirs, tmp_path):
    missing = tmp_path / "nope"
    s = spec(results_dir=dirs[2], **{f"{D}.image_dir": missing})
    with pytest.raises(ConfigError) as exc:
        check_paths(s)
    assert "data.image_dir" in str(exc.value)
    assert str(missing) in str(exc.value)


def test_image_dir_is_a_file(dirs, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    s = spec(results_dir=dirs[2], **{f"{D}.image_dir": f})
    with pytest.raises(ConfigError, match="not a directory"):
        check_paths(s)


def test_label_dir_missing(dirs, tmp_path):
    s = ok_spec(dirs, **{f"{D}.kitti_label_dir": tmp_path / "nolabels"})
    with pytest.raises(ConfigError) as exc:
        check_paths(s)
    assert "kitti_label_dir" in str(exc.value)
    assert str(tmp_path / "nolabels") in str(exc.value)


def test_label_dir_optional(dirs):
    images, _, results = dirs
    check_paths(spec(results_dir=results, **{f"{D}.image_dir": images}))


def test_input_jsonl_missing(dirs, tmp_path):
    missing = tmp_path / "in.jsonl"
    s = spec(results_dir=dirs[2], **{f"{D}.input_annotations_jsonl": missing})
    with pytest.raises(ConfigError) as exc:
        check_paths(s)
    assert "input_annotations_jsonl" in str(exc.value)
    assert str(missing) in str(exc.value)


def test_input_jsonl_replaces_image_dir(dirs, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("")
    check_paths(spec(results_dir=dirs[2], **{f"{D}.input_annotations_jsonl": src}))


def test_results_dir_cannot_be_created(dirs, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    images = dirs[0]
    s = spec(results_dir=blocker / "results", **{f"{D}.image_dir": images})
    with pytest.raises(ConfigError, match="results_dir"):
        check_paths(s)


def test_prompts_file_is_checked(dirs, tmp_path):
    with pytest.raises(ConfigError, match="prompts_file"):
        check_paths(ok_spec(dirs, **{f"{W}.prompts_file": tmp_path / "missing.yaml"}))


# --------------------------------------------------------------------------- check_wiring


def test_steps_2_3_without_step0_sink(tmp_path):
    s = spec(**{f"{W}.steps": "[2,3]"})
    with pytest.raises(ConfigError) as exc:
        check_wiring(s, Layout(tmp_path))
    msg = str(exc.value)
    assert "step 2" in msg and "step 0" in msg
    assert str(Layout(tmp_path).sink(0).path) in msg


def test_steps_2_3_with_step0_sink_from_a_past_run(tmp_path):
    layout = Layout(tmp_path)
    layout.sink(0).append({"image_id": "a", "regions": []})
    check_wiring(spec(**{f"{W}.steps": "[2,3]"}), layout)


def test_step_3_alone_needs_step2_sink(tmp_path):
    layout = Layout(tmp_path)
    with pytest.raises(ConfigError, match="step 2"):
        check_wiring(spec(**{f"{W}.steps": "[3]"}), layout)
    layout.sink(2).append({"image_id": "a", "expressions": []})
    check_wiring(spec(**{f"{W}.steps": "[3]"}), layout)


@pytest.mark.parametrize("steps", ["[0,1,2,3]", "[0,1]", "[1]", "[0,2]"])
def test_self_contained_steps_pass(tmp_path, steps):
    check_wiring(spec(**{f"{W}.steps": steps}), Layout(tmp_path))


# --------------------------------------------------------------------------- normalise


def test_normalise_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = normalise(spec(results_dir="out", **{f"{D}.image_dir": "imgs", f"{D}.kitti_label_dir": "./labels/",
                                             f"{D}.input_annotations_jsonl": "in/a.jsonl",
                                             f"{W}.prompts_file": "p.yaml"}))
    root = tmp_path.resolve()
    assert s.results_dir == str(root / "out")
    assert s.ire.data.image_dir == str(root / "imgs")
    assert s.ire.data.kitti_label_dir == str(root / "labels")
    assert s.ire.data.input_annotations_jsonl == str(root / "in" / "a.jsonl")
    assert s.ire.workflow.prompts_file == str(root / "p.yaml")


def test_normalise_turns_missing_markers_into_empty(tmp_path):
    s = normalise(spec(results_dir="'???'", **{f"{D}.image_dir": "'???'", f"{D}.kitti_label_dir": "'???'"}))
    assert s.results_dir == ""
    assert s.ire.data.image_dir == ""
    assert s.ire.data.kitti_label_dir == ""
    assert s.ire.data.input_annotations_jsonl == ""
    assert s.ire.workflow.prompts_file == ""


def test_normalise_tao_spec_file(tmp_path):
    p = tmp_path / "tao.yaml"
    p.write_text("results_dir: ???\nimage_referring_expression:\n  data:\n    image_dir: ???\n"
                 "    kitti_label_dir: ???\n")
    s = normalise(load_spec(p))
    assert (s.results_dir, s.ire.data.image_dir, s.ire.data.kitti_label_dir) == ("", "", "")
    with pytest.raises(ConfigError, match="results_dir is not set"):
        check_paths(s)


def test_normalise_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = normalise(spec(results_dir="~/r"))
    assert s.results_dir == str(tmp_path.resolve() / "r")


def test_normalise_keeps_everything_else(tmp_path):
    s = spec(**{f"{W}.steps": "[0,2]", "image_referring_expression.vlm.gemini.api_key": "k",
                f"{D}.ignore_types": "[Misc]"}, results_dir=tmp_path)
    n = normalise(s)
    assert n.ire.workflow.steps == [0, 2]
    assert n.ire.vlm.gemini.api_key == "k"
    assert n.ire.data.ignore_types == ["Misc"]
