"""Names shared by the producer and the workers: queue, Redis keys, file names, step ids."""

from __future__ import annotations

QUEUE = "refexp"
KEY_PREFIX = "refexp"

SEED_FILE = "seed_annotations.jsonl"
FAILURES_FILE = "failures.jsonl"
FINAL_FILE = "annotations.jsonl"
RUN_FILE = "run.json"
# One producer per results dir: it holds an flock on this file (producer/guard.py).
LOCK_FILE = ".producer.lock"
SINK_FILE = "annotations.jsonl"
LEGACY_DIR = "labels"
SPOOL_DIR = ".spool"  # answers paid for but not yet written (worker/tasks.py)

# Step number -> name, as in the reference; directory is step_<N>_<name>.
STEP_NAMES: dict[int, str] = {
    0: "region_expr",
    1: "image_caption",
    2: "grounding_expr",
    3: "double_check",
}
ALL_STEPS: tuple[int, ...] = (0, 1, 2, 3)
# Steps 2 and 3 never head a chord and nobody reads their status, so they store no result. The
# producer sends tasks by name (it need not import the task module), so this travels in the
# message as well as on the task.
RESULTLESS_STEPS = frozenset({2, 3})


def task_name(step: int) -> str:
    """The Celery task name of a step: ``refexp.<step name>``."""
    return f"refexp.{STEP_NAMES[step]}"

# Box coordinates the VLM sees are normalised to this range.
NORM = 1000


def step_dir_name(step: int) -> str:
    """``step_<N>_<name>``, the reference's directory name for a step."""
    return f"step_{step}_{STEP_NAMES[step]}"
