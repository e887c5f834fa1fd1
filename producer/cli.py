"""The ``producer`` command line.

Every command validates its inputs first and exits with status 2 and one clear message on a
user error; per-image problems never stop a run (they are counted and listed). Exit codes follow
one policy for every command: ``producer/exitcodes.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from tqdm import tqdm

from producer import estimate as estimate_cmd
from producer import export as export_cmd
from producer import preview as preview_cmd
from producer.exitcodes import HELP as EXIT_CODES_HELP
from producer.exitcodes import ExitCode, fail, for_images, user_errors
from worker.errors import ConfigError, PermanentClientError
from worker.spec import Spec, default_spec_yaml, load_spec

if TYPE_CHECKING:
    import redis

    from producer.guard import Busy, Claim, Holder, ResultsLock
    from producer.seed import SeedReport
    from worker.layout import Layout
    from worker.runstate import RunState

app = typer.Typer(add_completion=False, no_args_is_help=True, epilog=EXIT_CODES_HELP,
                  help="refexp: KITTI-labelled images -> grounded referring expressions, with a VLM teacher.")

SpecOpt = Annotated[Path | None, typer.Option("-c", "--spec", help="Spec YAML (TAO layout).")]
Overrides = Annotated[list[str] | None, typer.Argument(help="Dot-notation overrides, key.path=value.")]
ImageDir = Annotated[Path | None, typer.Option("--image-dir", help="= image_referring_expression.data.image_dir")]
LabelDir = Annotated[Path | None, typer.Option("--label-dir", help="= ...data.kitti_label_dir")]
ResultsDir = Annotated[Path | None, typer.Option("--results-dir", help="= results_dir")]
RequiredResults = Annotated[Path, typer.Option("--results-dir", help="The run's results_dir.")]
MaxInflight = Annotated[int, typer.Option("--max-inflight", min=1,
                                          help="Images enqueued but not finished, at most.")]


def _run_gone(layout, run_id: str, *, as_json: bool = False) -> NoReturn:
    """Redis holds nothing for the run: say what the results dir holds and what to run; exit 3."""
    from producer.status import format_gone, gone_report
    from worker import settings

    report = gone_report(layout, run_id, settings.state_url())
    if as_json:
        typer.echo(json.dumps(report))
    else:
        typer.echo(format_gone(report), err=True)
    raise typer.Exit(ExitCode.RUN_NOT_IN_REDIS)


def _spec(spec: Path | None, overrides: list[str] | None, image_dir: Path | None,
          label_dir: Path | None, results_dir: Path | None) -> Spec:
    extra = list(overrides or [])
    if image_dir is not None:
        extra.append(f"image_referring_expression.data.image_dir={image_dir}")
    if label_dir is not None:
        extra.append(f"image_referring_expression.data.kitti_label_dir={label_dir}")
    if results_dir is not None:
        extra.append(f"results_dir={results_dir}")
    return load_spec(spec, extra)


class _Bars:
    """tqdm bars for the seeding/enqueueing phases."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def __call__(self, phase: str, advance: int, total: int | None) -> None:
        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, desc=f"{phase:>8}", unit="img", file=sys.stderr,
                                          dynamic_ncols=True, mininterval=0.5,
                                          disable=not sys.stderr.isatty())
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(advance)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


