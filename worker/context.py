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
from worker.budget import FleetBudget
from worker.clients.base import VLMClient, VLMRequest, VLMResponse
from worker.clients.factory import endpoint_key, get_client
from worker.errors import ConfigError, RateLimited
from worker.layout import Layout
from worker.runstate import RunState
from worker.spec import Spec
from worker.steps import StepOptions
from worker.steps.prompts import load_prompts

_LOCK = threading.Lock()
_CONTEXTS: dict[str, RunContext] = {}


@functools.cache
def state_redis() -> redis.Redis:
    """One connection pool per process for run state (thread-safe)."""
    return redis.Redis.from_url(settings.state_url(), health_check_interval=30, socket_keepalive=True)


@dataclass
class RunContext:
    run_id: str
    spec: Spec
    layout: Layout
    state: RunState
    templates: dict[str, str]
    budget: FleetBudget
    _client: VLMClient | None = None

    @functools.cached_property
    def options(self) -> StepOptions:
        """The step options this run's VLM spec implies: derived once per run, not per task."""
        return StepOptions.from_vlm(self.spec.ire.vlm)

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

    def generate(self, request: VLMRequest) -> VLMResponse:
        with self.budget.slot():
            try:
                return self.inner.generate(request)
            except RateLimited:
                self.budget.note_rate_limited()
                raise


def split_ref(run_ref: str) -> tuple[str, str]:
    run_id, _, spec_hash = run_ref.partition(":")
    return run_id, spec_hash


def get_context(run_ref: str) -> RunContext:
    with _LOCK:
        ctx = _CONTEXTS.get(run_ref)
        if ctx is not None:
            return ctx
        run_id, spec_hash = split_ref(run_ref)
        state = RunState(state_redis(), run_id)
        public = state.load_spec(spec_hash)
        if public is None:
            raise ConfigError(f"run {run_id}: spec {spec_hash} is not in Redis (was it enqueued on this Redis?)")
        spec = Spec.model_validate(public)
        vlm = spec.ire.vlm
        timeout = vlm.gemini.timeout if vlm.backend == "gemini" else vlm.openai.timeout
        budget = FleetBudget(
            state_redis(), settings.state_url(),
            endpoint_key=endpoint_key(vlm),
            max_concurrency=vlm.max_concurrency,
            requests_per_minute=vlm.requests_per_minute,
            lease_seconds=float(timeout) + 30.0,
        )
        ctx = RunContext(
            run_id=run_id,
            spec=spec,
            layout=Layout(Path(spec.results_dir)),
            state=state,
            templates=load_prompts(spec.ire.workflow.prompts_file),
            budget=budget,
        )
        _CONTEXTS[run_ref] = ctx
        return ctx


def forget_contexts() -> None:
    """Drop cached contexts (tests, and workers reused across embedded runs)."""
    with _LOCK:
        _CONTEXTS.clear()
