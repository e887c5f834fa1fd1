"""Fixtures for driving the real SDK clients over HTTP against ``tests.support.fake_vlm``.

Every test gets its own server (so queued faults and counters never leak between tests), a
clean environment (a developer's real keys must neither leak into requests nor change which
branch a test takes) and a fresh client cache.
"""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from tests.support.fake_vlm import FakeVLM
from worker.clients import factory
from worker.images import load_payload

KEY_VARS = ("GOOGLE_API_KEY", "GEMINI_API_KEY", "OPENAI_API_KEY", "NVIDIA_API_KEY")
ENV_VARS = (*KEY_VARS, *(f"{k}_FILE" for k in KEY_VARS), "OPENAI_BASE_URL",
            "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_API_VERSION", "OPENAI_CUSTOM_HEADERS")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    factory.clear_cache()
    yield
    factory.clear_cache()


@pytest.fixture
def fake_vlm():
    """A started FakeVLM, stopped after the test."""
    with FakeVLM() as fake:
        yield fake


@pytest.fixture
def make_fake():
    """``make_fake(**kwargs)``: a FakeVLM with options (api_key, models, rpm...), stopped after."""
    started: list[FakeVLM] = []

    def create(**kwargs) -> FakeVLM:
        fake = FakeVLM(**kwargs).start()
        started.append(fake)
        return fake

    yield create
    for fake in started:
        fake.stop()


def _scene(path, fmt: str):
    im = Image.new("RGB", (320, 200), (128, 128, 128))
    draw = ImageDraw.Draw(im)
    draw.rectangle([20, 60, 120, 160], fill=(200, 30, 30))
    draw.rectangle([220, 40, 300, 180], fill=(240, 240, 240))
    im.save(path, format=fmt)
    return load_payload(path)


@pytest.fixture
def png(tmp_path):
    """An ImagePayload of a 320x200 PNG (a red and a white box on gray)."""
    return _scene(tmp_path / "scene.png", "PNG")


@pytest.fixture
def jpeg(tmp_path):
    return _scene(tmp_path / "scene.jpg", "JPEG")
