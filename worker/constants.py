"""File names of the results dir, and the 0-1000 box range, shared by the producer and the workers.

The steps are declared in ``worker/stepdefs.py``, the Redis keys in ``worker/keys.py``."""

from __future__ import annotations

SEED_FILE = "seed_annotations.jsonl"
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
