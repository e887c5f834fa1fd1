"""One run through the real fleet (Redis, ``celery -A worker worker`` processes, ``producer
enqueue``) against the fake endpoint, watched from outside; and the same images through TAO's
barrier schedule built on our step functions, for comparison.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    Deadline,
    Fake,
    FakeSampler,
    SinkTailer,
    cpu_seconds,
    pct,
    producer_popen,
    redis_client,
    rss_mb,
    run_id,
    run_key,
    settled_count,
    spec_args,
    stop_group,
    worker_env,
)

LOGNORMAL_SIGMA = math.log(5) / 2.326  # as tests/support/fake_vlm.py: p99 = 5x the median


def mean_latency(latency: float, dist: str) -> float:
    """The expected call latency of the fake's distribution (the lognormal's mean, not its median)."""
    return latency * math.exp(LOGNORMAL_SIGMA**2 / 2) if dist == "lognormal" else latency


@dataclass
class RunResult:
    images: int = 0
    finished: int = 0
    calls: int = 0
    status_counts: dict = field(default_factory=dict)
    max_in_flight: int = 0
    launch_to_first_call: float = float("nan")
    window: float = float("nan")  # first VLM call start -> last image finished
    makespan_from_launch: float = float("nan")
    first_finished: float = float("nan")  # first call start -> first image through step 3
    first_full: float = float("nan")  # ... -> first image whose step 3 called the model (all four calls)
    image_latency: list[float] = field(default_factory=list)  # per image: first call start -> step 3
    mean_in_flight: float = float("nan")
    steady_in_flight: float = float("nan")  # the middle 80% of the window
    ramp: float = float("nan")  # first call -> 90% of C in flight
    drain: float = float("nan")  # last time 90% of C were in flight -> last image done
    cpu: dict = field(default_factory=dict)  # process -> CPU seconds used during the run
    rss: dict = field(default_factory=dict)
    bound_hit: bool = False
    profile: str | None = None
    redis_commands: dict = field(default_factory=dict)  # command -> calls during the run
    redis_used_mb: float = float("nan")  # Redis used_memory above its level at launch, highest sample

    def calls_per_s(self) -> float:
        return self.calls / self.window if self.window and self.window > 0 else float("nan")


def run_fleet(*, redis_url: str, fake: Fake, workers: list, images_dir: Path, labels_dir: Path,
              results: Path, concurrency: int, deadline: Deadline, extra: tuple[str, ...] = (),
              profile_seconds: float = 0.0, profile_out: Path | None = None, redis_pid: int | None = None,
              fake_pid: int | None = None, other_pids: dict[str, int] | None = None,
              max_inflight: int = 1_000_000) -> RunResult:
    """Enqueue every image once, wait until every image settled step 3 (or the bound), measure.
    ``other_pids`` (name -> pid) are counted in the CPU figures too (a Redis proxy, say).
    ``max_inflight`` is the producer's window (by default no bound: every image at once)."""
    shutil.rmtree(results, ignore_errors=True)
    fake.reset()
    r = redis_client(redis_url)
    env = worker_env(redis_url)
    res = RunResult()
    tailer = SinkTailer(results).start()
    sampler = FakeSampler(fake).start()
    pids = {w.name: w.pid for w in workers}
    if fake_pid:
        pids["fake"] = fake_pid
    if redis_pid:
        pids["redis"] = redis_pid
    pids.update(other_pids or {})
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    cmd0 = _commandstats(r)
    mem0 = int(r.info("memory")["used_memory"])
    mem_max, next_mem = mem0, 0.0
    t_launch = time.monotonic()
    prod = producer_popen(env, "enqueue", *spec_args(backend="openai", fake=fake, results=results,
                                                     images=images_dir, labels=labels_dir,
                                                     concurrency=concurrency, extra=extra),
                          "--max-inflight", str(max_inflight), log=results.parent / f"{results.name}-producer.log")
    prof_thread = None
    try:
        while not (results / "run.json").exists():
            if deadline.hit or prod.poll() not in (None, 0):
                raise RuntimeError(f"producer did not start a run (exit {prod.poll()})")
            time.sleep(0.02)
        rid = run_id(results)
        images = 0
        while images == 0 and not deadline.hit:
            raw = r.hget(run_key(rid, "meta"), "images")
            images = int(raw) if raw else 0
            if prod.poll() not in (None, 0):
                raise RuntimeError(f"producer exited {prod.returncode}")
            time.sleep(0.02)
        res.images = images
        while not deadline.hit:
            settled = settled_count(r, rid)
            if settled >= images:
                break
            if time.monotonic() >= next_mem:  # the window's messages, sampled twice a second
                mem_max, next_mem = max(mem_max, int(r.info("memory")["used_memory"])), time.monotonic() + 0.5
            # Profile the steady state: 3 s after the first call (clients built, imports done).
            first = sampler.first_call()
            if (profile_seconds and profile_out is not None and prof_thread is None and first is not None
                    and time.monotonic() - first > 3):
                prof_thread = threading.Thread(target=_py_spy, args=(workers[0].pid, profile_seconds, profile_out),
                                               daemon=True)
                prof_thread.start()
            time.sleep(0.05)
        else:
            res.bound_hit = True
    finally:
        if prod.poll() is None:
            stop_group(prod, timeout=10)
        tailer.stop()
        sampler.stop()
    cmd1 = _commandstats(r)
    res.redis_used_mb = round((mem_max - mem0) / 2**20, 2)
    res.redis_commands = {k: v - cmd0.get(k, 0) for k, v in cmd1.items() if v - cmd0.get(k, 0) > 0}
    for k, p in pids.items():
        res.cpu[k] = round(cpu_seconds(p) - cpu0[k], 2)
        res.rss[k] = round(rss_mb(p), 1)
    if prof_thread is not None:
        prof_thread.join(profile_seconds + 30)
        res.profile = str(profile_out)
    st = fake.stats()
    res.calls = int(st["calls"])
    res.status_counts = st["status_counts"]
    res.max_in_flight = int(st["max_in_flight"])
    ev = tailer.events
    starts = [e.seen - e.latency for s in (0, 1) for e in ev[s].values() if e.latency > 0]
    t_first = min([*starts, *(t for t in [sampler.first_call()] if t is not None)], default=float("nan"))
    ends = [e.seen for e in ev[3].values()]
    res.finished = len(ends)
    if ends and not math.isnan(t_first):
        t_last = max(ends)
        res.launch_to_first_call = t_first - t_launch
        res.window = t_last - t_first
        res.makespan_from_launch = t_last - t_launch
        res.first_finished = min(ends) - t_first
        full_ends = [e.seen for e in ev[3].values() if e.latency > 0]
        res.first_full = min(full_ends) - t_first if full_ends else float("nan")
        res.mean_in_flight = sampler.mean_in_flight(t_first, t_last)
        span = t_last - t_first
        res.steady_in_flight = sampler.mean_in_flight(t_first + 0.1 * span, t_last - 0.1 * span)
        full = [t for t, _, f in sampler.samples if f >= 0.9 * concurrency]
        if full:
            res.ramp, res.drain = full[0] - t_first, t_last - full[-1]
        for image_id, e3 in ev[3].items():
            begin = [ev[s][image_id].seen - ev[s][image_id].latency for s in (0, 1) if image_id in ev[s]]
            if begin:
                res.image_latency.append(e3.seen - min(begin))
    return res


