"""The binding of a results dir to its inputs: what counts as other inputs, and what does not."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from producer.binding import InputsChanged, check_binding, input_changes, inputs_of
from producer.runs import normalise, read_run_file, run_id_for, update_run_file
from worker.layout import Layout
from worker.spec import load_spec

P = "image_referring_expression"


@pytest.fixture
def dirs(tmp_path):
    out = {}
    for name in ("images", "labels", "other"):
        out[name] = tmp_path / name
        out[name].mkdir()
    Image.new("RGB", (8, 8)).save(out["images"] / "a.png")
    out["results"] = tmp_path / "results"
    return out


def spec(dirs, *extra, images="images", labels="labels"):
    args = [f"results_dir={dirs['results']}", f"{P}.data.image_dir={dirs[images]}", *extra]
    if labels:
        args.append(f"{P}.data.kitti_label_dir={dirs[labels]}")
    return normalise(load_spec(None, args))


def test_the_same_sources_are_the_same_inputs(dirs):
    assert input_changes(inputs_of(spec(dirs)), inputs_of(spec(dirs))) == []


def test_a_grown_image_dir_is_the_same_inputs(dirs):
    before = inputs_of(spec(dirs))
    Image.new("RGB", (8, 8)).save(dirs["images"] / "b.png")  # more images, same dirs: a resume
    assert input_changes(before, inputs_of(spec(dirs))) == []


@pytest.mark.parametrize("override", [
    f"{P}.vlm.openai.model_name=another-model", f"{P}.vlm.backend=offline", f"{P}.workflow.steps=[0,1]",
    f"{P}.workflow.force_reprocess=true", f"{P}.vlm.max_concurrency=3", f"{P}.workflow.output_format=both",
])
def test_a_changed_spec_is_not_a_changed_input(dirs, override):
    assert input_changes(inputs_of(spec(dirs)), inputs_of(spec(dirs, override))) == []


def test_a_changed_prompts_file_is_not_a_changed_input(dirs, tmp_path):
    import yaml

    from worker.steps.prompts import PROMPT_TEMPLATES

    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"image_caption": PROMPT_TEMPLATES["image_caption"] + " Be brief."}))
    assert input_changes(inputs_of(spec(dirs)), inputs_of(spec(dirs, f"{P}.workflow.prompts_file={prompts}"))) == []


def test_ignore_types_compare_as_a_set(dirs):
    a = inputs_of(spec(dirs, f"{P}.data.ignore_types=[DontCare,Misc]"))
    b = inputs_of(spec(dirs, f"{P}.data.ignore_types=[Misc,DontCare,Misc]"))
    assert input_changes(a, b) == []
    c = inputs_of(spec(dirs, f"{P}.data.ignore_types=[DontCare]"))
    assert input_changes(a, c) == ['data.ignore_types: ["DontCare", "Misc"] -> ["DontCare"]']


def test_another_image_dir_is_named_with_both_paths(dirs):
    changes = input_changes(inputs_of(spec(dirs)), inputs_of(spec(dirs, images="other")))
    assert changes == [f"data.image_dir: {dirs['images'].resolve()} -> {dirs['other'].resolve()}"]


def test_labels_added_or_removed_are_other_inputs(dirs):
    without = inputs_of(spec(dirs, labels=None))
    with_labels = inputs_of(spec(dirs))
    assert input_changes(without, with_labels) == [f"data.kitti_label_dir: (unset) -> {dirs['labels'].resolve()}"]
    assert input_changes(with_labels, without) == [f"data.kitti_label_dir: {dirs['labels'].resolve()} -> (unset)"]


def test_a_symlink_to_the_bound_dir_is_the_same_input(dirs, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(dirs["images"])
    dirs["link"] = link
    assert input_changes(inputs_of(spec(dirs)), inputs_of(spec(dirs, images="link"))) == []


def test_keys_the_bound_record_lacks_are_not_compared(dirs):
    bound = {k: v for k, v in inputs_of(spec(dirs)).items() if k != "ignore_types"}
    assert input_changes(bound, inputs_of(spec(dirs, f"{P}.data.ignore_types=[Car]"))) == []


# --------------------------------------------------------------------------- check_binding


def test_a_dir_bound_to_other_inputs_is_refused_with_both_and_what_to_do(dirs):
    s = spec(dirs)
    layout = Layout(dirs["results"])
    run_id = run_id_for(layout)
    update_run_file(layout, inputs=inputs_of(s))
    with pytest.raises(InputsChanged) as exc:
        check_binding(layout, read_run_file(layout), spec(dirs, images="other"))
    msg = str(exc.value)
    assert run_id in msg
    assert f"image_dir={dirs['images'].resolve()}" in msg and f"image_dir={dirs['other'].resolve()}" in msg
    assert "another --results-dir" in msg and f"mv {layout.root}" in msg
    check_binding(layout, read_run_file(layout), s)  # the same inputs pass


def test_an_old_run_file_with_only_run_id_still_loads_and_is_free_to_bind(dirs):
    layout = Layout(dirs["results"])
    dirs["results"].mkdir()
    layout.run_file.write_text('{"run_id": "old0123"}\n')
    assert run_id_for(layout) == "old0123"
    check_binding(layout, read_run_file(layout), spec(dirs))
    update_run_file(layout, steps=[0, 1])
    assert json.loads(layout.run_file.read_text()) == {"run_id": "old0123", "steps": [0, 1]}


def test_an_old_seed_of_other_images_binds_an_old_run_file(dirs):
    layout = Layout(dirs["results"])
    dirs["results"].mkdir()
    layout.run_file.write_text('{"run_id": "old0123"}\n')
    layout.seed.path.write_text(json.dumps({"image_id": "a", "image_path": str(dirs["images"] / "a.png")}) + "\n")
    check_binding(layout, read_run_file(layout), spec(dirs))  # its own images: fine
    with pytest.raises(InputsChanged) as exc:
        check_binding(layout, read_run_file(layout), spec(dirs, images="other"))
    assert str(dirs["images"] / "a.png") in str(exc.value)


def test_a_run_file_that_is_not_ours_is_named(dirs):
    layout = Layout(dirs["results"])
    dirs["results"].mkdir()
    layout.run_file.write_text("[1, 2]\n")
    with pytest.raises(Exception, match=r"run\.json: not a refexp run file"):
        read_run_file(layout)
