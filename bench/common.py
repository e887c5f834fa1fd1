"""Shared parts of the benchmarks: the machine, a private Redis, the fake endpoint in its own
process, real ``celery -A worker worker`` processes, datasets, and the producer CLI.

Nothing here is a test helper: every piece is a real process started the way a user starts it
(the fake endpoint stands in for the VLM server). Every process a benchmark starts is stopped by
its process-group id when the benchmark leaves its ``with`` block, also on Ctrl-C or a bound.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker.keys import run_key

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PY = sys.executable
MODEL = "fake-vl"
STEP_DIRS = {0: "step_0_region_expr", 1: "step_1_image_caption", 2: "step_2_grounding_expr",
             3: "step_3_double_check"}
PIPELINE_NAMES = {0: "step0_region_expr", 1: "step1_image_caption", 2: "step2_grounding_expr",
                  3: "step3_double_check"}


# --------------------------------------------------------------------------- machine and output

def machine() -> dict:
    """Cores, RAM, Python and the versions that matter, printed beside every figure."""
    import celery
    import kombu
    import redis as redis_py

    from producer.embedded import redis_server_binary

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10).stdout
        redis_version = next((w.split("=", 1)[1] for w in out.split() if w.startswith("v=")), "?")
    except Exception:
        redis_version = "?"
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(_mem_total_kb() / 2**20, 1),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis_py": redis_py.__version__,
        "redis_server": redis_version,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _mem_total_kb() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


def machine_line(m: dict | None = None) -> str:
    m = m or machine()
    return (f"machine: {m['cores_usable']} cores ({m['cpu']}), {m['ram_gb']} GB RAM, Python {m['python']}, "
            f"{m['os']}; celery {m['celery']}, kombu {m['kombu']}, redis-server {m['redis_server']}; "
            f"load average {m['load_avg_1m']} at start (other work on the machine skews every figure)")


def banner(title: str, **params: object) -> dict:
    m = machine()
    print(f"== {title}")
    print(machine_line(m))
    if params:
        print("params: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    sys.stdout.flush()
    return m


def emit_json(path: str | None, payload: dict) -> None:
    """Append one JSON line of results to ``path`` (for the README table), if given."""
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(payload) + "\n")


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; nan when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


class Deadline:
    """A time bound for a whole benchmark: ``left()`` seconds remain; ``hit`` once it passed."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    @property
    def hit(self) -> bool:
        return self.left() <= 0


# --------------------------------------------------------------------------- processes

def _proc_mb(pid: int, file: str, field: str) -> float:
    """One ``<field>: <n> kB`` line of ``/proc/<pid>/<file>``, in MB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def rss_mb(pid: int) -> float:
    """Resident set size of one process, MB (0 when it is gone)."""
    return _proc_mb(pid, "status", "VmRSS")


def hwm_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of one process, MB."""
    return _proc_mb(pid, "status", "VmHWM")


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the producer's publisher processes, for example)."""
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # gone, or psutil missing: no children to count
        return []


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants, MB (each counted whole; shared pages twice)."""
    return rss_mb(pid) + sum(rss_mb(c) for c in children_of(pid))


def pss_mb(pid: int) -> float:
    """Proportional set size of one process, MB: shared pages split among their sharers."""
    return _proc_mb(pid, "smaps_rollup", "Pss")


def tree_pss_mb(pid: int) -> float:
    """PSS of a process and all its descendants, MB: what the tree costs the machine."""
    return pss_mb(pid) + sum(pss_mb(c) for c in children_of(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def stop_group(proc: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server (``producer.embedded``); yields its URL."""
    from producer.embedded import embedded_redis

    with embedded_redis() as url:
        yield url


def redis_client(url: str):
    import redis

    return redis.Redis.from_url(url)


@dataclass
class Proxy:
    url: str  # the Redis URL through the proxy
    proc: subprocess.Popen


