"""``producer check-endpoint``: one real call on one image before a long run.

It builds the same client a worker would (keys from this machine's environment), asks step 0
about a drawn test scene (or the image you give, with its KITTI label if one sits beside it),
and prints the model, the latency and the parsed regions — or the error and what to fix.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import typer

from producer.exitcodes import ExitCode
from worker.budget import endpoint_key
from worker.clients.factory import get_client
from worker.errors import PermanentClientError, PipelineError
from worker.images import read_size
from worker.kitti import decode_label_bytes, parse_kitti
from worker.spec import Spec
from worker.steps import StepOptions, run_step
from worker.steps.prompts import load_prompts


def _sample(image: Path | None, tmp: Path) -> tuple[Path, Path | None]:
    if image is not None:
        label = image.with_suffix(".txt")
        return image, label if label.is_file() else None
    from producer.demo import make_demo_dataset

    images, labels = make_demo_dataset(tmp, n_images=1, seed=3)
    first = sorted(images.iterdir())[0]
    return first, labels / f"{first.stem}.txt"


def check(spec: Spec, image: Path | None) -> ExitCode:
    """Return the exit code: 0 when the endpoint answered and the answer parsed; 2 when no
    client can be built here (no API key); 4 when the call failed (its one image failed)."""
    vlm = spec.ire.vlm
    typer.echo(f"endpoint: {endpoint_key(vlm)}")
    try:
        get_client(vlm)
    except PermanentClientError as exc:  # built without a call: a missing key, not the endpoint's answer
        typer.echo(f"error: {exc}", err=True)
        return ExitCode.USAGE
    with tempfile.TemporaryDirectory() as tmp:
        path, label = _sample(image, Path(tmp))
        width, height = read_size(path)
        boxes = []
        if label is not None:
            boxes = parse_kitti(decode_label_bytes(label.read_bytes()), width=width, height=height,
                                ignore_types=spec.ire.data.ignore_types).boxes
        record = {"image_id": path.stem, "image_path": str(path), "width": width, "height": height,
                  "kitti_bboxes": [[*b["bbox"], b["type"]] for b in boxes], "pipeline_steps": []}
        step = 0 if boxes else 1
        start = time.monotonic()
        try:
            client = get_client(vlm)
            outcome = run_step(step, record, client, load_prompts(spec.ire.workflow.prompts_file),
                               max_pixels=vlm.max_image_pixels,
                               options=StepOptions.from_vlm(vlm, endpoint=endpoint_key(vlm)))
        except PipelineError as exc:
            typer.echo(f"FAILED after {time.monotonic() - start:.2f}s: {type(exc).__name__}: {exc}", err=True)
            return ExitCode.NONE_DONE
        latency = time.monotonic() - start
    resp = outcome.response
    typer.echo(f"model: {resp.model if resp else '-'}  latency: {latency:.2f}s  finish: "
               f"{resp.finish_reason if resp else '-'}  usage: {json.dumps(resp.usage) if resp else '-'}")
    field = "regions" if step == 0 else "caption"
    typer.echo(f"parsed step {step} {field}: {json.dumps(outcome.record.get(field), ensure_ascii=False, indent=2)}")
    return ExitCode.OK
