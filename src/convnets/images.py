"""Decoding one image file into a fixed-size uint8 array, or saying why it can't be."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImage(Exception):
    """The file cannot be used as a training image; the message says why."""


def decode_image(path: str | Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """Decode `path`, convert to `channels` (1: grayscale, 3: RGB), resize to `size` (h, w).

    Returns a uint8 array of shape (h, w, channels).
    """
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            height, width = size
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise BadImage("file is missing") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"cannot decode: {exc}") from None
    return array.reshape(height, width, channels)
