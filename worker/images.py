"""Image access: header-only size reads for seeding, and the bytes we send to a VLM.

Seeding reads only the header (PIL opens lazily), so a million images cost a million small
reads, not a million decodes. A call path reads the file once and sends its original bytes
unless the provider cannot take them (palette or 16-bit PNG, CMYK JPEG, animated WebP, other
formats).

Which files are images: JPEG, PNG and WebP, the formats both APIs take as they are (Gemini:
PNG, JPEG, WebP, HEIC, HEIF; OpenAI: PNG, JPEG, WebP, non-animated GIF). Other image formats
are skipped at seeding with the reason (``UNSUPPORTED_SUFFIXES``) rather than re-encoded on
every call.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from worker.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# Image files seeding names as skipped (suffix -> format), so a user learns why they were left out.
UNSUPPORTED_SUFFIXES = {
    ".bmp": "BMP", ".dib": "BMP", ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".heic": "HEIC",
    ".heif": "HEIF", ".avif": "AVIF", ".jp2": "JPEG 2000", ".ppm": "PPM", ".pgm": "PGM", ".pnm": "PNM",
    ".ico": "ICO", ".tga": "TGA", ".exr": "OpenEXR", ".raw": "RAW", ".dng": "DNG",
}
DEFAULT_MAX_PIXELS = 64_000_000

# Our own limit (vlm.max_image_pixels) is checked from the header before any decode; Pillow's
# fixed one would otherwise make raising ours above ~89 Mpx impossible.
Image.MAX_IMAGE_PIXELS = None

_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Modes every provider decodes as-is; anything else is re-encoded.
_SAFE_MODES = {"RGB", "L", "RGBA", "LA"}


@dataclass(frozen=True)
class ImagePayload:
    """What a VLM call sends: the bytes, their MIME type and the image's pixel size."""

    data: bytes
    mime: str
    width: int
    height: int
    path: str
    reencoded: bool = False


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


def load_payload(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImagePayload:
    """Read an image once and return the bytes to send, re-encoding only when needed.

    The image is fully decoded (``load``) so a truncated file fails here with its name rather
    than at the provider.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{p}: image file not found") from exc
    except OSError as exc:
        raise InputError(f"{p}: cannot read image ({exc})") from exc
    if not data:
        raise InputError(f"{p}: image file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                _check_pixels(p, im.width, im.height, max_pixels)
                im.load()
                fmt, mode, size = im.format, im.mode, im.size
                # An animated WebP is sent as its first frame (OpenAI takes no animation).
                if fmt in _MIME and mode in _SAFE_MODES and not getattr(im, "is_animated", False):
                    return ImagePayload(data, _MIME[fmt], size[0], size[1], str(p))
                src = im
                if mode.startswith("I;16"):
                    # 16-bit grey: scale to 8 bits; convert() alone clips every value above 255 to white.
                    src = im.convert("I").point(lambda v: v * (1 / 256)).convert("L")
                rgb = src.convert("RGBA" if "A" in mode or "transparency" in im.info else "RGB")
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{p}: image too large ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{p}: not a readable image ({exc})") from exc
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return ImagePayload(buf.getvalue(), "image/png", size[0], size[1], str(p), reencoded=True)


def open_rgb(payload: ImagePayload) -> Image.Image:
    """Decode a payload to RGB pixels (the offline teacher and the preview look at pixels)."""
    with Image.open(io.BytesIO(payload.data)) as im:
        return im.convert("RGB")
