"""Reading pixels from files: image decoding to 8 bits per channel whatever the mode or bit depth, and the
IDX arrays Fashion-MNIST ships in. Written by hand: PIL clips 16-bit images when converting them, and
neither torchvision nor numpy reads IDX files from a local path.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

__all__ = ["BrokenImageError", "load_image", "to_8bit", "read_idx"]


class BrokenImageError(OSError):
    """An image file that cannot be decoded (truncated, corrupt, not an image)."""

    def __init__(self, path: str | os.PathLike, cause: BaseException) -> None:
        super().__init__(f"cannot read image {path}: {cause}")
        self.path = str(path)


def load_image(source: str | os.PathLike | bytes | IO[bytes], where: str | os.PathLike | None = None) -> Image.Image:
    """Decode one image (a file path, the encoded bytes, or a file object) to 8 bits per channel (`to_8bit`); any
    decoding failure becomes BrokenImageError naming `where` (default: the path)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()  # decode now: truncated files fail here, not later inside a transform
            return to_8bit(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BrokenImageError(source if where is None else where, e) from e


_8BIT_MODES = ("L", "LA", "RGB", "RGBA")


def to_8bit(image: Image.Image) -> Image.Image:
    """The image in L, LA, RGB or RGBA, wider values scaled, not clipped (PIL's convert clips a 16-bit
    image to 255: a gradient came out 99.6 % white). Alpha is kept; the transforms drop it.

    16-bit (I;16*, and I within [0, 65535], as older Pillow reads 16-bit PNGs): value / 257, rounded.
    F within [0, 1]: x 255. Other I / F ranges (32-bit ints, arbitrary floats): the image's own min..max.
    1 -> L; P -> RGB, or RGBA when it has a transparent colour; CMYK, YCbCr, ... -> RGB(A).
    """
    mode = image.mode
    if mode in _8BIT_MODES:
        return image
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), mode), mode="L")
    if mode == "1":
        return image.convert("L")
    if mode == "La":  # premultiplied alpha
        return image.convert("LA")
    if mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    has_alpha = any(band in ("A", "a") for band in image.getbands())
    return image.convert("RGBA" if has_alpha else "RGB")


def _scale_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """[H, W] uint8 from a single-band 16/32-bit int or float image (see to_8bit)."""
    values = np.nan_to_num(values.astype(np.float64))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0  # 65535 -> 255, 257 k -> k
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (optionally .gz) into an array; raises ValueError naming the file if corrupt."""
    path = Path(path)
    fix = "delete it and fetch it again (apt-get install --reinstall dataset-fashion-mnist, or data.download=true)"
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable gzip file ({err}); {fix}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}); {fix}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path} has a corrupt IDX header; {fix}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path} holds {len(data) - header} data bytes but its header {shape} needs {expected}; {fix}"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return array if dtype.itemsize == 1 else array.astype(dtype.newbyteorder("="))
