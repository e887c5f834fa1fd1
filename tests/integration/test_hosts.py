"""The fleet across hosts (issue 12): Redis and two worker hosts as network namespaces, one
worker host cut off from Redis for longer than the visibility timeout, then healed.

Real parts: redis-server in its own namespace, ``celery -A worker worker`` processes in two
others, each reaching Redis only through its own TCP proxy (``tests/support/tcpproxy.py``, 1 ms
each way: the kernel has no netem), the fake VLM and the producer CLI on the test's own host
(the root namespace). The worker hosts have no route to Redis but the proxy, so cutting a proxy
cuts that host alone. Two ways to cut (``TcpProxy.cut``): ``reset`` (connections reset, new ones
refused: the host sees errors at once) and ``blackhole`` (nothing forwarded, nothing closed: the
host sees silence, and what it sent arrives after the heal, as in a partition that heals within
TCP's retransmission window).

What must hold, as for a kill -9: nothing lost (every image in annotations.jsonl), exactly one
final record per image, no failure recorded for a network fault, and both workers alive and
answering afterwards (or dead only of the known upstream reconnect crash, said out loud). Sink
files may hold a second line for a redelivered image-step; those and the repeated VLM calls are
counted and printed.

A third case loses one task message in flight to host 1 (``TcpProxy.cut_on``: the reply that
carries it is dropped and the link reset). It asserts the same outcome, and FAILS without a
reconciler in ``producer wait``: see its docstring.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from producer.embedded import LIST_COMPRESS_DEPTH, redis_server_binary
from tests.integration.test_faults import (
    KOMBU_RECONNECT_CRASH,
    assert_finalized_once,
    failures,
    job,
    normal_calls,
    run_state,
    seed_records,
    sink_lines,
)
from tests.support.fake_vlm import FakeVLM
from tests.support.fleet import ROOT, Fleet, WorkerProc, producer, wait_until
from tests.support.netlab import Host, NetLab
from tests.support.tcpproxy import TcpProxy

# One lab at a time under pytest-xdist: labs pick a free 10.231.n.0/24 subnet by looking at the
# machine's addresses, which two labs built at the same moment could both see free.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("netns")]

SHORT_VT = 6  # REFEXP_VISIBILITY_TIMEOUT for the fleet: unacked messages come back after 6 s
ONE_WAY_DELAY = 0.001  # each worker host is 2 ms of round trip from Redis
CUT_FOR = 2 * SHORT_VT  # s: how long host 1 stays cut off, at least
REDIS_PORT = 6379  # inside the Redis host's own namespace: no clash with anything on this machine
SECRETS = ("GOOGLE_API_KEY", "GEMINI_API_KEY", "OPENAI_API_KEY", "NVIDIA_API_KEY",
           "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "REFEXP_STATE_URL")


@dataclass
class Site:
    """The hosts of one test: Redis, two worker hosts, and the test's own host (root namespace)."""

    lab: NetLab
    redis_host: Host
    workers: dict[str, Host]
    redis_url: str  # from the test's host, direct
    fake: FakeVLM
    proxies: dict[str, TcpProxy]  # worker host name -> its only path to Redis
    env: dict[str, str]  # the producer's environment (direct Redis)

    def worker_env(self, name: str) -> dict[str, str]:
        p = self.proxies[name]
        return {"REDIS_URL": f"redis://{p.host}:{p.port}/0"}


