"""The preview gallery in a real headless browser: it opens from disk and renders its panels.

Needs Chromium (Debian: ``apt-get install -y chromium``). It is part of the suite, so a machine
without it fails here with that install line instead of skipping. ``REFEXP_CHROMIUM`` names
another binary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from producer.preview import build_preview
from tests.producer.test_preview import make_run

pytestmark = pytest.mark.integration

WINDOW = (1400, 2000)


def chromium() -> str:
    for name in (os.environ.get("REFEXP_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    pytest.fail("headless Chromium is needed for the gallery test and was not found; install it "
                "(Debian/Ubuntu: `apt-get update && apt-get install -y chromium`) or set REFEXP_CHROMIUM")


def screenshot(index: Path, out: Path, profile: Path) -> Image.Image:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={out}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", index.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.is_file(), f"no screenshot (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    with Image.open(out) as im:
        return im.convert("RGB")


def assert_gallery_rendered(shot: Image.Image) -> None:
    assert shot.size == WINDOW
    stat = ImageStat.Stat(shot.convert("L"))
    assert stat.stddev[0] > 25, f"screenshot looks blank (stddev {stat.stddev[0]:.1f})"
    # the panels are photos: a text-only page (images failing to load) has far fewer colors
    colors = shot.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 3000, f"only {len(colors)} colors: the panel images did not render"
    # the header bar (#222) and a panel title bar are drawn
    assert shot.getpixel((5, 5)) == (34, 34, 34)


def test_demo_gallery_in_chromium(tmp_path):
    """The real pipeline (offline teacher) on the demo data, then the gallery, in Chromium."""
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CELERY_BROKER_URL",
                                                             "CELERY_RESULT_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "producer.cli", "demo", "--out", str(out), "--images", "5"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = build_preview(out / "results", sample=0)
    # three labelled images with three step panels each; demo_000001 and demo_000002 have no
    # labels and get one plain picture each
    assert rep.images == 5 and rep.panels == 11
    shot = screenshot(rep.index, tmp_path / "demo.png", tmp_path / "profile")
    assert_gallery_rendered(shot)


def test_synthetic_gallery_in_chromium(tmp_path):
    """Kept, removed and moved boxes, a parse warning and a failure, rendered."""
    layout = make_run(tmp_path / "run")
    rep = build_preview(layout.root, sample=0)
    shot = screenshot(rep.index, tmp_path / "synthetic.png", tmp_path / "profile")
    assert shot.size == WINDOW
    assert ImageStat.Stat(shot.convert("L")).stddev[0] > 25
    assert shot.getpixel((5, 5)) == (34, 34, 34)
