"""GeminiBatch through the real google-genai SDK against the fake server's batch routes, over HTTP."""

from __future__ import annotations

import re

import pytest

from tests.support.fake_vlm import FakeVLM
from worker.clients.base import BlockedAnswer, StructuredOutputRejected, TruncatedAnswer, VLMRequest, VLMResponse
from worker.clients.batch import BatchBackend, BatchItem, BatchUnsupported
from worker.clients.factory import get_batch_backend
from worker.clients.gemini import GeminiClient
from worker.clients.gemini_batch import GeminiBatch
from worker.errors import ClientError, PermanentClientError, RateLimited
from worker.spec import GeminiSpec, VLMSpec

KEY = "gk-test-0123456789abcdef"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
MODES = {"inline": 10**9, "file": 1}  # inline_max_bytes: everything inline / everything as a file


@pytest.fixture(autouse=True)
def keyed(monkeypatch):
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)


def spec(fake: FakeVLM, **kw) -> GeminiSpec:
    return GeminiSpec(base_url=fake.gemini_base_url, timeout=5, **kw)


def backend(fake: FakeVLM, mode: str = "inline", **kw) -> GeminiBatch:
    return GeminiBatch(spec(fake, **kw), inline_max_bytes=MODES[mode])


def items(png, n: int, **kw) -> list[BatchItem]:
    return [BatchItem(f"img{i}:step0", VLMRequest(image=png, prompt=f"Describe image {i}.", **kw)) for i in range(n)]


def camel(value):
    """Keys in camelCase: Google's JSON mapping takes either, and the SDK sends some nested
    settings (thinking_config's) in snake_case while the file line has them in camelCase."""
    if isinstance(value, dict):
        return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k): camel(v) for k, v in value.items()}
    if isinstance(value, list):
        return [camel(v) for v in value]
    return value


def answers(b: GeminiBatch, job: str, batch: list[BatchItem] | None = None) -> dict:
    keys = [i.key for i in batch] if batch is not None else None
    return dict(b.results(job, expected_keys=keys))


def test_factory_builds_it_and_it_is_a_batch_backend(fake_vlm):
    b = get_batch_backend(VLMSpec(backend="gemini", gemini=spec(fake_vlm)))
    assert isinstance(b, GeminiBatch) and isinstance(b, BatchBackend)


@pytest.mark.parametrize("mode", ["inline", "file"])
def test_batch_request_and_answer_are_the_online_ones(fake_vlm, png, mode):
    kw = {"model": "gemini-2.5-flash", "temperature": 0.2, "max_output_tokens": 777,
          "media_resolution": "MEDIA_RESOLUTION_HIGH"}
    request = VLMRequest(image=png, prompt="Describe this.", response_schema=SCHEMA, schema_name="a", max_tokens=555)
    online = GeminiClient(spec(fake_vlm, **kw)).generate(request)
    b = backend(fake_vlm, mode, **kw)

    job = b.submit([BatchItem("k", request)], display_name="run 1 step0")
    assert b.status(job).state == "succeeded"
    (key, answer), = b.results(job)

    (sent_online,), (sent_batch,) = fake_vlm.requests, fake_vlm.batch.requests
    assert sent_batch.prompt == sent_online.prompt and sent_batch.image == sent_online.image == png.data
    assert sent_batch.image_mime == "image/png"
    params = camel(sent_batch.params)
    assert params == camel(sent_online.params)  # schema, budget, thinking, resolution, temperature
    assert params["maxOutputTokens"] == 555 and params["responseJsonSchema"] == SCHEMA
    assert params["thinkingConfig"] == {"thinkingBudget": 0} and params["mediaResolution"] == "MEDIA_RESOLUTION_HIGH"
    assert key == "k" and isinstance(answer, VLMResponse)
    assert (answer.text, answer.finish_reason, answer.truncated, answer.model) == \
        (online.text, online.finish_reason, online.truncated, online.model)
    assert answer.usage == online.usage and answer.usage["input_tokens"] > 0


def test_small_jobs_go_inline_large_ones_as_an_uploaded_file(fake_vlm, png):
    inline = backend(fake_vlm, "inline")
    job = inline.submit(items(png, 3), display_name="small")
    assert fake_vlm.batch.jobs[job].source == "inline"
    assert fake_vlm.batch.calls["gemini.upload_start"] == 0
    assert len(answers(inline, job)) == 3 and fake_vlm.batch.calls["gemini.download"] == 0

    filed = backend(fake_vlm, "file")
    job = filed.submit(items(png, 3), display_name="large")
    assert fake_vlm.batch.jobs[job].source == "file"
    assert fake_vlm.batch.calls["gemini.upload_start"] == 1 and fake_vlm.batch.calls["gemini.upload"] == 1
    got = answers(filed, job)
    assert sorted(got) == ["img0:step0", "img1:step0", "img2:step0"]
    assert all(isinstance(a, VLMResponse) for a in got.values())
    assert fake_vlm.batch.calls["gemini.download"] == 1


