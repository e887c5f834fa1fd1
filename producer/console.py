"""What the producer's commands print: progress bars and lines, the seed summary, the final
report, and the messages for a run Redis lost or a watch interrupted. ``producer/cli.py`` (the
commands) and ``producer/local.py`` (``producer run``) share them."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from tqdm import tqdm

from producer.exitcodes import ExitCode, fail, for_images

if TYPE_CHECKING:
    from producer.seed import SeedReport
    from worker.layout import Layout
    from worker.runstate import RunState
    from worker.spec import Spec


def run_gone(layout, run_id: str, *, as_json: bool = False) -> NoReturn:
    """Redis holds nothing for the run: say what the results dir holds and what to run; exit 3."""
    from producer.status import format_gone, gone_report
    from worker import settings

    report = gone_report(layout, run_id, settings.state_url())
    if as_json:
        typer.echo(json.dumps(report))
    else:
        typer.echo(format_gone(report), err=True)
    raise typer.Exit(ExitCode.RUN_NOT_IN_REDIS)


class Bars:
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


class WorkerHint:
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
        """From ``Progress``: the run is being watched (``--wait``, ``wait``)."""
        if st["finished"] or st["workers"] or not st["in_flight_images"]:
            return
        if self.due():
            moved = any(c["done"] or c["failed"] for c in st["steps"].values())
            self.say(self.message(moved, st["in_flight_images"]))


class Progress:
    """Run progress: one bar per step on a terminal, a line every 10 s otherwise; and the
    ``WorkerHint`` when no worker takes the run's tasks (not for ``producer run``: its worker is
    in this process)."""

    def __init__(self, hint: bool = True) -> None:
        self.bars: dict[str, tqdm] = {}
        self.last = 0.0
        self.hint = WorkerHint() if hint else None

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


def watch(state, timeout: float | None, *, hint: bool = True) -> dict:
    """Wait for the run, showing progress (``Progress``); a timeout exits 5 (UNFINISHED)."""
    from producer.submit import wait

    show = Progress(hint=hint)
    try:
        return wait(state, timeout=timeout, on_status=show)
    except TimeoutError as exc:
        fail(f"{exc}; it goes on: `producer wait --results-dir ...` watches it again", ExitCode.UNFINISHED)
    finally:
        show.close()


def print_seed(report: SeedReport, notes: list[str]) -> None:
    typer.echo(report.summary(), err=True)
    for p in report.problems[:20]:
        typer.echo(f"  warning: {p}", err=True)
    if len(report.problems) > 20:
        typer.echo(f"  ... {len(report.problems) - 20} more (see failures.jsonl for unreadable images)", err=True)
    for note in notes:
        typer.echo(f"warning: {note}", err=True)


def on_seeded(bars: Bars | None):
    """``submit``'s ``on_seeded``: the seed summary as soon as the seed is written (before the
    publish, which may wait on the window for minutes)."""

    def show(report: SeedReport, notes: list[str]) -> None:
        if bars is not None:
            bars.close()
        print_seed(report, notes)

    return show


def nothing_seeded(spec: Spec, report: SeedReport) -> None:
    from producer.seed import why_nothing_seeded

    typer.echo(f"error: {why_nothing_seeded(spec, report)}. Nothing was enqueued (exit {int(ExitCode.NONE_DONE)}).",
               err=True)


def warn_if_in_flight(layout: Layout) -> None:
    """Say so when the run still has images in flight: finalize needs no Redis and runs anyway,
    but the images still being worked on come out as missing, and a worker appending meanwhile
    makes the done index point into merged parts (re-found on use, reindexed at the next
    enqueue). Best effort: a Redis that does not answer within a second is not asked."""
    import redis

    from producer.outage import redact
    from producer.runs import read_run_file
    from worker import settings
    from worker.errors import PipelineError
    from worker.runstate import RunState

    try:
        run_id = read_run_file(layout).get("run_id")
    except PipelineError:
        return
    if not run_id:
        return
    url = settings.state_url()
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        in_flight = RunState(client, run_id).queued_count()
    except redis.RedisError:
        return
    finally:
        client.close()
    if in_flight:
        typer.echo(f"warning: {in_flight} images of this run are still in flight (Redis at {redact(url)}): "
                   "they will be listed as missing. `producer wait --results-dir "
                   f"{layout.root}` waits for them; finalize again after that", err=True)


def finalize_and_report(layout: Layout, steps: list[int], prices: dict | None = None, *, seed_failed: int = 0,
                         retry: str | None = None) -> ExitCode:
    """Finalize, print what was written and why images are missing; return the exit code.

    ``retry``: how to try the failed images again (default: ``producer retry-failed``)."""
    from producer.finalize import finalize
    from producer.summary import commonest_failures
    from producer.usage import format_usage

    rep = finalize(layout, steps, prices, seed_failed=seed_failed)
    if rep.stale_removed:
        # Every leftover is counted: the temp files, and the folders of sorted runs (``.sort-*``).
        folders = sum(1 for name, _ in rep.stale_removed if ".sort-" in name)
        what = f"{len(rep.stale_removed) - folders} temp file(s)"
        what += f" and {folders} temp folder(s)" if folders else ""
        typer.echo(f"removed {what} an interrupted finalize left in {layout.root} "
                   f"({sum(size for _, size in rep.stale_removed) / 1e6:.1f} MB)", err=True)
    unseeded = f", {seed_failed} could not be seeded" if seed_failed else ""
    typer.echo(f"wrote {rep.path} ({rep.written} images; {rep.n_failed} failed, {rep.n_missing} missing"
               f"{unseeded})")
    if rep.usage.get("total", {}).get("calls"):
        typer.echo("\n".join(format_usage(rep.usage)))
    retry = retry or f"`producer retry-failed --results-dir {layout.root}` tries them again"
    if rep.failed:
        typer.echo(f"  failed images: {', '.join(rep.failed[:20])}{' ...' if rep.n_failed > 20 else ''}"
                   f" — details in {layout.failures.path}; {retry}", err=True)
        for line in commonest_failures(layout, set(rep.failed)):
            typer.echo(f"  {line}", err=True)
    not_done = rep.n_failed + rep.n_missing + seed_failed
    code = for_images(rep.written, not_done)
    total = rep.written + not_done
    if code == ExitCode.NONE_DONE:
        typer.echo(f"error: no image is done: all {total} failed (exit {int(code)})", err=True)
    elif code == ExitCode.SOME_FAILED:
        typer.echo(f"{not_done} of {total} images not done (exit {int(code)})", err=True)
    return code


def stopped_watching(root: Path) -> NoReturn:
    typer.echo(f"\ninterrupted: the run goes on on the workers; `producer wait --results-dir {root}` watches it "
               "again and finalizes it", err=True)
    raise typer.Exit(130)
