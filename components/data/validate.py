"""Validation of incoming samples, shared by every importer.

Each check raises :class:`SampleError` naming the file (or the JSON file and the id) and the
reason. A :class:`Validator` applies the dataset's policy: ``fail`` (the default) stops the
prepare stage at the first bad sample; ``quarantine`` sets the sample aside through the
writer (listed in ``quarantine/report.json``) and goes on. Nothing is ever dropped silently.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.data.canonical import DatasetError, DatasetWriter

Policy = Literal["fail", "quarantine"]
ACCEPTED_MODES = ("RGB", "RGBA", "L", "LA", "P")


class SampleError(DatasetError):
    """One bad input: ``file`` and ``reason`` say which and why."""

    def __init__(self, file: str | Path, reason: str) -> None:
        self.file = str(file)
        self.reason = reason
        super().__init__(f"{file}: {reason}")


def decode_image(data: bytes, name: str | Path) -> np.ndarray:
    """HxWx3 uint8 pixels of an encoded image; truncated, unreadable or odd-mode files raise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
            if mode not in ACCEPTED_MODES:
                raise SampleError(name, f"unsupported image mode {mode!r} (expected one of {', '.join(ACCEPTED_MODES)})")
            im.load()  # decodes fully: a truncated file fails here, not at training time
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except SampleError:
        raise
    except Image.DecompressionBombError as exc:
        raise SampleError(name, f"image too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        raise SampleError(name, "unreadable image (not a recognised image format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise SampleError(name, f"unreadable or truncated image ({exc})") from None


def read_image(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SampleError(path, "image file not found") from None
    return decode_image(data, path)


def load_json(path: Path) -> Any:
    """Parse a JSON file; non-UTF-8 or malformed content names the file and the position."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise SampleError(path, "file not found") from None
    except UnicodeDecodeError as exc:
        raise SampleError(path, f"not UTF-8 text (byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise SampleError(path, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def check_box(bbox: Iterable[float], width: int, height: int, where: str, tolerance: float = 1.0) -> list[float]:
    """A COCO ``[x, y, w, h]`` box with positive size inside the image (``tolerance`` pixels of slack)."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise SampleError(where, f"box {bbox!r} is not four numbers [x, y, w, h]") from None
    if not (w > 0 and h > 0):
        raise SampleError(where, f"box {[x, y, w, h]} has non-positive size")
    if x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
        raise SampleError(where, f"box {[x, y, w, h]} lies outside the {width}x{height} image")
    return [x, y, w, h]


def check_mask_shape(mask: np.ndarray, height: int, width: int, where: str) -> np.ndarray:
    if mask.shape[:2] != (height, width):
        raise SampleError(where, f"mask of shape {mask.shape[0]}x{mask.shape[1]} for a {height}x{width} image")
    return mask


def check_unique(ids: Iterable[Any], what: str, where: str) -> None:
    seen: set[Any] = set()
    for i in ids:
        if i in seen:
            raise SampleError(where, f"duplicate {what} id {i!r}")
        seen.add(i)


class Validator:
    """Applies the policy to :class:`SampleError` raised while importing one sample."""

    def __init__(self, policy: Policy, writer: DatasetWriter) -> None:
        if policy not in ("fail", "quarantine"):
            raise ValueError(f"unknown validation policy {policy!r}; expected 'fail' or 'quarantine'")
        self.policy = policy
        self.writer = writer
        self.quarantined: list[SampleError] = []

    def reject(self, error: SampleError, payload: bytes | None = None) -> None:
        """Raise (fail-fast) or quarantine the sample, keeping its bytes for inspection."""
        if self.policy == "fail":
            raise error
        self.quarantined.append(error)
        self.writer.quarantine(error.file, error.reason, payload)