@contextlib.contextmanager
def redis_on(host: Host, workdir: Path) -> Iterator[str]:
    """redis-server on ``host`` (inside its namespace, on its address), configured as
    ``producer.embedded`` configures ours; yields its URL as the test's host reaches it."""
    args = [*host.prefix(), redis_server_binary(), "--port", str(REDIS_PORT), "--bind", host.addr,
            "--dir", str(workdir), "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--maxmemory-policy", "noeviction", "--list-compress-depth", str(LIST_COMPRESS_DEPTH),
            "--logfile", str(workdir / "redis.log")]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # ip netns exec execs it
    url = f"redis://{host.addr}:{REDIS_PORT}/0"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"redis-server on {host.netns} exited {proc.returncode}: see {workdir}/redis.log")
            with contextlib.suppress(redis.ConnectionError), redis.Redis.from_url(url, socket_timeout=2) as r:
                return bool(r.ping())
            return False

        wait_until(up, 15, f"redis-server on {host.addr}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_worker(fleet: Fleet, host: Host, env: dict[str, str]) -> WorkerProc:
    """One ``celery -A worker worker`` on ``host``: Fleet's command under ``ip netns exec``
    (which execs it, so the process Fleet signals is the worker itself)."""
    name = f"w{len(fleet.workers) + 1}"
    argv = [*host.prefix(), sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "threads", "-c", "2",
            "-E", "--without-mingle", "--without-gossip", "-n", f"{name}@%h", "-l", "INFO"]
    w, = fleet.start(1, extra_env=env, argv=argv)
    assert w.name == name
    return w


@pytest.fixture
def site(tmp_path) -> Iterator[Site]:
    # NetLab raises (the test errors, never skips) when namespaces cannot be made: not root, no `ip`.
    with NetLab() as lab:
        rh = lab.add_host("redis")
        hosts = {name: lab.add_host(name) for name in ("w1", "w2")}
        (tmp_path / "redis").mkdir()
        with (redis_on(rh, tmp_path / "redis") as url,
              FakeVLM(host=rh.gateway) as fake,
              TcpProxy((rh.addr, REDIS_PORT), listen=(hosts["w1"].gateway, 0), delay=ONE_WAY_DELAY) as p1,
              TcpProxy((rh.addr, REDIS_PORT), listen=(hosts["w2"].gateway, 0), delay=ONE_WAY_DELAY) as p2):
            for h in hosts.values():
                lab.route(h, fake.host)  # the VLM endpoint is reachable from every worker host
            env = {k: v for k, v in os.environ.items() if k not in SECRETS}
            # The visibility timeout is a fleet setting: the producer (its reconciler) uses it too.
            env.update(REDIS_URL=url, PYTHONUNBUFFERED="1", REFEXP_VISIBILITY_TIMEOUT=str(SHORT_VT))
            yield Site(lab, rh, hosts, url, fake, {"w1": p1, "w2": p2}, env)


@pytest.fixture
def fleet(site, tmp_path) -> Iterator[Fleet]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    f = Fleet(env=site.env, logdir=logdir)
    yield f
    f.discard()  # before the site's namespaces go


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """16 drawn road scenes with KITTI labels: enough that the cut lands mid-run."""
    from producer.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("hosts-data"), n_images=16, seed=12)


# --------------------------------------------------------------------------- reading the workers

_TASK_LINE = re.compile(r"Task (refexp\.\w+)\[([0-9a-f-]{36})\] (received|succeeded|retry|raised|reject|ignored)")


def task_events(w: WorkerProc) -> list[tuple[str, str, str]]:
    """(task name, task id, event) from a worker's INFO log, in order."""
    return _TASK_LINE.findall(w.text())


def holding(w: WorkerProc) -> set[str]:
    """Task ids the worker received and has not finished (succeeded, retried, rejected, ...) yet."""
    held: set[str] = set()
    for _, tid, event in task_events(w):
        if event == "received":
            held.add(tid)
        else:
            held.discard(tid)
    return held


_NOT_RECORDED = re.compile(r"task ([0-9a-f-]{36}) taken from the queue could not be recorded as unacked")


def not_recorded(w: WorkerProc) -> set[str]:
    """Task ids the worker took from the queue but could not record as unacked (worker/clock.py)."""
    return set(_NOT_RECORDED.findall(w.text()))


def received(w: WorkerProc) -> set[str]:
    return {tid for _, tid, event in task_events(w) if event == "received"}


_CONNECTED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] Connected to redis", re.M)


def reconnected(w: WorkerProc, since: float) -> float | None:
    """When (epoch s) the worker's consumer first connected to the broker after ``since``."""
    from datetime import datetime

    stamps = [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f").timestamp() for m in _CONNECTED.findall(w.text())]
    return next((t for t in stamps if t > since), None)


def answering(site: Site, workers: list[WorkerProc]) -> bool:
    """Every one of ``workers`` answers a remote-control ping (each over its own, proxied, broker
    connection: a consumer that did not come back after a heal stays silent)."""
    names = [f"{w.name}@{os.uname().nodename}" for w in workers]
    proc = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "inspect", "ping", "-d", ",".join(names),
                           "-t", "3"], cwd=ROOT, env=site.env, capture_output=True, text=True, timeout=60)
    return all(re.search(rf"->\s+{re.escape(name)}: OK\s+pong", proc.stdout) for name in names)


def wait_run(site: Site, results: Path, timeout: float) -> tuple[subprocess.CompletedProcess, str]:
    """``producer wait``, as a user runs it (it runs the reconciler too, where there is one); and,
    when it did not finish, what the images still in flight have done and where the run's
    messages are."""
    out = producer(site.env, "wait", "--results-dir", str(results), "--timeout", str(timeout), check=False)
    if out.returncode == 0:
        return out, ""
    state = run_state(site.redis_url, results)
    client = state.r
    in_flight = sorted(k.decode() for k in client.hkeys(f"refexp:run:{state.run_id}:queued"))
    outcomes = {i: {s: next((kind for kind in ("done", "failed", "blocked")
                             if client.hexists(f"refexp:run:{state.run_id}:{kind}:{s}", i)), "none")
                    for s in (0, 1, 2, 3)} for i in in_flight}
    return out, (f"images still in flight: {outcomes}; messages queued: {client.llen('refexp')}, unacked: "
                 f"{client.zcard('unacked_messages')}\n{out.stdout[-1000:]}\n{out.stderr[-1000:]}")