def test_the_default_limit_keeps_a_normal_job_inline(fake_vlm, png):
    b = GeminiBatch(spec(fake_vlm))
    job = b.submit(items(png, 20), display_name="x")
    assert fake_vlm.batch.jobs[job].source == "inline"


@pytest.mark.parametrize("mode", ["inline", "file"])
def test_per_request_failures_come_back_as_the_online_errors(fake_vlm, png, mode):
    b = backend(fake_vlm, mode)
    fake_vlm.batch.fail_line(0, 429)
    fake_vlm.batch.fail_line(1, 503)
    fake_vlm.batch.fail_line(2, 400, "bad request")
    fake_vlm.batch.block_line(3)
    fake_vlm.batch.answer_line(4, "", finish_reason="MAX_TOKENS")
    fake_vlm.batch.answer_line(5, "cut sho", finish_reason="MAX_TOKENS")
    fake_vlm.batch.drop_line(6)
    batch = items(png, 8)

    got = answers(b, b.submit(batch, display_name="faults"), batch)

    assert sorted(got) == sorted(i.key for i in batch)
    assert isinstance(got["img0:step0"], RateLimited)
    assert type(got["img1:step0"]) is ClientError and got["img1:step0"].status == 503
    assert isinstance(got["img2:step0"], PermanentClientError) and "bad request" in str(got["img2:step0"])
    assert isinstance(got["img3:step0"], BlockedAnswer) and got["img3:step0"].reason == "SAFETY"
    assert isinstance(got["img4:step0"], TruncatedAnswer)
    assert got["img5:step0"].truncated is True and got["img5:step0"].text == "cut sho"
    assert type(got["img6:step0"]) is ClientError and "no answer" in str(got["img6:step0"])
    assert isinstance(got["img7:step0"], VLMResponse)


def test_a_job_runs_for_its_polls_then_succeeds(fake_vlm, png):
    b = backend(fake_vlm)
    fake_vlm.batch.finish_after(2)
    job = b.submit(items(png, 2), display_name="slow")
    assert b.status(job).state == "running"
    with pytest.raises(ClientError, match="still running"):  # reading results asks for the job too
        list(b.results(job))
    assert b.status(job).state == "succeeded"
    assert b.status(job).final and len(answers(b, job)) == 2
    assert fake_vlm.batch.calls["gemini.get"] == 5


def test_a_job_that_ended_before_anyone_polled_is_read_at_the_next_poll(fake_vlm, png):
    """A job that finishes while no worker runs: the next poll finds it ended, answers intact."""
    b = backend(fake_vlm)
    job = b.submit(items(png, 2), display_name="overnight")
    other = backend(fake_vlm)  # a later worker process: a new client, the job id from the ledger
    assert other.status(job).state == "succeeded"
    assert sorted(answers(other, job)) == ["img0:step0", "img1:step0"]


def test_an_expired_job_answers_nothing_and_every_key_comes_back_as_retryable(fake_vlm, png):
    b = backend(fake_vlm)
    fake_vlm.batch.expire_next()
    batch = items(png, 3)
    job = b.submit(batch, display_name="late")
    status = b.status(job)
    assert status.state == "expired" and status.final and "EXPIRED" in status.error
    got = answers(b, job, batch)
    assert sorted(got) == sorted(i.key for i in batch)
    assert all(type(a) is ClientError for a in got.values())


def test_a_failed_job_says_so(fake_vlm, png):
    b = backend(fake_vlm, "file")
    fake_vlm.batch.fail_next_job()
    job = b.submit(items(png, 2), display_name="doomed")
    status = b.status(job)
    assert status.state == "failed" and status.error
    assert list(b.results(job)) == []


def test_cancel(fake_vlm, png):
    b = backend(fake_vlm)
    fake_vlm.batch.finish_after(5)
    job = b.submit(items(png, 2), display_name="unwanted")
    assert b.status(job).state == "running"
    b.cancel(job)
    assert fake_vlm.batch.calls["gemini.cancel"] == 1
    assert b.status(job).state == "cancelled"
    assert all(type(a) is ClientError for a in answers(b, job, items(png, 2)).values())


def test_probe_passes_on_gemini_and_names_the_fix_where_there_are_no_batch_routes(fake_vlm):
    b = backend(fake_vlm)
    b.probe()
    assert fake_vlm.batch.calls["gemini.list"] == 1
    fake_vlm.batch.enabled = False
    with pytest.raises(BatchUnsupported, match=r"vlm\.batch off") as exc:
        b.probe()
    assert fake_vlm.gemini_base_url in str(exc.value)


