"""Batch mode's stand-in clients and what the ledger keeps of requests and answers."""

from __future__ import annotations

import pytest

from worker.clients.base import BlockedAnswer, EmptyText, VLMRequest, VLMResponse
from worker.errors import ClientError, ParseError, PermanentClientError, RateLimited
from worker.images import ImagePayload
from worker.parking import (
    AnswerClient,
    BatchJobFailed,
    Parked,
    ParkingClient,
    answer_from_json,
    answer_to_json,
    request_from_json,
    request_to_json,
)
from worker.stepdefs import first_wave, next_step


class Online:
    name = "online"
    structured_output = True

    def __init__(self):
        self.calls = []

    def generate(self, request):
        self.calls.append(request)
        return VLMResponse(text="online answer")


def payload(w: int = 40, h: int = 30) -> ImagePayload:
    return ImagePayload(data=b"x", mime="image/png", width=w, height=h, path="/img/a.png")


def request() -> VLMRequest:
    return VLMRequest(image=payload(), prompt="describe", step="region_expr", hint={"boxes": [[1, 2, 3, 4]]},
                      response_schema={"type": "object"}, schema_name="refexp_region_expr", max_tokens=900)


def test_parking_client_raises_the_request_it_was_given_and_keeps_the_online_mode():
    client = ParkingClient(Online())
    assert client.structured_output is True and client.name == "online"
    with pytest.raises(Parked) as caught:
        client.generate(request())
    assert caught.value.request == request()


def test_answer_client_answers_the_first_call_and_sends_later_ones_online():
    online = Online()
    batch = VLMResponse(text="batch answer", usage={"prompt_tokens": 5})
    client = AnswerClient(batch, online)
    assert client.generate(request()).text == "batch answer"
    assert client.used_batch is batch
    assert client.generate(request()).text == "online answer"  # a re-ask, a truncation retry
    assert len(online.calls) == 1


def test_answer_client_raises_the_request_s_error():
    client = AnswerClient(RateLimited("slow down", retry_after=3.0), Online())
    with pytest.raises(RateLimited):
        client.generate(request())
    assert client.used_batch is None


def test_a_request_comes_back_with_its_image_read_again():
    data = request_to_json(request())
    assert "data" not in data["image"]
    back = request_from_json(data, lambda path: payload())
    assert back == request()


def test_a_request_whose_image_changed_size_is_an_input_error():
    from worker.errors import InputError

    with pytest.raises(InputError, match="replaced since"):
        request_from_json(request_to_json(request()), lambda path: payload(80, 60))


@pytest.mark.parametrize("answer", [
    VLMResponse(text="t", model="m", finish_reason="stop", truncated=True, usage={"prompt_tokens": 1}),
    RateLimited("r", retry_after=2.0, status=429),
    BlockedAnswer("b", reason="SAFETY"),
    EmptyText("e", finish_reason="STOP"),
    PermanentClientError("p", status=400),
    ParseError("x", raw="raw text"),
    BatchJobFailed("job expired"),
])
def test_answers_round_trip(answer):
    back = answer_from_json(answer_to_json(answer))
    assert type(back) is type(answer)
    if isinstance(answer, VLMResponse):
        assert back == answer
    else:
        assert str(back) == str(answer)
        for attr in ("retry_after", "status", "reason", "finish_reason", "raw"):
            assert getattr(back, attr, None) == getattr(answer, attr, None)


def test_an_unknown_error_comes_back_retryable():
    back = answer_from_json({"error": "SomethingNew", "message": "m"})
    assert isinstance(back, ClientError)


def test_first_wave_and_next_step():
    assert first_wave([0, 1, 2, 3]) == [0, 1]
    assert first_wave([1, 2, 3]) == [1]
    assert first_wave([2, 3]) == [2]
    assert first_wave([3]) == [3]
    assert next_step(0, [0, 1, 2, 3]) == (2, (0, 1))
    assert next_step(1, [1, 2, 3]) == (2, (1,))
    assert next_step(2, [0, 1, 2, 3]) == (3, ())
    assert next_step(3, [0, 1, 2, 3]) == (None, ())
    assert next_step(0, [0, 1]) == (None, ())
    assert next_step(0, [0, 3]) == (3, (0,))
