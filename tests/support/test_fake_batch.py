"""The fake's batch and file routes, driven by the official SDKs and by plain HTTP."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import openai
import pytest
from google import genai
from google.genai import types

from tests.support.fake_vlm import FakeVLM

KEY = "fake-key-0123456789"


@pytest.fixture
def fake():
    with FakeVLM() as f:
        yield f


def gemini(fake: FakeVLM) -> genai.Client:
    return genai.Client(vertexai=False, api_key=KEY, http_options=types.HttpOptions(
        base_url=fake.gemini_base_url, retry_options=types.HttpRetryOptions(attempts=1)))


def oai(fake: FakeVLM) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.openai_base_url, api_key=KEY, max_retries=0)


def http(fake: FakeVLM, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(fake.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def request_dict(prompt: str) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}


def test_gemini_inline_job_answers_each_request_with_the_online_answer_logic(fake):
    fake.answer_fn = lambda prompt, image, protocol: f"{protocol} says: {prompt}"
    client = gemini(fake)
    src = [types.InlinedRequest(contents="first", metadata={"key": "a"}),
           types.InlinedRequest(contents="second", metadata={"key": "b"})]
    job = client.batches.create(model="gemini-2.5-flash", src=src, config={"display_name": "two"})
    assert job.state.name == "JOB_STATE_PENDING" and job.display_name == "two"

    job = client.batches.get(name=job.name)

    assert job.state.name == "JOB_STATE_SUCCEEDED"
    got = {r.metadata["key"]: r.response.text for r in job.dest.inlined_responses}
    assert got == {"a": "gemini says: first", "b": "gemini says: second"}
    assert [r.prompt for r in fake.batch.requests] == ["first", "second"]
    assert fake.requests == []  # batch lines are not online calls


def test_gemini_file_job_uploads_resumably_and_results_download(fake):
    client = gemini(fake)
    lines = [{"key": "x", "request": request_dict("one")}, {"key": "y", "request": request_dict("two")}]
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    uploaded = client.files.upload(file=io.BytesIO(data), config={"mime_type": "jsonl", "display_name": "in"})
    assert uploaded.name.startswith("files/") and uploaded.size_bytes == len(data)
    job = client.batches.create(model="gemini-2.5-flash", src=uploaded.name)

    job = client.batches.get(name=job.name)

    assert job.state.name == "JOB_STATE_SUCCEEDED" and job.dest.file_name
    out = [json.loads(x) for x in client.files.download(file=job.dest.file_name).decode().splitlines()]
    assert [x["key"] for x in out] == ["x", "y"]
    assert out[0]["response"]["candidates"][0]["content"]["parts"][0]["text"] == "The image shows a street scene."
    assert {k: fake.batch.calls[k] for k in ("gemini.upload_start", "gemini.upload", "gemini.create",
                                            "gemini.get", "gemini.download")} == dict.fromkeys(
        ("gemini.upload_start", "gemini.upload", "gemini.create", "gemini.get", "gemini.download"), 1)


def test_resumable_upload_takes_chunks_at_their_offsets(fake):
    status, headers, _ = http(fake, "POST", "/upload/v1beta/files", json.dumps({"file": {}}).encode(), {
        "X-Goog-Upload-Protocol": "resumable", "X-Goog-Upload-Command": "start", "x-goog-api-key": KEY,
        "Content-Type": "application/json"})
    assert status == 200
    url = {k.lower(): v for k, v in headers.items()}["x-goog-upload-url"].removeprefix(fake.url)
    assert http(fake, "POST", url, b"abc", {"X-Goog-Upload-Command": "upload", "X-Goog-Upload-Offset": "1"})[0] == 400
    status, headers, _ = http(fake, "POST", url, b"abc", {"X-Goog-Upload-Command": "upload",
                                                          "X-Goog-Upload-Offset": "0"})
    assert status == 200 and {k.lower(): v for k, v in headers.items()}["x-goog-upload-status"] == "active"
    status, headers, body = http(fake, "POST", url, b"def", {"X-Goog-Upload-Command": "upload, finalize",
                                                              "X-Goog-Upload-Offset": "3"})
    assert status == 200 and {k.lower(): v for k, v in headers.items()}["x-goog-upload-status"] == "final"
    name = json.loads(body)["file"]["name"]
    assert fake.batch.files[name][1] == b"abcdef"


def test_openai_job_output_file_has_the_batch_api_line_shape(fake):
    client = oai(fake)
    line = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
    f = client.files.create(file=("in.jsonl", json.dumps(line).encode() + b"\n", "application/jsonl"),
                            purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "validating"

    batch = client.batches.retrieve(batch.id)

    assert batch.status == "completed" and batch.request_counts.total == 1 and batch.error_file_id is None
    (out,) = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert out["custom_id"] == "c1" and out["error"] is None
    assert out["response"]["status_code"] == 200
    assert out["response"]["body"]["choices"][0]["message"]["content"] == "The image shows a street scene."
    assert client.batches.list(limit=1).data[0].id == batch.id


def test_openai_create_checks_its_file_and_endpoint(fake):
    client = oai(fake)
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    f = client.files.create(file=("in.jsonl", b"{}\n", "application/jsonl"), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")


def test_jobs_keep_the_poll_count_they_were_made_with(fake):
    client = oai(fake)
    f = client.files.create(file=("in.jsonl", b'{"custom_id": "a", "body": {}}\n', "application/jsonl"),
                            purpose="batch")
    fake.batch.finish_after(1)
    slow = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    fake.batch.finish_after(0)
    quick = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.retrieve(quick.id).status == "completed"
    assert client.batches.retrieve(slow.id).status == "in_progress"
    assert client.batches.retrieve(slow.id).status == "completed"
    assert fake.batch.jobs[slow.id].polls == 2


def test_batch_routes_require_the_key_when_the_fake_has_one():
    with FakeVLM(api_key="right") as fake:
        with pytest.raises(openai.AuthenticationError):
            oai(fake).batches.list(limit=1)
        client = gemini(fake)  # kept: a dropped genai.Client closes its connection pool
        with pytest.raises(genai.errors.ClientError) as exc:
            client.batches.list(config={"page_size": 1})
        assert exc.value.code == 400
        assert fake.batch.calls["openai.batches.list"] == 1 and fake.batch.calls["gemini.list"] == 1


def test_disabled_batch_routes_answer_404_like_vllm(fake):
    fake.batch.enabled = False
    assert http(fake, "GET", "/v1/batches?limit=1")[0] == 404
    assert http(fake, "POST", "/v1/files", b"")[0] == 404
    assert http(fake, "GET", "/v1beta/batches/abc")[0] == 404
    assert http(fake, "POST", "/v1beta/models/m:batchGenerateContent", b"{}")[0] == 404
    assert http(fake, "DELETE", "/v1/files/file-abc")[0] == 404
    assert sum(fake.batch.calls.values()) == 0


def test_reset_forgets_jobs_files_and_counters(fake):
    client = oai(fake)
    client.files.create(file=("in.jsonl", b"{}\n", "application/jsonl"), purpose="batch")
    fake.batch.fail_line(0, 500)
    fake.batch.expire_next()
    fake.batch.reset()
    assert fake.batch.files == {} and fake.batch.jobs == {} and sum(fake.batch.calls.values()) == 0
    f = client.files.create(file=("in.jsonl", b'{"custom_id": "a", "body": {}}\n', "application/jsonl"),
                            purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.retrieve(batch.id).status == "completed"  # no leftover expiry or fault
    assert client.batches.retrieve(batch.id).error_file_id is None


def test_files_can_be_deleted_through_both_sdks(fake):
    f = oai(fake).files.create(file=("in.jsonl", b"{}\n", "application/jsonl"), purpose="batch")
    assert oai(fake).files.delete(f.id).deleted is True
    client = gemini(fake)
    uploaded = client.files.upload(file=io.BytesIO(b"{}\n"), config={"mime_type": "jsonl"})
    client.files.delete(name=uploaded.name)
    assert fake.batch.files == {}
    with pytest.raises(openai.NotFoundError):
        oai(fake).files.delete(f.id)
