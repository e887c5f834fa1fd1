"""A run, as the producer and the workers both hold it.

The producer builds one when it enqueues (``producer.runs.open_run``: the spec it checked, the
prompt templates it resolved, the spec hash its messages carry); a worker builds the same from
what the producer stored in Redis (``worker.context.get_context``, which adds the client and the
fleet budget). Both name the run in a message the same way: ``Run.ref``.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.layout import Layout
from worker.runstate import RunRef, RunState
from worker.spec import Spec


@dataclass
class Run:
    """One version of a run.

    :param run_id: the run's id (``results_dir/run.json``); its Redis keys hang off it.
    :param spec: the spec (on a worker, with the secrets blanked: keys come from its environment).
    :param layout: where its files live under ``results_dir``.
    :param state: its state in Redis.
    :param spec_hash: the version of the spec (and prompts) the messages name.
    :param templates: the prompt templates checked at enqueue (None: a run enqueued by an older
        producer, whose worker reads ``workflow.prompts_file``).
    """

    run_id: str
    spec: Spec
    layout: Layout
    state: RunState
    spec_hash: str
    templates: dict[str, str] | None = None

    @property
    def ref(self) -> str:
        """The run reference every task message of this run carries (``RunRef``)."""
        return str(RunRef(self.run_id, self.spec_hash))
