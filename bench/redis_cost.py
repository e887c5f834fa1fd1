"""Issue 16: what one task costs Redis, and what a finished image-step leaves in it.

A run of N images through the real fleet (a private redis-server, 2 ``celery -A worker worker``
processes, ``producer enqueue`` as a user runs it) against the fake endpoint at L = 0 (or the
offline teacher: ``--backend offline``, no fleet budget), measured from Redis itself:

- **commands per task**, by command (``INFO commandstats`` before and after; tasks = the image-steps
  run, 4 per image), everything Redis ran for the run: the producer's publishing, kombu's
  queue and acks, chord counting, results, the budget, our run state. The bench's own polling
  (one pipeline of ``HLEN``s every 0.25 s) and its ``INFO`` calls are subtracted;
- **round trips per task**: ``total_reads_processed`` (``INFO stats``): one socket read per
  request or pipeline that arrives; a close approximation of client round trips;
- with ``--monitor``, the same commands split by who sent them (the key family they touch,
  Lua scripts' inner calls shown apart): kombu, Celery's result backend, chord join keys, task
  events, the budget, our run state;
- with ``--status-at N``, how long ``producer status`` takes on a run whose index holds N images;
- **Redis bytes per finished image-step**: ``used_memory`` after the run has settled (queue
  empty, every image out of the in-flight set) minus before the run, divided by 4 N; with the
  remaining keys broken down by family (``MEMORY USAGE``), Celery's keys included. Celery's chord
  markers (``.c``) are still there then (they expire 300 s after their chord joined): the figure
  with their bytes subtracted is printed too, and ``--markers-wait 330`` reads memory once they
  have gone instead.

The whole run is done twice: workers with task events (``-E``, what Flower needs) and without,
and the two are reported separately.

    .venv/bin/python -m bench.redis_cost --images 300 --workdir /tmp/bench-redis
    .venv/bin/python -m bench.redis_cost --images 300 --monitor --events on
    .venv/bin/python -m bench.redis_cost --images 2000 --events off --status-at 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench.common import (
    Deadline,
    banner,
    emit_json,
    fake_vlm,
    make_dataset,
    producer_run,
    redis_client,
    redis_server,
    run_id,
    spec_args,
    worker_env,
    workers,
)
from worker.keys import QUEUE_LISTS, run_key

STEPS = 4
POLL = 0.25
#: Commands a poll of the bench sends (one pipeline, one round trip): HLEN x 4, BITCOUNT x 1.
POLL_COMMANDS = {"hlen": 4, "bitcount": 1}
#: Celery's chord "done" markers: read with the rest right after the run, but they expire
#: ``MARKERS_TTL`` s after their chord joined (O(rate), not O(N)); both figures are reported.
MARKERS = "celery-taskset-meta-*.c"
MARKERS_TTL = 300


def _commandstats(r) -> Counter:
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()})


def _reads(r) -> int:
    return int(r.info("stats").get("total_reads_processed", 0))


def _data_memory(r) -> int:
    """``used_memory`` less what client connections hold (their buffers come and go with the
    fleet's connections, not with the run's data)."""
    info = r.info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


def _wait_markers_gone(r, timeout: float) -> bool:
    """Wait (at most ``timeout`` s) until Redis has expired every chord marker; True if it did."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if next(r.scan_iter(match="celery-taskset-meta-*.c", count=1000), None) is None:
            return True
        time.sleep(2)
    return False


def key_family(key: str) -> str:
    """A Redis key's family, for the breakdowns: ids and hashes folded away."""
    if key.startswith("refexp:run:"):
        parts = key.split(":")
        return "refexp:run:*:" + ":".join(parts[3:4] + [p for p in parts[4:5] if not re.fullmatch(r"[0-9a-f]{8,}", p)])
    if key.startswith("refexp:ep:"):
        return "refexp:ep:*:" + key.split(":", 3)[-1].split(":")[0]
    if key.startswith("celery-task-meta-"):
        return "celery-task-meta-*"
    if key.startswith("celery-taskset-meta-"):
        tail = key[len("celery-taskset-meta-"):]
        m = re.search(r"\.([a-z])$", tail)
        return "celery-taskset-meta-*" + (f".{m.group(1)}" if m else "")
    if key.startswith("_kombu.binding."):
        return "_kombu.binding.*"
    return re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27,}", "*", key)


