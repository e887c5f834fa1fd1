"""OpenAIBatch through the real openai SDK against the fake server's batch routes, over HTTP."""

from __future__ import annotations

import json

import pytest

from tests.support.fake_vlm import FakeVLM
from worker.clients.base import BlockedAnswer, StructuredOutputRejected, TruncatedAnswer, VLMRequest, VLMResponse
from worker.clients.batch import BatchBackend, BatchItem, BatchUnsupported
from worker.clients.factory import get_batch_backend
from worker.clients.openai_batch import OpenAIBatch
from worker.clients.openai_compat import OpenAICompatClient
from worker.errors import ClientError, PermanentClientError, RateLimited
from worker.spec import OpenAISpec, VLMSpec

KEY = "sk-test-0123456789abcdef"
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def spec(fake: FakeVLM, **kw) -> OpenAISpec:
    return OpenAISpec(base_url=fake.openai_base_url, timeout=5, model_name=kw.pop("model_name", "qwen/test-vl"), **kw)


def backend(fake: FakeVLM, **kw) -> OpenAIBatch:
    return OpenAIBatch(spec(fake, **kw))


def items(png, n: int, **kw) -> list[BatchItem]:
    return [BatchItem(f"img{i}:step1", VLMRequest(image=png, prompt=f"Describe image {i}.", **kw)) for i in range(n)]


def test_factory_builds_it_and_it_is_a_batch_backend(fake_vlm):
    b = get_batch_backend(VLMSpec(backend="openai", openai=spec(fake_vlm)))
    assert isinstance(b, OpenAIBatch) and isinstance(b, BatchBackend)


def test_batch_line_body_and_answer_are_the_online_ones(fake_vlm, png):
    request = VLMRequest(image=png, prompt="Describe this.", response_schema=SCHEMA, schema_name="ans", max_tokens=99)
    online = OpenAICompatClient(spec(fake_vlm, temperature=0.3)).generate(request)
    b = backend(fake_vlm, temperature=0.3)

    job = b.submit([BatchItem("k", request)], display_name="run 1 step1")
    assert b.status(job).state == "succeeded"
    (key, answer), = b.results(job)

    (sent_online,), (sent_batch,) = fake_vlm.requests, fake_vlm.batch.requests
    assert sent_batch.body == sent_online.body  # the very same chat-completions body
    assert sent_batch.body["response_format"]["json_schema"]["name"] == "ans"
    assert sent_batch.max_tokens == 99 and sent_batch.image == png.data
    assert key == "k" and isinstance(answer, VLMResponse)
    assert (answer.text, answer.finish_reason, answer.truncated, answer.model, answer.usage) == \
        (online.text, online.finish_reason, online.truncated, online.model, online.usage)


def test_the_job_is_a_jsonl_file_of_chat_completions_with_a_day_to_run(fake_vlm, png):
    b = backend(fake_vlm)
    job = b.submit(items(png, 3), display_name="run/7 step1")
    fake_job = fake_vlm.batch.jobs[job]
    name, data = fake_vlm.batch.files[fake_job.input_file_id]
    assert name.endswith(".jsonl") and "/" not in name
    lines = [json.loads(x) for x in data.decode().splitlines()]
    assert [x["custom_id"] for x in lines] == ["img0:step1", "img1:step1", "img2:step1"]
    assert {(x["method"], x["url"]) for x in lines} == {("POST", "/v1/chat/completions")}
    assert fake_job.metadata == {"name": "run/7 step1"}
    assert fake_vlm.batch.calls["openai.files.create"] == 1 and fake_vlm.batch.calls["openai.batches.create"] == 1


