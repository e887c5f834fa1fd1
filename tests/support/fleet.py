"""Real worker processes and producer CLI calls for integration tests.

Workers are started with the command docker-compose.yml declares (``celery -A worker worker
...``), as separate processes against a real Redis; the producer runs as its CLI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class WorkerProc:
    name: str
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Fleet:
    """Starts and stops worker processes; every one is stopped at teardown."""

    env: dict[str, str]
    logdir: Path
    workers: list[WorkerProc] = field(default_factory=list)

    def start(self, n: int = 2, *, concurrency: int = 8, extra_env: dict[str, str] | None = None,
              argv: list[str] | None = None) -> list[WorkerProc]:
        started = self.launch(n, concurrency=concurrency, extra_env=extra_env, argv=argv)
        for w in started:
            wait_until(lambda w=w: "ready." in w.text() or w.proc.poll() is not None, 60,
                       f"worker {w.name} to be ready")
            if w.proc.poll() is not None:
                raise AssertionError(f"worker {w.name} exited:\n{w.text()[-3000:]}")
        return started

    def launch(self, n: int = 1, *, concurrency: int = 8, extra_env: dict[str, str] | None = None,
               argv: list[str] | None = None) -> list[WorkerProc]:
        """Start ``n`` workers without waiting for them to be ready (or to refuse to start)."""
        started = []
        for _ in range(n):
            name = f"w{len(self.workers) + 1}"
            log = self.logdir / f"{name}.log"
            cmd = argv or [sys.executable, "-m", "celery", "-A", "worker", "worker", "-P", "threads",
                           "-c", str(concurrency), "-E", "--without-mingle", "--without-gossip",
                           "-n", f"{name}@%h", "-l", "INFO"]
            env = {**self.env, **(extra_env or {})}
            fh = open(log, "w")  # noqa: SIM115 - kept open for the process's lifetime
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            w = WorkerProc(name, proc, log)
            self.workers.append(w)
            started.append(w)
        return started

    def kill(self, w: WorkerProc, sig: int = signal.SIGKILL) -> None:
        os.killpg(w.proc.pid, sig)

    def stop_all(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                os.killpg(w.proc.pid, signal.SIGTERM)
        for w in self.workers:
            try:
                w.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(w.proc.pid, signal.SIGKILL)
                w.proc.wait()

    def discard(self) -> None:
        """Fixture teardown: SIGKILL every worker still running (its whole process group) and reap
        it. The test has asserted what it needed by then, and a warm shutdown costs 1-2 s a worker;
        the next test flushes what a killed worker leaves in Redis. Tests that rely on a warm
        shutdown (calls in flight finish and are written) call ``stop_all`` themselves."""
        for w in self.workers:
            if w.proc.poll() is None:
                os.killpg(w.proc.pid, signal.SIGKILL)
        for w in self.workers:
            w.proc.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.text()[-4000:]}" for w in self.workers)


def producer(env: dict[str, str], *args: str, timeout: float = 180, check: bool = True
             ) -> subprocess.CompletedProcess:
    """Run the producer CLI as a user would."""
    proc = subprocess.run([sys.executable, "-m", "producer.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"producer {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
