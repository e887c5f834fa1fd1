"""What a fingerprint holds: the request as sent without its transport, the image's bytes and
the upstream fingerprints; and the check path (``expected_fingerprints``, no call) agrees with
the call path (``run_step``) for every step."""

from __future__ import annotations

from PIL import Image

from worker.clients.offline import OfflineClient
from worker.spec import load_spec
from worker.steps import StepOptions, expected_fingerprints, fingerprint, input_record, run_step
from worker.steps.fingerprint import Sent, compose, generation
from worker.steps.prompts import PROMPT_TEMPLATES

P = "image_referring_expression.vlm"
SENT = Sent(mode="structured", prompt="Describe {objects}", schema={"type": "object"}, max_tokens=8192)


def test_a_fingerprint_is_16_hex_and_moves_with_every_part_of_the_request():
    base = dict(generation=(("model", "m"),), downscale_to_pixels=0, image_sha256="a" * 64, upstream={0: "x"})
    fp = compose(3, SENT, **base)
    assert len(fp) == 16 and int(fp, 16) >= 0 and compose(3, SENT, **base) == fp
    changed = [
        compose(2, SENT, **base),
        compose(3, Sent("text", SENT.prompt, None, 8192), **base),
        compose(3, Sent("structured", SENT.prompt + ".", SENT.schema, 8192), **base),
        compose(3, Sent("structured", SENT.prompt, {"type": "array"}, 8192), **base),
        compose(3, Sent("structured", SENT.prompt, SENT.schema, 4096), **base),
        compose(3, SENT, **{**base, "generation": (("model", "n"),)}),
        compose(3, SENT, **{**base, "downscale_to_pixels": 1_000_000}),
        compose(3, SENT, **{**base, "image_sha256": "b" * 64}),
        compose(3, SENT, **{**base, "upstream": {0: "y"}}),
    ]
    assert fp not in changed and len(set(changed)) == len(changed)
    # Nothing asked (no boxes): the image is not part of it.
    assert compose(3, None, **base) == compose(3, None, **{**base, "image_sha256": "b" * 64})


def test_generation_holds_what_the_client_sends_not_its_transport():
    def gen(*overrides):
        return generation(load_spec(None, [f"{P}.backend=gemini", *overrides]).ire.vlm)

    assert gen() == gen(f"{P}.gemini.timeout=5", f"{P}.gemini.base_url=http://proxy:1", f"{P}.gemini.api_key=k",
                        f"{P}.max_concurrency=3", f"{P}.max_retries=9", f"{P}.requests_per_minute=10")
    assert gen(f"{P}.gemini.media_resolution=low") == gen(f"{P}.gemini.media_resolution=MEDIA_RESOLUTION_LOW")
    for other in (f"{P}.gemini.model=gemini-2.5-pro", f"{P}.gemini.temperature=0.9",
                  f"{P}.gemini.media_resolution=HIGH", f"{P}.gemini.thinking_budget=128"):
        assert gen(other) != gen()
    openai = generation(load_spec(None, [f"{P}.backend=openai", f"{P}.openai.model_name=q"]).ire.vlm)
    assert dict(openai) == {"backend": "openai", "model": "q", "temperature": 0.7}


def test_the_check_path_computes_what_the_call_path_records(tmp_path):
    image = tmp_path / "img.png"
    Image.new("RGB", (200, 100), (90, 90, 90)).save(image)
    seed = {"image_id": "img", "image_path": str(image), "width": 200, "height": 100,
            "kitti_bboxes": [[10.0, 10.0, 60.0, 80.0, "Car"], [100.0, 20.0, 180.0, 90.0, "Van"]]}
    spec = load_spec(None, [f"{P}.backend=offline"])
    options = StepOptions.from_vlm(spec.ire.vlm, image_cache_dir=str(tmp_path / "cache"))
    records: dict[int, dict] = {}
    for step in (0, 1, 2, 3):
        rec = input_record(step, seed, records)
        out = run_step(step, rec, OfflineClient(), PROMPT_TEMPLATES, options=options).record
        records[step] = out
        have = fingerprint.of_record(out, step)
        assert have in expected_fingerprints(step, rec, PROMPT_TEMPLATES, options, structured=False)
        other = {**PROMPT_TEMPLATES, "image_caption": PROMPT_TEMPLATES["image_caption"] + " Be brief."}
        assert (have in expected_fingerprints(step, rec, other, options, structured=False)) == (step != 1)
    # Step 3's record carries every step's fingerprint, each its own.
    assert len({m["fingerprint"] for m in records[3]["meta"].values()}) == 4
