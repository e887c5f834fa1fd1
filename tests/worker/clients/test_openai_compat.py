"""OpenAICompatClient through the real openai SDK against the fake server, over HTTP."""

from __future__ import annotations

import base64
import time

import pytest

from tests.support.fake_vlm import FakeVLM
from worker import budget
from worker.clients import factory
from worker.clients.base import VLMClient, VLMRequest
from worker.clients.openai_compat import OpenAICompatClient
from worker.errors import ClientError, EmptyAnswer, PermanentClientError, RateLimited
from worker.spec import OpenAISpec, VLMSpec

KEY = "nvapi-test-0123456789abcdef"


def client(fake: FakeVLM, **kw) -> OpenAICompatClient:
    return OpenAICompatClient(OpenAISpec(base_url=fake.openai_base_url, timeout=kw.pop("timeout", 5), **kw))


def test_request_carries_image_prompt_model_and_params(monkeypatch, fake_vlm, png):
    monkeypatch.setenv("NVIDIA_API_KEY", KEY)
    c = client(fake_vlm, model_name="qwen/test-vl", temperature=0.2, max_tokens=123)
    assert isinstance(c, VLMClient)
    assert c.name == "openai:qwen/test-vl"

    resp = c.generate(VLMRequest(image=png, prompt="Describe this."))

    (req,) = fake_vlm.requests
    assert req.protocol == "openai" and req.path == "/v1/chat/completions"
    assert req.model == "qwen/test-vl"
    assert req.image == png.data and req.image_mime == "image/png" and req.n_images == 1
    assert req.prompt == "Describe this."
    assert req.temperature == pytest.approx(0.2)
    assert req.max_tokens == 123
    assert req.headers["authorization"] == f"Bearer {KEY}"
    (message,) = req.body["messages"]
    assert message["role"] == "user"
    assert [p["type"] for p in message["content"]] == ["image_url", "text"]
    url = message["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == png.data
    assert resp.text == "The image shows a street scene."
    assert resp.finish_reason == "stop" and resp.truncated is False
    assert resp.model == "qwen/test-vl"
    assert resp.usage["input_tokens"] > 0 and resp.usage["output_tokens"] > 0


def test_jpeg_keeps_its_mime(fake_vlm, jpeg):
    client(fake_vlm).generate(VLMRequest(image=jpeg, prompt="x"))
    (req,) = fake_vlm.requests
    assert req.image_mime == "image/jpeg" and req.image == jpeg.data


def test_key_order_openai_then_nvidia_then_spec(monkeypatch, fake_vlm, png):
    client(fake_vlm, api_key="from-spec").generate(VLMRequest(image=png, prompt="x"))
    monkeypatch.setenv("NVIDIA_API_KEY", "from-nvidia-env")
    client(fake_vlm, api_key="from-spec").generate(VLMRequest(image=png, prompt="x"))
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")
    client(fake_vlm, api_key="from-spec").generate(VLMRequest(image=png, prompt="x"))
    assert [r.headers["authorization"] for r in fake_vlm.requests] == [
        "Bearer from-spec", "Bearer from-nvidia-env", "Bearer from-openai-env"]


def test_key_from_a_mounted_secret_file(monkeypatch, tmp_path, fake_vlm, png):
    """OPENAI_API_KEY_FILE (a compose secret) is read like OPENAI_API_KEY; an empty file is no key
    (a self-hosted server without auth)."""
    key_file = tmp_path / "vlm_api_key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv("OPENAI_API_KEY_FILE", str(key_file))
    client(fake_vlm, api_key="from-spec").generate(VLMRequest(image=png, prompt="x"))
    key_file.write_text("")
    client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert [r.headers["authorization"] for r in fake_vlm.requests] == [f"Bearer {KEY}", "Bearer EMPTY"]
    with pytest.raises(PermanentClientError, match="OPENAI_API_KEY is not set on this worker") as info:
        OpenAICompatClient(OpenAISpec(base_url="https://api.openai.com/v1"))
    assert "_FILE" in str(info.value)


def test_self_hosted_endpoint_without_key_works(fake_vlm, png):
    resp = client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert resp.text
    assert fake_vlm.requests[0].headers["authorization"] == "Bearer EMPTY"


@pytest.mark.parametrize(("base_url", "var"), [
    ("https://api.openai.com/v1", "OPENAI_API_KEY"),
    ("https://integrate.api.nvidia.com/v1", "NVIDIA_API_KEY"),
    ("", "OPENAI_API_KEY"),
])
def test_hosted_endpoint_without_key_fails_at_construction(base_url, var):
    with pytest.raises(PermanentClientError, match=f"{var} is not set on this worker"):
        OpenAICompatClient(OpenAISpec(base_url=base_url))


def test_429_with_retry_after(fake_vlm, png):
    fake_vlm.fail_next(1, 429, retry_after=3)
    with pytest.raises(RateLimited) as info:
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert info.value.retry_after == pytest.approx(3)
    assert info.value.status == 429
    assert fake_vlm.calls == 1  # max_retries=0: the SDK did not retry


def test_server_side_rpm_limit_surfaces_as_rate_limited(make_fake, png):
    fake = make_fake(rpm=1)
    c = client(fake)
    c.generate(VLMRequest(image=png, prompt="x"))
    with pytest.raises(RateLimited) as info:
        c.generate(VLMRequest(image=png, prompt="x"))
    assert 0 < info.value.retry_after <= 60


def test_the_quota_stated_in_x_ratelimit_headers_comes_with_answers_and_429s(fake_vlm, png):
    from tests.support.fake_capacity import Capacity

    fake_vlm.capacity = Capacity(k=10, rpm=1, style="openai")
    c = client(fake_vlm)
    answer = c.generate(VLMRequest(image=png, prompt="x"))
    assert answer.stated_rate == pytest.approx(1 / 60)  # x-ratelimit-limit-requests: 1 (a minute)
    with pytest.raises(RateLimited) as info:
        c.generate(VLMRequest(image=png, prompt="x"))
    assert info.value.stated_rate == pytest.approx(1 / 60) and 0 < info.value.retry_after <= 60


def test_an_endpoint_stating_no_quota_gives_no_rate(fake_vlm, png):
    assert client(fake_vlm).generate(VLMRequest(image=png, prompt="x")).stated_rate is None


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_retryable_and_not_retried_by_the_sdk(fake_vlm, png, status):
    fake_vlm.fail_next(1, status)
    with pytest.raises(ClientError) as info:
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert not isinstance(info.value, RateLimited)
    assert info.value.status == status
    assert fake_vlm.calls == 1


def test_hang_beyond_timeout_is_a_client_error(fake_vlm, png):
    fake_vlm.hang_next(1, 10)
    start = time.monotonic()
    with pytest.raises(ClientError, match="within 1s"):
        client(fake_vlm, timeout=1).generate(VLMRequest(image=png, prompt="x"))
    assert time.monotonic() - start < 5
    assert fake_vlm.calls == 1


def test_unreachable_endpoint_is_a_client_error(png):
    fake = FakeVLM().start()
    fake.stop()
    with pytest.raises(ClientError, match="cannot reach"):
        client(fake, timeout=2).generate(VLMRequest(image=png, prompt="x"))


def test_wrong_key_is_permanent_and_never_echoed(monkeypatch, make_fake, png):
    fake = make_fake(api_key="the-right-key")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with pytest.raises(PermanentClientError) as info:
        client(fake).generate(VLMRequest(image=png, prompt="x"))
    msg = str(info.value)
    assert info.value.status == 401
    assert f"the API key was rejected by {fake.openai_base_url}" in msg
    assert "OPENAI_API_KEY/NVIDIA_API_KEY" in msg
    assert KEY not in msg and KEY not in repr(info.value.args)


def test_server_message_quoting_the_key_is_redacted(monkeypatch, fake_vlm, png):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    fake_vlm.fail_next(1, 403, message=f"key {KEY} has no access to this model")
    with pytest.raises(PermanentClientError, match="has no access") as info:
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert KEY not in str(info.value)


def test_unknown_model_is_permanent_and_named(make_fake, png):
    fake = make_fake(models={"served-model"})
    with pytest.raises(PermanentClientError) as info:
        client(fake, model_name="typo-model").generate(VLMRequest(image=png, prompt="x"))
    assert f"model 'typo-model' not found at {fake.openai_base_url}" in str(info.value)


def test_400_is_permanent(fake_vlm, png):
    fake_vlm.fail_next(1, 400, message="max_tokens is too large")
    want = "the endpoint rejected the request: max_tokens is too large"
    with pytest.raises(PermanentClientError, match=want):
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))


