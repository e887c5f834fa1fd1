"""File names of the results dir, and the 0-1000 box range, shared by the producer and the workers.

The steps are declared in ``worker/stepdefs.py``, the Redis keys in ``worker/keys.py``."""

from __future__ import annotations

SEED_FILE = "seed_annotations.jsonl"
#: The field of a seed line holding the image's ordinal: its bit in the done bitmaps
#: (``worker.runstate``, ``bits:<step>``). Stable for the image across re-seeds
#: (``producer.seed.write_seed``); stripped from a step's input (``worker.steps.input_record``).
#: Named so that it cannot take the place of a field of the user's own records (an input jsonl's
#: lines are seeded with every field they have).
SEED_ORDINAL = "_refexp_ordinal"
FAILURES_FILE = "failures.jsonl"
FINAL_FILE = "annotations.jsonl"
RUN_FILE = "run.json"
# One producer per results dir: it holds an flock on this file (producer/guard.py).
LOCK_FILE = ".producer.lock"
SINK_FILE = "annotations.jsonl"
LEGACY_DIR = "labels"
SPOOL_DIR = ".spool"  # answers paid for but not yet written (worker/tasks.py)

# Box coordinates the VLM sees are normalised to this range.
NORM = 1000


def seed_ordinal(seed: dict | None) -> int | None:
    """The image's ordinal from its seed line (None: no line, or a seed written before ordinals)."""
    o = (seed or {}).get(SEED_ORDINAL)
    return o if isinstance(o, int) and not isinstance(o, bool) else None
