"""``vlm.batch`` as a word and as a mapping, in the file and in overrides, in any order."""

from __future__ import annotations

import pytest

from worker.spec import load_spec

B = "image_referring_expression.vlm.batch"


@pytest.mark.parametrize("overrides", [
    [f"{B}=on", f"{B}.gather_seconds=2"],
    [f"{B}.gather_seconds=2", f"{B}=on"],
    [f"{B}=true", f"{B}.gather_seconds=2"],
    [f"{B}.enabled=true", f"{B}.gather_seconds=2"],
])
def test_a_switch_and_a_setting_together_keep_both(overrides):
    batch = load_spec(None, overrides).ire.vlm.batch
    assert batch.enabled is True and batch.gather_seconds == 2


def test_a_switch_in_the_file_and_a_setting_on_the_command_line(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("image_referring_expression:\n  vlm:\n    batch: on\n")
    batch = load_spec(spec, [f"{B}.poll_seconds=5"]).ire.vlm.batch
    assert batch.enabled is True and batch.poll_seconds == 5


def test_off_is_off():
    assert load_spec(None, [f"{B}=off", f"{B}.gather_seconds=2"]).ire.vlm.batch.enabled is False