class _WorkerHint:
    """While the producer waits on workers and none has taken a task of this run, say so, and
    which Redis the workers must use: first after ``first`` s, then every ``every`` s, on a
    terminal or not. (A producer whose output was not a terminal printed nothing while its
    window stayed full, not even the seed summary.)"""

    def __init__(self, first: float = 10.0, every: float = 30.0) -> None:
        self.first, self.every = first, every
        self.start = time.monotonic()
        self.next_at = self.start + first

    def due(self) -> bool:
        now = time.monotonic()
        if now < self.next_at:
            return False
        self.next_at = now + self.every
        return True

    @staticmethod
    def message(ever_seen: bool, in_flight: int) -> str:
        from worker.settings import broker_source

        since = "in the last 2 minutes" if ever_seen else "yet"
        return (f"waiting for workers: none has taken a task of this run {since}; {in_flight} images in flight "
                f"(is a worker running against {broker_source()}?)")

    def say(self, text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    def on_window(self, state: RunState, waited: float) -> None:
        """``enqueue.wait_for_window``'s ``on_wait``: the window is full."""
        if waited < self.first or not self.due() or state.workers_seen():
            return
        self.say(self.message(bool(state.workers_seen(window=float("inf"))), state.queued_count()))

    def on_status(self, st: dict) -> None:
        """From ``_Progress``: the run is being watched (``--wait``, ``wait``)."""
        if st["finished"] or st["workers"] or not st["in_flight_images"]:
            return
        if self.due():
            moved = any(c["done"] or c["failed"] for c in st["steps"].values())
            self.say(self.message(moved, st["in_flight_images"]))


class _Progress:
    """Run progress: one bar per step on a terminal, a line every 10 s otherwise; and the
    ``_WorkerHint`` when no worker takes the run's tasks (not for ``producer run``: its worker is
    in this process)."""

    def __init__(self, hint: bool = True) -> None:
        self.bars: dict[str, tqdm] = {}
        self.last = 0.0
        self.hint = _WorkerHint() if hint else None

    def __call__(self, st: dict) -> None:
        if self.hint is not None:
            self.hint.on_status(st)
        if not sys.stderr.isatty():
            now = time.monotonic()
            if now - self.last >= 10 or st["finished"]:
                self.last = now
                parts = [f"step {s}: {c['done']} done, {c['failed']} failed" for s, c in st["steps"].items()]
                typer.echo(f"[{st['images']} images] " + "; ".join(parts), err=True)
            return
        for s, c in st["steps"].items():
            bar = self.bars.get(s)
            if bar is None:
                bar = self.bars[s] = tqdm(total=st["images"], desc=f"  step {s}", unit="img", file=sys.stderr,
                                          dynamic_ncols=True, position=len(self.bars), leave=True)
            bar.n = c["done"] + c["failed"] + c["blocked"]
            bar.set_postfix(failed=c["failed"], refresh=False)
            bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def _watch(state, timeout: float | None, *, hint: bool = True) -> dict:
    """Wait for the run, showing progress (``_Progress``); a timeout exits 5 (UNFINISHED)."""
    from producer.submit import wait

    show = _Progress(hint=hint)
    try:
        return wait(state, timeout=timeout, on_status=show)
    except TimeoutError as exc:
        fail(f"{exc}; it goes on: `producer wait --results-dir ...` watches it again", ExitCode.UNFINISHED)
    finally:
        show.close()


def _print_seed(report: SeedReport, notes: list[str]) -> None:
    typer.echo(report.summary(), err=True)
    for p in report.problems[:20]:
        typer.echo(f"  warning: {p}", err=True)
    if len(report.problems) > 20:
        typer.echo(f"  ... {len(report.problems) - 20} more (see failures.jsonl for unreadable images)", err=True)
    for note in notes:
        typer.echo(f"warning: {note}", err=True)


def _on_seeded(bars: _Bars | None):
    """``submit``'s ``on_seeded``: the seed summary as soon as the seed is written (before the
    publish, which may wait on the window for minutes)."""

    def show(report: SeedReport, notes: list[str]) -> None:
        if bars is not None:
            bars.close()
        _print_seed(report, notes)

    return show


def _nothing_seeded(spec: Spec, report: SeedReport) -> None:
    from producer.seed import why_nothing_seeded

    typer.echo(f"error: {why_nothing_seeded(spec, report)}. Nothing was enqueued (exit {int(ExitCode.NONE_DONE)}).",
               err=True)


def _finalize_and_report(layout: Layout, steps: list[int], prices: dict | None = None, *, seed_failed: int = 0,
                         retry: str | None = None) -> ExitCode:
    """Finalize, print what was written and why images are missing; return the exit code.

    ``retry``: how to try the failed images again (default: ``producer retry-failed``)."""
    from producer.finalize import finalize
    from producer.summary import commonest_failures
    from producer.usage import format_usage

    rep = finalize(layout, steps, prices, seed_failed=seed_failed)
    if rep.stale_removed:
        typer.echo(f"removed {len(rep.stale_removed)} temp file(s) an interrupted finalize left in {layout.root} "
                   f"({sum(size for _, size in rep.stale_removed) / 1e6:.1f} MB)", err=True)
    unseeded = f", {seed_failed} could not be seeded" if seed_failed else ""
    typer.echo(f"wrote {rep.path} ({rep.written} images; {len(rep.failed)} failed, {len(rep.missing)} missing"
               f"{unseeded})")
    if rep.usage.get("total", {}).get("calls"):
        typer.echo("\n".join(format_usage(rep.usage)))
    retry = retry or f"`producer retry-failed --results-dir {layout.root}` tries them again"
    if rep.failed:
        typer.echo(f"  failed images: {', '.join(rep.failed[:20])}{' ...' if len(rep.failed) > 20 else ''}"
                   f" — details in {layout.failures.path}; {retry}", err=True)
        for line in commonest_failures(layout, set(rep.failed)):
            typer.echo(f"  {line}", err=True)
    not_done = len(rep.failed) + len(rep.missing) + seed_failed
    code = for_images(rep.written, not_done)
    total = rep.written + not_done
    if code == ExitCode.NONE_DONE:
        typer.echo(f"error: no image is done: all {total} failed (exit {int(code)})", err=True)
    elif code == ExitCode.SOME_FAILED:
        typer.echo(f"{not_done} of {total} images not done (exit {int(code)})", err=True)
    return code


@app.command("default-spec")
def default_spec() -> None:
    """Print the default spec (TAO's defaults plus refexp's keys)."""
    typer.echo(default_spec_yaml(), nl=False)


@app.command()
def enqueue(
    overrides: Overrides = None,
    spec: SpecOpt = None,
    image_dir: ImageDir = None,
    label_dir: LabelDir = None,
    results_dir: ResultsDir = None,
    max_inflight: MaxInflight = 5000,
    publishers: Annotated[int, typer.Option(
        "--publishers", min=0, help="Processes publishing tasks (0 = one per core, up to 4, for runs of "
                                    "20k+ images to enqueue; else 1).")] = 0,
    wait_: Annotated[bool, typer.Option("--wait", help="Show progress until done, then finalize.")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after this many s.")] = None,
) -> None:
    """Seed and enqueue a run on the fleet's Redis (REDIS_URL).

    One producer per results dir: when another one holds it with the same inputs on the same
    Redis, this one publishes nothing and (with --wait) watches that run to its end instead.
    """
    from producer.guard import Busy, ResultsLock, claim, joinable
    from producer.outage import harden_publishing
    from producer.runs import connect, prepare
    from producer.sizing import window_warnings
    from worker.app import app as celery_app

    with user_errors():
        s = _spec(spec, overrides, image_dir, label_dir, results_dir)
        for var in _spec_keys(s):
            typer.echo(f"warning: the spec holds an API key; it is not sent to the workers (keys never go "
                       f"through Redis). Set {var} in every worker's environment instead.", err=True)
        s, layout = prepare(s)
        client = connect()
        harden_publishing(celery_app)
        for note in window_warnings(client, max_inflight):
            typer.echo(f"warning: {note}", err=True)
        lock = ResultsLock(layout.lock_file)
        while True:
            try:
                with claim(layout, client, s, command="enqueue", lock=lock) as held:
                    code = _enqueue_held(s, client, held, max_inflight=max_inflight, publishers=publishers,
                                         wait_=wait_, timeout=timeout)
                raise typer.Exit(code)
            except Busy as busy:
                holder = joinable(busy, client, s)
                code = _join(busy, holder, client, lock, wait_=wait_, timeout=timeout)
                if code is not None:
                    raise typer.Exit(code) from None
                typer.echo(f"{holder.describe()} is gone before its enqueue was complete: this producer "
                           "holds the results dir now and resumes it", err=True)


def _enqueue_held(s: Spec, client: redis.Redis, held: Claim, *, max_inflight: int, publishers: int, wait_: bool,
                  timeout: float | None) -> ExitCode:
    """``enqueue`` while this producer holds the results dir (the lock is kept until it returns)."""
    from producer.status import RunNotInRedis
    from producer.submit import submit

    bars = _Bars()
    try:
        sub = submit(s, client, max_inflight=max_inflight, progress=bars, publishers=publishers, held=held,
                     on_seeded=_on_seeded(bars), on_wait=_WorkerHint().on_window)
    except KeyboardInterrupt:
        bars.close()
        typer.echo("\ninterrupted: nothing is lost. Re-run the same command to finish the enqueue "
                   "(queued and done images are not sent again).", err=True)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    bars.close()
    if sub.seed.images == 0:
        _nothing_seeded(sub.run.spec, sub.seed)
        return ExitCode.NONE_DONE
    e = sub.enqueue
    typer.echo(f"run {sub.run.run_id}: enqueued {e.enqueued} images ({e.already_done} already done, "
               f"{e.already_queued} already queued) -> {sub.run.layout.root}")
    if not wait_:
        typer.echo(f"watch: producer status --results-dir {sub.run.layout.root}   (or Flower on :5555)")
        return ExitCode.OK
    try:
        _watch(sub.run.state, timeout)
    except RunNotInRedis:
        _run_gone(sub.run.layout, sub.run.run_id)
    except KeyboardInterrupt:
        _stopped_watching(sub.run.layout.root)
    return _finalize_and_report(sub.run.layout, sub.run.spec.ire.workflow.steps,
                                sub.run.spec.ire.vlm.prices.model_dump(), seed_failed=len(sub.seed.failures))


def _join(busy: Busy, holder: Holder, client: redis.Redis, lock: ResultsLock, *, wait_: bool,
          timeout: float | None) -> ExitCode | None:
    """Watch the run of the producer holding the results dir (same inputs, same Redis).

    Returns None when that producer died before its enqueue was complete and this one now holds
    the lock (the caller resumes the enqueue); else the exit code.
    """
    from producer.status import RunNotInRedis
    from producer.submit import watch_joined
    from producer.usage import run_prices
    from worker.layout import Layout
    from worker.runstate import RunState

    typer.echo(f"{busy}: same inputs on the same Redis, so this command joins it and publishes nothing "
               "(that producer's spec applies)", err=True)
    watch = f"producer status --results-dir {busy.root}"
    if not wait_:
        typer.echo(f"joined run {holder.run_id}: that producer enqueues it; watch: {watch}")
        return ExitCode.OK
    state = RunState(client, holder.run_id)
    show = _Progress()
    try:
        st = watch_joined(state, lock, timeout=timeout, on_status=show)
    except RunNotInRedis:
        _run_gone(Layout(busy.root), holder.run_id)
    except TimeoutError as exc:
        fail(str(exc), ExitCode.UNFINISHED)
    except KeyboardInterrupt:
        _stopped_watching(busy.root)
    finally:
        show.close()
    if st is None:
        return None
    meta = state.meta()
    return _finalize_and_report(Layout(busy.root), meta.get("steps", []), run_prices(state, meta),
                                seed_failed=int(meta.get("seed_failed", 0)))


def _stopped_watching(root: Path) -> NoReturn:
    typer.echo(f"\ninterrupted: the run goes on on the workers; `producer wait --results-dir {root}` watches it "
               "again and finalizes it", err=True)
    raise typer.Exit(130)


@app.command()
def run(
    overrides: Overrides = None,
    spec: SpecOpt = None,
    image_dir: ImageDir = None,
    label_dir: LabelDir = None,
    results_dir: ResultsDir = None,
) -> None:
    """Run the whole pipeline on this machine: embedded Redis, in-process worker, then finalize."""
    with user_errors():
        s = _spec(spec, overrides, image_dir, label_dir, results_dir)
        _, code = run_local(s)
    raise typer.Exit(code)


def _spec_keys(s: Spec) -> dict[str, str]:
    """API keys written in the spec, as the environment variables the clients read."""
    vlm = s.ire.vlm
    keys = {}
    if vlm.gemini.api_key:
        keys["GOOGLE_API_KEY"] = vlm.gemini.api_key
    if vlm.openai.api_key:
        keys["OPENAI_API_KEY"] = vlm.openai.api_key
    return keys


def _require_client(s: Spec) -> None:
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
    for var, value in _spec_keys(s).items():
        if not os.environ.get(f"{var}_FILE"):  # a key file given to this process wins, as in the worker
            os.environ.setdefault(var, value)
    _require_client(s)
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
        bars = _Bars() if not quiet else None
        sub = submit(s, client, progress=bars, held=held, on_seeded=None if quiet else _on_seeded(bars))
        if bars:
            bars.close()
        if sub.seed.images:
            (wait(sub.run.state) if quiet else _watch(sub.run.state, None, hint=False))
    except KeyboardInterrupt:
        _interrupted(worker, server, _drain_timeout(s))
    finally:
        worker.stop()
    layout, steps, seed_failed = sub.run.layout, sub.run.spec.ire.workflow.steps, len(sub.seed.failures)
    if quiet or not sub.seed.images:
        rep = finalize(layout, steps, seed_failed=seed_failed)  # summary.json, for `producer status`
        if not sub.seed.images and not quiet:
            _nothing_seeded(sub.run.spec, sub.seed)
        return for_images(rep.written, len(rep.failed) + len(rep.missing) + seed_failed)
    return _finalize_and_report(layout, steps, sub.run.spec.ire.vlm.prices.model_dump(), seed_failed=seed_failed,
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


@app.command()
def status(
    results_dir: RequiredResults,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Images, done / failed / blocked / pending per step, throughput, ETA, workers, budget."""
    from producer.runs import connect, existing_run
    from producer.status import RunNotInRedis, format_status
    from producer.status import status as get_status
    from producer.summary import SUMMARY_FILE, format_local, local_run
    from worker.layout import Layout

    # A `producer run` took its Redis with it: its results dir speaks for it (summary.json).
    local = local_run(Layout(results_dir.expanduser().resolve()))
    if local is not None:
        typer.echo(json.dumps(local.to_json()) if json_ else format_local(local, str(results_dir / SUMMARY_FILE)))
        return
    with user_errors():
        run_id, layout, state = existing_run(results_dir, connect())
        try:
            st = get_status(state)
        except RunNotInRedis:
            _run_gone(layout, run_id, as_json=json_)
        typer.echo(json.dumps(st) if json_ else format_status(st))


@app.command()
def wait(
    results_dir: RequiredResults,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds.")] = None,
    finalize_: Annotated[bool, typer.Option("--finalize/--no-finalize")] = True,
) -> None:
    """Show progress until the run is finished, then finalize."""
    from producer.runs import connect, existing_run
    from producer.status import RunNotInRedis

    with user_errors():
        run_id, layout, state = existing_run(results_dir, connect())
        try:
            st = _watch(state, timeout)
        except RunNotInRedis:
            _run_gone(layout, run_id)
        except KeyboardInterrupt:
            _stopped_watching(layout.root)
        meta = state.meta()
        seed_failed = int(meta.get("seed_failed", 0))
        if finalize_:
            from producer.usage import run_prices

            code = _finalize_and_report(layout, meta.get("steps", []), run_prices(state, meta),
                                        seed_failed=seed_failed)
        else:
            last = st["steps"][str(meta["steps"][-1])]["done"] if meta.get("steps") else 0
            code = for_images(last, st["images"] - last + seed_failed)
    raise typer.Exit(code)


@app.command()
def finalize(results_dir: RequiredResults) -> None:
    """Write results_dir/annotations.jsonl from the sinks (one record per image, sorted).

    Needs no Redis: the steps come from the results dir (``producer.runs.steps_on_disk``), and
    the prices for the cost line from the spec stored there at enqueue."""
    from producer.runs import run_layout, steps_on_disk, stored_spec

    with user_errors():
        layout = run_layout(results_dir)
        steps = steps_on_disk(layout)
        if not steps:
            fail(f"{layout.root}: no step results to finalize (no steps in {layout.run_file.name}, no stored "
                  "spec, no step sink); has the run been enqueued?")
        spec = stored_spec(layout)
        code = _finalize_and_report(layout, steps, spec.ire.vlm.prices.model_dump() if spec else None)
    raise typer.Exit(code)


@app.command("retry-failed")
def retry_failed_cmd(results_dir: RequiredResults, max_inflight: MaxInflight = 5000) -> None:
    """Re-enqueue only the failed image-steps (and the steps after them)."""
    from producer.guard import hold
    from producer.outage import harden_publishing
    from producer.runs import connect, existing_run
    from producer.status import RunNotInRedis
    from producer.submit import retry_failed
    from worker.app import app as celery_app

    with user_errors():
        client = connect()
        run_id, layout, state = existing_run(results_dir, client)
        harden_publishing(celery_app)
        with hold(layout, client, None, command="retry-failed"):
            try:
                n = retry_failed(run_id, layout, state, max_inflight=max_inflight)
            except RunNotInRedis:
                _run_gone(layout, run_id)
        typer.echo(f"re-enqueued {n} images with failed steps")


@app.command()
def repair(
    results_dir: RequiredResults,
    older_than: Annotated[float | None, typer.Option(
        "--older-than", min=0, help="Only images in flight longer than this many seconds (default: the "
                                    "visibility timeout REFEXP_VISIBILITY_TIMEOUT, at most 300).")] = None,
) -> None:
    """Put back images in flight that nothing will ever move again (no task queued or held)."""
    from producer.reconcile import repair as do_repair
    from producer.runs import connect, existing_run
    from producer.submit import broker_client

    with user_errors():
        _, _, state = existing_run(results_dir, connect())
        rec = do_repair(state, broker_client(state), older_than=older_than)
        typer.echo(f"{rec.requeued} stranded images published again, {rec.dropped} finished images taken out "
                   f"of the in-flight set; {state.queued_count()} images in flight (older than "
                   f"{rec.older_than:.0f} s are checked)")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Where the demo dataset and results go.")] = Path("demo-out"),
    images: Annotated[int, typer.Option("--images", min=1, help="How many synthetic images.")] = 12,
) -> None:
    """Make a small synthetic road-scene dataset and run it locally on the offline teacher."""
    from producer.demo import make_demo_dataset

    with user_errors():
        image_dir, label_dir = make_demo_dataset(out / "data", n_images=images)
        s = load_spec(None, [
            "image_referring_expression.vlm.backend=offline",
            f"image_referring_expression.data.image_dir={image_dir}",
            f"image_referring_expression.data.kitti_label_dir={label_dir}",
            f"results_dir={out / 'results'}",
            "image_referring_expression.workflow.output_format=both",
        ])
        root, code = run_local(s)
        typer.echo(f"demo results in {root} (try: head -n 1 {root / 'annotations.jsonl'})")
    raise typer.Exit(code)


@app.command("check-endpoint")
def check_endpoint(
    overrides: Overrides = None,
    spec: SpecOpt = None,
    image: Annotated[Path | None, typer.Option(help="Image to send (default: a drawn test scene).")] = None,
) -> None:
    """One real call on one image: prints model, latency and the parsed answer, or what to fix."""
    from producer.check import check

    with user_errors():
        s = load_spec(spec, list(overrides or []))
        code = check(s, image)
        raise typer.Exit(code)


for _module in (preview_cmd, export_cmd, estimate_cmd):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
