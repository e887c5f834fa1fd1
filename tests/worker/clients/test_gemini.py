"""GeminiClient through the real google-genai SDK against the fake server, over HTTP."""

from __future__ import annotations

import time

import pytest

from tests.support.fake_vlm import FakeVLM
from worker import budget
from worker.clients import factory
from worker.clients.base import VLMClient, VLMRequest
from worker.clients.gemini import GeminiClient
from worker.errors import ClientError, ConfigError, EmptyAnswer, PermanentClientError, RateLimited
from worker.spec import GeminiSpec, VLMSpec

KEY = "gk-test-0123456789abcdef"


def client(fake: FakeVLM, **kw) -> GeminiClient:
    return GeminiClient(GeminiSpec(base_url=fake.gemini_base_url, timeout=kw.pop("timeout", 5), **kw))


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)


def test_request_carries_image_prompt_model_and_params(keyed, fake_vlm, png):
    c = client(fake_vlm, model="gemini-test", temperature=0.3, max_output_tokens=321,
               media_resolution="MEDIA_RESOLUTION_HIGH")
    assert isinstance(c, VLMClient)
    assert c.name == "gemini:gemini-test"

    resp = c.generate(VLMRequest(image=png, prompt="Describe this."))

    (req,) = fake_vlm.requests
    assert req.protocol == "gemini"
    assert req.model == "gemini-test"
    assert req.path.endswith("/models/gemini-test:generateContent")
    assert req.image == png.data and req.image_mime == "image/png" and req.n_images == 1
    assert req.prompt == "Describe this."
    assert req.temperature == pytest.approx(0.3)
    assert req.max_tokens == 321
    assert req.params["mediaResolution"] == "MEDIA_RESOLUTION_HIGH"
    assert req.headers["x-goog-api-key"] == KEY
    # the image goes first, then the text, in one user turn
    parts = req.body["contents"][0]["parts"]
    assert req.body["contents"][0]["role"] == "user"
    assert "inlineData" in parts[0] and parts[1] == {"text": "Describe this."}
    assert resp.text == "The image shows a street scene."
    assert resp.finish_reason == "STOP" and resp.truncated is False
    assert resp.model == "gemini-test"
    assert resp.usage["input_tokens"] > 0 and resp.usage["output_tokens"] > 0


def test_jpeg_keeps_its_mime(keyed, fake_vlm, jpeg):
    client(fake_vlm).generate(VLMRequest(image=jpeg, prompt="x"))
    (req,) = fake_vlm.requests
    assert req.image_mime == "image/jpeg" and req.image == jpeg.data


def test_empty_media_resolution_is_not_sent_and_bad_one_fails_early(keyed, fake_vlm, png):
    client(fake_vlm, media_resolution="").generate(VLMRequest(image=png, prompt="x"))
    assert "mediaResolution" not in fake_vlm.requests[0].params
    with pytest.raises(ConfigError, match="media_resolution"):
        client(fake_vlm, media_resolution="ULTRA")


def test_short_media_resolution_is_expanded(keyed, fake_vlm, png):
    client(fake_vlm, media_resolution="low").generate(VLMRequest(image=png, prompt="x"))
    assert fake_vlm.requests[0].params["mediaResolution"] == "MEDIA_RESOLUTION_LOW"


def test_key_order_google_then_gemini_then_spec(monkeypatch, fake_vlm, png):
    c = client(fake_vlm, api_key="from-spec")
    c.generate(VLMRequest(image=png, prompt="x"))
    monkeypatch.setenv("GEMINI_API_KEY", "from-gemini-env")
    client(fake_vlm, api_key="from-spec").generate(VLMRequest(image=png, prompt="x"))
    monkeypatch.setenv("GOOGLE_API_KEY", "from-google-env")
    client(fake_vlm, api_key="from-spec").generate(VLMRequest(image=png, prompt="x"))
    assert [r.headers["x-goog-api-key"] for r in fake_vlm.requests] == [
        "from-spec", "from-gemini-env", "from-google-env"]


def test_key_from_a_mounted_secret_file(monkeypatch, tmp_path, fake_vlm, png):
    """GOOGLE_API_KEY_FILE (a compose secret): the file's key is sent; a rotated file gives the
    factory a fresh client; a key in both places is refused, naming the variables only."""
    key_file = tmp_path / "vlm_api_key"
    key_file.write_text(KEY + "\n")
    monkeypatch.setenv("GOOGLE_API_KEY_FILE", str(key_file))
    spec = VLMSpec(backend="gemini", gemini=GeminiSpec(base_url=fake_vlm.gemini_base_url))
    first = factory.get_client(spec)
    first.generate(VLMRequest(image=png, prompt="x"))
    key_file.write_text("gk-rotated\n")
    second = factory.get_client(spec)
    assert second is not first
    second.generate(VLMRequest(image=png, prompt="x"))
    assert [r.headers["x-goog-api-key"] for r in fake_vlm.requests] == [KEY, "gk-rotated"]
    monkeypatch.setenv("GOOGLE_API_KEY", "also-in-env")
    with pytest.raises(ConfigError, match="both GOOGLE_API_KEY and GOOGLE_API_KEY_FILE") as info:
        client(fake_vlm)
    assert "gk-rotated" not in str(info.value) and "also-in-env" not in str(info.value)


