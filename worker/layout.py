"""Where every output file lives under ``results_dir`` (the reference's layout)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from worker.constants import FAILURES_FILE, FINAL_FILE, LEGACY_DIR, LOCK_FILE, RUN_FILE, SEED_FILE, SINK_FILE, SPOOL_DIR
from worker.sinks import JsonlSink, dumps, write_atomic
from worker.stepdefs import step_dir_name


@dataclass(frozen=True)
class Layout:
    root: Path
    #: Who writes through this layout (a worker: its run and spec version). A writer process
    #: takes a new part per value, so a later run's records sort after an earlier run's.
    writer: str = ""

    @property
    def seed(self) -> JsonlSink:
        """One seed record per image; tasks read theirs at the offset their message carries."""
        return JsonlSink(self.root / SEED_FILE)

    @property
    def final(self) -> Path:
        return self.root / FINAL_FILE

    @property
    def run_file(self) -> Path:
        return self.root / RUN_FILE

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def failures(self) -> JsonlSink:
        return JsonlSink(self.root / FAILURES_FILE)

    def sink(self, step: int) -> JsonlSink:
        """A step's sink: ``step_<N>_<name>/annotations.jsonl`` plus its writers' parts."""
        return JsonlSink(self.root / step_dir_name(step) / SINK_FILE, parts=True, writer=self.writer)

    def legacy_path(self, step: int, image_id: str) -> Path:
        return self.root / step_dir_name(step) / LEGACY_DIR / f"{image_id}.txt.step{step}"

    def write_legacy(self, step: int, image_id: str, text: str) -> None:
        write_atomic(self.legacy_path(step, image_id), text)

    # -- answers kept for a later write (worker/tasks.py) -----------------------------------
    def spool_path(self, step: int, image_id: str, spec_hash: str) -> Path:
        """Under the spec version that produced the answer: a later version (another model, a
        forced redo) never commits an answer its own spec did not ask for."""
        return self.root / SPOOL_DIR / spec_hash / step_dir_name(step) / f"{image_id}.json"

    def write_spool(self, step: int, image_id: str, spec_hash: str, pending: dict) -> None:
        """Keep an answer that was paid for but could not be committed because Redis was unusable
        (the retry that would carry it cannot be published either). The redelivered message,
        on whichever host, finds it here instead of calling the model again."""
        write_atomic(self.spool_path(step, image_id, spec_hash), dumps(pending))

    def read_spool(self, step: int, image_id: str, spec_hash: str) -> dict | None:
        try:
            return json.loads(self.spool_path(step, image_id, spec_hash).read_bytes())
        except (OSError, ValueError):
            return None

    def drop_spool(self, step: int, image_id: str, spec_hash: str) -> None:
        with contextlib.suppress(OSError):
            self.spool_path(step, image_id, spec_hash).unlink()

    def record_failure(
        self, *, image_id: str, step: int | str, error: BaseException | str, attempts: int,
        kind: str | None = None, **extra: object,
    ) -> None:
        """One line in ``failures.jsonl``: what failed, why, after how many attempts, and when.

        ``error`` is an exception, or a message whose error class is ``kind`` (default "Error").
        """
        if isinstance(error, BaseException):
            kind, message = type(error).__name__, str(error)
        else:
            kind, message = kind or "Error", error
        self.failures.append({
            "image_id": image_id,
            "step": step,
            "error": kind,
            "message": message,
            "attempts": attempts,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **extra,
        })
