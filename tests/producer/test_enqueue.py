"""The one dispatch path (``enqueue.dispatch``): every image goes out once, in chunks that fit the
window, published before it is marked in flight. A real Redis; a stand-in publisher records
what is published (no worker: a thread plays the workers, settling images as they come)."""

from __future__ import annotations

import threading

from producer.enqueue import dispatch
from worker.runstate import RunState


class RecordingPublisher:
    processes = 1

    def __init__(self, state: RunState):
        self.state, self.items, self.in_flight_at_publish, self.chunks = state, [], [], []

    def publish(self, items):
        self.in_flight_at_publish.append(self.state.queued_count())
        self.chunks.append(len(items))
        self.items.extend(items)
        return len(items)


def test_dispatch_keeps_the_window_for_any_size_and_publishes_before_marking(redis_client):
    state = RunState(redis_client, "run-dispatch")
    todo = [(i * 10, f"img_{i:03d}", [1]) for i in range(23)]
    pub = RecordingPublisher(state)
    peak = [0]
    stop = threading.Event()

    def workers():  # settle whatever is in flight, as workers finishing step 1 would
        while not stop.is_set():
            for image_id, _, _ in list(state.iter_queued()):
                peak[0] = max(peak[0], state.queued_count())
                state.finish(1, image_id, 0, [1])
            stop.wait(0.005)

    t = threading.Thread(target=workers, daemon=True)
    t.start()
    try:
        sent = dispatch(state, "run-dispatch:h", todo, [1], pub, max_inflight=3)
    finally:
        stop.set()
        t.join()
    assert sent == 23
    assert [item[2] for item in pub.items] == [f"img_{i:03d}" for i in range(23)]
    assert all(item[1] == "run-dispatch:h" and item[0] == [1] for item in pub.items)
    assert sum(pub.chunks) == 23 and max(pub.chunks) <= 3
    assert max(pub.in_flight_at_publish) <= 2, "a chunk is published only into free room"
    assert peak[0] <= 3