def test_the_key_authenticates_every_step_and_is_never_written(make_fake, png):
    fake = make_fake(api_key=KEY)
    b = GeminiBatch(GeminiSpec(base_url=fake.gemini_base_url, timeout=5), inline_max_bytes=1)
    job = b.submit(items(png, 2), display_name=f"run with {KEY} in its name")
    assert len(answers(b, job)) == 2
    assert KEY not in fake.batch.jobs[job].display_name
    for name, data in fake.batch.files.values():
        assert KEY not in name and KEY.encode() not in data


def test_a_wrong_key_is_permanent(make_fake, png, monkeypatch):
    fake = make_fake(api_key="the-right-key")
    with pytest.raises(PermanentClientError, match="GOOGLE_API_KEY") as exc:
        backend(fake).submit(items(png, 1), display_name="x")
    assert KEY not in str(exc.value)


def test_keys_must_be_unique_and_a_job_not_empty(fake_vlm, png):
    b = backend(fake_vlm)
    with pytest.raises(ValueError, match="unique"):
        b.submit(items(png, 1) * 2, display_name="x")
    with pytest.raises(ValueError, match="at least one"):
        b.submit([], display_name="x")


@pytest.mark.parametrize("mode", ["inline", "file"])
def test_a_refused_schema_is_told_apart_as_online(make_fake, png, mode):
    """A server that predates structured output: the step runner falls back to the text prompt."""
    fake = make_fake(reject_json_schema=True)
    b = backend(fake, mode)
    batch = [BatchItem("schema", VLMRequest(image=png, prompt="x", response_schema=SCHEMA)),
             BatchItem("plain", VLMRequest(image=png, prompt="x"))]
    got = answers(b, b.submit(batch, display_name="old server"))
    assert isinstance(got["schema"], StructuredOutputRejected)
    assert isinstance(got["plain"], VLMResponse)


def test_a_refused_job_leaves_no_input_file_behind(fake_vlm, png):
    b = backend(fake_vlm, "file")
    fake_vlm.batch.fail_next_create(429)
    with pytest.raises(RateLimited):
        b.submit(items(png, 2), display_name="x")
    assert fake_vlm.batch.files == {} and fake_vlm.batch.calls["gemini.files.delete"] == 1


def test_inline_responses_without_metadata_are_placed_by_position(fake_vlm, png):
    b = backend(fake_vlm)
    fake_vlm.batch.omit_inline_metadata = True
    fake_vlm.batch.fail_line(1, 429)
    batch = items(png, 3)
    job = b.submit(batch, display_name="x")
    got = answers(b, job, batch)
    assert isinstance(got["img0:step0"], VLMResponse) and isinstance(got["img1:step0"], RateLimited)
    assert isinstance(got["img2:step0"], VLMResponse)
    unplaced = answers(b, job)  # without the job's keys nothing can be placed
    assert unplaced == {}


def test_without_a_key_it_probes_and_does_nothing_else(make_fake, png, monkeypatch):
    """The producer has no key (keys live on the workers): the probe still tells an endpoint
    with batch routes (they answer the keyless call with an auth error) from one without."""
    monkeypatch.delenv("GOOGLE_API_KEY")
    fake = make_fake(api_key=KEY)
    b = backend(fake)
    b.probe()
    assert fake.batch.calls["gemini.list"] == 1
    with pytest.raises(PermanentClientError, match="GOOGLE_API_KEY is not set"):
        b.submit(items(png, 1), display_name="x")
    with pytest.raises(PermanentClientError, match="GOOGLE_API_KEY is not set"):
        b.status("batches/abc")
    assert sum(fake.batch.calls.values()) == 1  # nothing sent without a key
    fake.batch.enabled = False
    with pytest.raises(BatchUnsupported):
        b.probe()


def test_with_a_wrong_key_the_probe_says_so(make_fake):
    fake = make_fake(api_key="the-right-key")
    with pytest.raises(PermanentClientError, match="GOOGLE_API_KEY"):
        backend(fake).probe()


def test_find_names_the_job_submitted_under_a_display_name(fake_vlm, png):
    """How a coordinator that died mid-submit is caught up: the job is listed by its name."""
    b = backend(fake_vlm)
    first = b.submit(items(png, 1), display_name="refexp-j1")
    second = b.submit(items(png, 1), display_name="refexp-j2")
    assert (b.find("refexp-j1"), b.find("refexp-j2"), b.find("refexp-j3")) == (first, second, None)