def key_breakdown(r) -> dict[str, tuple[int, int]]:
    """family -> (keys, bytes by MEMORY USAGE)."""
    out: dict[str, list[int]] = {}
    for raw in r.scan_iter(count=1000):
        key = raw.decode(errors="replace")
        fam = key_family(key)
        size = r.memory_usage(raw, samples=0) or 0
        acc = out.setdefault(fam, [0, 0])
        acc[0] += 1
        acc[1] += size
    return {k: (v[0], v[1]) for k, v in sorted(out.items(), key=lambda kv: -kv[1][1])}


class Monitor:
    """``MONITOR`` in a thread: every command Redis runs, attributed by the key family it names
    (a Lua script's own calls are counted under ``lua:``; the EVALSHA that ran them stays under
    its first key)."""

    def __init__(self, url: str):
        self.client = redis_client(url)
        self._poke = redis_client(url)
        self.counts: Counter = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self._poke.ping()  # any command wakes the listener, which then sees the flag
        self._thread.join(5)

    def _run(self) -> None:
        with contextlib.suppress(Exception), self.client.monitor() as m:
            for ev in m.listen():
                if self._stop.is_set():
                    return
                words = ev["command"].split(" ")
                name = words[0].strip('"').lower()
                if name in ("info", "monitor", "ping"):
                    continue
                key = _first_key(name, words[1:])
                who = "lua:" if ev.get("client_type") == "lua" else ""
                self.counts[f"{who}{name} {key_family(key) if key else '-'}"] += 1


def _first_key(name: str, args: list[str]) -> str:
    args = [a.strip('"') for a in args]
    if name in ("evalsha", "eval"):
        return args[2] if len(args) > 2 and args[1] != "0" else ""
    if name in ("multi", "exec", "time", "script", "client", "select", "hello", "discard"):
        return ""
    if name == "publish":
        return "channel:" + re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27,}", "*", args[0]) if args else ""
    return args[0] if args else ""


