"""The render service: one frame of a stored instance as PNG, for the viewer and DICOMweb.

Three renditions of a frame (PS3.3 C.7.6.3 Image Pixel, C.11.1 Modality LUT, C.11.2 VOI LUT):

``preview``
    8-bit, windowed with the dataset's first WindowCenter/WindowWidth (the pixel range when
    it has none), MONOCHROME1 inverted; colour images as RGB. First paint and WADO-RS rendered.
``thumbnail``
    the preview scaled to fit ``THUMBNAIL_SIZE``.
``jpeg``
    the preview as JPEG (quality 90), for WADO-RS rendered and WADO-URI.
``packed``
    lossless: each stored value (its 16 bits, two's complement when signed) split over the red
    (high byte) and green (low byte) channels of an RGB PNG, so that the browser windows the
    real values. ``image_info`` gives the transform from a packed value to the modality value.
    Colour images are their RGB pixels. Data with more than 16 bits stored keeps its 16 most
    significant bits (the transform says so); floating point pixel data has no packed form.

Renditions are cached on disk under ``PACS_RENDER_CACHE_DIR``, keyed by a hash of the SOP
Instance UID and the file's SHA-256 (so a replaced file never serves a stale image), and by
frame and kind. Writing goes through a temporary name and a rename: a reader sees a whole file
or none. Raises ``RenderError`` for what cannot be rendered, with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

from archive import storage
from archive.models import Instance

log = logging.getLogger("archive.render")

RENDER_VERSION = 1
PNG_KINDS = ("preview", "packed", "thumbnail")
KINDS = (*PNG_KINDS, "jpeg")
JPEG_QUALITY = 90
THUMBNAIL_SIZE = 128
PNG_COMPRESS_LEVEL = 1  # zlib level: 1 is several times faster than 6, and about as small on images
COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR"}


# The columns rendering needs: load only these when listing instances to render.
RENDER_FIELDS = ("pk", "sop_instance_uid", "file_sha256", "file_path", "number_of_frames")


class RenderError(Exception):
    """A frame that cannot be rendered; ``str(exc)`` says why."""


@dataclass(frozen=True)
class Rendition:
    """A rendered frame on disk and the validator that names its content."""

    path: Path
    etag: str


# ------------------------------------------------------------------------- cache


def _cache_key(instance: Instance) -> str:
    text = f"{instance.sop_instance_uid}:{instance.file_sha256}:{RENDER_VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(instance: Instance, frame: int, kind: str) -> Path:
    """Where the rendition of ``frame`` (1-based) of ``instance`` is cached."""
    key = _cache_key(instance)
    extension = "jpg" if kind == "jpeg" else "png"
    return Path(settings.PACS_RENDER_CACHE_DIR) / key[:2] / key[2:4] / key / f"{frame}.{kind}.{extension}"


def etag(instance: Instance, frame: int, kind: str) -> str:
    """A strong validator of a rendition, known without reading or rendering it."""
    return f'"{_cache_key(instance)[:40]}-{frame}-{kind}"'


def rendition(instance: Instance, frame: int, kind: str) -> Rendition:
    """Return the cached rendition of ``frame`` (1-based), rendering and caching it if needed."""
    if kind not in KINDS:
        raise RenderError(f"unknown rendition {kind!r}")
    frames = instance.number_of_frames or 1
    if not 1 <= frame <= frames:
        raise RenderError(f"frame {frame} does not exist; the instance has {frames}")
    path = cache_path(instance, frame, kind)
    if not path.exists():
        ds = _read(instance)
        write_atomic(path, render(ds, frame, kind))
    return Rendition(path, etag(instance, frame, kind))


def series_representative(series_id: int) -> Instance | None:
    """The instance a series is shown by (its thumbnail): the middle one in instance order."""
    pks = list(Instance.objects.filter(series_id=series_id).order_by("instance_number", "pk").values_list("pk", flat=True))
    if not pks:
        return None
    return Instance.objects.only(*RENDER_FIELDS).get(pk=pks[len(pks) // 2])


# Series locks are striped: one file each of this many, never removed (removing a lock
# file another process may hold open is a race); two series rarely share one.
_LOCK_STRIPES = 256


@contextlib.contextmanager
def series_lock(series_id: int) -> Iterator[None]:
    """Hold, across processes, the right to render ``series_id``'s cache (waiting for it)."""
    folder = Path(settings.PACS_RENDER_CACHE_DIR) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"series-{series_id % _LOCK_STRIPES:03d}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def render_all(instance: Instance, kinds: tuple[str, ...] = ("preview", "packed")) -> int:
    """Render and cache every frame of ``instance`` in ``kinds``; return how many were new."""
    frames = instance.number_of_frames or 1
    missing = [(f, k) for f in range(1, frames + 1) for k in kinds if not cache_path(instance, f, k).exists()]
    if not missing:
        return 0
    ds = _read(instance)
    made = 0
    for frame, kind in missing:
        try:
            write_atomic(cache_path(instance, frame, kind), render(ds, frame, kind))
            made += 1
        except RenderError as exc:
            log.info("no %s rendition of frame %d of instance %s: %s", kind, frame, instance.pk, exc)
    return made


