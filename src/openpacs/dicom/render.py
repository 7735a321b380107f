"""Rendering a decoded frame for display (PS3.18 8.3.5 rendered and thumbnail resources).

Owns: the parameters of a rendering request (``window=center,width[,function]``,
``viewport=vw,vh[,sx,sy,sw,sh]``, ``quality``), validated here so the HTTP layer can answer 400
with the reason; the grayscale pipeline of PS3.4 N.2 as far as a rendered image needs it —
Modality LUT (Rescale Slope/Intercept or Modality LUT Sequence, through pydicom; the enhanced
objects' shared/per-frame functional groups included), VOI (the request's window, else the data
set's first Window Center/Width with its VOI LUT Function, else its VOI LUT Sequence, else the
frame's own minimum to maximum), MONOCHROME1 inversion; colour (RGB as decoded — pydicom
already turned YCbCr into RGB —, PALETTE COLOR through its LUT, more than 8 bits scaled down);
the viewport (source region, fit inside vw×vh keeping the aspect ratio); encoding as JPEG, PNG
or GIF with Pillow.
The VOI functions are written here (PS3.3 C.11.2.1.2, three formulas) rather than taken from
pydicom's ``apply_windowing``: that one reads the window from a data set and returns float64
in the stored bit range, where a rendered image needs the request's own window straight to
8 bits; pydicom's is the oracle in the unit tests.
Must not: read files, decode pixel data or know about HTTP.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import Dataset

FUNCTIONS = {
    "linear": "LINEAR",
    "linear_exact": "LINEAR_EXACT",
    "linear-exact": "LINEAR_EXACT",
    "sigmoid": "SIGMOID",
}
MEDIA_TYPES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}
THUMBNAIL_SIZE = 128
MAX_SIDE = 8192  # largest viewport side we render


class RenderError(ValueError):
    """A rendering parameter is malformed or out of range (the reason says which)."""


@dataclass(frozen=True)
class Window:
    """A VOI window (PS3.3 C.11.2.1.2): center, width and the VOI LUT Function."""

    center: float
    width: float
    function: str = "LINEAR"

    def __post_init__(self) -> None:
        if self.function not in FUNCTIONS.values():
            raise RenderError(f"unknown VOI LUT function {self.function!r}")
        if not (math.isfinite(self.center) and math.isfinite(self.width)):
            raise RenderError("window center and width must be finite numbers")
        if self.function == "LINEAR" and self.width < 1:
            raise RenderError("a LINEAR window needs a width of at least 1")
        if self.width <= 0:
            raise RenderError("the window width must be greater than 0")

    @classmethod
    def parse(cls, text: str) -> Window:
        """``center,width[,function]`` (PS3.18 8.3.5.1.4), function linear (default),
        linear-exact / linear_exact or sigmoid, case-insensitive."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (2, 3):
            raise RenderError("window must be center,width[,function]")
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            raise RenderError("window center and width must be numbers") from None
        function = FUNCTIONS.get(parts[2].lower()) if len(parts) == 3 else "LINEAR"
        if function is None:
            raise RenderError("the window function must be linear, linear-exact or sigmoid")
        return cls(center, width, function)


@dataclass(frozen=True)
class Viewport:
    """``vw,vh[,sx,sy,sw,sh]`` (PS3.18 8.3.5.1.3): output size (either may be empty: keep the
    aspect ratio) and an optional source region (a negative sw/sh flips the image)."""

    width: int | None
    height: int | None
    region: tuple[int | None, int | None, int | None, int | None] | None = None

    @classmethod
    def parse(cls, text: str) -> Viewport:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) not in (2, 6):
            raise RenderError("viewport must be vw,vh or vw,vh,sx,sy,sw,sh")
        try:
            values = [int(p) if p else None for p in parts]
        except ValueError:
            raise RenderError("viewport values must be integers") from None
        vw, vh = values[0], values[1]
        for v in (vw, vh):
            if v is not None and not 0 < v <= MAX_SIDE:
                raise RenderError(f"viewport width and height must be 1 to {MAX_SIDE}")
        region = None
        if len(values) == 6:
            sx, sy, sw, sh = values[2:]
            if (sx is not None and sx < 0) or (sy is not None and sy < 0) or 0 in (sw, sh):
                raise RenderError("the source region needs sx, sy >= 0 and non-zero sw, sh")
            region = (sx, sy, sw, sh)
        return cls(vw, vh, region)


def parse_quality(text: str) -> int:
    try:
        quality = int(text)
    except ValueError:
        raise RenderError("quality must be an integer from 1 to 100") from None
    if not 1 <= quality <= 100:
        raise RenderError("quality must be an integer from 1 to 100")
    return quality


