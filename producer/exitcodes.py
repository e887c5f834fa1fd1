"""The producer's exit codes: one policy for every command, in one place.

Why: scripts and CI decide on the exit code alone. A run whose every image failed used to exit 0
(the cause only in ``failures.jsonl``), so a broken key looked like a finished dataset. The table
below is printed by ``producer --help`` and copied in the README.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import IntEnum
from typing import NoReturn

import typer

from worker.errors import ConfigError


class ExitCode(IntEnum):
    """What a ``producer`` command's exit status means."""

    #: Every image ended done (or was done already); ``enqueue`` without ``--wait``: its images
    #: are published; ``status``, ``export`` ...: the command did what was asked.
    OK = 0
    #: An unexpected error (a traceback): a bug, please report it.
    CRASH = 1
    #: A usage or config error (a bad option, spec key, path, missing API key, a results dir held
    #: by another producer): nothing was started.
    USAGE = 2
    #: The run finished with some images failed (or not done); the count is printed, the reasons
    #: are in ``failures.jsonl``, and ``producer retry-failed`` tries them again.
    SOME_FAILED = 3
    #: Nothing could be seeded, or every image failed (``check-endpoint``: its one call failed).
    NONE_DONE = 4
    #: ``--timeout`` passed before the run finished; it goes on (``producer wait`` again).
    UNFINISHED = 5
    #: Redis holds nothing for the run (restarted empty, flushed, another Redis): the message says
    #: what the results dir holds and the command that resumes it.
    RUN_NOT_IN_REDIS = 6
    #: Redis stopped answering and did not come back within ``REFEXP_REDIS_PATIENCE``; nothing is
    #: lost, the same command goes on once it answers.
    REDIS_UNREACHABLE = 7
    #: Interrupted (Ctrl-C); the run is resumable by the same command.
    INTERRUPTED = 130


def for_images(done: int, not_done: int) -> ExitCode:
    """The code for a finished run: ``done`` images with a final record, ``not_done`` without
    one (failed, blocked by a failed step, missing, or not seedable)."""
    if not_done == 0 and done > 0:
        return ExitCode.OK
    if done == 0:
        return ExitCode.NONE_DONE
    return ExitCode.SOME_FAILED


HELP = ("Exit codes: 0 every image done (or already done; enqueue without --wait: published); "
        "1 unexpected error (a bug); 2 usage or config error; 3 finished with some images failed; "
        "4 nothing seeded or every image failed; 5 --timeout passed before the run finished; "
        "6 Redis holds nothing for the run; 7 Redis did not answer within REFEXP_REDIS_PATIENCE; 130 interrupted.")


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> NoReturn:
    """Say ``error: <message>`` on stderr and exit with ``code``: every command's way out."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Every command's body runs in this: a user's mistake (``ConfigError``) exits 2 with one
    clear line, Redis gone for longer than the producer's patience exits 7, never a traceback."""
    from producer.outage import OUTAGE_ERRORS

    try:
        yield
    except ConfigError as exc:
        fail(str(exc))
    except OUTAGE_ERRORS as exc:
        fail(f"{exc}\n  nothing is lost: once Redis answers again, run the same command to go on",
             ExitCode.REDIS_UNREACHABLE)