def _read(instance: Instance) -> Dataset:
    try:
        return dcmread(storage.absolute(instance.file_path), force=True)
    except FileNotFoundError:
        raise RenderError("the instance's file is missing from storage") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a damaged file
        raise RenderError(f"the instance's file cannot be read: {exc}") from None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary name and a rename (whole file or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".render-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------- rendering


def render(ds: Dataset, frame: int, kind: str) -> bytes:
    """Encode ``frame`` (1-based) of ``ds`` as the PNG rendition ``kind``."""
    if kind == "packed":
        return encode_png(packed_pixels(ds, frame))
    image = windowed_pixels(ds, frame)
    if kind == "jpeg":
        out = io.BytesIO()
        Image.fromarray(image).save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue()
    if kind == "thumbnail":
        picture = Image.fromarray(image)
        picture.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
        return _png(picture)
    return encode_png(image)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG of an 8-bit grey (H×W) or RGB (H×W×3) array."""
    return _png(Image.fromarray(np.ascontiguousarray(pixels)))


def _png(picture: Image.Image) -> bytes:
    out = io.BytesIO()
    picture.save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def decode_frame(ds: Dataset, frame: int) -> np.ndarray:
    """The pixels of ``frame`` (1-based): stored values (H×W) or RGB (H×W×3).

    Compressed transfer syntaxes are decoded by pydicom's plugins (pylibjpeg), YBR is
    converted to RGB and palette colour expanded through its lookup tables.
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise RenderError("the instance holds no pixel data")
    frames = _int(ds.get("NumberOfFrames"), 1) or 1
    if not 1 <= frame <= frames:
        raise RenderError(f"frame {frame} does not exist; the instance has {frames}")
    try:
        pixels = pixel_array(ds, index=frame - 1 if frames > 1 else None)
    except Exception as exc:  # noqa: BLE001 - decoders raise many kinds on damaged data
        raise RenderError(f"the pixel data cannot be decoded: {exc}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        try:
            pixels = apply_color_lut(pixels, ds)
        except Exception as exc:  # noqa: BLE001
            raise RenderError(f"the palette cannot be applied: {exc}") from None
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        return _to_rgb8(pixels, ds)
    if pixels.ndim != 2:
        raise RenderError(f"unexpected pixel array shape {pixels.shape}")
    return pixels


def _to_rgb8(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind == "f":
        return np.clip(pixels * 255.0, 0, 255).astype(np.uint8)
    bits = _int(ds.get("BitsStored"), 8) or 8
    if str(ds.get("PhotometricInterpretation", "")).strip() == "PALETTE COLOR":
        bits = 16  # palette entries are 16-bit
    return (pixels.astype(np.uint32) >> max(bits - 8, 0)).astype(np.uint8)


def modality_values(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Apply the modality LUT (C.11.1): RescaleSlope/Intercept or the Modality LUT Sequence."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(stored, ds).astype(np.float64)
    slope, intercept = _rescale(ds)
    return stored.astype(np.float64) * slope + intercept


def window_linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The LINEAR VOI function of PS3.3 C.11.2.1.2.1 onto 0..255 (same formula as the viewer's)."""
    width = max(width, 1.0)
    low = center - 0.5 - (width - 1) / 2
    scaled = ((values - (center - 0.5)) / (width - 1 if width > 1 else 1) + 0.5) * 255.0
    out = np.clip(np.rint(scaled), 0, 255)
    out[values <= low] = 0
    out[values > center - 0.5 + (width - 1) / 2] = 255
    return out.astype(np.uint8)


def windowed_pixels(ds: Dataset, frame: int, window: tuple[float, float] | None = None) -> np.ndarray:
    """The 8-bit preview of a frame: grey windowed (with ``window`` = (center, width), else
    the dataset's own) and shown as MONOCHROME2, or RGB."""
    pixels = decode_frame(ds, frame)
    if pixels.ndim == 3:
        return pixels
    windows = [{"center": window[0], "width": window[1]}] if window else dataset_windows(ds)
    if pixels.dtype.kind in "iu" and "ModalityLUTSequence" not in ds:
        # Through a lookup table over the stored range: one float pass over at most 64 Ki
        # values instead of the whole frame.
        low, high = int(pixels.min()), int(pixels.max())
        slope, intercept = _rescale(ds)
        if high - low <= 1 << 20:
            table_values = np.arange(low, high + 1, dtype=np.float64) * slope + intercept
            center, width = _window_of(windows, table_values.min(), table_values.max())
            table = window_linear(table_values, center, width)
            out = table[pixels.astype(np.int64) - low] if low else table[pixels]
            return 255 - out if _inverted(ds) else out
    values = modality_values(ds, pixels)
    center, width = _window_of(windows, float(values.min()), float(values.max()))
    out = window_linear(values, center, width)
    return 255 - out if _inverted(ds) else out


def _inverted(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"


def _window_of(windows: list[dict[str, Any]], low: float, high: float) -> tuple[float, float]:
    """The dataset's first window, else one spanning the values (``low``..``high``)."""
    if windows:
        return windows[0]["center"], windows[0]["width"]
    return (low + high + 1) / 2, max(high - low + 1, 1.0)


def packed_pixels(ds: Dataset, frame: int) -> np.ndarray:
    """The lossless rendition: stored values split over red (high byte) and green (low byte)."""
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise RenderError("floating point pixel data has no packed rendition; use the preview")
    pixels = decode_frame(ds, frame)
    if pixels.ndim == 3:
        return pixels
    packing = _packing(ds)
    if packing["lut"]:
        values = apply_modality_lut(pixels, ds).astype(np.int64)
    else:
        values = pixels
    if packing["shift"]:
        values = values.astype(np.int64)
        values = (values - packing["offset"]) >> packing["shift"]
    if values.dtype in (np.uint16, np.int16):
        words = values.view(np.uint16)  # two's complement bits of a signed value
    else:
        words = (values.astype(np.int64) & 0xFFFF).astype(np.uint16)
    out = np.empty(words.shape + (3,), dtype=np.uint8)
    out[..., 0] = words >> 8
    out[..., 1] = words  # the low byte (a narrowing cast)
    out[..., 2] = 0
    return out


def _packing(ds: Dataset) -> dict[str, Any]:
    """How packed values map back to modality values (see ``image_info``)."""
    return _packing_from(
        bits_stored=_int(ds.get("BitsStored"), 16) or 16,
        signed=_int(ds.get("PixelRepresentation"), 0) == 1,
        rescale=_rescale(ds),
        has_lut="ModalityLUTSequence" in ds,
    )


def _packing_from(*, bits_stored: int, signed: bool, rescale: tuple[float, float], has_lut: bool) -> dict[str, Any]:
    slope, intercept = rescale
    if has_lut:
        return {"lut": True, "shift": 0, "offset": 0, "signed": False, "slope": 1.0, "intercept": 0.0}
    if bits_stored <= 16:
        return {"lut": False, "shift": 0, "offset": 0, "signed": signed, "slope": slope, "intercept": intercept}
    shift = bits_stored - 16
    offset = -(1 << (bits_stored - 1)) if signed else 0
    return {
        "lut": False,
        "shift": shift,
        "offset": offset,
        "signed": False,
        "slope": slope * (1 << shift),
        "intercept": intercept + slope * offset,
    }


def dataset_windows(ds: Dataset) -> list[dict[str, Any]]:
    """The dataset's own windows (C.11.2.1.2), from the top level or the functional groups."""
    source = ds
    if "WindowCenter" not in ds:
        source = _functional_item(ds, "FrameVOILUTSequence") or ds
    return _windows(source.get("WindowCenter"), source.get("WindowWidth"), source.get("WindowCenterWidthExplanation"))


def _windows(centers: Any, widths: Any, names: Any) -> list[dict[str, Any]]:
    centers, widths, names = _as_list(centers), _as_list(widths), _as_list(names)
    windows = []
    for index, (center, width) in enumerate(zip(centers, widths)):
        try:
            c, w = float(center), float(width)
        except (TypeError, ValueError):
            continue
        if w >= 1:
            name = str(names[index]) if index < len(names) else ""
            windows.append({"center": c, "width": w, "name": name})
    return windows


def _rescale(ds: Dataset) -> tuple[float, float]:
    source = ds
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        source = _functional_item(ds, "PixelValueTransformationSequence") or ds
    try:
        slope = float(source.get("RescaleSlope", 1) or 1)
        intercept = float(source.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return 1.0, 0.0
    return slope, intercept


def _functional_item(ds: Dataset, keyword: str) -> Dataset | None:
    """The first item of ``keyword`` in the shared, else the first per-frame, functional group."""
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        sequence = ds.get(groups)
        if sequence:
            inner = sequence[0].get(keyword)
            if inner:
                return inner[0]
    return None


def _as_list(value: Any) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _int(value: Any, default: int | None = None) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# ------------------------------------------------------------------------- image information


def image_info(header: dict[str, Any], instance: Instance | None = None) -> dict[str, Any]:
    """What the viewer needs to show and window an instance, from its DICOM JSON header.

    Reads no file: rows, columns, frames, photometric interpretation, signedness, the transform
    from packed values to modality values, the dataset's windows, pixel spacing (and whether it
    is only ImagerPixelSpacing, PS3.3 C.8.11.7), position and orientation (per frame for
    enhanced multi-frame objects), slice thickness and location.
    """
    get = _JsonHeader(header)
    photometric = (get.text("00280004") or "MONOCHROME2").strip()
    bits_stored = get.int("00280101") or get.int("00280100") or 16
    signed = get.int("00280103") == 1
    shared = get.item("52009229")
    per_frame = get.items("52009230")
    slope = get.float("00281053")
    intercept = get.float("00281052")
    if slope is None and intercept is None and shared:
        transform = shared.item("00289145")
        if transform:
            slope, intercept = transform.float("00281053"), transform.float("00281052")
    rescale = (slope if slope is not None else 1.0, intercept if intercept is not None else 0.0)
    packing = _packing_from(bits_stored=bits_stored, signed=signed, rescale=rescale, has_lut=get.has("00283000"))
    centers, widths, names = get.values("00281050"), get.values("00281051"), get.values("00281055")
    if not centers and shared and shared.item("00289132"):
        voi = shared.item("00289132")
        centers, widths, names = voi.values("00281050"), voi.values("00281051"), voi.values("00281055")
    spacing, spacing_source = get.floats("00280030"), "PixelSpacing"
    if not spacing and shared and shared.item("00289110"):
        spacing = shared.item("00289110").floats("00280030")
    if not spacing:
        spacing, spacing_source = get.floats("00181164"), "ImagerPixelSpacing"
    frames = (instance.number_of_frames if instance else None) or get.int("00280008") or 1
    orientation = get.floats("00200037")
    if not orientation and shared and shared.item("00209116"):
        orientation = shared.item("00209116").floats("00200037")
    positions = [get.floats("00200032")]
    if per_frame:
        positions = [
            (item.item("00209113").floats("00200032") if item.item("00209113") else None) for item in per_frame
        ]
    return {
        "rows": get.int("00280010"),
        "columns": get.int("00280011"),
        "frames": frames,
        "photometric": photometric,
        "colour": photometric in COLOUR or (get.int("00280002") or 1) == 3,
        "invert": photometric == "MONOCHROME1",
        "bits_stored": bits_stored,
        "signed": packing["signed"],
        "slope": packing["slope"],
        "intercept": packing["intercept"],
        "packed": not (get.has("7FE00008") or get.has("7FE00009")),
        "windows": _windows(centers, widths, names),
        "pixel_spacing": spacing[:2] if spacing and len(spacing) >= 2 else None,
        "spacing_source": spacing_source if spacing and len(spacing) >= 2 else None,
        "orientation": orientation if orientation and len(orientation) == 6 else None,
        "positions": [p if p and len(p) == 3 else None for p in positions],
        "slice_thickness": get.float("00180050"),
        "slice_location": get.float("00201041"),
        "modality": get.text("00080060"),
        "instance_number": get.int("00200013"),
        "series_number": get.int("00200011"),
    }


class _JsonHeader:
    """Read values from a DICOM JSON model dataset (PS3.18 F.2)."""

    def __init__(self, data: dict[str, Any] | None) -> None:
        self.data = data or {}

    def has(self, tag: str) -> bool:
        return tag in self.data

    def values(self, tag: str) -> list:
        element = self.data.get(tag) or {}
        return list(element.get("Value") or [])

    def text(self, tag: str) -> str:
        values = self.values(tag)
        return str(values[0]) if values else ""

    def int(self, tag: str) -> int | None:
        values = self.values(tag)
        return _int(values[0]) if values else None

    def float(self, tag: str) -> float | None:
        floats = self.floats(tag)
        return floats[0] if floats else None

    def floats(self, tag: str) -> list[float] | None:
        try:
            values = [float(v) for v in self.values(tag)]
        except (TypeError, ValueError):
            return None
        return values or None

    def items(self, tag: str) -> list[_JsonHeader]:
        return [_JsonHeader(item) for item in self.values(tag) if isinstance(item, dict)]

    def item(self, tag: str) -> _JsonHeader | None:
        items = self.items(tag)
        return items[0] if items else None
