"""The pipeline, declared once: which steps exist, what each reads, and how it is scheduled.

Everything that depends on the shape of the pipeline reads this table: the canvas a producer
publishes (``producer/publish.py``: the steps without upstream run side by side as a chord
header, the others chain after it), the wiring check before enqueueing (``producer/runs.py``),
what a task loads before its call (``worker/execute.py``), which record ``finalize`` keeps
(``worker/steps/__init__.py::final_record``), the Celery task names and result storage
(``worker/tasks.py``), the output layout (``worker/layout.py``) and the conversation policy of
each step (``worker/steps/converse.py``). Adding a step means a row here and a step module in
``worker/steps/`` (registered in ``worker/steps/__init__.py::MODULES``).

This module imports nothing of ours but the key names, so a publisher process (which only needs
task names) stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.keys import PRIORITY_STEPS

#: Message priorities (Redis: lower is served first): the last step, the middle step, the head
#: steps. Headers wait only while later steps are queued, and every image has at most one of
#: each (plus bounded retries), so headers are never starved for ever. The last step must stay
#: at 0: Celery sends a chain's next task with ``priority=None`` (``task_inherit_parent_priority``
#: is off), which the transport files under its default, 0, whatever the signature said
#: (tests/integration/test_depth_first.py). The chord body (sent with ``delay()``) and retries
#: (``delivery_info["priority"]``) keep the signature's priority.
PRIORITY_LAST, PRIORITY_MIDDLE, PRIORITY_HEAD = PRIORITY_STEPS[0], PRIORITY_STEPS[1], PRIORITY_STEPS[2]


@dataclass(frozen=True)
class StepDef:
    """One step of the pipeline.

    :param number: the reference's step number (``workflow.steps`` lists these).
    :param name: the reference's name; directory ``step_<N>_<name>``, task ``refexp.<name>``.
    :param module: the module holding the step's pure logic (``build_prompt``, ``parse``,
        ``record``, ``legacy``, ``empty``, ``n_items``; ``merge`` when it re-asks).
    :param needs: steps whose record must exist before this one runs (else it is *blocked*).
    :param needs_when_run: steps whose record must exist when they are in the run's steps
        (step 2 waits for the caption only when step 1 runs).
    :param reads: steps whose records are merged into this step's input when present.
    :param reads_seed: whether the input starts from the image's seed record (step 3 works on
        step 2's record alone).
    :param reask_missing: a cut answer keeps what it holds and the model is asked again about
        the missing ids only (KITTI boxes, groups), instead of asking again whole.
    :param reask_silent_cut: an answer cut mid-object under a clean finish reason gets the
        same re-ask (the ids it never reached are known).
    :param empty_means_none_kept: a cleanly finished empty answer is an answer ("every box
        removed"), not a failure.
    :param tokens_per_box: output tokens per box by answer mode (text repeats coordinates).
    :param priority: the Celery priority of the step's messages. On kombu's Redis transport a
        lower number is served first (each worker's BRPOP lists the queue's priority lists in
        order), so later steps carry lower numbers: an image already started is finished before
        a new image's head steps run (depth-first). Each value is one of ``worker.keys.
        PRIORITY_STEPS``, so no two steps share a list by rounding; the fleet budget's wait
        list honours the same order (worker/budget.py).
    """

    number: int
    name: str
    module: str
    needs: tuple[int, ...] = ()
    needs_when_run: tuple[int, ...] = ()
    reads: tuple[int, ...] = ()
    reads_seed: bool = True
    reask_missing: bool = False
    reask_silent_cut: bool = False
    empty_means_none_kept: bool = False
    tokens_per_box: dict[str, int] = field(default_factory=lambda: {"text": 0, "structured": 0})
    priority: int = PRIORITY_HEAD

    @property
    def head(self) -> bool:
        """Runs on the seed alone, side by side with the other head steps (the chord header)."""
        return not self.reads

    @property
    def stores_result(self) -> bool:
        """No task stores its status: nothing reads a result. Chord counting does not need the
        header tasks' results stored either: Celery's ``Backend.mark_as_done`` calls
        ``on_chord_part_return`` (which keeps the status in the chord's own join key, deleted
        when the body is sent) whether or not the result is stored (celery/backends/base.py,
        5.7; proved with real workers by tests/integration/test_fleet.py). Storing it cost 3
        Redis commands per header task and a ~360-byte key per task kept for ``result_expires``
        (bench/redis_cost.py)."""
        return False

    @property
    def dir_name(self) -> str:
        """``step_<N>_<name>``, the reference's directory name."""
        return f"step_{self.number}_{self.name}"

    @property
    def task_name(self) -> str:
        return f"refexp.{self.name}"

    @property
    def record_name(self) -> str:
        """How records name the step in ``pipeline_steps`` and ``meta``: ``step<N>_<name>``."""
        return f"step{self.number}_{self.name}"

    def required(self, steps: list[int] | tuple[int, ...]) -> tuple[int, ...]:
        """The upstream steps whose records must exist for a run of ``steps``."""
        return self.needs + tuple(s for s in self.needs_when_run if s in steps)


PIPELINE: tuple[StepDef, ...] = (
    StepDef(0, "region_expr", "worker.steps.region_expr", reask_missing=True, reask_silent_cut=True,
            tokens_per_box={"text": 70, "structured": 45}),
    StepDef(1, "image_caption", "worker.steps.image_caption"),
    StepDef(2, "grounding_expr", "worker.steps.grounding_expr", needs=(0,), needs_when_run=(1,), reads=(0, 1),
            tokens_per_box={"text": 40, "structured": 20}, priority=PRIORITY_MIDDLE),
    StepDef(3, "double_check", "worker.steps.double_check", needs=(2,), reads=(2,), reads_seed=False,
            reask_missing=True, empty_means_none_kept=True, tokens_per_box={"text": 35, "structured": 15},
            priority=PRIORITY_LAST),
)

STEP: dict[int, StepDef] = {d.number: d for d in PIPELINE}
ALL_STEPS: tuple[int, ...] = tuple(STEP)
STEP_NAMES: dict[int, str] = {d.number: d.name for d in PIPELINE}
RESULTLESS_STEPS = frozenset(d.number for d in PIPELINE if not d.stores_result)
#: Step name -> message priority, for code that knows a call by its step name (the budget).
PRIORITY_BY_NAME: dict[str, int] = {d.name: d.priority for d in PIPELINE}


def for_module(module: str) -> StepDef:
    """The step whose logic lives in ``module`` (a step module names itself: ``for_module(__name__)``)."""
    for d in PIPELINE:
        if d.module == module:
            return d
    raise LookupError(f"{module} is not a step module of worker/stepdefs.py's PIPELINE")


def task_name(step: int) -> str:
    """The Celery task name of a step: ``refexp.<step name>``."""
    return STEP[step].task_name


def step_dir_name(step: int) -> str:
    """``step_<N>_<name>``, the reference's directory name for a step."""
    return STEP[step].dir_name


def final_steps(steps: list[int] | tuple[int, ...]) -> list[int]:
    """The steps whose records make an image's final record: the last step that builds on
    others (its record carries everything before it), or each head step when only those run."""
    tail = [s for s in steps if not STEP[s].head]
    return [max(tail)] if tail else sorted(steps)


def wiring_errors(steps: list[int], exists: dict[int, bool]) -> list[str]:
    """Steps that need another step which neither runs nor has results (``exists``)."""
    out = []
    for s in steps:
        for need in STEP[s].needs:
            if need not in steps and not exists.get(need, False):
                out.append(f"step {s} reads step {need}'s results, but step {need} is not in the steps "
                           "and has no results here")
    return out


def first_wave(remaining: list[int] | tuple[int, ...]) -> list[int]:
    """Batch mode: the steps of ``remaining`` that can start now (the head steps, else the first
    later one). The producer publishes these alone, with no chord or chain: each step task
    publishes the image's next step itself once it settles (``worker/batchflow.py``), since a
    step waiting in a provider job must not count as done towards a chord."""
    heads = [s for s in remaining if STEP[s].head]
    return heads or sorted(remaining)[:1]


def next_step(step: int, steps: list[int] | tuple[int, ...]) -> tuple[int | None, tuple[int, ...]]:
    """The step to publish after ``step`` settles in a run of ``steps``, and the steps that must
    all be settled first (the head steps, when ``step`` is one of them): ``(None, ())`` at the end."""
    tail = sorted(s for s in steps if not STEP[s].head)
    if STEP[step].head:
        heads = tuple(sorted(s for s in steps if STEP[s].head))
        return (tail[0], heads) if tail else (None, ())
    later = [s for s in tail if s > step]
    return (later[0], ()) if later else (None, ())