def warm_up(*, redis_url: str, fake: Fake, workers: list, workdir: Path, fmt: str, concurrency: int,
            deadline: Deadline, images: int = 16) -> float:
    """A few images through the fleet first, so the measured run sees a fleet that has been up:
    each worker process imports the VLM SDK and builds its client on its first task (~0.5 s of
    CPU on this machine, during which its other threads wait), once per process lifetime."""
    from bench.common import make_dataset

    t = time.monotonic()
    images_dir, labels_dir = make_dataset(workdir / f"data-{fmt}-{images}", images, fmt=fmt)
    run_fleet(redis_url=redis_url, fake=fake, workers=workers, images_dir=images_dir, labels_dir=labels_dir,
              results=workdir / "results-warmup", concurrency=concurrency, deadline=deadline)
    return time.monotonic() - t


def run_layouts(a, *, redis_url: str, fake: Fake, images_dir: Path, labels_dir: Path, deadline: Deadline,
                tag: str, profile_seconds: float, worker_redis_url: str | None = None,
                other_pids: dict[str, int] | None = None) -> Iterator[tuple[int, int, RunResult | None]]:
    """For each ``workers x threads`` layout in ``a.layout``: a flushed Redis, fresh workers
    (warmed on ``a.warmup`` images), and one measured run. Yields ``(n, threads, result)``;
    the result is None when the time bound left no room for the layout. ``worker_redis_url``:
    how the workers reach Redis (e.g. through a delaying proxy), when not ``redis_url``."""
    from bench.common import workers

    redis_pid = int(redis_client(redis_url).info("server")["process_id"])
    for layout in a.layout.split(","):
        n, t = (int(x) for x in layout.lower().split("x"))
        if deadline.left() < 30:
            print(f"-- {layout}: skipped (time bound)")
            yield n, t, None
            continue
        redis_client(redis_url).flushdb()
        prof = a.workdir / f"profile-{tag}-{layout}.txt"
        prof.unlink(missing_ok=True)
        with workers(worker_redis_url or redis_url, n, t, a.workdir / "logs", events=not a.no_events,
                     switch_interval=a.switch_interval) as ws:
            if a.warmup:
                warm_up(redis_url=redis_url, fake=fake, workers=ws, workdir=a.workdir, fmt=a.fmt,
                        concurrency=a.concurrency, deadline=deadline, images=a.warmup)
            yield n, t, run_fleet(redis_url=redis_url, fake=fake, workers=ws, images_dir=images_dir,
                                  labels_dir=labels_dir, results=a.workdir / f"results-{tag}-{layout}",
                                  concurrency=a.concurrency, deadline=deadline, redis_pid=redis_pid,
                                  fake_pid=fake.proc.pid, profile_seconds=profile_seconds, profile_out=prof,
                                  other_pids=other_pids, max_inflight=getattr(a, "max_inflight", 1_000_000))