# --------------------------------------------------------------------------- the test

def test_worker_hosts_reach_redis_only_through_their_proxy(site):
    probe = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"
    for host in site.workers.values():
        direct = subprocess.run([*host.prefix(), sys.executable, "-c", probe, site.redis_host.addr, str(REDIS_PORT)],
                                capture_output=True, text=True, timeout=30)
        assert direct.returncode != 0 and "unreachable" in direct.stderr, direct
        p = site.proxies[host.name]
        via = subprocess.run([*host.prefix(), sys.executable, "-c", probe, p.host, str(p.port)],
                             capture_output=True, text=True, timeout=30)
        assert via.returncode == 0, via.stderr
    assert redis.Redis.from_url(site.redis_url).ping()


def enqueue_on_two_hosts(site, fleet, data, tmp_path):
    """A worker on each host, the fake endpoint at 0.4 s a call, and a job enqueued: (worker 1,
    worker 2, the fake, the results dir, its seed records, its run state)."""
    w1 = start_worker(fleet, site.workers["w1"], site.worker_env("w1"))
    w2 = start_worker(fleet, site.workers["w2"], site.worker_env("w2"))
    site.fake.latency = 0.4
    results = tmp_path / "results"
    producer(site.env, "enqueue", *job(site.fake, data, results))
    return w1, w2, site.fake, results, seed_records(results), run_state(site.redis_url, results)


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_worker_host_cut_off_from_redis_past_the_visibility_timeout(site, fleet, data, tmp_path, mode):
    w1, w2, fake, results, seeds, state = enqueue_on_two_hosts(site, fleet, data, tmp_path)
    n = len(seeds)

    def mid_run():
        done = state.counts([3])[3]["done"]
        return 1 <= done <= n - 4 and holding(w1) and holding(w2)

    wait_until(mid_run, 60, "some images done and tasks held by both worker hosts", interval=0.02)
    t_cut, t_cut_wall = time.monotonic(), time.time()
    site.proxies["w1"].cut(mode)
    # What host 1 holds now stays unacked until the heal (Celery logs a task's end before it
    # acks it, so a task acked before the cut is not in this set).
    held = holding(w1)

    # Keep host 1 cut off for twice the visibility timeout (the fault itself, not a wait for
    # something), and until every task it held was redelivered to host 2 (host 2's restore
    # sweep gave them back to the queue): the heal must find them running in two places.
    def redelivered():
        # A task whose message was taken but never recorded as unacked (the reset hit between
        # BRPOP and the record) is not Redis's to redeliver: the reconciler puts it back after
        # the heal, and the run must still finish below.
        return held - not_recorded(w1) <= received(w2) or w2.proc.poll() is not None

    wait_until(lambda: time.monotonic() - t_cut >= CUT_FOR and redelivered(), CUT_FOR + SHORT_VT + 30,
               f"host 1's tasks {sorted(held)} to be redelivered to host 2 while host 1 is cut off ({mode})",
               interval=0.1)
    assert w2.proc.poll() is None, f"worker 2 died during the cut:\n{w2.text()[-4000:]}"
    t_heal, t_heal_wall = time.monotonic(), time.time()
    site.proxies["w1"].heal()

    out, stranded = wait_run(site, results, 60)
    t_done = time.monotonic()
    # A reset can also drop a task message on its way to host 1 (a BRPOP reply in flight, or
    # read but not yet recorded as unacked): that is the hole the last test shows on purpose.
    assert out.returncode == 0, (f"the run did not finish after the heal ({mode}); if an image below has "
                                 f"no message anywhere, see test_a_task_message_lost_in_flight_to_a_host_still_"
                                 f"ends_done: {stranded}\n{fleet.logs()}")
    # Host 1 answers again, and whatever it still held when healed runs to its end (a late
    # second record must not change the final output).
    crashed = [w.name for w in (w1, w2) if w.proc.poll() is not None]
    for w in (w1, w2):
        if w.proc.poll() is not None:
            assert KOMBU_RECONNECT_CRASH in w.text(), f"worker {w.name} died:\n{w.text()[-4000:]}"
    alive = [w for w in (w1, w2) if w.proc.poll() is None]
    wait_until(lambda: answering(site, alive), 60, f"workers {[w.name for w in alive]} to answer a ping after the heal")
    wait_until(lambda: not any(holding(w) for w in alive), 60, "the workers to finish what they held")
    producer(site.env, "finalize", "--results-dir", str(results))

    ids = [r["image_id"] for r in seeds]
    final = assert_finalized_once(results, ids)
    fails = failures(results)
    lines = sink_lines(results)
    twice = {s: sorted(i for i, k in c.items() if k > 1) for s, c in lines.items()}
    calls = fake.stats()
    repeated = calls["calls"] - sum(normal_calls(r) for r in seeds)
    by_host = {name: calls["requests_by_client"].get(h.addr, 0) for name, h in site.workers.items()}
    st = state.counts([0, 1, 2, 3])
    print(f"\ncut host 1 ({mode}) for {t_heal - t_cut:.1f} s, visibility timeout {SHORT_VT} s, "
          f"held {len(held)} tasks at the cut; proxy 1: {site.proxies['w1'].stats()}")
    print(f"  images: {len(final)} done / {len({f['image_id'] for f in fails})} failed / "
          f"{n - len(final) - len({f['image_id'] for f in fails})} stranded, of {n}")
    print(f"  VLM calls: {calls['calls']} ({repeated} repeated), by host {by_host}")
    print(f"  image-steps with a second sink line: {sum(len(v) for v in twice.values())} {twice}")
    back = reconnected(w1, t_cut_wall)
    print(f"  wall time: cut -> finished {t_done - t_cut:.1f} s, heal -> finished {t_done - t_heal:.1f} s; "
          + (f"host 1's consumer reconnected {back - t_heal_wall:.1f} s after the heal" if back
             else "host 1's consumer never saw its connection drop"))
    print(f"  index: {st}; workers dead of the known upstream reconnect crash: {crashed or 'none'}")
    assert fails == [], fails  # a network fault is not an image failure
    assert all(st[s]["failed"] == 0 and st[s]["blocked"] == 0 for s in st), st


