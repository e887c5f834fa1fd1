"""One producer per results dir: an ``flock`` on ``results_dir/.producer.lock``, held for the
producer's whole life (seeding, enqueueing, ``--wait``; the whole local run for ``producer run``).

Why a lock file on the volume and not a key in Redis: two fleets (two Redis servers) pointed at
one results dir by mistake share nothing but the volume, and ``producer run`` brings its own
Redis. The kernel drops an flock when its holder dies (kill -9 included), so a stale lock file
blocks no one; the text in it, who holds it, is only there to name the holder. On NFS, Linux maps
flock to byte-range locks served by the server's lock manager, so it holds across hosts; a
process loses such a lock when it closes *any* descriptor of the file, so the holder never
opens the lock file a second time.

The holder also leaves its identity under ``refexp:run:<id>:producer`` in its Redis. A second
producer with the same inputs whose Redis holds that very identity is on the same fleet and may
watch the run (``producer enqueue`` joins); one whose Redis does not is another fleet, and is
refused: it would send every in-flight image a second time, under a second concurrency cap.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from producer.binding import check_binding, input_changes, inputs_of, refusal
from producer.runs import describe_redis, read_run_file, run_id_for, update_run_file
from worker.errors import ConfigError
from worker.keys import run_key
from worker.layout import Layout
from worker.runstate import SPEC_TTL, RunState
from worker.spec import Spec

#: How long a producer that found the lock taken waits for the holder to write who it is (the
#: holder does so milliseconds after taking the lock).
IDENTITY_WAIT = 5.0


@dataclass(frozen=True)
class Holder:
    """Who holds a results dir: written into the lock file and the holder's Redis. No secrets."""

    command: str
    host: str
    pid: int
    started: str
    redis: str  # describe_redis: no password
    run_id: str
    token: str  # random; the same in the lock file and in the holder's Redis
    inputs: dict

    def describe(self) -> str:
        return (f"`producer {self.command}` (pid {self.pid} on {self.host}, since {self.started}, "
                f"Redis {self.redis}, run {self.run_id})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Holder | None:
        try:
            data = json.loads(text)
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None


class Busy(Exception):
    """Another live producer holds the results dir (``holder`` says who)."""

    def __init__(self, root: Path, holder: Holder):
        super().__init__(f"results_dir {root} is in use by {holder.describe()}")
        self.root, self.holder = root, holder


class ResultsBusy(ConfigError):
    """The results dir is held by a producer this one cannot join."""


class ResultsLock:
    """The flock on one results dir's lock file, taken without blocking."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this object now holds it."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot open the results dir's lock file ({exc}); every "
                              "producer needs write access to it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"{self.path}: cannot lock the results dir ({exc}); the volume must "
                              "support file locks (NFS: lockd / NFSv4)") from None
        os.ftruncate(fd, 0)  # a dead holder's text must not name it as the holder now
        self._fd = fd
        return True

    def announce(self, holder: Holder) -> None:
        """Write who holds the lock (replacing a dead holder's text)."""
        if self._fd is None:
            raise RuntimeError(f"{self.path}: announce() without holding the lock")
        data = (holder.to_json() + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Empty the file (no one holds it now) and drop the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only volume must not keep the lock held
        finally:
            os.close(fd)  # closing releases the flock

    def holder(self) -> Holder | None:
        """Who the file says holds the lock (only meaningful while it is taken)."""
        try:
            return Holder.from_json(self.path.read_bytes())
        except OSError:
            return None

    def acquire_or_holder(self, wait: float = IDENTITY_WAIT) -> Holder | None:
        """Take the lock (None) or name the live producer holding it.

        A holder writes its identity right after taking the lock; if the file stays empty for
        ``wait`` seconds while the lock stays taken, the holder is not a producer we know.
        """
        deadline = time.monotonic() + wait
        while True:
            if self.try_acquire():
                return None
            found = self.holder()
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise ResultsBusy(f"{self.path} is locked by a process that has not said who it is "
                                  f"after {wait:.0f} s; another producer may be starting or hung. Find it "
                                  f"(e.g. fuser {self.path}) or use another --results-dir")
            time.sleep(0.1)


def _marker(run_id: str) -> str:
    return run_key(run_id, "producer")


@dataclass(frozen=True)
class Claim:
    """A results dir held by this producer: who we are, and the producer recorded before us."""

    me: Holder
    previous: dict | None
    bound: dict  # run.json as found


@contextlib.contextmanager
def claim(layout: Layout, client: redis.Redis, spec: Spec | None, *, command: str,
          lock: ResultsLock | None = None) -> Iterator[Claim]:
    """Hold ``layout``'s results dir for this producer while the block runs.

    Raises ``Busy`` when another live producer holds it and ``InputsChanged`` when the directory
    is bound to other inputs; neither touches a file. ``spec`` (normalised) gives the inputs;
    None skips the binding check (``retry-failed`` seeds nothing). ``lock`` may already be held.
    """
    lock = lock or ResultsLock(layout.lock_file)
    if not lock.held:
        holder = lock.acquire_or_holder()
        if holder is not None:
            raise Busy(layout.root, holder)
    me: Holder | None = None
    try:
        bound = read_run_file(layout)
        if spec is not None:
            check_binding(layout, bound, spec)
        run_id = run_id_for(layout)
        me = Holder(command=command, host=socket.gethostname(), pid=os.getpid(),
                    started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), redis=describe_redis(client),
                    run_id=run_id, token=uuid.uuid4().hex,
                    inputs=inputs_of(spec) if spec is not None else bound.get("inputs") or {})
        if spec is not None:
            # A producer joining from now on must not take the last run's "enqueue complete"
            # (still in Redis) for this one's: it would report a run finished that is being re-seeded.
            RunState(client, run_id).set_meta(enqueue_complete=False)
        client.set(_marker(run_id), me.to_json(), ex=SPEC_TTL)  # Redis first, then the file: see same_fleet
        lock.announce(me)
        previous = bound.get("last_producer")
        update_run_file(layout, last_producer={k: v for k, v in asdict(me).items() if k not in ("token", "inputs")})
        yield Claim(me, previous if isinstance(previous, dict) else None, bound)
    finally:
        if me is not None:
            with contextlib.suppress(redis.RedisError):
                if same_fleet(client, me):  # still ours: a later holder may have replaced it
                    client.delete(_marker(me.run_id))
        lock.release()


@contextlib.contextmanager
def hold(layout: Layout, client: redis.Redis, spec: Spec | None, *, command: str) -> Iterator[Claim]:
    """``claim`` for the commands that cannot join a live run (``run``, ``retry-failed``): a
    results dir another producer holds is a user error naming that producer."""
    lock = ResultsLock(layout.lock_file)
    holder = lock.acquire_or_holder()
    if holder is not None:
        raise refuse_busy(Busy(layout.root, holder), spec, command=command)
    with claim(layout, client, spec, command=command, lock=lock) as held:
        yield held


def same_fleet(client: redis.Redis, holder: Holder) -> bool:
    """True when ``client``'s Redis is the one the holder uses (it holds the holder's token)."""
    raw = client.get(_marker(holder.run_id))
    found = Holder.from_json(raw) if raw is not None else None
    return found is not None and found.token == holder.token


def joinable(busy: Busy, client: redis.Redis, spec: Spec) -> Holder:
    """The holder of a busy results dir when this producer may watch its run: same inputs and
    the same Redis. Otherwise the error that says why not and what to do."""
    holder = busy.holder
    new = inputs_of(spec)
    changes = input_changes(holder.inputs, new)
    if changes:
        raise refusal(busy.root, holder.inputs, new, changes, whose=f"the live {holder.describe()}", live=True)
    if not same_fleet(client, holder):
        raise ResultsBusy(
            f"results_dir {busy.root} is in use by {holder.describe()}, through another Redis: "
            f"{describe_redis(client)} (this producer's) holds no state of that run. Two fleets on one "
            "results dir would call the endpoint twice for the images in flight, each under its own "
            f"concurrency cap. Wait for it to finish (this command then resumes from the sinks), "
            f"point REDIS_URL at its Redis ({holder.redis}), or use another --results-dir."
        )
    return holder


def refuse_busy(busy: Busy, spec: Spec | None, *, command: str) -> ConfigError:
    """For commands that cannot join a live run (``run``, ``retry-failed``): the error to raise."""
    holder = busy.holder
    if spec is not None:
        new = inputs_of(spec)
        changes = input_changes(holder.inputs, new)
        if changes:
            return refusal(busy.root, holder.inputs, new, changes, whose=f"the live {holder.describe()}", live=True)
    return ResultsBusy(f"results_dir {busy.root} is in use by {holder.describe()}; `producer {command}` "
                       "cannot share it. Wait for that producer to finish, or use another --results-dir.")