def _commandstats(r) -> dict[str, int]:
    """Calls per Redis command so far (INFO commandstats)."""
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()}


def _py_spy(pid: int, seconds: float, out: Path) -> None:
    """Sample one worker with py-spy for ``seconds``, twice at once: ``out`` gets the thread
    holding the GIL (where the worker's CPU goes), ``out.wall`` every thread, idle ones included
    (where a task's wall time goes). Collapsed-stack (raw) format."""
    exe = shutil.which("py-spy") or str(Path(__import__("sys").executable).with_name("py-spy"))
    base = [exe, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "100", "-f", "raw",
            "--nonblocking"]
    procs = [subprocess.Popen([*base, "--gil", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
             subprocess.Popen([*base, "--idle", "-o", str(out) + ".wall"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    for p in procs:
        try:
            p.wait(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _ours(frame: str) -> bool:
    loc = _loc(frame)
    return loc.startswith(("worker/", "producer/"))


def _loc(frame: str) -> str:
    return frame.rsplit(" (", 1)[1].rstrip(")") if " (" in frame else ""


def _fn(frame: str) -> str:
    return frame.rsplit(" (", 1)[0]


def _lib(frame: str) -> str:
    loc = _loc(frame)
    return loc.split("/")[0].split(".py")[0].split(":")[0] if loc else "?"


def _bucket(frames: list[str]) -> tuple[str, str]:
    """(thread kind, what it was doing) for one sampled stack."""
    fns = [_fn(f) for f in frames]
    leaf = frames[-1]
    if "apply_target" in fns:  # a pool thread running a task
        ours = [f for f in frames if _ours(f)]
        if not ours:
            return "task threads", f"celery around the task: {fns[-1]} ({_lib(leaf)})"
        deepest = ours[-1]
        where = f"{_fn(deepest)} ({_loc(deepest)})"
        tail = "" if _ours(leaf) else f" -> {_lib(leaf)}"
        if "OpenAICompatClient.generate" in fns or "GeminiClient.generate" in fns:
            return "task threads", f"VLM call via the SDK{tail}"
        if "load_payload" in fns:
            return "task threads", f"load_payload (read + decode the image){tail}"
        if _fn(deepest) in ("step_task", "run_task", "_attempt"):
            nxt = frames[frames.index(deepest) + 1] if frames.index(deepest) + 1 < len(frames) else leaf
            return "task threads", f"{where}: {_fn(nxt)} ({_lib(nxt)})"
        return "task threads", f"{where}{tail}"
    if "_worker" in fns and fns[-1] in ("_worker", "get", "wait", "acquire"):
        return "task threads", "idle, waiting for a task"
    if "asynloop" in fns:
        i = fns.index("asynloop")
        rest = [f for f in fns[i + 1:] if f not in ("Hub.create_loop", "promise.__call__")]
        return "event loop", (rest[0] if rest else "asynloop") + f" ({_lib(leaf)})"
    return "other threads", f"{fns[min(len(fns) - 1, 3)]} ... {fns[-1]} ({_lib(leaf)})"


def summarize_profile(path: Path, top: int = 14) -> list[str]:
    """Where one worker's time went: CPU (the GIL holder) and wall time (every thread)."""
    out: list[str] = []
    for label, p in (("CPU (thread holding the GIL)", path), ("wall time, every thread", Path(str(path) + ".wall"))):
        if not p.exists():
            out.append(f"(no {label} profile: py-spy failed or is missing; pip install -e '.[bench]')")
            continue
        total = 0
        kinds: dict[str, int] = {}
        buckets: dict[tuple[str, str], int] = {}
        for line in p.read_text(errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            count = int(n)
            total += count
            kind, what = _bucket(stack.split(";"))
            kinds[kind] = kinds.get(kind, 0) + count
            buckets[(kind, what)] = buckets.get((kind, what), 0) + count
        if not total:
            out.append(f"(empty {label} profile)")
            continue
        out.append(f"py-spy, {label}: {total} samples; " + ", ".join(
            f"{k} {100 * v / total:.0f}%" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
        for (kind, what), v in sorted(buckets.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"  {100 * v / total:5.1f}%  [{kind}] {what}")
    return out


def print_run(label: str, res: RunResult, *, concurrency: int, latency: float, dist: str) -> dict:
    """Print a fleet run's figures; return them as a dict."""
    lat = sorted(res.image_latency)
    ideal = concurrency / mean_latency(latency, dist) if latency > 0 else float("nan")
    eff = res.calls_per_s() / ideal if latency > 0 else float("nan")
    fig = {
        "label": label, "images": res.images, "finished": res.finished, "calls": res.calls,
        "status_counts": res.status_counts, "max_in_flight": res.max_in_flight,
        "calls_per_s": round(res.calls_per_s(), 2), "ideal_calls_per_s": round(ideal, 2),
        "efficiency": round(eff, 3), "mean_in_flight": round(res.mean_in_flight, 2),
        "steady_in_flight": round(res.steady_in_flight, 2), "ramp_s": round(res.ramp, 2),
        "drain_s": round(res.drain, 2),
        "window_s": round(res.window, 2), "makespan_from_launch_s": round(res.makespan_from_launch, 2),
        "launch_to_first_call_s": round(res.launch_to_first_call, 2),
        "first_image_s": round(res.first_finished, 2),
        "image_latency_p50_s": round(pct(lat, 0.5), 2), "image_latency_p99_s": round(pct(lat, 0.99), 2),
        "images_per_s": round(res.finished / res.window, 2) if res.window > 0 else None,
        "cpu_s": res.cpu, "rss_mb": res.rss, "bound_hit": res.bound_hit, "redis_used_mb": res.redis_used_mb,
    }
    partial = " (PARTIAL: time bound hit)" if res.bound_hit else ""
    print(f"-- {label}{partial}")
    print(f"   images {res.finished}/{res.images} through step 3; VLM calls {res.calls} "
          f"(HTTP {res.status_counts}); max in flight at the endpoint {res.max_in_flight}")
    print(f"   window (first call -> last image done) {res.window:.2f} s; producer launch -> first call "
          f"{res.launch_to_first_call:.2f} s; makespan from launch {res.makespan_from_launch:.2f} s")
    if latency > 0:
        print(f"   calls/s {res.calls_per_s():.2f} vs C/L = {concurrency}/{mean_latency(latency, dist):.3f} = "
              f"{ideal:.2f}  -> efficiency {eff:.3f}; mean calls in flight {res.mean_in_flight:.1f}/{concurrency} "
              f"(middle 80% of the window: {res.steady_in_flight:.1f}); "
              f"ramp to 90% of C {res.ramp:.2f} s, drain from 90% {res.drain:.2f} s")
    else:
        print(f"   calls/s {res.calls_per_s():.1f}; images/s {fig['images_per_s']}")
    print(f"   per-image latency (first call start -> step 3 done): p50 {pct(lat, 0.5):.2f} s, "
          f"p99 {pct(lat, 0.99):.2f} s; first image done {res.first_finished:.2f} s after the first call")
    if latency > 0:
        # Depth-first targets (issue 15): first image within 5 L, p50 under 10 L, and the window
        # against the lower bound work / C (= 1 / efficiency).
        fig["first_image_L"] = round(res.first_finished / latency, 1)
        fig["first_full_image_s"] = round(res.first_full, 2)
        fig["first_full_image_L"] = round(res.first_full / latency, 1)
        fig["image_latency_p50_L"] = round(pct(lat, 0.5) / latency, 1)
        fig["window_over_work_per_C"] = round(1 / eff, 3) if eff > 0 else None
        print(f"   in L units: first image {fig['first_image_L']} L (first with all four calls "
              f"{fig['first_full_image_L']} L), per-image p50 {fig['image_latency_p50_L']} L; "
              f"window / (work / C) = {fig['window_over_work_per_C']}")
    print(f"   CPU s during the run: {res.cpu}; RSS MB at end: {res.rss}; Redis used_memory at most "
          f"+{res.redis_used_mb} MB over its level at launch")
    tasks = 4 * res.finished
    if tasks and res.redis_commands:
        total = sum(res.redis_commands.values())
        top = sorted(res.redis_commands.items(), key=lambda kv: -kv[1])[:12]
        print(f"   Redis commands per task (all clients, bench polling included): {total / tasks:.1f}: "
              + ", ".join(f"{k} {v / tasks:.2f}" for k, v in top))
        fig["redis_commands_per_task"] = round(total / tasks, 1)
    return fig


# --------------------------------------------------------------------------- direct step calls

class _DirectRun:
    """Our step functions called directly (no Celery, no Redis) against the fake: the seeded
    images, one client, and each step's records in memory and in a sink, as a worker keeps them."""

    def __init__(self, *, fake: Fake, images_dir: Path, labels_dir: Path, results: Path, concurrency: int,
                 name: str):
        from producer.runs import normalise
        from producer.seed import SeedReport, iter_seed, write_seed
        from worker.clients.factory import get_client
        from worker.sinks import JsonlSink
        from worker.spec import load_spec
        from worker.steps import StepOptions
        from worker.steps.prompts import load_prompts

        shutil.rmtree(results, ignore_errors=True)
        results.mkdir(parents=True)
        p = "image_referring_expression"
        spec = normalise(load_spec(None, [
            f"{p}.vlm.backend=openai", f"{p}.vlm.openai.base_url={fake.openai_base_url}",
            f"{p}.vlm.openai.model_name=fake-vl", f"{p}.vlm.openai.timeout=60",
            f"{p}.vlm.max_concurrency={concurrency}", f"{p}.data.image_dir={images_dir}",
            f"{p}.data.kitti_label_dir={labels_dir}", f"results_dir={results}"]))
        write_seed(spec, results, SeedReport())
        self.seeds = {rec["image_id"]: rec for _, rec in iter_seed(results / "seed_annotations.jsonl")}
        self.vlm = spec.ire.vlm
        self.client = get_client(self.vlm)
        self.templates = load_prompts("")
        self.options = StepOptions.from_vlm(self.vlm)
        self.records: dict[int, dict[str, dict]] = {0: {}, 1: {}, 2: {}, 3: {}}
        self.sinks = {s: JsonlSink(results / f"{name}_step_{s}.jsonl") for s in range(4)}
        self.lock = threading.Lock()
        fake.reset()  # the calls counted from here are the run's

    def ready(self, step: int, image_id: str) -> bool:
        """Whether the step's required upstream record is there (a failed one blocks it)."""
        need = {2: 0, 3: 2}.get(step)
        return need is None or image_id in self.records[need]

    def call(self, step: int, image_id: str) -> dict | None:
        """Run one image-step; its record (appended to the sink), or None if it failed. The
        caller keeps it in ``records``, under ``lock`` with whatever it decides from it."""
        from worker.steps import input_record, run_step

        with self.lock:
            upstream = {s: self.records[s][image_id] for s in (0, 1, 2) if image_id in self.records[s]}
        try:
            rec = run_step(step, input_record(step, self.seeds[image_id], upstream), self.client, self.templates,
                           max_pixels=self.vlm.max_image_pixels, options=self.options).record
        except Exception:
            return None
        self.sinks[step].append(rec)
        return rec


# --------------------------------------------------------------------------- the barrier schedule

@dataclass
class BarrierResult:
    images: int = 0
    calls: int = 0
    phases: list[float] = field(default_factory=list)
    makespan: float = float("nan")
    failures: int = 0
    bound_hit: bool = False


def run_barrier(*, fake: Fake, images_dir: Path, labels_dir: Path, results: Path, concurrency: int,
                deadline: Deadline, phase1: str = "split") -> BarrierResult:
    """TAO's schedule on our step functions: every image through steps 0 and 1, then all through
    step 2, then all through step 3; each step its own ThreadPoolExecutor, the real OpenAI client
    against the same endpoint, the same total concurrency. ``phase1``: ``split`` runs steps 0 and
    1 together on two pools of C/2; ``shared`` gives phase 1 one pool of C for both steps."""
    run = _DirectRun(fake=fake, images_dir=images_dir, labels_dir=labels_dir, results=results,
                     concurrency=concurrency, name="barrier")
    out = BarrierResult(images=len(run.seeds))

    def one(step: int, image_id: str) -> None:
        if deadline.hit or not run.ready(step, image_id):
            return
        rec = run.call(step, image_id)
        with run.lock:
            if rec is None:
                out.failures += 1
            else:
                run.records[step][image_id] = rec

    ids = sorted(run.seeds)
    t0 = time.monotonic()
    if phase1 == "split":
        half = max(1, concurrency // 2)
        with ThreadPoolExecutor(half) as pool0, ThreadPoolExecutor(concurrency - half) as pool1:
            futures = [pool0.submit(one, 0, i) for i in ids] + [pool1.submit(one, 1, i) for i in ids]
            for f in futures:
                f.result()
    else:
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(one, s, i) for s in (0, 1) for i in ids]:
                f.result()
    out.phases.append(time.monotonic() - t0)
    for step in (2, 3):
        t = time.monotonic()
        with ThreadPoolExecutor(concurrency) as pool:
            for f in [pool.submit(one, step, i) for i in ids]:
                f.result()
        out.phases.append(time.monotonic() - t)
    out.makespan = time.monotonic() - t0
    out.bound_hit = deadline.hit
    out.calls = int(fake.stats()["calls"])
    return out


# --------------------------------------------------------------------------- an in-process baseline

def run_inprocess(*, fake: Fake, images_dir: Path, labels_dir: Path, results: Path, concurrency: int,
                  deadline: Deadline) -> BarrierResult:
    """The same per-image dependency graph as the fleet (0 and 1, then 2, then 3), scheduled by
    C threads in this one process with no Celery and no Redis: what the endpoint and the client
    allow on this machine, so the fleet's gap to it is the orchestration's own cost."""
    import queue

    run = _DirectRun(fake=fake, images_dir=images_dir, labels_dir=labels_dir, results=results,
                     concurrency=concurrency, name="inproc")
    records, lock = run.records, run.lock
    out = BarrierResult(images=len(run.seeds))
    todo: queue.Queue = queue.Queue()
    left = [len(run.seeds)]
    finished = threading.Event()
    for image_id in sorted(run.seeds):
        todo.put((0, image_id))
        todo.put((1, image_id))

    def worker() -> None:
        while not finished.is_set():
            try:
                step, image_id = todo.get(timeout=0.2)
            except queue.Empty:
                continue
            rec = run.call(step, image_id)
            with lock:
                if rec is not None:
                    records[step][image_id] = rec
                else:
                    out.failures += 1
                nxt = None
                if step in (0, 1) and image_id in records[0] and image_id in records[1]:
                    nxt = 2
                elif step == 2:
                    nxt = 3
                if step == 3 or (rec is None and step != 1):
                    left[0] -= 1
                    if left[0] == 0:
                        finished.set()
            if nxt is not None and rec is not None:
                todo.put((nxt, image_id))
            if deadline.hit:
                finished.set()

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    finished.wait()
    out.makespan = time.monotonic() - t0
    for t in threads:
        t.join(1)
    out.bound_hit = deadline.hit
    out.calls = int(fake.stats()["calls"])
    return out
