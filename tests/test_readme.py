"""The README's commands are the ones that work: the venv's programs, a worker that says when it is
ready, Flower outside compose without its password on the command line, `compose up --build`,
a way to put the data into the compose volume, and every secret-file variable the code reads.
"""

from __future__ import annotations

import re
import shlex
import sys

import pytest

from tests.support.fleet import ROOT
from worker.clients import gemini, openai_compat

README = (ROOT / "README.md").read_text()


def shell_commands() -> list[list[str]]:
    """Every command in the README's ``bash`` blocks as argv: continuations joined, comments and
    leading ``VAR=value`` assignments dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            argv = shlex.split(line, comments=True)
            while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
                argv.pop(0)
            if argv:
                out.append(argv)
    return out


COMMANDS = shell_commands()


def program(argv: list[str]) -> str:
    return argv[0].rsplit("/", 1)[-1]


def test_producer_and_celery_are_the_venvs():
    ours = [argv for argv in COMMANDS if program(argv) in ("producer", "celery")]
    assert len(ours) >= 8
    assert all(argv[0] in (".venv/bin/producer", ".venv/bin/celery") for argv in ours), [
        " ".join(a) for a in ours if not a[0].startswith(".venv/bin/")]


def test_the_worker_command_logs_at_info_so_it_says_ready():
    workers = [argv for argv in COMMANDS if program(argv) == "celery" and argv[1:4] == ["-A", "worker", "worker"]]
    assert workers
    for argv in workers:
        assert "-l" in argv and argv[argv.index("-l") + 1] == "INFO", argv
    assert '"celery@<host> ready."' in README


def test_flower_runs_outside_compose_without_its_password_in_argv():
    flowers = [argv for argv in COMMANDS if program(argv) == "celery" and argv[1:4] == ["-A", "worker", "flower"]]
    assert flowers, "no command to run Flower outside compose"
    for argv in flowers:
        assert not any(a.startswith("--basic-auth") for a in argv)
        assert "--address=127.0.0.1" in argv
    assert 'FLOWER_BASIC_AUTH="admin:$(cat' in README


def test_compose_up_always_builds_and_data_goes_into_the_volume():
    ups = [argv for argv in COMMANDS if argv[:3] == ["docker", "compose", "up"]]
    assert ups and all("--build" in argv for argv in ups)
    copies = [argv for argv in COMMANDS if argv[:3] == ["docker", "compose", "run"] and "cp" in argv]
    assert copies and any(a.endswith(":/import:ro") for a in copies[0]) and copies[0][-1].startswith("/data/")


def test_every_secret_file_variable_the_code_reads_is_documented():
    for var in (*gemini.KEY_ENV, *openai_compat.KEY_ENV):
        assert f"`{var}_FILE`" in README, var
    assert "`REDIS_PASSWORD_FILE`" in README and "`FLOWER_BIND`" in README
    assert "REDIS_PASSWORD=" not in README and "FLOWER_PASSWORD=" not in README  # the old env values


@pytest.mark.integration
def test_the_readme_worker_command_prints_ready(fleet, fleet_env):
    """The worker line as written (the venv's celery is this interpreter's), against a real Redis:
    ``Fleet.start`` waits for its "ready." line and fails if it never comes."""
    (argv,) = [a for a in COMMANDS if program(a) == "celery" and a[1:4] == ["-A", "worker", "worker"]]
    (w,) = fleet.start(1, argv=[sys.executable, "-m", "celery", *argv[1:]])
    assert re.search(r"celery@\S+ ready\.", w.text())
