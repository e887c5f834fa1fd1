"""What a worker process knows about a run, built once per run and spec version and cached.

The producer stores the spec (secrets blanked) in Redis under the run id; a task names the run
and spec hash, and the first task of a run in this process loads it, builds the VLM client
(keys from this worker's environment), the prompt templates and the fleet budget.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

import redis

from worker import settings
from worker.budget import FleetBudget, endpoint_key
from worker.clients.base import VLMClient, VLMRequest, VLMResponse
from worker.clients.factory import get_client
from worker.errors import RateLimited
from worker.images import CACHE_DIR
from worker.layout import Layout
from worker.run import Run
from worker.runstate import RunRef, RunState
from worker.spec import Spec
from worker.steps import StepOptions
from worker.steps.prompts import load_prompts

_LOCK = threading.Lock()
_CONTEXTS: dict[str, RunContext] = {}


@functools.cache
def state_redis() -> redis.Redis:
    """One connection pool per process for run state (thread-safe), with timeouts on every
    socket operation, so a stalled Redis costs a task a retry, never a wedged thread (the
    budget's BLPOP waits 1 s, well inside the timeout)."""
    return redis.Redis.from_url(settings.state_url(), health_check_interval=30, socket_keepalive=True,
                                socket_timeout=settings.REDIS_SOCKET_TIMEOUT, socket_connect_timeout=10)


@dataclass
class RunContext(Run):
    """A worker's ``Run``: the producer's, rebuilt from Redis, with this process's client and the
    fleet budget."""

    budget: FleetBudget | None = None
    _client: VLMClient | None = None

    @functools.cached_property
    def prompts(self) -> dict[str, str]:
        """The prompt templates the producer checked and stored with the run; a run enqueued by an
        older producer (none stored) reads ``workflow.prompts_file`` here. Loaded on first use, so
        a bad file is a ``ConfigError`` of the task (recorded as the image-step's failure), not
        an error while building the context, where there is nowhere to record it."""
        if self.templates is not None:
            return self.templates
        return load_prompts(self.spec.ire.workflow.prompts_file)

    @functools.cached_property
    def options(self) -> StepOptions:
        """The step options this run's VLM spec implies: derived once per run, not per task."""
        return StepOptions.from_vlm(self.spec.ire.vlm, endpoint=endpoint_key(self.spec.ire.vlm),
                                    image_cache_dir=str(Path(self.spec.results_dir) / CACHE_DIR))

    @property
    def client(self) -> VLMClient:
        # Built on first use so a run whose images all skip never needs a key.
        if self._client is None:
            self._client = BudgetedClient(get_client(self.spec.ire.vlm), self.budget)
        return self._client


class BudgetedClient:
    """A VLM client whose every call first takes a fleet-wide slot, and whose 429s are counted."""

    def __init__(self, inner: VLMClient, budget: FleetBudget):
        self.inner = inner
        self.budget = budget
        self.name = inner.name

    @property
    def structured_output(self) -> bool:
        return bool(getattr(self.inner, "structured_output", False))

    def generate(self, request: VLMRequest) -> VLMResponse:
        with self.budget.slot(request.step):
            try:
                response = self.inner.generate(request)
            except RateLimited:
                self.budget.note_rate_limited()
                raise
            self.budget.note_stated(response.stated_rate)
            return response


class RunNotInRedis(Exception):
    """Redis holds no spec for the run a message names: Redis lost it (restarted empty) or the
    message came from another Redis. Not a per-image failure: the task is retried later."""


def get_context(run_ref: str) -> RunContext:
    with _LOCK:
        ctx = _CONTEXTS.get(run_ref)
        if ctx is not None:
            return ctx
        ref = RunRef.parse(run_ref)
        run_id, spec_hash = ref.run_id, ref.spec_hash
        state = RunState(state_redis(), run_id)
        public = state.load_spec(spec_hash)
        if public is None:
            raise RunNotInRedis(f"run {run_id}: spec {spec_hash} is not in Redis (was it enqueued on this Redis, "
                                "or was Redis restarted empty? `producer enqueue` stores it again)")
        spec = Spec.model_validate(public)
        vlm = spec.ire.vlm
        timeout = vlm.gemini.timeout if vlm.backend == "gemini" else vlm.openai.timeout
        budget = FleetBudget(
            state_redis(), settings.state_url(),
            endpoint_key=endpoint_key(vlm),
            max_concurrency=vlm.max_concurrency,
            requests_per_minute=vlm.requests_per_minute,
            lease_seconds=float(timeout) + settings.budget_lease_margin(),
            ceiling=vlm.max_concurrency_ceiling,
        )
        ctx = RunContext(
            run_id=run_id,
            spec=spec,
            layout=Layout(Path(spec.results_dir), writer=run_ref),
            state=state,
            spec_hash=spec_hash,
            templates=state.load_prompts(spec_hash),
            budget=budget,
        )
        _CONTEXTS[run_ref] = ctx
        return ctx


def forget_contexts() -> None:
    """Drop cached contexts (tests, and workers reused across embedded runs)."""
    with _LOCK:
        _CONTEXTS.clear()