def one_run(url: str, *, images_dir: Path, labels_dir: Path, results: Path, backend: str, fake, n_workers: int,
            threads: int, events: bool, monitor: bool, logdir: Path, deadline: Deadline,
            concurrency: int | str = 32, markers_wait: float = 0) -> dict:
    r = redis_client(url)
    r.flushall()
    shutil.rmtree(results, ignore_errors=True)
    env = worker_env(url)
    mem0 = _data_memory(r)
    with workers(url, n_workers, threads, logdir, events=events) as _:
        mon = Monitor(url).start() if monitor else None
        cmd0, reads0 = _commandstats(r), _reads(r)
        t0 = time.monotonic()
        args = spec_args(backend=backend, fake=fake if backend == "openai" else None, results=results,
                         images=images_dir, labels=labels_dir, concurrency=concurrency)
        producer_run(env, "enqueue", *args, "--max-inflight", "1000000", timeout=max(10, deadline.left()))
        rid = run_id(results)
        polls = 0
        n = int(r.hget(run_key(rid, "meta"), "images") or 0)
        while not deadline.hit:
            pipe = r.pipeline(transaction=False)
            for kind in ("done", "failed", "blocked"):
                pipe.hlen(run_key(rid, kind, 3))
            pipe.hlen(run_key(rid, "queued"))
            pipe.bitcount(run_key(rid, "bits", 3))
            d, f, b, q, bits = pipe.execute()
            polls += 1
            if d + bits + f + b >= n and q == 0:
                break
            time.sleep(POLL)
        settled = not deadline.hit
        secs = time.monotonic() - t0
        cmd1, reads1 = _commandstats(r), _reads(r)
        if mon is not None:
            mon.stop()
        # The last chord cleanups and acks land within a round trip of the last mark; give the
        # queue a moment to drain its bookkeeping before memory is read.
        end = time.monotonic() + 5
        while time.monotonic() < end and (any(r.llen(q) for q in QUEUE_LISTS) or r.zcard("unacked_messages")):
            time.sleep(0.05)
    # Read with the workers gone and the monitor stopped: connections and their buffers are not
    # what the run leaves behind.
    mem1 = _data_memory(r)
    markers_gone = None
    if markers_wait:  # what stays once the chord markers have expired, read rather than subtracted
        markers_gone = _wait_markers_gone(r, markers_wait)
        mem1 = _data_memory(r)
    keys = key_breakdown(r)
    cmds = cmd1 - cmd0
    for name, k in POLL_COMMANDS.items():
        cmds[name] -= k * polls
    cmds.pop("info", None)
    cmds = +cmds
    tasks = STEPS * n
    reads = reads1 - reads0 - polls - 2  # the polls and the closing INFOs
    return {"events": events, "images": n, "tasks": tasks, "seconds": round(secs, 1), "settled": settled,
            "commands": sum(cmds.values()), "commands_per_task": round(sum(cmds.values()) / tasks, 2),
            "round_trips_per_task": round(reads / tasks, 2),
            "by_command": {k: round(v / tasks, 2) for k, v in cmds.most_common()},
            "by_sender": ({k: round(v / tasks, 2) for k, v in mon.counts.most_common()} if mon else None),
            "used_memory_before": mem0, "used_memory_after": mem1,
            "bytes_per_image_step": round((mem1 - mem0) / tasks, 1),
            "bytes_per_image_step_less_markers": round((mem1 - mem0 - keys.get(MARKERS, (0, 0))[1]) / tasks, 1),
            "markers_gone": markers_gone,
            "keys_after": {k: {"keys": c, "bytes": b, "per_image_step": round(b / tasks, 1)}
                           for k, (c, b) in keys.items()}}


def status_at(url: str, n: int, runs: int = 5) -> dict:
    """``producer status``'s Redis part (``producer.status.status``) on a run whose index holds
    ``n`` images done in every step (written as a reindex writes them: one bit per image-step,
    ``RunState.rebuild_index``): the seconds it takes, best and worst of ``runs``, and the bytes
    the index takes."""
    from producer.status import status
    from worker.runstate import RunState

    r = redis_client(url)
    r.flushall()
    state = RunState(r, "status-bench")
    state.set_meta(images=n, steps=list(range(STEPS)), enqueue_complete=True, enqueued_at=time.time())
    mem0 = _data_memory(r)
    rebuild = state.rebuild_index(range(STEPS), batch=5000)
    for step in range(STEPS):
        for i in range(n):
            rebuild.bit(step, i)
    rebuild.commit({})
    mem1 = _data_memory(r)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        st = status(state)
        times.append(time.perf_counter() - t)
    assert st["finished"] and st["steps"]["3"]["done"] == n
    r.flushall()
    return {"images": n, "status_s_best": round(min(times), 4), "status_s_worst": round(max(times), 4),
            "index_bytes_per_image_step": round((mem1 - mem0) / (STEPS * n), 1)}