def test_length_is_truncated(fake_vlm, png):
    fake_vlm.answer_next("white car: [[1, 2,", finish_reason="length")
    resp = client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert resp.truncated is True and resp.finish_reason == "length"
    assert resp.text == "white car: [[1, 2,"


def test_content_filter_is_an_empty_answer(fake_vlm, png):
    fake_vlm.block_next(1)
    with pytest.raises(EmptyAnswer, match="content_filter"):
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))


def test_empty_content_is_an_empty_answer(fake_vlm, png):
    fake_vlm.answer_next("<think>hmm</think>  ")
    with pytest.raises(EmptyAnswer, match="empty answer"):
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))


def test_think_blocks_are_stripped(fake_vlm, png):
    fake_vlm.answer_next("<think>\nthe left one is red\n</think>\nA red car on the left.")
    assert client(fake_vlm).generate(VLMRequest(image=png, prompt="x")).text == "A red car on the left."


def test_factory_shares_one_client_across_threads(fake_vlm, png):
    from concurrent.futures import ThreadPoolExecutor

    spec = VLMSpec(backend="openai", openai=OpenAISpec(base_url=fake_vlm.openai_base_url, timeout=5))
    with ThreadPoolExecutor(8) as pool:
        clients = list(pool.map(lambda _: factory.get_client(spec), range(16)))
        texts = list(pool.map(lambda c: c.generate(VLMRequest(image=png, prompt="x")).text, clients))
    assert len({id(c) for c in clients}) == 1
    assert isinstance(clients[0], OpenAICompatClient)
    assert texts == ["The image shows a street scene."] * 16
    assert fake_vlm.calls == 16


