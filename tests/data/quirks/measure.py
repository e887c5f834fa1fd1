"""Both answer modes on the fake endpoint, through the real SDK clients and the full conversation.

``PYTHONPATH=. python tests/data/quirks/measure.py [--images N]`` prints two tables:

1. **Corpus through the endpoint.** Each corpus answer is served by ``tests.support.fake_vlm``
   as the first answer to the step's real request (Gemini or OpenAI protocol by model name,
   structured or text by the case's mode); later calls (a truncation retry, a re-ask about
   missing ids) get the fake's literal answer. Reported: answers that end in a record, records
   with a box joined where the truth does not join it, and calls per case.
2. **Demo dataset end to end.** ``producer.demo`` scenes through all four steps with the fake's
   literal answers, per protocol and mode (and a server that rejects json_schema): records,
   boxes matched of those asked about, calls and output tokens per image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from PIL import Image

from tests.support.fake_vlm import FakeVLM
from worker.clients.factory import clear_cache, get_client
from worker.errors import PipelineError
from worker.geometry import iou
from worker.spec import GeminiSpec, OpenAISpec, VLMSpec
from worker.steps import input_record, run_step
from worker.steps.converse import forget_rejections
from worker.steps.options import StepOptions
from worker.steps.prompts import load_prompts

HERE = Path(__file__).parent
GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}
OPENAI_FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter"}


def _image(tmp: Path, w: int, h: int) -> str:
    p = tmp / f"blank_{w}x{h}.png"
    if not p.exists():
        Image.new("RGB", (w, h), (110, 110, 110)).save(p)
    return str(p)


def _spec(fake: FakeVLM, model: str, structured: bool, box_format: str) -> VLMSpec:
    backend = "gemini" if model.lower().startswith("gemini") else "openai"
    return VLMSpec(backend=backend, structured_output="auto" if structured else "off", box_format=box_format,
                   gemini=GeminiSpec(base_url=fake.gemini_base_url, model=model, timeout=10),
                   openai=OpenAISpec(base_url=fake.openai_base_url, model_name=model, timeout=10))


def _queue(fake: FakeVLM, case: dict, backend: str) -> None:
    finish = case["finish_reason"]
    if case["block_reason"]:
        fake.block_next(1, reason=case["block_reason"])
        return
    if backend == "gemini":
        finish = GEMINI_FINISH.get(finish, finish or "STOP")
        if finish in ("content_filter",):
            finish = "SAFETY"
    else:
        finish = OPENAI_FINISH.get(finish, finish or "stop")
        if finish in ("SAFETY", "RECITATION"):
            fake.block_next(1)
            return
    fake.answer_next(case["answer"], finish_reason=finish)


def _wrong(case: dict, rec: dict) -> int:
    """Boxes joined where the corpus truth does not join them (regions the truth leaves out
    but a re-ask filled in are judged by their KITTI box)."""
    step, want = case["step"], case["expect"]
    n = 0
    if step == 0:
        truth = {r["kitti_index"]: r for r in want.get("regions", [])}
        for r in rec.get("regions", []):
            t = truth.get(r["kitti_index"])
            if t is not None and t["description"] != r["description"]:
                n += 1
            kitti = case["input"]["kitti_bboxes"][r["kitti_index"]]
            if [float(v) for v in kitti[:4]] != r["bbox"]:
                n += 1
    elif step == 2:
        allowed = {(e["text"], ri) for e in want.get("expressions", []) for ri in e["regions"]}
        for e in rec.get("expressions", []):
            for i in e["instances"]:
                if i["matched"] and (e["text"], i["region_index"]) not in allowed and any(
                        t == e["text"] for t, _ in allowed):
                    n += 1
    elif step == 3:
        allowed = {(e["text"], b) for e in want.get("expressions", []) for b in e["bbox_ids"]}
        orig = {i["bbox_id"]: i for e in case["input"]["expressions"] for i in e["instances"]}
        for e in rec.get("expressions", []):
            for i in e["instances"]:
                if (e["text"], i["bbox_id"]) not in allowed and i["bbox_id"] in orig and \
                        iou(i["bbox_2d"], orig[i["bbox_id"]]["bbox_2d"]) < 0.5:
                    n += 1
    return n


def corpus_through_endpoint(tmp: Path) -> dict:
    templates = load_prompts(None)
    table: dict = {}
    with FakeVLM() as fake:
        os.environ["GOOGLE_API_KEY"] = "fake-key-for-measurement"
        for step in (0, 1, 2, 3):
            for line in (HERE / f"step{step}.jsonl").read_text(encoding="utf-8").splitlines():
                case = json.loads(line)
                clear_cache()
                forget_rejections()
                fake.reset()
                vlm = _spec(fake, case["model"], case["mode"] == "structured", case["box_format"])
                _queue(fake, case, vlm.backend)
                rec = {"image_id": "img", "image_path": _image(tmp, case["input"]["width"], case["input"]["height"]),
                       "pipeline_steps": [], **case["input"]}
                row = table.setdefault((step, case["mode"]), Counter())
                row["cases"] += 1
                try:
                    out = run_step(step, rec, get_client(vlm), templates, options=StepOptions.from_vlm(vlm))
                    row["record"] += 1
                    row["wrong_boxes"] += _wrong(case, out.record)
                    row["expected_error_but_recovered"] += bool(case["expect"].get("error"))
                except PipelineError as exc:
                    row["error"] += 1
                    row["expected_error"] += bool(case["expect"].get("error"))
                    row[f"error:{type(exc).__name__}"] += 1
                row["calls"] += fake.calls
    return table


def demo_end_to_end(tmp: Path, n_images: int) -> dict:
    from producer.demo import make_demo_dataset
    from worker.images import read_size
    from worker.kitti import decode_label_bytes, parse_kitti

    images, labels = make_demo_dataset(tmp / "demo", n_images=n_images, seed=11)
    seeds = []
    for p in sorted(images.iterdir()):
        w, h = read_size(p)
        label = labels / f"{p.stem}.txt"
        boxes = parse_kitti(decode_label_bytes(label.read_bytes()), width=w, height=h,
                            ignore_types=["DontCare"]).boxes if label.exists() else []
        seeds.append({"image_id": p.stem, "image_path": str(p), "width": w, "height": h,
                      "kitti_bboxes": [[*b["bbox"], b["type"]] for b in boxes], "pipeline_steps": []})
    templates = load_prompts(None)
    table = {}
    for backend, model in (("openai", "qwen3-vl-32b-instruct"), ("gemini", "gemini-2.5-flash")):
        for mode, reject in (("off", False), ("auto", False), ("auto", True)):
            clear_cache()
            forget_rejections()
            row = Counter()
            with FakeVLM(reject_json_schema=reject) as fake:
                os.environ["GOOGLE_API_KEY"] = "fake-key-for-measurement"
                vlm = VLMSpec(backend=backend, structured_output=mode,
                              gemini=GeminiSpec(base_url=fake.gemini_base_url, model=model, timeout=10),
                              openai=OpenAISpec(base_url=fake.openai_base_url, model_name=model, timeout=10))
                client, opts = get_client(vlm), StepOptions.from_vlm(vlm)
                for seed in seeds:
                    recs = {}
                    try:
                        for step in (0, 1, 2, 3):
                            out = run_step(step, input_record(step, seed, recs), client, templates, options=opts)
                            recs[step] = out.record
                            call = out.record.get("meta", {}).get(
                                {0: "step0_region_expr", 1: "step1_image_caption", 2: "step2_grounding_expr",
                                 3: "step3_double_check"}[step], {})
                            row["output_tokens"] += (call.get("call") or {}).get("output_tokens", 0)
                        row["images_done"] += 1
                        row["kitti_boxes"] += len(seed["kitti_bboxes"])
                        row["regions"] += len(recs[0]["regions"])
                        row["step3_boxes"] += sum(len(e["instances"]) for e in recs[3].get("expressions", []))
                    except PipelineError as exc:
                        row[f"error:{type(exc).__name__}"] += 1
                row["calls"] = fake.calls
                row["images"] = len(seeds)
            table[(backend, mode + (" (server rejects schema)" if reject else ""))] = row
    return table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=20)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        print("corpus through the fake endpoint (SDK clients, full conversation):")
        for (step, mode), r in sorted(corpus_through_endpoint(t).items()):
            usable = r["record"] + r["expected_error"]
            print(f"  step {step} {mode:<10} cases {r['cases']:>3}  record {r['record']:>3}  "
                  f"expected error {r['expected_error']:>2}  unexpected error {r['error'] - r['expected_error']:>2}  "
                  f"as expected {usable / r['cases']:6.1%}  wrong boxes {r['wrong_boxes']}  "
                  f"calls/case {r['calls'] / r['cases']:.2f}  "
                  f"retried into a record {r['expected_error_but_recovered']}")
        print(f"\ndemo dataset end to end ({a.images} images, fake's literal answers):")
        for (backend, mode), r in demo_end_to_end(t, a.images).items():
            errors = {k: v for k, v in r.items() if k.startswith("error:")}
            print(f"  {backend:<6} {mode:<30} images {r['images_done']}/{r['images']}  regions "
                  f"{r['regions']}/{r['kitti_boxes']}  step-3 boxes {r['step3_boxes']}  calls {r['calls']}  "
                  f"output tokens/image {r['output_tokens'] / max(1, r['images']):.0f}  {errors or ''}")


if __name__ == "__main__":
    sys.exit(main())
