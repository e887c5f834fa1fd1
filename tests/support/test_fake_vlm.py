"""The fake VLM server itself: wire shapes, limits, fault injection, the answerer, the CLI.

Wire checks use only the stdlib HTTP client, so they test what the server puts on the wire,
not what an SDK makes of it. The answerer is checked against the steps' own prompt builders
and parsers, which is the contract that matters for pipeline runs.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from statistics import median

import pytest
from PIL import Image, ImageDraw

from tests.support.fake_vlm import FakeVLM, default_answer
from worker.steps import double_check, grounding_expr, image_caption, region_expr
from worker.steps.prompts import PROMPT_TEMPLATES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake():
    with FakeVLM() as f:
        yield f


@pytest.fixture
def scene() -> bytes:
    im = Image.new("RGB", (400, 200), (128, 128, 128))
    draw = ImageDraw.Draw(im)
    draw.rectangle([20, 60, 120, 160], fill=(200, 30, 30))  # red, left
    draw.rectangle([150, 60, 190, 160], fill=(200, 30, 30))  # red, center
    draw.rectangle([300, 40, 380, 180], fill=(240, 240, 240))  # white, right
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def post(fake: FakeVLM, path: str, body: dict, headers: dict | None = None, conn=None):
    c = conn or http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    headers = {"Content-Type": "application/json", **(headers or {})}
    c.request("POST", path, body=json.dumps(body), headers=headers)
    resp = c.getresponse()
    data = resp.read()
    return resp.status, dict(resp.getheaders()), json.loads(data)


def openai_body(prompt="hi", image: bytes = b"\x89PNG fake", model="m") -> dict:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"model": model, "temperature": 0.5, "max_tokens": 77, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}]}]}


def gemini_body(prompt="hi", image: bytes = b"\x89PNG fake") -> dict:
    return {"contents": [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "image/jpeg", "data": base64.urlsafe_b64encode(image).decode()}},
        {"text": prompt}]}], "generationConfig": {"temperature": 0.1, "maxOutputTokens": 55}}


# ----------------------------------------------------------------------------- wire shapes

def test_openai_chat_completion_shape_and_record(fake):
    status, _, body = post(fake, "/v1/chat/completions", openai_body(image=b"abc\xff"))
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    (req,) = fake.requests
    assert (req.protocol, req.model, req.prompt) == ("openai", "m", "hi")
    assert (req.image, req.image_mime) == (b"abc\xff", "image/png")
    assert req.temperature == 0.5 and req.max_tokens == 77


@pytest.mark.parametrize("version", ["v1beta", "v1alpha", "v1"])
def test_gemini_generate_content_shape_and_record(fake, version):
    path = f"/{version}/models/gem-x:generateContent"
    status, _, body = post(fake, path, gemini_body(image=b"\xfb\xff\xfe"))
    assert status == 200
    (cand,) = body["candidates"]
    assert cand["finishReason"] == "STOP" and cand["index"] == 0
    assert cand["content"]["role"] == "model" and cand["content"]["parts"][0]["text"]
    meta = body["usageMetadata"]
    assert meta["totalTokenCount"] == meta["promptTokenCount"] + meta["candidatesTokenCount"]
    assert body["modelVersion"] == "gem-x"
    (req,) = fake.requests
    assert (req.protocol, req.model, req.prompt) == ("gemini", "gem-x", "hi")
    assert (req.image, req.image_mime) == (b"\xfb\xff\xfe", "image/jpeg")
    assert req.temperature == 0.1 and req.max_tokens == 55


def test_keep_alive_serves_several_requests_on_one_connection(fake):
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    for _ in range(3):
        status, headers, _ = post(fake, "/v1/chat/completions", openai_body(), conn=conn)
        assert status == 200 and int(headers["Content-Length"]) > 0
    conn.close()
    assert fake.calls == 3


def test_model_listing(fake):
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    conn.request("GET", "/v1/models")
    body = json.loads(conn.getresponse().read())
    assert body["object"] == "list" and body["data"][0]["object"] == "model"


def test_error_bodies_in_each_protocol(fake):
    fake.fail_next(1, 500, message="boom")
    status, _, body = post(fake, "/v1/chat/completions", openai_body())
    assert status == 500
    assert body == {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    fake.fail_next(1, 500, message="boom")
    status, _, body = post(fake, "/v1beta/models/g:generateContent", gemini_body())
    assert status == 500 and body == {"error": {"code": 500, "message": "boom", "status": "INTERNAL"}}


def test_429_carries_retry_after_header_and_gemini_retry_info(fake):
    fake.fail_next(2, 429, retry_after=4)
    status, headers, body = post(fake, "/v1/chat/completions", openai_body())
    assert status == 429 and headers["Retry-After"] == "4" and body["error"]["code"] == "rate_limit_exceeded"
    status, headers, body = post(fake, "/v1beta/models/g:generateContent", gemini_body())
    assert status == 429 and headers["Retry-After"] == "4"
    assert body["error"]["status"] == "RESOURCE_EXHAUSTED"
    retry_info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "4s"}
    assert retry_info in body["error"]["details"]
    assert fake.status_counts == {429: 2}


def test_unknown_model_is_404_in_each_protocol():
    with FakeVLM(models={"known"}) as fake:
        status, _, body = post(fake, "/v1/chat/completions", openai_body(model="other"))
        assert status == 404 and body["error"]["code"] == "model_not_found"
        assert "other" in body["error"]["message"]
        status, _, body = post(fake, "/v1beta/models/other:generateContent", gemini_body())
        assert status == 404 and body["error"]["status"] == "NOT_FOUND"
        assert post(fake, "/v1beta/models/known:generateContent", gemini_body())[0] == 200


def test_api_key_checks_follow_each_service():
    with FakeVLM(api_key="sekret") as fake:
        assert post(fake, "/v1/chat/completions", openai_body())[0] == 401
        assert post(fake, "/v1/chat/completions", openai_body(), {"Authorization": "Bearer sekret"})[0] == 200
        gem = "/v1beta/models/g:generateContent"
        assert post(fake, gem, gemini_body())[0] == 403
        status, _, body = post(fake, gem, gemini_body(), {"x-goog-api-key": "bad"})
        assert status == 400 and body["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        assert post(fake, gem, gemini_body(), {"x-goog-api-key": "sekret"})[0] == 200
        assert post(fake, gem + "?key=sekret", gemini_body())[0] == 200


# ----------------------------------------------------------------------------- limits and faults

def test_over_max_concurrency_is_429(fake):
    fake.max_concurrency = 1
    inside, release = threading.Event(), threading.Event()

    def slow(prompt, image, protocol):
        inside.set()
        release.wait(5)
        return "slow answer"

    fake.answer_fn = slow
    first: list = []
    t = threading.Thread(target=lambda: first.append(post(fake, "/v1/chat/completions", openai_body())))
    t.start()
    assert inside.wait(5)
    status, headers, _ = post(fake, "/v1/chat/completions", openai_body())
    release.set()
    t.join(5)
    assert status == 429 and "Retry-After" in headers
    assert first[0][0] == 200 and first[0][2]["choices"][0]["message"]["content"] == "slow answer"
    assert fake.max_in_flight == 2 and fake.in_flight == 0


def test_rpm_limit_answers_429_with_retry_after():
    with FakeVLM(rpm=2) as fake:
        assert [post(fake, "/v1/chat/completions", openai_body())[0] for _ in range(2)] == [200, 200]
        status, headers, _ = post(fake, "/v1/chat/completions", openai_body())
        assert status == 429 and 0 < float(headers["Retry-After"]) <= 60


def test_directives_apply_in_order_then_default_resumes(fake):
    fake.fail_next(1, 503)
    fake.answer_next("truncated [[1,", finish_reason="length")
    fake.block_next(1)
    results = [post(fake, "/v1/chat/completions", openai_body()) for _ in range(4)]
    assert [r[0] for r in results] == [503, 200, 200, 200]
    assert results[1][2]["choices"][0] == {
        "index": 0, "message": {"role": "assistant", "content": "truncated [[1,"},
        "logprobs": None, "finish_reason": "length"}
    assert results[2][2]["choices"][0]["finish_reason"] == "content_filter"
    assert results[2][2]["choices"][0]["message"]["content"] is None
    assert results[3][2]["choices"][0]["finish_reason"] == "stop"
    assert fake.status_counts == {503: 1, 200: 3} and fake.calls == 4


def test_raw_next_serves_a_body_that_is_not_the_api(fake):
    fake.raw_next(1, "<html><title>Sign in</title></html>")
    c = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    c.request("POST", "/v1beta/models/g:generateContent", body=json.dumps(gemini_body()),
              headers={"Content-Type": "application/json"})
    resp = c.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/html; charset=utf-8"
    assert resp.read() == b"<html><title>Sign in</title></html>"
    status, _, body = post(fake, "/v1/chat/completions", openai_body())  # then the API again
    assert status == 200 and body["object"] == "chat.completion"
    assert fake.calls == 2


def test_gemini_block_and_finish_reasons(fake):
    fake.block_next(1, reason="SAFETY")
    fake.answer_next("", finish_reason="SAFETY")
    fake.answer_next("partial", finish_reason="MAX_TOKENS")
    blocked = post(fake, "/v1beta/models/g:generateContent", gemini_body())[2]
    assert "candidates" not in blocked and blocked["promptFeedback"] == {"blockReason": "SAFETY"}
    refused = post(fake, "/v1beta/models/g:generateContent", gemini_body())[2]
    assert refused["candidates"][0]["finishReason"] == "SAFETY" and "content" not in refused["candidates"][0]
    cut = post(fake, "/v1beta/models/g:generateContent", gemini_body())[2]
    assert cut["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert cut["candidates"][0]["content"]["parts"] == [{"text": "partial"}]


def test_reset_clears_records_counters_and_queue(fake):
    fake.fail_next(5, 500)
    post(fake, "/v1/chat/completions", openai_body())
    fake.reset()
    assert (fake.requests, fake.calls, fake.status_counts) == ([], 0, {})
    assert post(fake, "/v1/chat/completions", openai_body())[0] == 200


def test_lognormal_latency_has_the_configured_median_and_tail():
    fake = FakeVLM(latency=0.5, latency_dist="lognormal", seed=1)
    samples = sorted(fake.sample_latency() for _ in range(20000))
    assert median(samples) == pytest.approx(0.5, rel=0.05)
    assert samples[int(0.99 * len(samples))] == pytest.approx(2.5, rel=0.15)
    assert FakeVLM(latency=0.5).sample_latency() == 0.5
    with pytest.raises(ValueError):
        FakeVLM(latency_dist="uniform")


# ----------------------------------------------------------------------------- the answerer

def _record(scene: bytes) -> dict:
    return {"image_id": "scene", "width": 400, "height": 200, "kitti_bboxes": [
        [20, 60, 120, 160, "Car"], [150, 60, 190, 160, "Car"], [300, 40, 380, 180, "Van"]]}


def test_answers_parse_through_all_four_steps(scene):
    rec = _record(scene)
    prompt, _ = region_expr.build_prompt(rec, PROMPT_TEMPLATES["region_expr"])
    answer0 = default_answer(prompt, scene, "gemini")
    assert answer0.startswith("```json")
    regions = region_expr.parse(answer0, rec)["regions"]
    assert [(r["type"], r["color"], r["description"]) for r in regions] == [
        ("Car", "red", "red car on the left"), ("Car", "red", "red car in the center"),
        ("Van", "white", "white van on the right")]
    rec = region_expr.record(rec, {"regions": regions, "report": {}})

    caption_prompt, _ = image_caption.build_prompt(rec, PROMPT_TEMPLATES["image_caption"])
    caption = image_caption.parse(default_answer(caption_prompt, scene, "openai"), rec)["caption"]
    assert caption.startswith("A road scene in daylight")
    assert caption == default_answer(caption_prompt, scene, "openai")  # deterministic
    rec = {**rec, "caption": caption}

    prompt2, _ = grounding_expr.build_prompt(rec, PROMPT_TEMPLATES["grounding_expr"])
    answer2 = default_answer(prompt2, scene, "openai")
    assert answer2.splitlines() == ["the red cars: [[50, 300, 300, 800], [375, 300, 475, 800]]",
                                    "white van on the right: [[750, 200, 950, 900]]"]
    expressions = grounding_expr.parse(answer2, rec)["expressions"]
    assert [len(e["instances"]) for e in expressions] == [2, 1]
    assert all(i["matched"] for e in expressions for i in e["instances"])
    rec = grounding_expr.record(rec, {"expressions": expressions, "report": {}})

    prompt3, _ = double_check.build_prompt(rec, PROMPT_TEMPLATES["double_check"])
    assert default_answer(prompt3, scene, "gemini") == answer2  # echoed unchanged
    checked = double_check.parse(default_answer(prompt3, scene, "gemini"), rec)["expressions"]
    assert [e["text"] for e in checked] == ["the red cars", "white van on the right"]
    assert all(e["verified"] for e in checked)


def test_answer_fn_overrides_the_default(fake):
    seen = []
    fake.answer_fn = lambda prompt, image, protocol: seen.append((prompt, image, protocol)) or "custom"
    body = post(fake, "/v1beta/models/g:generateContent", gemini_body(prompt="p", image=b"img"))[2]
    assert body["candidates"][0]["content"]["parts"][0]["text"] == "custom"
    assert seen == [("p", b"img", "gemini")]


def test_a_raising_answer_fn_is_a_500_and_not_a_leak(fake):
    fake.answer_fn = lambda prompt, image, protocol: 1 / 0
    status, _, body = post(fake, "/v1/chat/completions", openai_body())
    assert status == 500 and "ZeroDivisionError" in body["error"]["message"]
    assert fake.in_flight == 0 and fake.status_counts == {500: 1}


# ----------------------------------------------------------------------------- the CLI

def _request(url: str, method: str, path: str, body: dict | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request(method, path, body=json.dumps(body) if body is not None else None)
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read())


def test_cli_prints_its_url_serves_control_routes_and_stops_on_sigterm():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_vlm", "--port", "0", "--latency", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("FAKE_VLM_URL=http://127.0.0.1:")
        url = line.split("=", 1)[1]
        fail = {"n": 1, "status": 503, "retry_after": 2}
        assert _request(url, "POST", "/_fail_next", fail) == (200, {"ok": True})
        assert _request(url, "POST", "/v1/chat/completions", openai_body(model="a"))[0] == 503
        assert _request(url, "POST", "/v1/chat/completions", openai_body(model="a"))[0] == 200
        status, stats = _request(url, "GET", "/_stats")
        assert status == 200
        assert stats["calls"] == 2 and stats["status_counts"] == {"503": 1, "200": 1}
        assert stats["requests_by_model"] == {"a": 2} and stats["in_flight"] == 0
        assert _request(url, "POST", "/_reset", {})[0] == 200
        assert _request(url, "GET", "/_stats")[1]["calls"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