def test_no_key_fails_at_construction(fake_vlm):
    with pytest.raises(PermanentClientError, match="GOOGLE_API_KEY is not set on this worker") as info:
        client(fake_vlm)
    assert "GOOGLE_API_KEY_FILE" in str(info.value)
    assert fake_vlm.calls == 0


def test_429_with_retry_after_header(keyed, fake_vlm, png):
    fake_vlm.fail_next(1, 429, retry_after=7)
    with pytest.raises(RateLimited) as info:
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert info.value.retry_after == pytest.approx(7)
    assert info.value.status == 429
    assert fake_vlm.calls == 1  # the SDK did not retry on its own


def test_429_with_only_retry_info_detail(keyed, fake_vlm, png):
    fake_vlm.fail_next(1, 429, retry_after=2.5, retry_header=False)
    with pytest.raises(RateLimited) as info:
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert info.value.retry_after == pytest.approx(2.5)


def test_a_429_over_a_quota_states_it_in_its_quota_failure(keyed, fake_vlm, png):
    from tests.support.fake_capacity import Capacity

    fake_vlm.capacity = Capacity(k=10, rpm=1, style="gemini")
    c = client(fake_vlm)
    assert c.generate(VLMRequest(image=png, prompt="x")).stated_rate is None  # Gemini states it on 429s only
    with pytest.raises(RateLimited) as info:
        c.generate(VLMRequest(image=png, prompt="x"))
    assert info.value.stated_rate == pytest.approx(1 / 60)  # GenerateRequestsPerMinute..., quotaValue 1
    assert 0 < info.value.retry_after <= 60  # from the RetryInfo: the fake sends no header in this style


def test_quota_failures_name_their_window_and_a_daily_one_is_no_rate():
    from worker.clients.gemini import stated_rate_from_details

    def body(*violations):
        return {"error": {"code": 429, "details": [
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": list(violations)},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "20s"}]}}

    per_minute = {"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "quotaValue": "10"}
    per_day = {"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "quotaValue": "250"}
    tokens = {"quotaId": "GenerateContentInputTokensPerModelPerMinute-FreeTier", "quotaValue": "250000"}
    assert stated_rate_from_details(body(per_minute)) == pytest.approx(10 / 60)
    assert stated_rate_from_details(body(per_day)) is None
    assert stated_rate_from_details(body(tokens)) is None
    assert stated_rate_from_details(body(per_day, per_minute)) == pytest.approx(10 / 60)
    assert stated_rate_from_details({"error": {"code": 429}}) is None


def test_429_without_hint(keyed, fake_vlm, png):
    fake_vlm.fail_next(1, 429)
    with pytest.raises(RateLimited) as info:
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert info.value.retry_after is None


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_is_retryable_and_not_retried_by_the_sdk(keyed, fake_vlm, png, status):
    fake_vlm.fail_next(1, status)
    with pytest.raises(ClientError) as info:
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert not isinstance(info.value, RateLimited)
    assert info.value.status == status
    assert fake_vlm.calls == 1


def test_hang_beyond_timeout_is_a_client_error(keyed, fake_vlm, png):
    fake_vlm.hang_next(1, 10)
    start = time.monotonic()
    with pytest.raises(ClientError, match="within 1s"):
        client(fake_vlm, timeout=1).generate(VLMRequest(image=png, prompt="x"))
    assert time.monotonic() - start < 5


def test_unreachable_endpoint_is_a_client_error(keyed, png):
    fake = FakeVLM().start()
    fake.stop()  # the port is now closed
    with pytest.raises(ClientError, match="cannot reach"):
        client(fake, timeout=2).generate(VLMRequest(image=png, prompt="x"))


def test_wrong_key_is_permanent_and_never_echoed(monkeypatch, make_fake, png):
    fake = make_fake(api_key="the-right-key")
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    with pytest.raises(PermanentClientError) as info:
        client(fake).generate(VLMRequest(image=png, prompt="x"))
    msg = str(info.value)
    assert info.value.status == 400  # Google answers a bad key with 400 API_KEY_INVALID
    assert "GOOGLE_API_KEY" in msg and fake.gemini_base_url in msg
    assert KEY not in msg and KEY not in repr(info.value.args)


def test_right_key_is_accepted(monkeypatch, make_fake, png):
    fake = make_fake(api_key=KEY)
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)
    assert client(fake).generate(VLMRequest(image=png, prompt="x")).text


@pytest.mark.parametrize("status", [401, 403])
def test_401_403_are_permanent_auth_errors(keyed, fake_vlm, png, status):
    fake_vlm.fail_next(1, status, message=f"denied for key {KEY}")
    with pytest.raises(PermanentClientError, match="check GOOGLE_API_KEY") as info:
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert KEY not in str(info.value)


def test_unknown_model_is_permanent_and_named(keyed, make_fake, png):
    fake = make_fake(models={"gemini-real"})
    with pytest.raises(PermanentClientError) as info:
        client(fake, model="gemini-typo").generate(VLMRequest(image=png, prompt="x"))
    assert "model 'gemini-typo' not found at " + fake.gemini_base_url in str(info.value)
    assert info.value.status == 404


def test_400_is_permanent(keyed, fake_vlm, png):
    fake_vlm.fail_next(1, 400, message="Request payload size exceeds the limit")
    with pytest.raises(PermanentClientError, match="the endpoint rejected the request: Request payload"):
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))


def test_max_tokens_is_truncated(keyed, fake_vlm, png):
    fake_vlm.answer_next('[{"bbox_2d": [1, 2', finish_reason="MAX_TOKENS")
    resp = client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))
    assert resp.truncated is True and resp.finish_reason == "MAX_TOKENS"
    assert resp.text == '[{"bbox_2d": [1, 2'


