"""Dense label maps as ``condmoe-prep`` stores them: the specs of ``dense.json``, PNG encoding, nearest-neighbour
resizing, the value checks of each encoding, and the readers that turn a dataset's own files (PNG, ``.npy``) into
the stored form.

The encodings are :data:`data_prep.schema.DENSE_ENCODINGS`. A label map is stored at the resolution of its image,
so when images are shrunk (``--image-size``) the maps are resampled by nearest neighbour: class indices, the 0 / 255
of binary maps, unlabelled pixels and normals are never blended into values that mean something else (thin edges
lose pixels: keep the full size, ``--image-size 0``, for edge detection).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "READERS",
    "LabelError",
    "binary_spec",
    "check_label",
    "encode_npy",
    "encode_png",
    "index_spec",
    "normal_spec",
    "resize_nearest",
    "scalar_spec",
    "soft_spec",
]


class LabelError(ValueError):
    """A label file that cannot be read as its label (wrong mode, shape or values); the message says why."""


def index_spec(member: str, num_classes: int, ignore: int = 255, names: Sequence[str] | None = None) -> dict[str, Any]:
    """An ``index`` label's ``dense.json`` spec (class per pixel, ``ignore`` unlabelled)."""
    spec: dict[str, Any] = {"member": member, "encoding": "index", "num_classes": num_classes, "ignore": ignore}
    if names is not None:
        if len(names) != num_classes:
            raise ValueError(f"{member}: {len(names)} class names for {num_classes} classes")
        spec["names"] = list(names)
    return spec


def binary_spec(member: str) -> dict[str, Any]:
    """A ``binary`` label's spec (0 / 255, positive when >= 128)."""
    return {"member": member, "encoding": "binary"}


def normal_spec(member: str) -> dict[str, Any]:
    """A ``normal`` label's spec (RGB, ``n = 2 v / 255 - 1``, ``(0, 0, 0)`` unlabelled)."""
    return {"member": member, "encoding": "normal"}


def scalar_spec(member: str, scale: float, invalid: int | None) -> dict[str, Any]:
    """A ``scalar`` label's spec (``value * scale`` is the quantity; ``invalid`` is unlabelled, ``None``: none is)."""
    return {"member": member, "encoding": "scalar", "scale": scale, "invalid": invalid}


def soft_spec(member: str, num_classes: int) -> dict[str, Any]:
    """A ``soft`` label's spec: a per-image distribution over ``num_classes`` classes, stored as ``.npy``."""
    return {"member": member, "encoding": "soft", "num_classes": num_classes}


def encode_npy(vector: np.ndarray) -> bytes:
    """A soft label as ``.npy`` bytes (float32, 1-D); the same vector always gives the same bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vector, dtype=np.float32).reshape(-1), allow_pickle=False)
    return buf.getvalue()


def encode_png(array: np.ndarray) -> bytes:
    """A label map as PNG: uint8 HxW (grey), uint16 HxW (16-bit grey) or uint8 HxWx3 (RGB); the same array always
    gives the same bytes."""
    grey = array.ndim == 2 and array.dtype in (np.uint8, np.uint16)
    if not (grey or (array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"no PNG form for a {array.dtype} array of shape {array.shape}")
    image = Image.fromarray(np.ascontiguousarray(array))  # the dtype and shape give the mode: L, I;16 or RGB
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def resize_nearest(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``array`` (HxW or HxWxC) resampled to ``size`` = ``(width, height)`` by nearest neighbour (each output pixel
    takes the input pixel under its centre); the same array when it already has that size."""
    height, width = array.shape[:2]
    if (width, height) == tuple(size):
        return array
    rows = np.minimum((np.arange(size[1]) + 0.5) * height / size[1], height - 1).astype(np.int64)
    cols = np.minimum((np.arange(size[0]) + 0.5) * width / size[0], width - 1).astype(np.int64)
    return array[rows[:, None], cols[None, :]]