# ---------------------------------------------------------------------------- VOI
def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1/.2 (LINEAR, LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID), output 0–255."""
    x = values.astype(np.float64, copy=False)
    c, w = window.center, window.width
    if window.function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    elif window.function == "LINEAR_EXACT":
        y = np.clip(((x - c) / w + 0.5) * 255.0, 0.0, 255.0)
        y = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, y))
    elif w == 1:  # a step at the center (C.11.2.1.2.1 with w-1 = 0)
        y = np.where(x <= c - 0.5, 0.0, 255.0)
    else:
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
        y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, y)
        y = np.where(x > c - 0.5 + (w - 1) / 2, 255.0, y)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def frame_attributes(ds: Dataset, index: int) -> Dataset:
    """*ds* with the Pixel Value Transformation and Frame VOI LUT of frame *index* of an enhanced
    multi-frame object (shared and per-frame functional groups) copied to the top level."""
    out = Dataset()
    out.update(ds)
    for groups, item in (
        ("SharedFunctionalGroupsSequence", 0),
        ("PerFrameFunctionalGroupsSequence", index),
    ):
        seq = ds.get(groups)
        if not seq or len(seq) <= item:
            continue
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            inner = seq[item].get(macro)
            if inner:
                for elem in inner[0]:
                    out[elem.tag] = elem
    return out


def default_window(ds: Dataset) -> Window | None:
    """The data set's first window (Window Center/Width, VOI LUT Function), else None."""
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center in (None, "") or width in (None, ""):
        return None
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    try:
        return Window(
            float(center), float(width), function if function in FUNCTIONS.values() else "LINEAR"
        )
    except (ValueError, TypeError, RenderError):
        return None  # an unusable stored window: fall back to the next VOI source


def _first(value: Any) -> Any:
    from pydicom.multival import MultiValue

    if isinstance(value, MultiValue | list | tuple):
        return value[0] if len(value) else None
    return value


def grayscale(arr: np.ndarray, ds: Dataset, photometric: str, window: Window | None) -> np.ndarray:
    """A monochrome frame to 8-bit display values (Modality LUT, VOI, MONOCHROME1 inverted)."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = apply_modality_lut(arr, ds) if _has_modality_lut(ds) else arr
    values = np.asarray(values, dtype=np.float64)
    chosen = window or default_window(ds)
    if chosen is not None:
        out = apply_window(values, chosen)
    elif "VOILUTSequence" in ds and ds.VOILUTSequence:
        lut = apply_voi(values.astype(np.int64), ds, index=0)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2]) or 16
        out = np.clip(np.rint(lut * (255.0 / ((1 << bits) - 1))), 0, 255).astype(np.uint8)
    else:
        low, high = float(values.min()), float(values.max())
        if high > low:
            out = apply_window(values, Window((low + high) / 2, high - low, "LINEAR_EXACT"))
        else:
            out = np.zeros(values.shape, np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _has_modality_lut(ds: Dataset) -> bool:
    return "ModalityLUTSequence" in ds or "RescaleSlope" in ds or "RescaleIntercept" in ds


def color(arr: np.ndarray, ds: Dataset, photometric: str, bits_stored: int) -> np.ndarray:
    """A colour frame to 8-bit RGB (PALETTE COLOR through its LUT)."""
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        if rgb.dtype.itemsize > 1:
            return (rgb.astype(np.uint32) >> 8).astype(np.uint8)
        return rgb.astype(np.uint8)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise RenderError(f"cannot render {photometric} with shape {arr.shape}")
    if arr.dtype.itemsize > 1 or bits_stored > 8:
        shift = max(bits_stored - 8, 0)
        return (arr.astype(np.uint32) >> shift).clip(0, 255).astype(np.uint8)
    return arr.astype(np.uint8)


def to_display(
    arr: np.ndarray, ds: Dataset, photometric: str, bits_stored: int, window: Window | None
) -> np.ndarray:
    """8-bit pixels to show: (rows, columns) grey or (rows, columns, 3) RGB. The window applies to
    monochrome images only."""
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim != 2:
            raise RenderError(f"cannot render {photometric} with shape {arr.shape}")
        return grayscale(arr, ds, photometric, window)
    return color(arr, ds, photometric, bits_stored)


# ---------------------------------------------------------------------------- image
def apply_viewport(img: Any, viewport: Viewport | None, fit: int | None = None) -> Any:
    """The source region cut out (and flipped for a negative sw/sh), then scaled to fit inside
    the viewport keeping the aspect ratio; without a viewport, *fit* (thumbnails) bounds it."""
    from PIL import Image

    if viewport is not None and viewport.region is not None:
        sx, sy, sw, sh = viewport.region
        sx, sy = sx or 0, sy or 0
        sw = sw if sw is not None else img.width - sx
        sh = sh if sh is not None else img.height - sy
        left, right = (sx, sx + sw) if sw > 0 else (sx + sw, sx)
        top, bottom = (sy, sy + sh) if sh > 0 else (sy + sh, sy)
        left, top = max(left, 0), max(top, 0)
        right, bottom = min(right, img.width), min(bottom, img.height)
        if right <= left or bottom <= top:
            raise RenderError("the source region lies outside the image")
        img = img.crop((left, top, right, bottom))
        if sw < 0:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if sh < 0:
            img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if viewport is not None and (viewport.width or viewport.height):
        vw, vh = viewport.width, viewport.height
    elif fit is not None:
        vw = vh = fit
    else:
        return img
    scales = [s for s in ((vw / img.width) if vw else None, (vh / img.height) if vh else None) if s]
    scale = min(scales)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    return img


def encode(img: Any, media_type: str, quality: int | None) -> bytes:
    fmt = MEDIA_TYPES[media_type]
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality or 90)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def render(
    arr: np.ndarray,
    ds: Dataset,
    photometric: str,
    bits_stored: int,
    *,
    media_type: str = "image/jpeg",
    window: Window | None = None,
    viewport: Viewport | None = None,
    quality: int | None = None,
    fit: int | None = None,
) -> bytes:
    """One decoded frame rendered as *media_type* (image/jpeg, image/png or image/gif)."""
    from PIL import Image

    pixels = to_display(arr, ds, photometric, bits_stored, window)
    img = Image.fromarray(pixels, "L" if pixels.ndim == 2 else "RGB")
    return encode(apply_viewport(img, viewport, fit), media_type, quality)
