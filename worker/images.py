"""Image access: header-only size reads for seeding, and the bytes we send to a VLM.

Seeding reads only the header (PIL opens lazily), so a million images cost a million small
reads, not a million decodes.

A call reads the file once, checks from its bytes that it is whole (:func:`check_complete`: the
marker structure up to JPEG's end-of-image, PNG's chunks and CRCs up to IEND, WebP's RIFF
sizes; a millisecond where a decode costs tens) and sends the original bytes. Only what must
change is converted — palette or 16-bit PNG, CMYK JPEG, animated WebP, other formats, or any
image above ``vlm.downscale_to_pixels`` — and that once per image, not once per call: the
converted bytes are kept under ``<results_dir>/.image-cache`` (every host mounts it), keyed by
the image's path, size and mtime and by the size sent, written atomically and checked like an
original when read back.

Which files are images: JPEG, PNG and WebP, the formats both APIs take as they are (Gemini:
PNG, JPEG, WebP, HEIC, HEIF; OpenAI: PNG, JPEG, WebP, non-animated GIF). Other image formats
are skipped at seeding with the reason (``UNSUPPORTED_SUFFIXES``) rather than re-encoded on
every call.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from worker.coords import downscaled_size
from worker.errors import InputError
from worker.sinks import temp_path

log = logging.getLogger("refexp.images")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Image files seeding names as skipped (suffix -> format), so a user learns why they were left out.
UNSUPPORTED_SUFFIXES = {
    ".bmp": "BMP", ".dib": "BMP", ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".heic": "HEIC",
    ".heif": "HEIF", ".avif": "AVIF", ".jp2": "JPEG 2000", ".ppm": "PPM", ".pgm": "PGM", ".pnm": "PNM",
    ".ico": "ICO", ".tga": "TGA", ".exr": "OpenEXR", ".raw": "RAW", ".dng": "DNG",
}
DEFAULT_MAX_PIXELS = 64_000_000
#: Under ``results_dir``: converted images, one file per image and size sent.
CACHE_DIR = ".image-cache"
# Part of every cache key: bump it when the conversion changes, so old entries are not reused.
CACHE_VERSION = 2  # 2: one folder per image (drop_cached)
# Quality of a downscaled JPEG (the source was lossy already; PNG would be 3-5x the bytes).
JPEG_QUALITY = 90
# zlib level of a converted PNG: level 1 writes a KITTI-size frame in ~15 ms where Pillow's
# default (6) takes ~75, for ~15% more bytes.
PNG_LEVEL = 1

# Our own limit (vlm.max_image_pixels) is checked from the header before any decode; Pillow's
# fixed one would otherwise make raising ours above ~89 Mpx impossible.
Image.MAX_IMAGE_PIXELS = None

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
_SUFFIX = {"image/jpeg": ".jpg", "image/png": ".png"}
# Modes every provider decodes as-is; anything else is re-encoded.
_SAFE_MODES = {"RGB", "L", "RGBA", "LA"}


@dataclass(frozen=True)
class ImagePayload:
    """What a VLM call sends: the bytes, their MIME type and the image's pixel size.

    ``width``/``height`` are the original image's (what the seed and the KITTI boxes speak of);
    ``sent_width``/``sent_height`` the size of ``data`` when it was downscaled (0: the same).
    """

    data: bytes
    mime: str
    width: int
    height: int
    path: str
    reencoded: bool = False
    sent_width: int = 0
    sent_height: int = 0
    cached: bool = False  # the converted bytes came from the results volume's cache
    sha256: str = ""  # of the original file's bytes (``content_hash``): part of each step's fingerprint

    @property
    def sent(self) -> tuple[int, int]:
        """``(width, height)`` of the bytes sent."""
        return (self.sent_width or self.width), (self.sent_height or self.height)


class Incomplete(ValueError):
    """An image's bytes end or break before the format says they should (:func:`check_complete`)."""

    def __init__(self, message: str, *, truncated: bool):
        super().__init__(message)
        self.truncated = truncated


def _check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InputError(
            f"{path}: image is {width}x{height} = {width * height} pixels, above the limit of "
            f"{max_pixels} (raise vlm.max_image_pixels if this is intended)"
        )


