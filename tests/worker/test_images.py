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


# --------------------------------------------------------------------------- integrity without a decode


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(size=(96, 64)) -> Image.Image:
    return Image.effect_noise(size, 60).convert("RGB")


def _fails(tmp_path, name: str, data: bytes, word: str) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(InputError) as exc:
        load_payload(p)
    msg = str(exc.value)
    assert msg.startswith(f"{p}: image file is {word}"), msg
    return msg


def test_jpeg_cut_mid_scan_is_truncated(tmp_path):
    data = _encoded(_noise(), "JPEG", quality=90)
    sos = data.index(b"\xff\xda")
    _fails(tmp_path, "cut.jpg", data[: (sos + len(data)) // 2], "truncated")


def test_jpeg_cut_before_its_scan_is_truncated(tmp_path):
    data = _encoded(_noise(), "JPEG", quality=90)
    # Cut inside the Huffman tables: the header Pillow reads lazily is there, the image is not.
    dht = data.index(b"\xff\xc4")
    _fails(tmp_path, "header.jpg", data[: dht + 6], "truncated")


def test_jpeg_missing_only_its_end_marker_is_truncated(tmp_path):
    data = _encoded(_noise(), "JPEG", quality=90)
    assert data.endswith(b"\xff\xd9")
    _fails(tmp_path, "noeoi.jpg", data[:-2], "truncated")


def test_jpeg_garbage_after_a_valid_header_is_refused(tmp_path):
    import random

    data = _encoded(_noise(), "JPEG", quality=90)
    sos = data.index(b"\xff\xda")
    end_of_header = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    rng = random.Random(7)
    for trial in range(20):
        garbage = bytes(rng.randrange(256) for _ in range(len(data) - end_of_header))
        p = tmp_path / f"garbage{trial}.jpg"
        p.write_bytes(data[:end_of_header] + garbage)
        with pytest.raises(InputError, match=r"image file is (truncated|corrupt)"):
            load_payload(p)


def test_jpeg_with_bytes_after_its_end_marker_is_sent_whole(tmp_path):
    # Camera trailers (maker notes, a second picture) follow the end-of-image marker.
    data = _encoded(_noise(), "JPEG", quality=90) + b"\x00\x00TRAILER\xff\xd8\xff"
    p = tmp_path / "trailer.jpg"
    p.write_bytes(data)
    assert load_payload(p).data == data


@pytest.mark.parametrize("kw", [{"progressive": True}, {"restart_marker_blocks": 1}, {"quality": 100},
                                {"subsampling": 0}, {"optimize": True}])
def test_valid_jpeg_variants_pass(tmp_path, kw):
    data = _encoded(_noise((200, 120)), "JPEG", **kw)
    p = tmp_path / "v.jpg"
    p.write_bytes(data)
    payload = load_payload(p)
    assert payload.data == data and not payload.reencoded


def test_grey_jpeg_passes(tmp_path):
    p = tmp_path / "grey.jpg"
    p.write_bytes(_encoded(_noise().convert("L"), "JPEG"))
    assert load_payload(p).mime == "image/jpeg"


def test_png_missing_iend_is_truncated(tmp_path):
    data = _encoded(_noise(), "PNG")
    assert data.endswith(_chunk(b"IEND", b""))
    msg = _fails(tmp_path, "noiend.png", data[:-12], "truncated")
    assert "IEND" in msg


def test_png_cut_mid_data_is_truncated(tmp_path):
    data = _encoded(_noise(), "PNG")
    msg = _fails(tmp_path, "cut.png", data[: len(data) * 6 // 10], "truncated")
    assert "IDAT" in msg


def test_png_with_bytes_overwritten_fails_its_crc(tmp_path):
    data = bytearray(_encoded(_noise(), "PNG"))
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(64)
    msg = _fails(tmp_path, "garbage.png", bytes(data), "corrupt")
    assert "CRC" in msg


def test_png_garbage_after_a_valid_header_is_corrupt(tmp_path):
    import random

    data = _encoded(_noise(), "PNG")
    first_idat = data.index(b"IDAT") - 4
    rng = random.Random(3)
    garbage = bytes(rng.randrange(256) for _ in range(len(data) - first_idat))
    _fails(tmp_path, "garbage.png", data[:first_idat] + garbage, "corrupt")


def test_interlaced_and_grey_and_alpha_pngs_pass(tmp_path):
    for i, (img, kw) in enumerate([(_noise(), {"interlace": 1}), (_noise().convert("L"), {}),
                                   (_noise().convert("RGBA"), {}), (Image.new("RGB", (4000, 3000)), {})]):
        p = tmp_path / f"ok{i}.png"
        data = _encoded(img, "PNG", **kw) if not kw else None
        if data is None:
            img.save(p, format="PNG", **kw)
        else:
            p.write_bytes(data)
        payload = load_payload(p)
        assert payload.data == p.read_bytes() and not payload.reencoded


def test_webp_truncated_against_its_riff_size(tmp_path):
    data = _encoded(_noise(), "WEBP", quality=80)
    msg = _fails(tmp_path, "cut.webp", data[: len(data) - 10], "truncated")
    assert "RIFF" in msg


def test_webp_whole_passes(tmp_path):
    for i, img in enumerate([_noise(), _noise().convert("RGBA")]):
        p = tmp_path / f"ok{i}.webp"
        p.write_bytes(_encoded(img, "WEBP", lossless=bool(i)))
        assert load_payload(p).data == p.read_bytes()


def test_check_complete_does_not_decode(monkeypatch, tmp_path):
    # The call path must not decode an image that is sent as it is.
    p = tmp_path / "a.jpg"
    p.write_bytes(_encoded(_noise(), "JPEG"))

    def no_load(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", no_load)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_load)
    assert load_payload(p).mime == "image/jpeg"


# --------------------------------------------------------------------------- converted once per image


def _cache_files(cache):
    """The converted images in the cache (not the images' content hashes kept beside them)."""
    return sorted(x for x in cache.rglob("*") if x.is_file() and x.suffix != ".sha256") if cache.exists() else []


def test_palette_png_is_converted_once_and_kept_on_the_volume(tmp_path):
    p = save(Image.new("RGB", (16, 12), (0, 0, 255)).convert("P"), tmp_path / "pal.png", "PNG")
    cache = tmp_path / "results" / ".image-cache"
    first = load_payload(p, cache_dir=cache)
    assert first.reencoded and not first.cached
    (entry,) = _cache_files(cache)
    assert entry.suffix == ".png" and entry.read_bytes() == first.data
    again = [load_payload(p, cache_dir=cache) for _ in range(3)]
    assert all(a.cached and a.data == first.data and a.mime == "image/png" for a in again)
    assert _cache_files(cache) == [entry]


def test_original_bytes_are_sent_and_nothing_cached_when_no_conversion_is_needed(rgb_png, rgb_jpeg, tmp_path):
    cache = tmp_path / "cache"
    for path in (rgb_png, rgb_jpeg):
        payload = load_payload(path, cache_dir=cache, downscale_to_pixels=100_000)
        assert payload.data == path.read_bytes() and not payload.reencoded and payload.sent == (payload.width,
                                                                                                 payload.height)
    assert not cache.exists()


def test_a_replaced_image_gets_a_new_cache_entry(tmp_path):
    p = tmp_path / "pal.png"
    cache = tmp_path / "cache"
    save(Image.new("RGB", (16, 12), (0, 0, 255)).convert("P"), p, "PNG")
    blue = load_payload(p, cache_dir=cache)
    save(Image.new("RGB", (16, 12), (255, 0, 0)).convert("P"), p, "PNG")
    import os

    os.utime(p, ns=(1, 1))  # a different mtime even on a coarse clock
    red = load_payload(p, cache_dir=cache)
    assert not red.cached and open_rgb(red).getpixel((0, 0)) == (255, 0, 0)
    assert open_rgb(blue).getpixel((0, 0)) == (0, 0, 255)
    assert len(_cache_files(cache)) == 2


def test_a_torn_cache_entry_is_converted_again(tmp_path):
    p = save(Image.new("RGB", (16, 12), (0, 0, 255)).convert("P"), tmp_path / "pal.png", "PNG")
    cache = tmp_path / "cache"
    first = load_payload(p, cache_dir=cache)
    (entry,) = _cache_files(cache)
    entry.write_bytes(first.data[:20])
    again = load_payload(p, cache_dir=cache)
    assert not again.cached and again.data == first.data and entry.read_bytes() == first.data


def test_an_unwritable_cache_only_costs_the_conversion(tmp_path, caplog):
    p = save(Image.new("RGB", (16, 12), (0, 0, 255)).convert("P"), tmp_path / "pal.png", "PNG")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    payload = load_payload(p, cache_dir=blocker / "cache")
    assert payload.reencoded and open_rgb(payload).getpixel((0, 0)) == (0, 0, 255)
    assert "converted again" in caplog.text


# --------------------------------------------------------------------------- downscale


def test_downscaled_jpeg_is_sent_smaller_as_jpeg_and_cached(tmp_path):
    p = tmp_path / "big.jpg"
    p.write_bytes(_encoded(_noise((1600, 1200)), "JPEG", quality=90))
    cache = tmp_path / "cache"
    payload = load_payload(p, downscale_to_pixels=300_000, cache_dir=cache)
    assert (payload.width, payload.height) == (1600, 1200)
    assert payload.sent == (632, 474) and payload.sent[0] * payload.sent[1] <= 300_000
    assert payload.mime == "image/jpeg" and payload.reencoded
    with Image.open(io.BytesIO(payload.data)) as im:
        assert im.size == payload.sent and im.format == "JPEG"
    assert load_payload(p, downscale_to_pixels=300_000, cache_dir=cache).cached
    # another size is another entry; the original size needs none
    assert not load_payload(p, downscale_to_pixels=200_000, cache_dir=cache).cached
    assert load_payload(p, cache_dir=cache).data == p.read_bytes()
    assert len(_cache_files(cache)) == 2


def test_downscaled_png_stays_lossless_and_keeps_alpha(tmp_path):
    p = save(_noise((800, 600)).convert("RGBA"), tmp_path / "a.png", "PNG")
    payload = load_payload(p, downscale_to_pixels=120_000)
    assert payload.mime == "image/png" and payload.sent == (400, 300)
    with Image.open(io.BytesIO(payload.data)) as im:
        assert im.mode == "RGBA" and im.size == (400, 300)


def test_downscale_keeps_the_exif_orientation(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    _noise((1000, 800)).save(p, format="JPEG", exif=exif.tobytes())
    payload = load_payload(p, downscale_to_pixels=100_000)
    with Image.open(io.BytesIO(payload.data)) as im:
        assert im.getexif().get(0x0112) == 6


def test_downscale_does_not_hide_a_truncated_image(tmp_path):
    data = _encoded(_noise((800, 600)), "JPEG")
    _fails(tmp_path, "cut.jpg", data[: len(data) * 6 // 10], "truncated")
    p = tmp_path / "cut.jpg"
    with pytest.raises(InputError, match="truncated"):
        load_payload(p, downscale_to_pixels=100_000, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_drop_cached_removes_one_image_s_copies_at_every_size_and_no_other(tmp_path):
    from worker.images import drop_cached

    cache = tmp_path / "cache"
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for p in (a, b):
        Image.new("RGB", (800, 600), (10, 20, 30)).save(p)
    for size in (100_000, 200_000):
        load_payload(a, cache_dir=cache, downscale_to_pixels=size)
    load_payload(b, cache_dir=cache, downscale_to_pixels=100_000)
    assert len(_cache_files(cache)) == 3
    drop_cached(cache, str(a))
    assert len(_cache_files(cache)) == 1
    assert load_payload(b, cache_dir=cache, downscale_to_pixels=100_000).cached  # b's copy is the one left
    drop_cached(cache, str(a))  # nothing left of a: not an error
    drop_cached(cache, str(b))
    assert _cache_files(cache) == []


def test_content_hash_is_kept_beside_the_cache_and_follows_a_replaced_image(tmp_path):
    import hashlib
    import os

    from worker import images

    p = save(Image.new("RGB", (16, 12), (0, 0, 255)), tmp_path / "a.png", "PNG")
    cache = tmp_path / "results" / ".image-cache"
    payload = load_payload(p, cache_dir=cache)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    assert payload.sha256 == digest and not cache.exists()  # a call writes nothing for it
    images._HASHES.clear()
    assert images.content_hash(p, cache) == digest  # a check reads the image once, and keeps the hash
    (kept,) = [x for x in cache.rglob("*.sha256")]
    assert kept.read_text() == digest
    # Another process: the file on the volume answers and the image is not read (shown by bytes
    # changed under the same size and mtime, which only a read would see; the key is path, size, mtime).
    images._HASHES.clear()
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[-5] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert images.content_hash(p, cache) == digest
    save(Image.new("RGB", (16, 12), (255, 0, 0)), p, "PNG")  # replaced in place: new size or mtime
    os.utime(p, ns=(1, 1))
    assert images.content_hash(p, cache) == hashlib.sha256(p.read_bytes()).hexdigest() != digest