def test_per_request_failures_come_back_as_the_online_errors(fake_vlm, png):
    b = backend(fake_vlm)
    fake_vlm.batch.fail_line(0, 429)
    fake_vlm.batch.fail_line(1, 500)
    fake_vlm.batch.fail_line(2, 400, "bad image")
    fake_vlm.batch.block_line(3)
    fake_vlm.batch.answer_line(4, "", finish_reason="length")
    fake_vlm.batch.answer_line(5, "cut sho", finish_reason="length")
    fake_vlm.batch.drop_line(6)
    batch = items(png, 8)
    job = b.submit(batch, display_name="faults")
    status = b.status(job)
    assert status.counts == {"total": 8, "succeeded": 4, "failed": 3}

    got = dict(b.results(job))

    assert sorted(got) == sorted(i.key for i in batch)  # the dropped one too, from the input file
    assert isinstance(got["img0:step1"], RateLimited)
    assert type(got["img1:step1"]) is ClientError and got["img1:step1"].status == 500
    assert isinstance(got["img2:step1"], PermanentClientError) and "bad image" in str(got["img2:step1"])
    assert isinstance(got["img3:step1"], BlockedAnswer)
    assert isinstance(got["img4:step1"], TruncatedAnswer)
    assert got["img5:step1"].truncated is True and got["img5:step1"].text == "cut sho"
    assert type(got["img6:step1"]) is ClientError and "no answer" in str(got["img6:step1"])
    assert isinstance(got["img7:step1"], VLMResponse)


def test_a_fully_answered_job_needs_no_input_download(fake_vlm, png):
    b = backend(fake_vlm)
    job = b.submit(items(png, 3), display_name="x")
    b.status(job)
    assert len(dict(b.results(job))) == 3
    assert fake_vlm.batch.calls["openai.files.content"] == 1  # the output file only


def test_given_keys_spare_the_input_download(fake_vlm, png):
    b = backend(fake_vlm)
    batch = items(png, 2)
    job = b.submit(batch, display_name="x")
    b.status(job)
    got = dict(b.results(job, expected_keys=[i.key for i in batch] + ["ghost"]))
    assert fake_vlm.batch.calls["openai.files.content"] == 1  # the output file only
    assert isinstance(got["ghost"], ClientError) and isinstance(got["img1:step1"], VLMResponse)


def test_a_job_runs_for_its_polls_then_succeeds(fake_vlm, png):
    b = backend(fake_vlm)
    fake_vlm.batch.finish_after(2)
    job = b.submit(items(png, 2), display_name="slow")
    assert b.status(job).state == "running"
    with pytest.raises(ClientError, match="still in_progress"):
        list(b.results(job))
    assert b.status(job).state == "succeeded"
    assert fake_vlm.batch.calls["openai.batches.retrieve"] == 3


def test_an_expired_job_keeps_what_was_answered_and_the_rest_is_retryable(fake_vlm, png):
    b = backend(fake_vlm)
    fake_vlm.batch.expire_next(answered=1)
    batch = items(png, 3)
    job = b.submit(batch, display_name="late")
    status = b.status(job)
    assert status.state == "expired" and status.final
    got = dict(b.results(job))
    assert isinstance(got["img0:step1"], VLMResponse)
    for key in ("img1:step1", "img2:step1"):
        assert type(got[key]) is ClientError and "batch_expired" in str(got[key])


def test_a_failed_job_says_why(fake_vlm, png):
    b = backend(fake_vlm)
    fake_vlm.batch.fail_next_job(message="line 1: invalid JSON")
    batch = items(png, 2)
    job = b.submit(batch, display_name="doomed")
    status = b.status(job)
    assert status.state == "failed" and "invalid JSON" in status.error
    assert all(type(a) is ClientError for _, a in b.results(job))


def test_cancel(fake_vlm, png):
    b = backend(fake_vlm)
    fake_vlm.batch.finish_after(5)
    batch = items(png, 2)
    job = b.submit(batch, display_name="unwanted")
    assert b.status(job).state == "running"
    b.cancel(job)
    assert fake_vlm.batch.calls["openai.batches.cancel"] == 1
    assert b.status(job).state == "cancelled"
    got = dict(b.results(job))
    assert sorted(got) == [i.key for i in batch] and all(type(a) is ClientError for a in got.values())


