"""The offline teacher as a batch backend: the interface, and the knobs tests drive it with."""

from __future__ import annotations

import pytest

from worker.clients.base import VLMRequest, VLMResponse
from worker.clients.batch import BatchBackend, BatchItem, BatchUnsupported
from worker.clients.offline import OfflineClient
from worker.clients.offline_batch import OfflineBatch
from worker.errors import ClientError
from worker.images import load_payload


@pytest.fixture
def items(demo_data) -> list[BatchItem]:
    image_dir, _ = demo_data
    paths = sorted(image_dir.iterdir())[:3]
    return [BatchItem(p.stem, VLMRequest(image=load_payload(p), prompt="caption", step="image_caption"))
            for p in paths]


def test_is_a_batch_backend_answering_as_the_online_teacher(tmp_path, items):
    backend = OfflineBatch(directory=tmp_path)
    assert isinstance(backend, BatchBackend)
    backend.probe()
    job = backend.submit(items, display_name="refexp-test")
    assert backend.status(job).state == "succeeded"
    answers = dict(backend.results(job))
    online = OfflineClient()
    assert answers == {i.key: online.generate(i.request) for i in items}
    assert all(isinstance(a, VLMResponse) for a in answers.values())
    assert backend.submitted() == [job]


def test_polls_errors_end_states_and_probe_knobs(tmp_path, items, monkeypatch):
    backend = OfflineBatch(directory=tmp_path)
    monkeypatch.setenv("REFEXP_OFFLINE_BATCH_POLLS", "2")
    monkeypatch.setenv("REFEXP_OFFLINE_BATCH_ERRORS", "image_caption:1")
    monkeypatch.setenv("REFEXP_OFFLINE_BATCH_END", "expired:1")
    first = backend.submit(items, display_name="a")
    assert backend.status(first).state == "running"
    assert backend.status(first).state == "expired"
    assert backend.status(first).state == "expired"  # decided once
    assert list(backend.results(first)) == []  # expired whole: nothing answered
    missing = dict(backend.results(first, expected_keys=[i.key for i in items]))
    assert len(missing) == len(items) and all(isinstance(a, ClientError) for a in missing.values())
    monkeypatch.setenv("REFEXP_OFFLINE_BATCH_ERRORS", "image_caption:2")  # the count is for the run: one more
    second = backend.submit(items, display_name="b")
    backend.status(second)
    assert backend.status(second).state == "succeeded"
    errors = [k for k, a in backend.results(second) if isinstance(a, ClientError)]
    assert len(errors) == 1
    backend.cancel(second)
    assert backend.status(second).state == "cancelled"
    monkeypatch.setenv("REFEXP_OFFLINE_BATCH_UNSUPPORTED", "1")
    with pytest.raises(BatchUnsupported):
        backend.probe()