def test_endpoint_key(monkeypatch):
    assert budget.endpoint_key(VLMSpec(backend="openai")) == "openai|https://api.openai.com/v1|"
    spec = VLMSpec(backend="openai", openai=OpenAISpec(base_url="", model_name="m"))
    assert budget.endpoint_key(spec) == "openai|https://api.openai.com/v1|m"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://vllm:8000/v1/")
    assert budget.endpoint_key(spec) == "openai|http://vllm:8000/v1|m"


def test_offline_backend_is_built_lazily():
    from worker.clients import offline
    assert isinstance(factory.get_client(VLMSpec(backend="offline")), offline.OfflineClient)


# --------------------------------------------------------------------------- not the API (issue 13)

LOGIN_PAGE = ("<!DOCTYPE html>\n<html><head><title>Sign in \u2013 Corp Proxy</title></head>"
              "<body><form>...</form></body></html>")


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/json"])
def test_http_200_with_an_html_page_says_so(fake_vlm, png, content_type):
    fake_vlm.raw_next(1, LOGIN_PAGE, content_type=content_type)
    with pytest.raises(PermanentClientError) as exc:
        client(fake_vlm, model_name="m").generate(VLMRequest(image=png, prompt="x"))
    assert str(exc.value) == (
        f"openai:m: {fake_vlm.openai_base_url} answered HTTP 200 with an HTML page ('Sign in \u2013 Corp Proxy'), "
        "not a chat completion: a proxy or login page answered, or the base_url is wrong (an OpenAI-compatible "
        "base_url ends in /v1, e.g. http://host:8000/v1)")


def test_http_200_with_plain_text_says_so(fake_vlm, png):
    fake_vlm.raw_next(1, "It works!", content_type="text/plain")
    with pytest.raises(PermanentClientError, match=r"HTTP 200 with a body that is not JSON \('It works!'\)"):
        client(fake_vlm, model_name="m").generate(VLMRequest(image=png, prompt="x"))


def test_webp_keeps_its_mime(fake_vlm, tmp_path):
    from PIL import Image

    from worker.images import load_payload

    p = tmp_path / "scene.webp"
    Image.new("RGB", (64, 32), (30, 160, 60)).save(p, format="WEBP")
    webp = load_payload(p)
    client(fake_vlm).generate(VLMRequest(image=webp, prompt="x"))
    (req,) = fake_vlm.requests
    assert req.image_mime == "image/webp" and req.image == p.read_bytes()


@pytest.mark.parametrize(("headers", "rate"), [
    ({"x-ratelimit-limit-requests": "600", "x-ratelimit-reset-requests": "100ms"}, 10.0),
    ({"x-ratelimit-limit-requests": "600", "x-ratelimit-reset-requests": "59.5s"}, 10.0),
    ({"x-ratelimit-limit-requests": "600"}, 10.0),  # no reset stated: OpenAI's limits are per minute
    # A reset past a minute: the limit is a longer window's (a per-day one, as some providers
    # state in the same header), not a rate to keep to.
    ({"x-ratelimit-limit-requests": "14400", "x-ratelimit-reset-requests": "2m59.56s"}, None),
    ({"x-ratelimit-limit-requests": "14400", "x-ratelimit-reset-requests": "1h0m0s"}, None),
    ({"x-ratelimit-limit-requests": "0"}, None),
    ({"x-ratelimit-limit-requests": "many"}, None),
    ({}, None),
])
def test_the_stated_request_quota_is_a_minute_s_only(headers, rate):
    from worker.clients.replies import stated_rate_from_headers

    assert stated_rate_from_headers(headers) == (pytest.approx(rate) if rate else None)