# A BRPOP reply carrying a message of the refexp queue (any priority), as Redis sends it.
TASK_MESSAGE_REPLY = rb"\*2\r\n\$\d+\r\nrefexp(?:\x06\x16\d+)?\r\n\$\d+\r\n\{"


def lost_message(chunk: bytes) -> str:
    """``task(image_id)`` of the message in a dropped BRPOP reply."""
    try:
        raw = chunk.split(b"\r\n", 5)[4]
        msg = json.loads(raw)
        args = json.loads(msg["body"])[0]
        return f"{msg['headers']['task']}({args[1]})"
    except (ValueError, KeyError, IndexError, TypeError):
        return repr(chunk[:200])


def test_a_task_message_lost_in_flight_to_a_host_still_ends_done(site, fleet, data, tmp_path):
    """A real hole in kombu's Redis transport: it takes a message off the queue with BRPOP and
    records it as unacked only once the reply reached the worker, so a reply lost with its
    connection leaves the message nowhere (neither queued nor unacked: no visibility timeout
    brings it back). Before the reconciler (producer/reconcile.py, run by `producer wait`) its
    image never ended and `producer wait` waited for ever; now it is put back."""
    w1, w2, _fake, results, seeds, state = enqueue_on_two_hosts(site, fleet, data, tmp_path)
    n = len(seeds)
    wait_until(lambda: 1 <= state.counts([3])[3]["done"] <= n - 4 and holding(w1), 60,
               "some images done and tasks held by worker host 1", interval=0.02)
    proxy = site.proxies["w1"]
    proxy.cut_on(TASK_MESSAGE_REPLY)  # the next task message Redis hands host 1 is lost, and the link reset
    wait_until(lambda: proxy.tripped, 30, "Redis to hand host 1 a task message")
    t_cut = time.monotonic()
    proxy.heal()  # a blip: host 1 reconnects at once
    lost = lost_message(proxy.tripped)

    out, stranded = wait_run(site, results, SHORT_VT + 30)
    t_done = time.monotonic()
    print(f"\nlost in flight to host 1: {lost}; `producer wait` exited {out.returncode} after "
          f"{t_done - t_cut:.1f} s. {stranded.splitlines()[0] if stranded else ''}")
    assert out.returncode == 0, (
        f"the message {lost} was lost in flight to host 1 and the reconciler did not put its image back: "
        f"{stranded}")
    assert_finalized_once(results, [r["image_id"] for r in seeds])
    assert failures(results) == []
    for w in (w1, w2):
        assert w.proc.poll() is None or KOMBU_RECONNECT_CRASH in w.text(), f"{w.name} died:\n{w.text()[-4000:]}"
