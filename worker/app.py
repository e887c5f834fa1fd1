"""The Celery app: the only module that builds it. ``celery -A worker worker`` finds it here.

Pool: tasks spend their time waiting on the VLM's HTTP answer, so the threads pool
(``-P threads -c 16``) gives the most concurrent calls per MB; prefork works too.
"""

from __future__ import annotations

import logging

import redis
from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_shutdown, worker_shutdown

from worker import settings
from worker.budget import flush_all_counts
from worker.clock import ClockCheck
from worker.coordstep import BatchCoordinatorStep
from worker.keys import PRIORITY_SEP, PRIORITY_STEPS, QUEUE
from worker.settings import REDIS_SOCKET_TIMEOUT
from worker.tailfirst import TailFirst


def _backend_url(url: str) -> str:
    """Route Redis result URLs through ``RefexpRedisBackend`` (see worker/result_backend.py)."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return f"worker.result_backend:RefexpRedisBackend+{url}"
    return url


def make_app() -> Celery:
    vt = settings.visibility_timeout()
    app = Celery("refexp", include=["worker.tasks"])
    app.conf.update(
        broker_url=settings.broker_url(),
        result_backend=_backend_url(settings.result_backend()),
        # One dedicated queue, so a shared Redis can host other Celery apps without crosstalk.
        task_default_queue=QUEUE,
        task_default_exchange=QUEUE,
        task_default_routing_key=QUEUE,
        # Ack after the task ran, not when it was received: a worker that dies mid-task leaves
        # the message unacked and Redis redelivers it after the visibility timeout.
        task_acks_late=True,
        # ... and a task whose worker process was killed (OOM, SIGKILL) is requeued, not failed.
        task_reject_on_worker_lost=True,
        # Take one message per free thread: long VLM calls must not strand prefetched work on
        # one busy worker while others idle (and unacked prefetched messages count against the
        # visibility timeout).
        worker_prefetch_multiplier=1,
        # Redis redelivers a message not acked within this many seconds. It must exceed the
        # longest task (VLM timeout x calls) and every retry countdown (capped in tasks.py).
        # REFEXP_VISIBILITY_TIMEOUT lowers it in tests so a killed worker's tasks come back fast.
        # kombu looks for unacked messages past their timeout only every
        # unacked_restore_interval x unacked_restore_throttle seconds (10 x 10 by default), so a
        # short timeout alone would still leave a dead worker's tasks waiting 100 s: sweep at
        # least four times per timeout (at most every 10 s), and scan on every sweep.
        # Message bodies are JSON already: store them as text, not base64 (kombu's default for
        # Redis), which made every queued message a third larger. Each message names its own
        # encoding, so messages queued before this change are still read.
        # Timeouts on every socket operation: without them a stalled Redis (a failover, a cut
        # network, `kill -STOP`) holds a publish, an ack or a chord count for ever, and the
        # worker thread with it. With them the operation fails, and the task layer keeps the
        # image-step (worker/tasks.py: retry, or leave the message unacked).
        broker_transport_options={
            "visibility_timeout": vt,
            "unacked_restore_interval": max(1, min(10, vt // 4)),
            "unacked_restore_throttle": 1,
            "body_encoding": "utf-8",
            "socket_timeout": REDIS_SOCKET_TIMEOUT,
            "socket_connect_timeout": 10,
            # Depth-first: each step's messages carry a priority (worker/stepdefs.py) and sit in
            # that priority's list; a worker's BRPOP names the lists lowest number first, so it
            # takes an image's later step before any new image's head step. Spelled out (they
            # are kombu's defaults) because the reconciler names these lists (worker/keys.py).
            "priority_steps": list(PRIORITY_STEPS),
            "sep": PRIORITY_SEP,
        },
        result_backend_transport_options={"visibility_timeout": vt},
        redis_socket_timeout=REDIS_SOCKET_TIMEOUT,
        redis_socket_connect_timeout=10,
        # Results are tiny status strings, read only by chord counting; let them go quickly.
        result_expires=3600,
        # The chord join counter must outlive the deepest backlog (an image's header may wait
        # days behind a million others), so it lives much longer than plain results.
        result_chord_expires=14 * 24 * 3600,
        # JSON only: messages carry ids and offsets, never pickled objects.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Sent events for every one of a million tasks cost the producer. Task events on the
        # worker are what Flower needs, and cost Redis about 3 commands per task
        # (bench/redis_cost.py): off unless the worker is started with -E (the compose file does).
        task_send_sent_event=False,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        task_track_started=False,
    )
    # A worker whose clock is off refuses to start, and stops re-queueing others' tasks if it
    # drifts later (worker/clock.py: kombu compares unacked stamps with each worker's own clock).
    app.steps["consumer"].add(ClockCheck)
    # Once few new images are left to start, a worker starts them before finishing started ones
    # (worker/tailfirst.py): depth-first until the end of the run, then the longest work first.
    app.steps["consumer"].add(TailFirst)
    # Batch mode: one worker at a time (a lease in Redis) submits and polls provider jobs
    # (worker/coordinator.py); idle, it costs one EXISTS every few seconds.
    app.steps["consumer"].add(BatchCoordinatorStep)
    return app


app = make_app()
log = logging.getLogger("refexp.worker")


@celeryd_after_setup.connect(weak=False)
def say_where_redis_should_be(sender: object = None, conf: object = None, **_: object) -> None:
    """Once, as a worker starts (logging is set up, the consumer not yet connected): if its
    broker's Redis does not answer, say which variable set the URL and what to check. Celery
    alone logs "Cannot connect to redis://..." and retries for ever, naming neither. The worker
    still retries (Redis may come up later); this only speaks."""
    url = str(getattr(conf or app.conf, "broker_url", "") or "")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        return
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        log.warning("Redis does not answer at the broker URL from %s (%s: %s). Check that Redis runs there and "
                    "that this host reaches it (host, port, firewall; its password: REDIS_PASSWORD_FILE); "
                    "CELERY_BROKER_URL, when set, overrides REDIS_URL for the broker. The worker keeps retrying "
                    "until Redis answers.", settings.broker_source(), type(exc).__name__, exc)
    finally:
        client.close()


@worker_shutdown.connect(weak=False)
@worker_process_shutdown.connect(weak=False)
def add_the_last_calls(**_: object) -> None:
    """At a clean shutdown (sent after a warm shutdown's tasks have finished; in each child of a
    prefork pool too): the fleet budget counts calls in the process and adds them about once a
    second (worker/budget.py), so the calls of the last second reach ``producer status``."""
    flush_all_counts()


def repoint(url: str) -> None:
    """Point this process's app at another Redis (``producer run`` starts its own, per run).

    Celery caches the broker pool and the result backend on first use; drop both so the next
    publish and the next chord count use ``url``.
    """
    import threading

    app.conf.update(broker_url=url, result_backend=_backend_url(url))
    app.close()
    app._backend_cache = None
    app._local = threading.local()
    app.__dict__.pop("amqp", None)
