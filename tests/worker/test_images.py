"""Image access: header-only size reads, and the bytes a VLM call sends."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from worker.errors import InputError
from worker.images import ImagePayload, load_payload, open_rgb, read_size


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but whose pixel data is a few bytes:
    reading its size works, decoding it cannot."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _chunk(b"IEND", b""))


def save(img: Image.Image, path, fmt: str, **kw):
    img.save(path, format=fmt, **kw)
    return path


@pytest.fixture
def rgb_png(tmp_path):
    return save(Image.new("RGB", (32, 24), (200, 10, 10)), tmp_path / "a.png", "PNG")


@pytest.fixture
def rgb_jpeg(tmp_path):
    return save(Image.new("RGB", (40, 30), (10, 200, 10)), tmp_path / "b.jpg", "JPEG")


# --------------------------------------------------------------------------- read_size


def test_read_size_small_png(rgb_png):
    assert read_size(rgb_png) == (32, 24)


def test_read_size_jpeg_with_str_path(rgb_jpeg):
    assert read_size(str(rgb_jpeg)) == (40, 30)


def test_read_size_reads_header_only(tmp_path):
    # 80 Mpx declared, a few bytes of pixel data: only a header read can succeed.
    p = tmp_path / "big.png"
    p.write_bytes(png_header_only(10_000, 8_000))
    assert read_size(p, max_pixels=100_000_000) == (10_000, 8_000)


def test_read_size_huge_declared_size_is_a_clear_error(tmp_path):
    p = tmp_path / "huge.png"
    p.write_bytes(png_header_only(20_000, 20_000))
    with pytest.raises(InputError) as exc:
        read_size(p)
    assert str(p) in str(exc.value)


def test_read_size_huge_declared_size_within_a_raised_limit(tmp_path):
    # The limit error tells users to raise vlm.max_image_pixels; doing so must let the image through.
    p = tmp_path / "huge.png"
    p.write_bytes(png_header_only(20_000, 20_000))
    assert read_size(p, max_pixels=1_000_000_000) == (20_000, 20_000)


def test_read_size_max_pixels_error_names_file(rgb_png):
    with pytest.raises(InputError) as exc:
        read_size(rgb_png, max_pixels=100)
    msg = str(exc.value)
    assert str(rgb_png) in msg
    assert "32x24" in msg
    assert "max_image_pixels" in msg


def test_read_size_missing_file(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(InputError) as exc:
        read_size(p)
    assert str(p) in str(exc.value)


def test_read_size_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n")
    with pytest.raises(InputError) as exc:
        read_size(p)
    assert str(p) in str(exc.value)


def test_read_size_zero_bytes(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(InputError) as exc:
        read_size(p)
    assert str(p) in str(exc.value)


# --------------------------------------------------------------------------- load_payload


def test_load_payload_rgb_png_keeps_bytes(rgb_png):
    payload = load_payload(rgb_png)
    assert isinstance(payload, ImagePayload)
    assert payload.data == rgb_png.read_bytes()
    assert payload.mime == "image/png"
    assert (payload.width, payload.height) == (32, 24)
    assert payload.reencoded is False
    assert payload.path == str(rgb_png)


def test_load_payload_rgb_jpeg_keeps_bytes(rgb_jpeg):
    payload = load_payload(rgb_jpeg)
    assert payload.data == rgb_jpeg.read_bytes()
    assert payload.mime == "image/jpeg"
    assert (payload.width, payload.height) == (40, 30)
    assert payload.reencoded is False


def test_load_payload_mime_from_content_not_name(tmp_path):
    # a PNG saved with a .jpg name is sent as what it is
    p = save(Image.new("RGB", (8, 8)), tmp_path / "misnamed.jpg", "PNG")
    payload = load_payload(p)
    assert payload.mime == "image/png"
    assert payload.data == p.read_bytes()


def _assert_reencoded_png(payload: ImagePayload, size: tuple[int, int], original: bytes):
    assert payload.reencoded is True
    assert payload.mime == "image/png"
    assert payload.data != original
    assert payload.data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(payload.data)) as im:
        assert im.format == "PNG"
        assert im.size == size
        assert im.mode in ("RGB", "RGBA")
    assert (payload.width, payload.height) == size


def test_load_payload_palette_png_reencoded(tmp_path):
    img = Image.new("RGB", (16, 12), (0, 0, 255)).convert("P")
    p = save(img, tmp_path / "pal.png", "PNG")
    with Image.open(p) as check:
        assert check.mode == "P"
    payload = load_payload(p)
    _assert_reencoded_png(payload, (16, 12), p.read_bytes())
    assert open_rgb(payload).getpixel((0, 0)) == (0, 0, 255)


def test_load_payload_cmyk_jpeg_reencoded(tmp_path):
    p = save(Image.new("CMYK", (20, 10), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", "JPEG")
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    payload = load_payload(p)
    _assert_reencoded_png(payload, (20, 10), p.read_bytes())


def test_load_payload_16bit_png_reencoded(tmp_path):
    p = save(Image.new("I;16", (10, 10), 40000), tmp_path / "deep.png", "PNG")
    with Image.open(p) as check:
        assert check.mode.startswith("I")
    payload = load_payload(p)
    _assert_reencoded_png(payload, (10, 10), p.read_bytes())


def test_load_payload_zero_bytes(tmp_path):
    p = tmp_path / "zero.jpg"
    p.write_bytes(b"")
    with pytest.raises(InputError) as exc:
        load_payload(p)
    assert str(p) in str(exc.value)
    assert "empty" in str(exc.value)


def test_load_payload_truncated_jpeg(tmp_path):
    data = save(Image.effect_noise((64, 64), 50).convert("RGB"), tmp_path / "full.jpg", "JPEG").read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        load_payload(p)
    assert str(p) in str(exc.value)


def test_load_payload_truncated_png(tmp_path):
    data = save(Image.effect_noise((64, 64), 50).convert("RGB"), tmp_path / "full.png", "PNG").read_bytes()
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as exc:
        load_payload(p)
    assert str(p) in str(exc.value)


def test_load_payload_header_only_png_fails_to_decode(tmp_path):
    p = tmp_path / "hollow.png"
    p.write_bytes(png_header_only(100, 100))
    with pytest.raises(InputError) as exc:
        load_payload(p)
    assert str(p) in str(exc.value)


def test_load_payload_text_named_jpg(tmp_path):
    p = tmp_path / "readme.jpg"
    p.write_text("hello, I am text\n")
    with pytest.raises(InputError) as exc:
        load_payload(p)
    assert str(p) in str(exc.value)


def test_load_payload_missing_file(tmp_path):
    p = tmp_path / "gone.png"
    with pytest.raises(InputError) as exc:
        load_payload(p)
    assert str(p) in str(exc.value)


def test_load_payload_max_pixels_names_file(rgb_png):
    with pytest.raises(InputError) as exc:
        load_payload(rgb_png, max_pixels=10)
    assert str(rgb_png) in str(exc.value)


def test_load_payload_huge_declared_size_rejected_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(png_header_only(10_000, 8_000))
    with pytest.raises(InputError) as exc:
        load_payload(p, max_pixels=1_000_000)
    assert str(p) in str(exc.value)
    assert "10000x8000" in str(exc.value)


# --------------------------------------------------------------------------- WebP (issue 13)


def test_webp_is_sent_as_it_is(tmp_path):
    p = save(Image.new("RGB", (40, 30), (10, 20, 200)), tmp_path / "w.webp", "WEBP", lossless=True)
    assert read_size(p) == (40, 30)
    payload = load_payload(p)
    assert payload.mime == "image/webp" and payload.data == p.read_bytes() and not payload.reencoded
    assert open_rgb(payload).getpixel((5, 5)) == (10, 20, 200)


def test_animated_webp_is_sent_as_its_first_frame_in_png(tmp_path):
    frames = [Image.new("RGB", (20, 10), c) for c in ((250, 0, 0), (0, 250, 0))]
    p = tmp_path / "anim.webp"
    frames[0].save(p, format="WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=100)
    payload = load_payload(p)
    assert payload.mime == "image/png" and payload.reencoded
    assert open_rgb(payload).getpixel((3, 3)) == (250, 0, 0)