def read_size(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Width and height from the header only; raises InputError naming the file."""
    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                width, height = im.size
    except FileNotFoundError as exc:
        raise InputError(f"{p}: image file not found") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{p}: image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{p}: not a readable image ({exc})") from exc
    if width <= 0 or height <= 0:
        raise InputError(f"{p}: image has no pixels ({width}x{height})")
    _check_pixels(p, width, height, max_pixels)
    return width, height


# --------------------------------------------------------------------------- integrity

# In JPEG entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), a restart marker
# (D0-D7) or another 0xFF (fill): anything else is the marker that ends the scan.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _truncated(why: str) -> Incomplete:
    return Incomplete(why, truncated=True)


def _corrupt(why: str) -> Incomplete:
    return Incomplete(why, truncated=False)


def _check_jpeg(data: bytes) -> None:
    """Walk the marker segments, and each scan to the marker that ends it, up to end-of-image.

    Bytes after the end-of-image marker (camera trailers, a second picture) are allowed, and so
    are stray bytes between segments (libjpeg skips them too); a marker no JPEG has is not.
    """
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise _corrupt("no JPEG start-of-image marker")
    pos, scans = 2, 0
    while True:
        if pos >= n - 1:
            raise _truncated("it ends before its end-of-image marker" if scans else
                             "it ends before its image data")
        if data[pos] != 0xFF:
            nxt = data.find(b"\xff", pos)
            if nxt < 0:
                raise _truncated("it ends before its end-of-image marker")
            pos = nxt
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            if not scans:
                raise _corrupt("end-of-image marker before any image data")
            return
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        if marker < 0xC0 or marker == 0xD8:
            raise _corrupt(f"invalid JPEG marker 0xFF{marker:02X} at byte {pos}")
        if pos + 4 > n:
            raise _truncated(f"it ends inside the segment at byte {pos}")
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end < pos + 4:
            raise _corrupt(f"a JPEG segment of impossible length at byte {pos}")
        if end > n:
            raise _truncated(f"it ends inside the segment at byte {pos}")
        if marker != 0xDA:
            pos = end
            continue
        scans += 1
        m = _SCAN_END.search(data, end)
        if m is None:
            raise _truncated("it ends inside its image data (no end-of-image marker)")
        pos = m.start()


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Deflate never packs more than ~1032 bytes into one: image data smaller than raw/1032 is hollow.
_DEFLATE_MAX_RATIO = 1032


def _png_raw_size(ihdr: bytes | memoryview) -> int:
    """The bytes a non-interlaced image of this IHDR inflates to (a filter byte per row)."""
    width, height = int.from_bytes(ihdr[0:4], "big"), int.from_bytes(ihdr[4:8], "big")
    depth, color = ihdr[8], ihdr[9]
    return height * (1 + -(-width * _PNG_CHANNELS.get(color, 1) * depth // 8))


def _check_png(data: bytes) -> None:
    """Walk the chunks to IEND, checking each one's CRC (which catches bytes overwritten inside),
    and that the image data could hold the pixels the header declares at all."""
    n = len(data)
    if data[:8] != _PNG_SIGNATURE:
        raise _corrupt("no PNG signature")
    view = memoryview(data)
    pos, idat, raw = 8, 0, 0
    while True:
        if pos + 8 > n:
            raise _truncated("it ends before its IEND chunk")
        length = int.from_bytes(view[pos:pos + 4], "big")
        kind = bytes(view[pos + 4:pos + 8])
        if not kind.isalpha():
            raise _corrupt(f"not a PNG chunk at byte {pos}")
        if pos == 8 and kind != b"IHDR":
            raise _corrupt("its first chunk is not IHDR")
        end = pos + 12 + length
        if end > n:
            raise _truncated(f"it ends inside its {kind.decode()} chunk at byte {pos}")
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            raise _corrupt(f"its {kind.decode()} chunk at byte {pos} fails its CRC")
        if kind == b"IHDR" and length >= 13:
            raw = _png_raw_size(view[pos + 8:pos + 21])
        elif kind == b"IDAT":
            idat += length
        elif kind == b"IEND":
            if not idat:
                raise _corrupt("it has no image data (IDAT)")
            if idat * _DEFLATE_MAX_RATIO + 64 < raw:
                raise _corrupt(f"its {idat} bytes of image data cannot hold the {raw} its header declares")
            return
        pos = end


def _check_webp(data: bytes) -> None:
    """The RIFF size against the file's, and every chunk inside it."""
    n = len(data)
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise _corrupt("no RIFF/WEBP header")
    total = 8 + int.from_bytes(data[4:8], "little")
    if total > n:
        raise _truncated(f"its RIFF header says {total} bytes, the file has {n}")
    pos, chunks = 12, 0
    while pos < total:
        if pos + 8 > total:
            raise _corrupt(f"a chunk header cut at byte {pos}")
        end = pos + 8 + int.from_bytes(data[pos + 4:pos + 8], "little")
        if end > total:
            raise _corrupt(f"its {data[pos:pos + 4].decode('latin-1')!r} chunk at byte {pos} runs past the RIFF size")
        chunks += 1
        pos = end + (end & 1)  # chunks are padded to an even size
    if not chunks:
        raise _corrupt("no WebP chunks")


_CHECKS = {"JPEG": _check_jpeg, "PNG": _check_png, "WEBP": _check_webp}


def sniff(data: bytes) -> str:
    """The format ``data`` starts like (Pillow's name), or "" for one :func:`check_complete` has no check for."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == _PNG_SIGNATURE:
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return ""


def check_complete(data: bytes, fmt: str) -> None:
    """Raise :class:`Incomplete` when ``data`` (a ``fmt`` image, PIL's format name) is cut short
    or broken in its structure; formats without a check here pass (they are converted, which
    decodes them whole).

    What this cannot see: pixel data that is structurally whole but wrong inside (a JPEG scan
    with bytes overwritten, a PNG whose zlib stream was built wrong before its CRCs were). The
    endpoint decodes those into noise or refuses them (a permanent 4xx, recorded as the
    image-step's failure): the price of not decoding every image on every call.
    """
    check = _CHECKS.get(fmt)
    if check is not None:
        check(data)


# --------------------------------------------------------------------------- conversions

def _convert(data: bytes, mode: str, fmt: str, sent: tuple[int, int], mime: str) -> bytes:
    """Decode ``data`` and write it as ``mime`` at ``sent`` size (raises Pillow's errors)."""
    with Image.open(io.BytesIO(data)) as im:
        if fmt == "JPEG" and im.size != sent and mode in ("RGB", "L"):
            im.draft(mode, sent)  # DCT scaling: decode at 1/2, 1/4 or 1/8 when that still covers ``sent``
        im.load()
        icc = im.info.get("icc_profile")
        orientation = im.getexif().get(0x0112) if fmt == "JPEG" else None
        src: Image.Image = im
        if mode.startswith("I;16"):
            # 16-bit grey: scale to 8 bits; convert() alone clips every value above 255 to white.
            src = im.convert("I").point(lambda v: v * (1 / 256)).convert("L").convert("RGB")
        elif mode not in _SAFE_MODES or "transparency" in im.info:
            src = im.convert("RGBA" if "A" in mode or "transparency" in im.info else "RGB")
        if src.size != sent:
            src = src.resize(sent, Image.Resampling.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        extra: dict = {"icc_profile": icc} if icc and mode != "CMYK" else {}
        if mime == "image/jpeg":
            if orientation and orientation != 1:
                exif = Image.Exif()
                exif[0x0112] = orientation  # the model sees the photo the same way up as the original
                extra["exif"] = exif.tobytes()
            src.save(buf, format="JPEG", quality=JPEG_QUALITY, **extra)
        else:
            src.save(buf, format="PNG", compress_level=PNG_LEVEL, **extra)
        return buf.getvalue()


def _target_mime(fmt: str, mode: str, transparent: bool, downscaled: bool) -> str:
    """A downscaled opaque JPEG stays JPEG; everything else converted becomes PNG (lossless, as
    a re-encode of a palette/CMYK/16-bit image always was)."""
    if downscaled and fmt == "JPEG" and mode in ("RGB", "L") and not transparent:
        return "image/jpeg"
    return "image/png"


def cache_path(cache_dir: Path, image_path: str, size: int, mtime_ns: int, sent: tuple[int, int],
               mime: str) -> Path:
    """Where the converted copy of one image (at one sent size) lives. Keyed by the path every host
    reads the image under (the seed's), its size and mtime: a replaced image gets a new entry,
    and no byte of the image needs hashing to find it. Every entry of an image sits in that
    image's own folder (``image_cache_dir``), so ``drop_cached`` finds them from the path alone."""
    key = hashlib.sha256(f"{CACHE_VERSION}\0{image_path}\0{size}\0{mtime_ns}\0{sent[0]}x{sent[1]}\0{mime}"
                         .encode("utf-8", "surrogateescape")).hexdigest()
    return image_cache_dir(cache_dir, image_path) / f"{key}{_SUFFIX[mime]}"


def image_cache_dir(cache_dir: Path, image_path: str) -> Path:
    """The folder of one image's converted copies."""
    key = hashlib.sha256(f"{CACHE_VERSION}\0{image_path}".encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return cache_dir / key[:2] / key


def drop_cached(cache_dir: str | Path, image_path: str) -> None:
    """Remove one image's converted copies: called once the image has settled (every step done
    or failed), so the cache holds the images in flight, not every image of the run. Best
    effort: a copy left behind costs disk only, and a later call converts again."""
    folder = image_cache_dir(Path(cache_dir), image_path)
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the converted copies of %s in %s (%s)", image_path, folder, exc)


def _read_cached(path: Path, mime: str) -> bytes | None:
    try:
        data = path.read_bytes()
        check_complete(data, "JPEG" if mime == "image/jpeg" else "PNG")
    except (OSError, Incomplete):
        return None
    return data


def _write_cached(path: Path, data: bytes) -> None:
    """Best effort: a cache that cannot be written (read-only or full volume) only costs the
    conversion again on the next call, so it never fails the image-step."""
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("cannot keep the converted image %s (%s); it will be converted again on the next call",
                    path, exc)


# --------------------------------------------------------------------------- content hashes

#: Content hashes known to this process: ``(path, size, mtime_ns) -> sha256`` (a few hundred
#: bytes an entry; bounded so a long-lived worker does not grow with the dataset).
_HASHES: dict[tuple[str, int, int], str] = {}
_HASHES_MAX = 4096


def hash_path(cache_dir: Path, image_path: str, size: int, mtime_ns: int) -> Path:
    """Where an image's content hash is kept beside its converted copies, in the image's folder
    (removed with them when the image settles): keyed like them (the seeded path, size and
    mtime), so a replaced image is hashed again and nothing else is."""
    key = hashlib.sha256(f"{CACHE_VERSION}\0sha256\0{image_path}\0{size}\0{mtime_ns}"
                         .encode("utf-8", "surrogateescape")).hexdigest()
    return image_cache_dir(cache_dir, image_path) / f"{key}.sha256"


def _remember(key: tuple[str, int, int], digest: str) -> str:
    if len(_HASHES) >= _HASHES_MAX:
        _HASHES.clear()
    _HASHES[key] = digest
    return digest


def _known_hash(key: tuple[str, int, int], cache_dir: str | Path | None) -> str | None:
    found = _HASHES.get(key)  # .get: another thread may clear the table between a test and a read
    if found:
        return found
    if cache_dir:
        try:
            text = hash_path(Path(cache_dir), *key).read_text().strip()
        except OSError:
            return None
        if re.fullmatch(r"[0-9a-f]{64}", text):
            return _remember(key, text)
    return None


def _keep_hash(key: tuple[str, int, int], digest: str, cache_dir: str | Path | None) -> str:
    """Best effort, like the converted images: a volume that takes no write costs a hash again."""
    if cache_dir:
        path = hash_path(Path(cache_dir), *key)
        tmp = temp_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(digest)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return _remember(key, digest)


def hash_of(path: str, data: bytes, st: os.stat_result, cache_dir: str | Path | None = None) -> str:
    """The sha256 of an image's bytes already read. The call path passes no ``cache_dir``: with
    the bytes in memory a hash costs well under a millisecond for a KITTI frame, less than a
    file on the volume would, so it touches no file (``content_hash`` keeps one)."""
    key = (str(path), st.st_size, st.st_mtime_ns)
    return _known_hash(key, cache_dir) or _keep_hash(key, hashlib.sha256(data).hexdigest(), cache_dir)


def content_hash(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """The sha256 of an image file's bytes, without reading them when it is known: a stat, then
    this process's table, then ``hash_path`` (written by whichever host hashed it first, kept
    while the image is in flight). A step's fingerprint holds it, so a ``reprocess: changed`` re-run can tell
    an image replaced in place (same name, new pixels) from one left alone."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError as exc:
        raise InputError(f"{p}: image file not found") from exc
    except OSError as exc:
        raise InputError(f"{p}: cannot read image ({exc})") from exc
    key = (str(path), st.st_size, st.st_mtime_ns)
    known = _known_hash(key, cache_dir)
    if known:
        return known
    data, st = _read(p)
    return hash_of(str(path), data, st, cache_dir)


# --------------------------------------------------------------------------- the call path

def _read(p: Path) -> tuple[bytes, os.stat_result]:
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError as exc:
        raise InputError(f"{p}: image file not found") from exc
    except OSError as exc:
        raise InputError(f"{p}: cannot read image ({exc})") from exc
    if not data:
        raise InputError(f"{p}: image file is empty (0 bytes)")
    return data, st


def load_payload(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, downscale_to_pixels: int = 0,
                 cache_dir: str | Path | None = None) -> ImagePayload:
    """Read an image once and return the bytes to send (see the module docstring).

    ``downscale_to_pixels`` (``vlm.downscale_to_pixels``, 0 = off) sends a larger image at
    :func:`worker.coords.downscaled_size`. ``cache_dir`` keeps converted images for the calls
    after the first (None: convert on every call). A truncated or corrupt file is an
    ``InputError`` naming it and saying which.
    """
    p = Path(path)
    data, st = _read(p)
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    fmt, mode, size = im.format or "", im.mode, im.size
                    animated = bool(getattr(im, "is_animated", False))
                    transparent = "transparency" in im.info
        except (OSError, SyntaxError, ValueError):
            check_complete(data, sniff(data))  # a cut file: say so, rather than Pillow's less telling error
            raise
        _check_pixels(p, size[0], size[1], max_pixels)
        check_complete(data, fmt)
    except InputError:
        raise
    except Incomplete as exc:
        raise InputError(f"{p}: image file is {'truncated' if exc.truncated else 'corrupt'} ({exc})") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{p}: image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{p}: not a readable image ({exc})") from exc
    sent = downscaled_size(size[0], size[1], downscale_to_pixels)
    digest = hash_of(str(path), data, st)
    # An animated WebP is sent as its first frame (OpenAI takes no animation).
    if fmt in _MIME and mode in _SAFE_MODES and not animated and sent == size:
        return ImagePayload(data, _MIME[fmt], size[0], size[1], str(p), sha256=digest)
    mime = _target_mime(fmt, mode, transparent, sent != size)
    entry = cache_path(Path(cache_dir), str(path), st.st_size, st.st_mtime_ns, sent, mime) if cache_dir else None
    converted = _read_cached(entry, mime) if entry is not None else None
    cached = converted is not None
    if converted is None:
        try:
            converted = _convert(data, mode, fmt, sent, mime)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"{p}: image too large ({exc})") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{p}: not a readable image ({exc})") from exc
        if entry is not None:
            _write_cached(entry, converted)
    return ImagePayload(converted, mime, size[0], size[1], str(p), reencoded=True,
                        sent_width=sent[0] if sent != size else 0, sent_height=sent[1] if sent != size else 0,
                        cached=cached, sha256=digest)


def open_rgb(payload: ImagePayload) -> Image.Image:
    """Decode a payload to RGB pixels (the offline teacher and the preview look at pixels)."""
    with Image.open(io.BytesIO(payload.data)) as im:
        return im.convert("RGB")