def test_blocked_prompt_is_an_empty_answer(keyed, fake_vlm, png):
    fake_vlm.block_next(1, reason="PROHIBITED_CONTENT")
    with pytest.raises(EmptyAnswer, match="PROHIBITED_CONTENT"):
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))


@pytest.mark.parametrize("reason", ["SAFETY", "RECITATION"])
def test_refusal_without_text_is_an_empty_answer(keyed, fake_vlm, png, reason):
    fake_vlm.answer_next("", finish_reason=reason)
    with pytest.raises(EmptyAnswer, match=reason):
        client(fake_vlm).generate(VLMRequest(image=png, prompt="x"))


def test_think_blocks_are_stripped(keyed, fake_vlm, png):
    fake_vlm.answer_next("<think>the red one is a car</think>\nA red car.")
    assert client(fake_vlm).generate(VLMRequest(image=png, prompt="x")).text == "A red car."


def test_factory_shares_one_client_per_spec_and_key(keyed, monkeypatch, fake_vlm):
    spec = VLMSpec(backend="gemini", gemini=GeminiSpec(base_url=fake_vlm.gemini_base_url))
    first = factory.get_client(spec)
    assert factory.get_client(spec) is first
    assert isinstance(first, GeminiClient)
    other = VLMSpec(backend="gemini", gemini=GeminiSpec(base_url=fake_vlm.gemini_base_url, model="m2"))
    assert factory.get_client(other) is not first
    monkeypatch.setenv("GOOGLE_API_KEY", "rotated-key")
    assert factory.get_client(spec) is not first


def test_endpoint_key_spells_out_the_default_url():
    assert budget.endpoint_key(VLMSpec(backend="gemini")) == (
        "gemini|https://generativelanguage.googleapis.com|gemini-3.1-flash-lite-preview")
    custom = VLMSpec(backend="gemini", gemini=GeminiSpec(base_url="http://proxy:8080/", model="m"))
    assert budget.endpoint_key(custom) == "gemini|http://proxy:8080|m"


# --------------------------------------------------------------------------- not the API (issue 13)


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/json"])
def test_http_200_with_an_html_page_says_so(keyed, fake_vlm, png, content_type):
    fake_vlm.raw_next(1, "<html><head><title>Open WebUI</title></head><body></body></html>",
                      content_type=content_type)
    with pytest.raises(PermanentClientError) as exc:
        client(fake_vlm, model="gemini-2.5-flash").generate(VLMRequest(image=png, prompt="x"))
    assert str(exc.value) == (
        f"gemini:gemini-2.5-flash: {fake_vlm.gemini_base_url} answered HTTP 200 with an HTML page ('Open WebUI'), "
        "not a generateContent response: a proxy or login page answered, or the base_url is wrong "
        "(vlm.gemini.base_url is the API root, e.g. https://generativelanguage.googleapis.com, without /v1beta)")
    assert KEY not in str(exc.value)


def test_webp_keeps_its_mime(keyed, fake_vlm, tmp_path):
    from PIL import Image

    from worker.images import load_payload

    p = tmp_path / "scene.webp"
    Image.new("RGB", (64, 32), (30, 160, 60)).save(p, format="WEBP")
    client(fake_vlm).generate(VLMRequest(image=load_payload(p), prompt="x"))
    (req,) = fake_vlm.requests
    assert req.image_mime == "image/webp" and req.image == p.read_bytes()