@contextlib.contextmanager
def redis_proxy(redis_url: str, one_way_ms: float) -> Iterator[Proxy]:
    """``python -m tests.support.tcpproxy`` in its own process in front of ``redis_url``, adding
    ``one_way_ms`` each way (the round trip grows by twice that): Redis "on another host" for
    the workers, on one machine. Yields the proxied URL."""
    from urllib.parse import urlsplit

    u = urlsplit(redis_url)
    cmd = [PY, "-m", "tests.support.tcpproxy", "--target", f"{u.hostname}:{u.port}", "--delay-ms", str(one_way_ms)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("TCPPROXY_ADDR="):
            raise RuntimeError(f"tcpproxy did not start: {line!r}")
        yield Proxy(f"redis://{line.strip().split('=', 1)[1]}{u.path or '/0'}", proc)
    finally:
        stop_group(proc, timeout=10)


def ping_rtt_ms(url: str, n: int = 200) -> tuple[float, float]:
    """Median and p99 of ``n`` Redis PING round trips to ``url`` (one connection), in ms."""
    client = redis_client(url)
    client.ping()
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        client.ping()
        samples.append((time.perf_counter() - t) * 1000)
    client.close()
    return pct(samples, 0.5), pct(samples, 0.99)


@dataclass
class Fake:
    url: str
    proc: subprocess.Popen

    @property
    def openai_base_url(self) -> str:
        return self.url + "/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/_stats", timeout=5) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        req = urllib.request.Request(self.url + "/_reset", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=5):
            pass