def report(res: dict) -> None:
    ev = "with task events (-E)" if res["events"] else "without task events"
    print(f"-- {ev}: {res['images']} images, {res['tasks']} tasks in {res['seconds']} s"
          + ("" if res["settled"] else "  (PARTIAL: time bound hit)"))
    print(f"   Redis commands per task {res['commands_per_task']} ({res['commands']} in all); "
          f"round trips per task {res['round_trips_per_task']}")
    print("   by command (per task): " + ", ".join(f"{k} {v}" for k, v in res["by_command"].items()))
    if res["by_sender"]:
        print("   by command and key family (per task):")
        for k, v in res["by_sender"].items():
            if v >= 0.01:
                print(f"     {v:7.2f}  {k}")
    print(f"   used_memory (less client buffers) {res['used_memory_before']} -> {res['used_memory_after']} B: "
          f"{res['bytes_per_image_step']} B per finished image-step")
    if res["markers_gone"] is None:
        if MARKERS in res["keys_after"]:  # Celery's join left them; refexp's chord counting leaves none
            print(f"   {res['bytes_per_image_step_less_markers']} B per finished image-step once the chord markers "
                  f"({MARKERS}, {MARKERS_TTL} s) have expired (their bytes subtracted)")
    else:
        print(f"   (read after waiting for the chord markers to expire: "
              f"{'all gone' if res['markers_gone'] else 'SOME LEFT at the time bound'})")
    print("   keys left after the run (family: keys, bytes, bytes per image-step):")
    for fam, v in res["keys_after"].items():
        print(f"     {fam}: {v['keys']}, {v['bytes']} B, {v['per_image_step']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--backend", choices=("openai", "offline"), default="openai",
                    help="openai: the fake endpoint at L = 0 through the fleet budget; offline: the offline teacher")
    ap.add_argument("--layout", default="2x16", help="workers x threads")
    ap.add_argument("--events", choices=("both", "on", "off"), default="both")
    ap.add_argument("--monitor", action="store_true", help="split the commands by sender (MONITOR; slower)")
    ap.add_argument("--status-at", type=int, default=0,
                    help="also time status on a run whose done index holds this many images (1000000: ~1 min)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/refexp-bench"))
    ap.add_argument("--timeout", type=float, default=170)
    ap.add_argument("--markers-wait", type=float, default=0,
                    help=f"read memory once the chord markers have expired (they live {MARKERS_TTL} s): "
                         "wait up to this many seconds for them")
    ap.add_argument("--json", default=None)
    ap.add_argument("--concurrency", default="32", help="vlm.max_concurrency: a number or auto")
    a = ap.parse_args(argv)
    deadline = Deadline(a.timeout)
    m = banner("bench.redis_cost: Redis commands per task and bytes per finished image-step", images=a.images,
               backend=a.backend, layout=a.layout, events=a.events, monitor=a.monitor,
               concurrency=a.concurrency)
    images_dir, labels_dir = make_dataset(a.workdir / f"data-small-{a.images}", a.images, fmt="small")
    n_workers, threads = (int(x) for x in a.layout.lower().split("x"))
    runs = []
    ok = True
    with redis_server() as url, (fake_vlm(0.0) if a.backend == "openai" else contextlib.nullcontext()) as fake:
        for events in {"both": (True, False), "on": (True,), "off": (False,)}[a.events]:
            res = one_run(url, images_dir=images_dir, labels_dir=labels_dir,
                          results=a.workdir / f"results-redis-cost-{int(events)}", backend=a.backend, fake=fake,
                          n_workers=n_workers, threads=threads, events=events, monitor=a.monitor,
                          logdir=a.workdir / "logs", deadline=deadline, concurrency=a.concurrency,
                          markers_wait=a.markers_wait)
            report(res)
            runs.append(res)
            ok = ok and res["settled"]
        if a.status_at:
            st = status_at(url, a.status_at)
            print(f"-- status with {st['images']} images done in each of {STEPS} steps: "
                  f"{st['status_s_best']} s best, {st['status_s_worst']} s worst of 5; "
                  f"the done index takes {st['index_bytes_per_image_step']} B per image-step")
            runs.append({"status_at": st})
    emit_json(a.json, {"bench": "redis_cost", "machine": m, "params": vars(a) | {"workdir": str(a.workdir)},
                       "runs": runs})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
