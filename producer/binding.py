"""A results dir is bound to its inputs: the first seed written there fixes where images come from.

Why: the seed file, the sinks and the messages in flight all name images by id and point into
``seed_annotations.jsonl``. A second run with other images re-seeding the same directory
used to replace the seed under the first run's workers ("not in the seed file") and mix two
datasets in one ``annotations.jsonl``. So ``run.json`` records the inputs, and a producer
with other inputs is refused before it writes anything.

"The inputs" are the *sources* and the options that decide what a seed record holds:
``data.image_dir``, ``data.kitti_label_dir``, ``data.input_annotations_jsonl`` (absolute,
symlinks resolved) and ``data.ignore_types`` (as a set). What those sources contain may change:
more images in the same ``image_dir`` (or lines in the same jsonl) is a resume, and so are
fixed label files; done image-steps are kept and only new work is sent. The spec around them
(backend, model, prompts, steps, limits) is not an input: changing it is a resume with a new
spec, which ``force_reprocess`` / skip-if-done already govern.
"""

from __future__ import annotations

import json
from pathlib import Path

from producer.seed import allowed_root
from worker.errors import ConfigError
from worker.layout import Layout
from worker.spec import Spec

SOURCE_KEYS = ("image_dir", "kitti_label_dir", "input_annotations_jsonl")


class InputsChanged(ConfigError):
    """The results dir belongs to a run with other inputs; nothing was written."""


def inputs_of(spec: Spec) -> dict:
    """The inputs a results dir is bound to, from a normalised spec (``runs.normalise``)."""
    data = spec.ire.data
    return {**{key: getattr(data, key) for key in SOURCE_KEYS}, "ignore_types": sorted(set(data.ignore_types))}


def input_changes(bound: dict, new: dict) -> list[str]:
    """One line per input that differs, ``[]`` when ``new`` may resume a run bound to ``bound``.

    Only the keys ``bound`` holds are compared, so a key added in a later version does not
    turn every older run into "other inputs".
    """
    changes = []
    for key in (*SOURCE_KEYS, "ignore_types"):
        if key not in bound:
            continue
        old, now = bound[key], new.get(key)
        if key == "ignore_types":
            old, now = sorted(set(old or [])), sorted(set(now or []))
        if old != now:
            changes.append(f"data.{key}: {_show(old)} -> {_show(now)}")
    return changes


def _show(value: object) -> str:
    if value in ("", None):
        return "(unset)"
    return json.dumps(value) if isinstance(value, list) else str(value)


def describe(inputs: dict) -> str:
    """``image_dir=/a, kitti_label_dir=/b, ...``: the set sources and the type filter."""
    parts = [f"{key}={inputs[key]}" for key in SOURCE_KEYS if inputs.get(key)]
    return ", ".join([*parts, f"ignore_types={json.dumps(inputs.get('ignore_types', []))}"])


def refusal(root: Path, bound: dict, new: dict, changes: list[str], *, whose: str,
            live: bool = False) -> InputsChanged:
    """The error for a producer whose inputs differ from ``whose`` ones (the bound run's, or
    those of the ``live`` producer holding the dir)."""
    move = f"move {root} away (e.g. mv {root} {root}.old) to start afresh there"
    return InputsChanged(
        f"results_dir {root} belongs to {whose}, with other inputs:\n"
        f"  bound: {describe(bound)}\n"
        f"  given: {describe(new)}\n"
        + "".join(f"  differs: {c}\n" for c in changes)
        + f"Nothing in {root} was changed. Use another --results-dir for these inputs, or "
        + (f"once that producer has finished, {move}" if live else move)
        + ". (More images in the same image_dir is a resume, not other inputs.)"
    )


def check_binding(layout: Layout, bound_run: dict, spec: Spec) -> None:
    """Raise ``InputsChanged`` unless ``spec``'s inputs may use this results dir.

    ``bound_run`` is ``run.json`` as read. A directory that has no recorded inputs yet is free,
    unless it holds a seed from an older version that names images outside the new inputs.
    """
    new = inputs_of(spec)
    bound = bound_run.get("inputs")
    run = f"run {bound_run.get('run_id')}"
    if isinstance(bound, dict):
        changes = input_changes(bound, new)
        if changes:
            raise refusal(layout.root, bound, new, changes, whose=run)
        return
    outside = _seed_outside(layout.seed.path, allowed_root(spec))
    if outside:
        raise InputsChanged(
            f"results_dir {layout.root} holds a seed (written before run.json recorded inputs) whose "
            f"images are not under {allowed_root(spec)}: {outside}. Nothing was changed. Use another "
            f"--results-dir, or move {layout.root} away to start afresh there."
        )


def _seed_outside(seed: Path, root: Path) -> str | None:
    """The first seed record's image path when it lies outside ``root`` (an older results dir
    of other images), else None. One line is enough: a seed comes from one source."""
    try:
        with open(seed, "rb") as f:
            first = json.loads(f.readline() or b"{}")
    except (OSError, ValueError):
        return None
    path = first.get("image_path") if isinstance(first, dict) else None
    if not path:
        return None
    p = Path(path)
    return None if p.is_relative_to(root) or p.resolve().is_relative_to(root.resolve()) else path