@contextlib.contextmanager
def fake_vlm(latency: float, dist: str = "fixed", *, seed: int = 0, max_concurrency: int = 0) -> Iterator[Fake]:
    """``python -m tests.support.fake_vlm`` in its own process, with the given latency model."""
    cmd = [PY, "-m", "tests.support.fake_vlm", "--port", "0", "--latency", str(latency),
           "--latency-dist", dist, "--seed", str(seed)]
    if max_concurrency:
        cmd += ["--max-concurrency", str(max_concurrency)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("FAKE_VLM_URL="):
            raise RuntimeError(f"fake VLM did not start: {line!r}")
        yield Fake(line.strip().split("=", 1)[1], proc)
    finally:
        stop_group(proc, timeout=10)


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def worker_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The environment a worker host and the producer share: REDIS_URL, no API keys."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOOGLE_API_KEY", "GEMINI_API_KEY", "OPENAI_API_KEY", "NVIDIA_API_KEY",
                        "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "REFEXP_STATE_URL")}
    env.update(REDIS_URL=redis_url, PYTHONUNBUFFERED="1", **extra)
    return env


@contextlib.contextmanager
def workers(redis_url: str, n: int, threads: int, logdir: Path, *, events: bool = True,
            extra_env: dict[str, str] | None = None, loglevel: str = "WARNING",
            switch_interval: float | None = None) -> Iterator[list[Worker]]:
    """``n`` worker processes, ``celery -A worker worker -P threads -c <threads>``, as deployed.
    ``switch_interval`` (experiments only) runs celery with ``sys.setswitchinterval`` set first."""
    logdir.mkdir(parents=True, exist_ok=True)
    env = worker_env(redis_url, **(extra_env or {}))
    started: list[Worker] = []
    try:
        for i in range(n):
            name = f"bench{i + 1}"
            log = logdir / f"{name}.log"
            launcher = [PY, "-m", "celery"] if switch_interval is None else [
                PY, "-c", f"import sys; sys.setswitchinterval({switch_interval}); from celery.__main__ import main; "
                "main()"]
            cmd = [*launcher, "-A", "worker", "worker", "-P", "threads", "-c", str(threads),
                   "--without-mingle", "--without-gossip", "-n", f"{name}@%h", "-l", loglevel]
            if events:
                cmd.append("-E")
            fh = open(log, "w")  # noqa: SIM115 - lives as long as the process
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            started.append(Worker(name, proc, log))
        _wait_ready(redis_url, started)
        yield started
    finally:
        for w in started:
            if w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(w.proc.pid, signal.SIGTERM)
        for w in started:
            stop_group(w.proc, timeout=30)


def _wait_ready(redis_url: str, started: list[Worker], timeout: float = 90) -> None:
    """Until every worker answers a remote-control ping (logs stay at WARNING, as deployed)."""
    from worker.app import app, repoint

    repoint(redis_url)
    want = {w.name for w in started}
    deadline = time.monotonic() + timeout
    while True:
        for w in started:
            if w.proc.poll() is not None:
                raise RuntimeError(f"worker {w.name} exited:\n{w.text()[-2000:]}")
        replies = app.control.ping(timeout=0.5) or []
        seen = {name.split("@", 1)[0] for r in replies for name in r}
        if want <= seen:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers {sorted(want - seen)} not ready after {timeout:g} s")


def producer_popen(env: dict[str, str], *args: str, log: Path | None = None) -> subprocess.Popen:
    """``producer <args>`` (the CLI, as a user runs it) in its own process group."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen([PY, "-m", "producer.cli", *args], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def producer_run(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, "-m", "producer.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"producer {' '.join(args[:1])} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return proc


def spec_args(*, backend: str, fake: Fake | None, results: Path, images: Path | None = None,
              labels: Path | None = None, concurrency: int | str = 32, extra: tuple[str, ...] = ()) -> list[str]:
    """Spec overrides for a run against the fake endpoint (openai protocol, no key)."""
    p = "image_referring_expression"
    args = [f"{p}.vlm.backend={backend}", f"{p}.vlm.max_concurrency={concurrency}"]
    if backend == "openai":
        assert fake is not None
        args += [f"{p}.vlm.openai.base_url={fake.openai_base_url}", f"{p}.vlm.openai.model_name={MODEL}",
                 f"{p}.vlm.openai.timeout=60"]
    args += list(extra)
    if images is not None:
        args += ["--image-dir", str(images)]
    if labels is not None:
        args += ["--label-dir", str(labels)]
    args += ["--results-dir", str(results)]
    return args


def run_id(results: Path) -> str:
    return json.loads((results / "run.json").read_text())["run_id"]


def settled_count(client, rid: str, step: int = 3) -> int:
    """Images whose ``step`` is done (an offset, or a bit once the image settled done in every
    step), failed or blocked."""
    pipe = client.pipeline()
    for kind in ("done", "failed", "blocked"):
        pipe.hlen(run_key(rid, kind, step))
    pipe.bitcount(run_key(rid, "bits", step))
    return sum(pipe.execute())


# --------------------------------------------------------------------------- datasets

# ``big``: the demo's 1242x375 scene scaled to ~8 Mpx (5160x1558).
BIG_SCALE = (8_000_000 / (1242 * 375)) ** 0.5


def make_dataset(out: Path, n: int, *, fmt: str = "jpg", distinct: int = 32, seed: int = 11) -> tuple[Path, Path]:
    """``n`` images with KITTI labels: ``distinct`` drawn road scenes (producer.demo), copied
    under ``n`` different stems. ``fmt``: ``jpg`` (1242x375 JPEG q90, ~100 KB, as KITTI-like
    camera data usually ships), ``png`` (the demo's 1242x375 PNG, ~450 KB), ``small``
    (310x93 JPEG: the cheapest image that still has boxes, for orchestration-only runs) or
    ``big`` (5160x1558 = 8 Mpx JPEG q90 with sensor-like noise, ~3 MB: a modern camera frame)."""

    from PIL import Image

    from producer.demo import plan_scene, render_scene

    images, labels = out / "images", out / "labels"
    marker = out / f".made-{n}-{fmt}-{distinct}-{seed}"
    if marker.exists():
        return images, labels
    shutil.rmtree(out, ignore_errors=True)
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    suffix = ".png" if fmt == "png" else ".jpg"
    scenes = []
    for i in range(min(n, distinct)):
        scene = plan_scene(i, seed)
        im = render_scene(scene).convert("RGB")
        scale = {"small": 0.25, "big": BIG_SCALE}.get(fmt, 1.0)
        if scale != 1.0:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
        if fmt == "big":  # a smooth upscale compresses like no camera frame does: add sensor noise
            noise = Image.effect_noise(im.size, 24).convert("RGB")
            im = Image.blend(im, noise, 0.12)
        buf = io.BytesIO()
        im.save(buf, format="PNG" if fmt == "png" else "JPEG", **({} if fmt == "png" else {"quality": 90}))
        lines = []
        for line in scene.label_text().splitlines():
            f = line.split()
            if len(f) >= 8:
                f[4:8] = [f"{float(v) * scale:.2f}" for v in f[4:8]]
            lines.append(" ".join(f))
        scenes.append((buf.getvalue(), "\n".join(lines) + "\n"))
    for i in range(n):
        data, label = scenes[i % len(scenes)]
        stem = f"img_{i:07d}"
        (images / f"{stem}{suffix}").write_bytes(data)
        (labels / f"{stem}.txt").write_text(label)
    marker.touch()
    return images, labels


# --------------------------------------------------------------------------- watching a run

@dataclass
class StepEvent:
    seen: float  # monotonic time the bench saw the line appear in the sink
    latency: float  # the call's latency_s from the record (0 when no call was made)


class _Poller:
    """A daemon thread calling ``tick()`` every ``poll`` seconds between ``start()`` and ``stop()``;
    ``stop()`` ticks once more so nothing that happened before it is missed."""

    poll: float

    def start(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):  # the source may be gone already; the samples stay
            self.tick()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.tick()
            self._stop.wait(self.poll)

    def tick(self) -> None:
        raise NotImplementedError


@dataclass
class SinkTailer(_Poller):
    """Polls the four step sinks and notes when each image's record appeared (±poll interval).

    Sinks are the output, so this needs no hook in the code under test. With a 20 ms poll the
    per-image times are good to ~20 ms, far below the 0.5 s calls they bracket.
    """

    results: Path
    poll: float = 0.02
    events: dict[int, dict[str, StepEvent]] = field(default_factory=lambda: {s: {} for s in STEP_DIRS})
    _pos: dict[Path, int] = field(default_factory=dict)
    _partial: dict[Path, bytes] = field(default_factory=dict)

    def tick(self) -> None:
        now = time.monotonic()
        for step, d in STEP_DIRS.items():
            # Workers write per-writer part files (worker/sinks.py); the main file holds what a
            # finalize merged. Tail them all.
            folder = self.results / d
            for path in [folder / "annotations.jsonl", *sorted((folder / "annotations.parts").glob("*.jsonl"))]:
                self._tail(step, path, now)

    def _tail(self, step: int, path: Path, now: float) -> None:
        try:
            with open(path, "rb") as f:
                f.seek(self._pos.get(path, 0))
                chunk = f.read()
        except OSError:
            return
        if not chunk:
            return
        self._pos[path] = self._pos.get(path, 0) + len(chunk)
        data = self._partial.get(path, b"") + chunk
        *lines, self._partial[path] = data.split(b"\n")
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            call = ((rec.get("meta") or {}).get(PIPELINE_NAMES[step]) or {}).get("call") or {}
            self.events[step].setdefault(rec["image_id"], StepEvent(now, float(call.get("latency_s") or 0)))


@dataclass
class FakeSampler(_Poller):
    """Polls the fake's ``/_stats``: calls made and calls in flight over time."""

    fake: Fake
    poll: float = 0.05
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, calls, in_flight)

    def tick(self) -> None:
        s = self.fake.stats()
        self.samples.append((time.monotonic(), int(s["calls"]), int(s["in_flight"])))

    def first_call(self) -> float | None:
        return next((t for t, calls, _ in self.samples if calls > 0), None)

    def mean_in_flight(self, t0: float, t1: float) -> float:
        vals = [f for t, _, f in self.samples if t0 <= t <= t1]
        return sum(vals) / len(vals) if vals else float("nan")