def check_label(array: np.ndarray, spec: dict[str, Any]) -> str | None:
    """Whether a stored label map (or soft vector) fits its spec: the problem as text, or ``None``."""
    encoding = spec["encoding"]
    if encoding == "soft":
        if array.ndim != 1 or array.shape[0] != spec["num_classes"]:
            return f"expected {spec['num_classes']} class scores, got an array of shape {array.shape}"
        if not np.isfinite(array).all() or (array < 0).any():
            return "class scores must be finite and non-negative"
        return None
    if encoding == "normal":
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            return f"expected an RGB map, got {array.dtype} of shape {array.shape}"
        return None
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        return f"expected a grey uint8/uint16 map, got {array.dtype} of shape {array.shape}"
    if encoding == "binary":
        values = np.unique(array)
        if not np.isin(values, (0, 255)).all():
            return f"binary map holds values other than 0 and 255 ({values[:8].tolist()})"
    elif encoding == "index":
        bad = (array >= spec["num_classes"]) & (array != spec["ignore"])
        if bad.any():
            shown = np.unique(array[bad])[:8].tolist()
            return f"values {shown} are neither a class in [0, {spec['num_classes']}) nor the ignore value " \
                   f"{spec['ignore']}"
    return None


# --------------------------------------------------------------------------------------------------------------------
# Readers: a dataset's file -> the stored array, plus facts for the sample's .json (e.g. pixels made invalid)
# --------------------------------------------------------------------------------------------------------------------


def _open(path: str | os.PathLike) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise
    # Pillow raises many types on corrupt input; any of them means the file is unusable.
    except Exception as e:
        raise LabelError(f"not a readable image ({type(e).__name__}: {e})") from None
    return image


def _load_npy(path: str | os.PathLike) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise LabelError(f"not a readable .npy array ({e})") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise LabelError(f"expected a numeric array, got {getattr(array, 'dtype', type(array).__name__)}")
    return array


def _squeeze(array: np.ndarray, what: str) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2:
        raise LabelError(f"expected a {what} of shape HxW, got {array.shape}")
    return array


def _integer_grey(image: Image.Image) -> np.ndarray:
    # Class maps are grey or palette images whose pixel values (palette indices) are the classes: never converted
    # through a palette or to RGB.
    if image.mode not in ("L", "P", "I;16", "I"):
        raise LabelError(f"expected a grey or palette PNG of class indices, got mode {image.mode}")
    array = np.asarray(image)
    if array.min() < 0 or array.max() > 65535:
        raise LabelError(f"values outside [0, 65535] ({int(array.min())}..{int(array.max())})")
    return array.astype(np.uint8 if array.max() <= 255 else np.uint16)


def read_index_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A PNG of class indices, stored as is."""
    return _integer_grey(_open(path)), {}


def read_nyud_semseg_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """NYUD-v2's 40-class PNG (0 void, 1..40 the classes) as 0..39 with void -> 255, as Multi-Task-Learning-PyTorch
    loads it (``semseg[semseg == 0] = 256; semseg -= 1``)."""
    raw = _integer_grey(_open(path)).astype(np.int64)
    if raw.max() > 40:
        raise LabelError(f"values up to {int(raw.max())}, expected 0 (void) to 40")
    return np.where(raw == 0, 255, raw - 1).astype(np.uint8), {}


def _grey(image: Image.Image) -> np.ndarray:
    if image.mode in ("1", "P", "RGB", "RGBA", "LA"):
        image = image.convert("L")
    if image.mode not in ("L", "I;16", "I", "F"):
        raise LabelError(f"expected a grey PNG, got mode {image.mode}")
    return np.asarray(image)


def read_threshold_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A soft 0..255 map (saliency) as binary: positive where >= 128 (the 0.5 threshold of ``value / 255``)."""
    grey = _grey(_open(path))
    if grey.dtype != np.uint8:
        raise LabelError(f"expected an 8-bit grey PNG, got {grey.dtype}")
    return np.where(grey >= 128, 255, 0).astype(np.uint8), {}


def read_nonzero_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A mask PNG (edges: 0/1, 0/255 or any non-zero value) as binary: positive where non-zero."""
    return np.where(_grey(_open(path)) != 0, 255, 0).astype(np.uint8), {}


def read_nonzero_npy(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A mask ``.npy`` (HxW, e.g. float 0/1 edges) as binary: positive where non-zero and finite."""
    array = _squeeze(_load_npy(path), "mask")
    return np.where(np.isfinite(array) & (array != 0), 255, 0).astype(np.uint8), {}


def read_normal_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """An RGB normal map (``n = 2 v / 255 - 1``), stored as is (an alpha channel is dropped)."""
    image = _open(path)
    if image.mode == "RGBA":
        image = image.convert("RGB")
    if image.mode != "RGB":
        raise LabelError(f"expected an RGB PNG of normals, got mode {image.mode}")
    return np.asarray(image), {}


