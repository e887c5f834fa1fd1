"""``producer run``: the fleet's pipeline on one machine, with nothing to install or start.

An embedded real Redis (``producer.embedded``), the same Celery tasks on an in-process worker
(``LocalWorker``) with a thread pool of ``workflow.max_workers``, the same enqueue, wait and
finalize (``run_local``). Outputs are the fleet's, byte for byte, because every line of code that
writes them is the same. Ctrl-C lets the calls in flight finish and keeps their answers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from producer.console import Bars, finalize_and_report, nothing_seeded, on_seeded, watch
from producer.exitcodes import ExitCode, for_images
from worker.errors import ConfigError, PermanentClientError
from worker.spec import Spec

if TYPE_CHECKING:
    import redis

    from producer.guard import Claim

import contextlib
import os
import socket
import threading
from collections.abc import Iterator

from worker.keys import QUEUE


class LocalWorker:
    """A Celery worker on the threads pool, consuming in a background thread of this process."""

    def __init__(self, concurrency: int):
        from worker.app import app

        # As a worker process does at start: make this app the current and default one, so the
        # tracer stores results (and counts chords) through it.
        app.finalize()
        app.set_current()
        app.set_default()
        ready = self._ready = threading.Event()

        class _Controller(app.WorkController):  # type: ignore[name-defined, misc]
            def on_consumer_ready(self, consumer: object) -> None:
                super().on_consumer_ready(consumer)
                ready.set()

        self.controller = _Controller(
            app=app,
            hostname=f"local-{os.getpid()}@{socket.gethostname()}",
            concurrency=concurrency,
            pool_cls="threads",
            queues=[QUEUE],
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            ready_callback=None,
        )
        self._thread = threading.Thread(target=self.controller.start, name="refexp-local-worker", daemon=True)

    def start(self) -> LocalWorker:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the in-process worker did not start within 60 s")
        return self

    @staticmethod
    def tasks_in_flight() -> int:
        """Tasks this process is running now (each holds at most one VLM call at a time)."""
        from celery.worker import state as worker_state

        return len(worker_state.active_requests)

    def drain(self, timeout: float) -> bool:
        """Warm shutdown: stop taking tasks, let the running ones finish (their answers are written
        and indexed, so a resume does not pay for them again); True if they did within ``timeout``.

        A KeyboardInterrupt (a second Ctrl-C) while waiting propagates at once.
        """
        return self._stop("should_stop", timeout)

    def stop(self, timeout: float = 60.0) -> bool:
        """Cold shutdown, for when nothing is left to run."""
        return self._stop("should_terminate", timeout)

    def _stop(self, flag: str, timeout: float) -> bool:
        from celery.worker import state as worker_state

        if not self._thread.is_alive():
            return True
        setattr(worker_state, flag, 0)  # the consumer loop checks it (celery.worker.state.maybe_shutdown)
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped:
            setattr(worker_state, flag, None)  # a later in-process worker in this process starts afresh
        return stopped


@contextlib.contextmanager
def in_process_worker(concurrency: int, *, shutdown_timeout: float = 60.0) -> Iterator[LocalWorker]:
    """A started ``LocalWorker``, stopped on exit."""
    worker = LocalWorker(concurrency).start()
    try:
        yield worker
    finally:
        worker.stop(shutdown_timeout)


# --------------------------------------------------------------------------- producer run

def spec_keys(s: Spec) -> dict[str, str]:
    """API keys written in the spec, as the environment variables the clients read."""
    vlm = s.ire.vlm
    keys = {}
    if vlm.gemini.api_key:
        keys["GOOGLE_API_KEY"] = vlm.gemini.api_key
    if vlm.openai.api_key:
        keys["OPENAI_API_KEY"] = vlm.openai.api_key
    return keys


def require_client(s: Spec) -> None:
    """``producer run`` is its own worker: a client it cannot build (no API key, both a key and a
    key file) is a config error now, before anything is seeded, not one failure per image-step.
    Building a client makes no call (a paid generation is ``check-endpoint``'s job)."""
    from worker.clients.factory import get_client

    try:
        get_client(s.ire.vlm)
    except PermanentClientError as exc:
        raise ConfigError(f"{exc}. `producer run` calls the model from this process, so this shell is the "
                          "worker's environment. Nothing was seeded.") from None


def run_local(s: Spec, *, quiet: bool = False) -> tuple[Path, ExitCode]:
    """``producer run`` as a function (the demo and the tests call it): the results dir and the
    exit code (``producer/exitcodes.py``).

    The results dir is held (``producer.guard``) for the whole local run: the embedded Redis is
    private, so no other producer could join it, and one that tries is refused.
    """
    from producer.embedded import RedisServer
    from producer.guard import hold
    from producer.runs import prepare

    # Keys never travel through Redis; the in-process worker reads them from this process's
    # environment, so a key given in the spec (TAO users do) is handed over that way.
    for var, value in spec_keys(s).items():
        if not os.environ.get(f"{var}_FILE"):  # a key file given to this process wins, as in the worker
            os.environ.setdefault(var, value)
    require_client(s)
    s, layout = prepare(s)

    with RedisServer() as server:
        url = server.url
        from producer.runs import connect

        client = connect(url, patience_s=EMBEDDED_REDIS_PATIENCE)
        with hold(layout, client, s, command="run") as held:
            code = _run_held(s, server, client, held, quiet=quiet)
        return layout.root, code


def _run_held(s: Spec, server, client: redis.Redis, held: Claim, *, quiet: bool) -> ExitCode:
    """``producer run`` while it holds the results dir: in-process worker, enqueue, wait, finalize.

    Ctrl-C stops the worker taking tasks and lets the calls in flight finish and write their
    answers (``_interrupted``), so a resume does not pay for them again.
    """
    url = server.url
    os.environ["REDIS_URL"] = url
    os.environ.pop("CELERY_BROKER_URL", None)
    os.environ.pop("CELERY_RESULT_BACKEND", None)
    os.environ.pop("REFEXP_STATE_URL", None)
    from producer.finalize import finalize
    from producer.local import LocalWorker
    from producer.submit import submit, wait
    from worker.app import repoint

    repoint(url)
    worker = LocalWorker(s.ire.workflow.max_workers)
    try:
        worker.start()
        bars = Bars() if not quiet else None
        sub = submit(s, client, progress=bars, held=held, on_seeded=None if quiet else on_seeded(bars))
        if bars:
            bars.close()
        if sub.seed.images:
            (wait(sub.run.state) if quiet else watch(sub.run.state, None, hint=False))
    except KeyboardInterrupt:
        _interrupted(worker, server, _drain_timeout(s))
    finally:
        worker.stop()
    layout, steps, seed_failed = sub.run.layout, sub.run.spec.ire.workflow.steps, len(sub.seed.failures)
    if quiet or not sub.seed.images:
        rep = finalize(layout, steps, seed_failed=seed_failed)  # summary.json, for `producer status`
        if not sub.seed.images and not quiet:
            nothing_seeded(sub.run.spec, sub.seed)
        return for_images(rep.written, rep.n_failed + rep.n_missing + seed_failed)
    return finalize_and_report(layout, steps, sub.run.spec.ire.vlm.prices.model_dump(), seed_failed=seed_failed,
                                retry="run the same `producer run` command again to retry them (done "
                                      "image-steps are kept)")


#: Our own redis-server does not stall for minutes; if it stops answering for this long, it died.
EMBEDDED_REDIS_PATIENCE = 30.0


def _drain_timeout(s: Spec) -> float:
    """How long the calls in flight may take to finish after Ctrl-C: a task makes at most one
    call and one re-ask, each bounded by the VLM timeout."""
    vlm = s.ire.vlm
    timeout = vlm.gemini.timeout if vlm.backend == "gemini" else vlm.openai.timeout
    return 2 * float(timeout) + 10


def _interrupted(worker, server, timeout: float) -> NoReturn:
    """Ctrl-C of ``producer run``: stop taking tasks, let the calls in flight finish and write
    their answers (a resume would pay for them again), then stop Redis and exit 130. A second
    Ctrl-C quits at once."""
    n = worker.tasks_in_flight()
    typer.echo(f"\ninterrupted: letting the {n} task(s) in flight finish so their answers are kept "
               f"(at most {timeout:.0f} s; Ctrl-C again to quit now)", err=True)
    try:
        finished = worker.drain(timeout)
    except KeyboardInterrupt:
        _quit_now(server, "interrupted again: quitting now; the calls still in flight are made again on resume")
    if not finished:
        _quit_now(server, f"the tasks in flight did not finish within {timeout:.0f} s; quitting; they are made "
                          "again on resume")
    typer.echo("interrupted: the answers of the calls in flight are saved; run the same command to resume "
               "(image-steps already done are not sent again)", err=True)
    raise typer.Exit(130)


def _quit_now(server, message: str) -> NoReturn:
    """Exit without waiting for the worker's threads (the interpreter would join them at exit)."""
    typer.echo(f"{message}; run the same command to resume", err=True)
    server.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
