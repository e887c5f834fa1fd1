"""The ``producer`` command line.

Every command validates its inputs first and exits with status 2 and one clear message on a
user error; per-image problems never stop a run (they are counted and listed). Exit codes follow
one policy for every command: ``producer/exitcodes.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from producer import estimate as estimate_cmd
from producer import export as export_cmd
from producer import preview as preview_cmd
from producer.console import (
    Bars,
    Progress,
    WorkerHint,
    finalize_and_report,
    nothing_seeded,
    on_seeded,
    run_gone,
    stopped_watching,
    warn_if_in_flight,
    watch,
)
from producer.enqueue import DEFAULT_MAX_INFLIGHT
from producer.exitcodes import HELP as EXIT_CODES_HELP
from producer.exitcodes import ExitCode, fail, for_images, user_errors
from producer.local import run_local, spec_keys
from worker.spec import Spec, default_spec_yaml, load_spec

if TYPE_CHECKING:
    import redis

    from producer.guard import Busy, Claim, Holder, ResultsLock

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
    max_inflight: MaxInflight = DEFAULT_MAX_INFLIGHT,
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
        for var in spec_keys(s):
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

    bars = Bars()
    try:
        sub = submit(s, client, max_inflight=max_inflight, progress=bars, publishers=publishers, held=held,
                     on_seeded=on_seeded(bars), on_wait=WorkerHint().on_window)
    except KeyboardInterrupt:
        bars.close()
        typer.echo("\ninterrupted: nothing is lost. Re-run the same command to finish the enqueue "
                   "(queued and done images are not sent again).", err=True)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    bars.close()
    if sub.seed.images == 0:
        nothing_seeded(sub.run.spec, sub.seed)
        return ExitCode.NONE_DONE
    e = sub.enqueue
    typer.echo(f"run {sub.run.run_id}: enqueued {e.enqueued} images ({e.already_done} already done, "
               f"{e.already_queued} already queued) -> {sub.run.layout.root}")
    if not wait_:
        typer.echo(f"watch: producer status --results-dir {sub.run.layout.root}   (or Flower on :5555)")
        return ExitCode.OK
    try:
        watch(sub.run.state, timeout)
    except RunNotInRedis:
        run_gone(sub.run.layout, sub.run.run_id)
    except KeyboardInterrupt:
        stopped_watching(sub.run.layout.root)
    return finalize_and_report(sub.run.layout, sub.run.spec.ire.workflow.steps,
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
    show = Progress()
    try:
        st = watch_joined(state, lock, timeout=timeout, on_status=show)
    except RunNotInRedis:
        run_gone(Layout(busy.root), holder.run_id)
    except TimeoutError as exc:
        fail(str(exc), ExitCode.UNFINISHED)
    except KeyboardInterrupt:
        stopped_watching(busy.root)
    finally:
        show.close()
    if st is None:
        return None
    meta = state.meta()
    return finalize_and_report(Layout(busy.root), meta.get("steps", []), run_prices(state, meta),
                                seed_failed=int(meta.get("seed_failed", 0)))


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


@app.command()
def status(
    results_dir: RequiredResults,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    stale: Annotated[bool, typer.Option("--stale", help="Also scan the sinks: how many done image-steps are stale "
                                        "against the run's spec (run.spec.yaml, its last enqueue), and their cost. "
                                        "Reads every record and image hash.")] = False,
) -> None:
    """Images, done / failed / blocked / pending per step, throughput, ETA, workers, budget."""
    from producer.runs import connect, existing_run
    from producer.status import RunNotInRedis, format_status
    from producer.status import status as get_status
    from producer.summary import SUMMARY_FILE, format_local, local_run
    from worker.layout import Layout

    # A `producer run` took its Redis with it: its results dir speaks for it (summary.json).
    layout = Layout(results_dir.expanduser().resolve())
    local = local_run(layout)
    if local is not None:
        out = local.to_json()
        if stale:
            out["stale"] = _stale_or_exit(layout, json_)
        typer.echo(json.dumps(out) if json_ else format_local(local, str(results_dir / SUMMARY_FILE)))
        if stale and not json_:
            _print_stale(layout, out["stale"])
        return
    with user_errors():
        run_id, layout, state = existing_run(results_dir, connect())
        try:
            st = get_status(state)
        except RunNotInRedis:
            run_gone(layout, run_id, as_json=json_)
        if stale:
            st["stale"] = _stale_or_exit(layout, json_)
        typer.echo(json.dumps(st) if json_ else format_status(st))
        if stale and not json_:
            _print_stale(layout, st["stale"])


def _stale_or_exit(layout, as_json: bool) -> dict:
    """``status --stale``: the stale count against the run's own spec (``run.spec.yaml``)."""
    from producer.runs import stored_spec
    from producer.stale import stale_report
    from worker.errors import ConfigError

    with user_errors():
        spec = stored_spec(layout)
        if spec is None:
            raise ConfigError(f"{layout.root}: no run.spec.yaml (a run enqueued before it was written): run "
                              "`producer estimate -c SPEC --results-dir ...` with its spec instead")
        return stale_report(spec, layout).to_json()


def _print_stale(layout, stale: dict) -> None:
    from producer.runs import stored_spec
    from producer.stale import StaleReport, StepStale, format_stale

    report = StaleReport([StepStale(**s) for s in stale["steps"]], stale["images_unreadable"], stale["cost"])
    for line in format_stale(report, stored_spec(layout)):
        typer.echo(line)


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
            st = watch(state, timeout)
        except RunNotInRedis:
            run_gone(layout, run_id)
        except KeyboardInterrupt:
            stopped_watching(layout.root)
        meta = state.meta()
        seed_failed = int(meta.get("seed_failed", 0))
        if finalize_:
            from producer.usage import run_prices

            code = finalize_and_report(layout, meta.get("steps", []), run_prices(state, meta),
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
        warn_if_in_flight(layout)
        code = finalize_and_report(layout, steps, spec.ire.vlm.prices.model_dump() if spec else None)
    raise typer.Exit(code)


@app.command("retry-failed")
def retry_failed_cmd(results_dir: RequiredResults, max_inflight: MaxInflight = DEFAULT_MAX_INFLIGHT) -> None:
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
                run_gone(layout, run_id)
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