def read_normal_npy(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Float normals (HxWx3, components in [-1, 1]) as ``rint((n + 1) * 127.5)``; zero or non-finite vectors become
    the unlabelled ``(0, 0, 0)``."""
    array = _load_npy(path).astype(np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise LabelError(f"expected normals of shape HxWx3, got {array.shape}")
    valid = np.isfinite(array).all(axis=2) & (np.abs(np.nan_to_num(array)).sum(axis=2) > 0)
    stored = np.rint((np.clip(np.nan_to_num(array), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    stored[~valid] = 0
    return stored, {"unlabelled_pixels": int((~valid).sum())}


def read_depth_npy(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Float depth in metres (HxW) as uint16 millimetres; zero, negative and non-finite depths become the invalid 0,
    and so do depths beyond 65.535 m (counted in the sample's .json)."""
    metres = _squeeze(_load_npy(path), "depth map").astype(np.float64)
    mm = np.rint(np.nan_to_num(metres, nan=0.0, posinf=0.0, neginf=0.0) * 1000.0)
    too_far = mm > 65535
    stored = np.where((mm >= 1) & ~too_far, mm, 0).astype(np.uint16)
    return stored, {"invalid_pixels": int((stored == 0).sum()), "beyond_range_pixels": int(too_far.sum())}


def read_uint16_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A 16-bit grey PNG (depth in millimetres, Taskonomy's 16-bit domains), stored as is."""
    image = _open(path)
    if image.mode not in ("I;16", "I"):
        raise LabelError(f"expected a 16-bit grey PNG, got mode {image.mode}")
    array = np.asarray(image)
    if array.min() < 0 or array.max() > 65535:
        raise LabelError(f"values outside [0, 65535] ({int(array.min())}..{int(array.max())})")
    return array.astype(np.uint16), {}


def read_uint8_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """An 8-bit grey PNG stored as is; an RGB one is accepted when its three channels are equal."""
    image = _open(path)
    if image.mode in ("RGB", "RGBA"):
        rgb = np.asarray(image.convert("RGB"))
        if not ((rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 0] == rgb[:, :, 2]).all()):
            raise LabelError("expected a grey PNG, got RGB with differing channels")
        return np.ascontiguousarray(rgb[:, :, 0]), {}
    if image.mode != "L":
        raise LabelError(f"expected an 8-bit grey PNG, got mode {image.mode}")
    return np.asarray(image), {}


def _rgb_channel(path: str | os.PathLike, channel: int) -> tuple[np.ndarray, dict[str, Any]]:
    image = _open(path)
    if image.mode not in ("RGB", "RGBA"):
        raise LabelError(f"expected an 8-bit RGB PNG, got mode {image.mode}")
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, channel]), {}


def read_red_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """The first (red) channel of an 8-bit RGB PNG (Taskonomy's first principal curvature)."""
    return _rgb_channel(path, 0)


def read_green_png(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """The second (green) channel of an 8-bit RGB PNG (Taskonomy's second principal curvature)."""
    return _rgb_channel(path, 1)


def read_soft_npy(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """A per-image class distribution (Taskonomy's ``class_object`` / ``class_scene`` ``.npy``) as float32 ``[K]``."""
    array = _load_npy(path).astype(np.float32)
    if array.ndim > 1 and sum(n > 1 for n in array.shape) <= 1:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise LabelError(f"expected a vector of class scores, got shape {array.shape}")
    return array, {}


#: Reader name (stored in the plan's items, so they stay JSON) -> reader.
READERS: dict[str, Callable[[str | os.PathLike], tuple[np.ndarray, dict[str, Any]]]] = {
    "index_png": read_index_png,
    "nyud_semseg_png": read_nyud_semseg_png,
    "threshold_png": read_threshold_png,
    "nonzero_png": read_nonzero_png,
    "nonzero_npy": read_nonzero_npy,
    "normal_png": read_normal_png,
    "normal_npy": read_normal_npy,
    "depth_npy": read_depth_npy,
    "uint16_png": read_uint16_png,
    "uint8_png": read_uint8_png,
    "red_png": read_red_png,
    "green_png": read_green_png,
    "soft_npy": read_soft_npy,
}