def test_probe_on_an_endpoint_without_batch_routes_names_it_and_the_fix(fake_vlm):
    b = backend(fake_vlm)
    b.probe()
    fake_vlm.batch.enabled = False  # what vLLM and NIM answer: 404 on /v1/batches
    with pytest.raises(BatchUnsupported, match=r"vlm\.batch off") as exc:
        b.probe()
    assert fake_vlm.openai_base_url in str(exc.value)


def test_the_key_authenticates_every_step_and_is_never_written(make_fake, png, monkeypatch):
    fake = make_fake(api_key=KEY)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    b = backend(fake)
    job = b.submit(items(png, 2), display_name=f"run {KEY}")
    b.status(job)
    assert len(dict(b.results(job))) == 2
    assert KEY not in json.dumps(fake.batch.jobs[job].metadata)
    for name, data in fake.batch.files.values():
        assert KEY not in name and KEY.encode() not in data


def test_a_wrong_key_is_permanent_and_not_echoed(make_fake, png, monkeypatch):
    fake = make_fake(api_key="the-right-key")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with pytest.raises(PermanentClientError, match="OPENAI_API_KEY") as exc:
        backend(fake).submit(items(png, 1), display_name="x")
    assert KEY not in str(exc.value)


def test_a_refused_schema_is_told_apart_as_online(make_fake, png):
    """A server that predates structured output: the step runner falls back to the text prompt."""
    fake = make_fake(reject_json_schema=True)
    b = backend(fake)
    batch = [BatchItem("schema", VLMRequest(image=png, prompt="x", response_schema=SCHEMA)),
             BatchItem("plain", VLMRequest(image=png, prompt="x"))]
    job = b.submit(batch, display_name="old server")
    b.status(job)
    got = dict(b.results(job))
    assert isinstance(got["schema"], StructuredOutputRejected)
    assert isinstance(got["plain"], VLMResponse)


def test_a_refused_job_leaves_no_input_file_behind(fake_vlm, png):
    b = backend(fake_vlm)
    fake_vlm.batch.fail_next_create(503)
    with pytest.raises(ClientError):
        b.submit(items(png, 2), display_name="x")
    assert fake_vlm.batch.files == {} and fake_vlm.batch.calls["openai.files.delete"] == 1


def test_without_a_key_it_probes_and_does_nothing_else(make_fake, png, monkeypatch):
    """The producer has no key (keys live on the workers): for a host that needs one, the probe
    reads the batch route's auth error as "the route exists"; jobs need the key."""
    import worker.clients.openai_compat as compat

    fake = make_fake(api_key=KEY)
    monkeypatch.setitem(compat.KEYED_HOSTS, "127.0.0.1", "OPENAI_API_KEY")  # the fake plays api.openai.com
    b = backend(fake)
    b.probe()
    with pytest.raises(PermanentClientError, match="OPENAI_API_KEY is not set"):
        b.submit(items(png, 1), display_name="x")
    assert sum(fake.batch.calls.values()) == 1
    fake.batch.enabled = False
    with pytest.raises(BatchUnsupported, match="vLLM and NIM"):
        b.probe()


def test_with_a_wrong_key_the_probe_says_so(make_fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    fake = make_fake(api_key="the-right-key")
    with pytest.raises(PermanentClientError, match="OPENAI_API_KEY"):
        backend(fake).probe()


def test_find_names_the_job_submitted_under_a_display_name(fake_vlm, png):
    """How a coordinator that died mid-submit is caught up: the job is listed by its name."""
    b = backend(fake_vlm)
    first = b.submit(items(png, 1), display_name="refexp-j1")
    second = b.submit(items(png, 1), display_name="refexp-j2")
    assert (b.find("refexp-j1"), b.find("refexp-j2"), b.find("refexp-j3")) == (first, second, None)
