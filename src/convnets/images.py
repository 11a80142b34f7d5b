"""Decoding one image file into a fixed-size uint8 array, or saying why it can't be.

Real photo collections hold files that are empty, cut short, not images at
all, in another format than their name says, in grayscale or CMYK, or so
large that decoding them would exhaust memory. `load_image` decodes what can
be used (noting conversions) and raises `BadImage` with a short, stable
reason code for the rest, so a stage can set the file aside and count it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Formats we decode. Pillow knows many more (EPS even runs Ghostscript); a
# training photo is never one of them, so anything else is "not an image".
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")

# The format a file's extension promises, to notice e.g. a PNG named .jpg.
EXTENSION_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}

# Reason codes, as counted in preprocess's report.json (docs/data.md explains each).
MISSING = "missing"
EMPTY = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_MANY_PIXELS = "too_many_pixels"


class BadImage(Exception):
    """The file cannot be used as a training image; `reason` is a short code, the message says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class LoadedImage:
    array: np.ndarray  # uint8 (height, width, channels)
    notes: tuple[str, ...]  # what was done to make it usable, e.g. "converted_from_CMYK"


def decode_image(path: str | Path, size, channels: int, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode `path`, convert to `channels` (1: grayscale, 3: RGB), resize to `size` (h, w).

    Returns a uint8 array of shape (h, w, channels); raises BadImage if the file is unusable.
    """
    return load_image(path, size, channels, max_pixels).array


def load_image(path: str | Path, size, channels: int, max_pixels: int) -> LoadedImage:
    """Like decode_image, and also say what was converted on the way."""
    path = Path(path)
    check_not_empty(path)
    height, width = size
    mode = "L" if channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            # Pillow warns about large images; check_pixels below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as image:
                check_pixels(image, max_pixels)
                notes = describe_conversions(image, path, mode)
                image = decode_and_resize(image, mode, width, height)
                array = np.asarray(image, dtype=np.uint8)
    except BadImage:
        raise
    except Image.DecompressionBombError:
        # Pillow refuses at open, from the header, beyond twice its MAX_IMAGE_PIXELS.
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise BadImage(TOO_MANY_PIXELS, f"more than {limit:,} pixels, Pillow's own decompression-bomb limit") from None
    except UnidentifiedImageError:
        raise BadImage(NOT_AN_IMAGE, "not a JPEG, PNG, GIF, BMP, WebP or TIFF image") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError) as exc:
        # Pillow's decoders report damage through all of these.
        reason = TRUNCATED if "truncated" in str(exc).lower() else CORRUPT
        raise BadImage(reason, f"cannot decode: {exc}") from None
    return LoadedImage(array.reshape(height, width, channels), notes)


def check_not_empty(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImage(MISSING, "file is missing") from None
    if size == 0:
        raise BadImage(EMPTY, "zero bytes")


def check_pixels(image: Image.Image, max_pixels: int) -> None:
    """Refuse before decoding: Image.open has only read the header so far."""
    width, height = image.size
    if width * height > max_pixels:
        raise BadImage(
            TOO_MANY_PIXELS,
            f"{width} x {height} = {width * height:,} pixels, above preprocess.max_pixels ({max_pixels:,})",
        )


def describe_conversions(image: Image.Image, path: Path, mode: str) -> tuple[str, ...]:
    notes = []
    expected = EXTENSION_FORMATS.get(path.suffix.lower())
    if expected and image.format != expected:
        notes.append(f"{image.format}_named_{path.suffix.lower().lstrip('.')}")
    if image.mode != mode:
        notes.append(f"converted_from_{image.mode}")
    return tuple(notes)


def decode_and_resize(image: Image.Image, mode: str, width: int, height: int) -> Image.Image:
    if image.format == "JPEG":
        # Let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while staying at least
        # the target size: a large photo then never exists in memory at full size.
        image.draft(mode, (width, height))
    image.load()
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow's advice for palette images with transparency
    image = image.convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return image


def load_chunk_into(
    paths: list[str], target: str, first_offset: int, size, channels: int, max_pixels: int
) -> list[tuple]:
    """`load_image` over several files, for a worker process: the pixels go straight into `target`.

    The i-th file's pixels are written at byte first_offset + i x (bytes per image)
    of the output file, its row in manifest order (the parent closes the gaps the
    bad files leave), so the pixels never travel back through a pipe: sending them
    cost more CPU than decoding. Returns per file ("ok", notes) or ("bad", reason,
    detail); BadImage is not returned as such: an exception whose __init__ takes
    other arguments than its message does not survive pickling back to the parent.
    """
    entries: list[tuple] = []
    fd = os.open(target, os.O_WRONLY)
    try:
        for index, path in enumerate(paths):
            try:
                loaded = load_image(path, size, channels, max_pixels)
            except BadImage as exc:
                entries.append(("bad", exc.reason, exc.detail))
                continue
            pixels = np.ascontiguousarray(loaded.array)
            os.pwrite(fd, pixels.data, first_offset + index * pixels.nbytes)
            entries.append(("ok", loaded.notes))
    finally:
        os.close(fd)
    return entries
