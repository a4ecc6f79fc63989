"""The synthetic ``dense`` dataset's scenes: an image and six label maps that are exact by construction.

A scene is seen by an orthographic camera looking down -z (x right, y up, z towards the camera; image coordinates
``u, v`` in [-1, 1], ``v`` up):

- the background is a tilted plane at depth ``d(u, v) = d0 + a u + b v`` metres, whose normal is
  ``(a, b, 1) / |(a, b, 1)|``;
- one of the ten shapes of the ``image`` dataset lies on a flat plate parallel to the image plane, nearer than any
  point of the plane (normal ``(0, 0, 1)``);
- both are shaded Lambertian under one fixed light (``LIGHT``) times their albedo, so the image shows the plane's
  tilt (its brightness) and the plate (its colour and flat shading): depth and normals are predictable from pixels.

Label maps (``data_prep/schema.py`` encodings; ``DENSE_LABELS`` is the ``dense.json`` entry): ``semseg`` 0 background,
1 + the shape's class; ``human_parts`` the shape's upper half 1 and lower half 2 (a stand-in for PASCAL's parts);
``saliency`` the shape; ``edge`` the shape's boundary (its pixels with a 4-neighbour outside it); ``depth`` in
millimetres; ``normals`` as RGB. The shape is drawn without anti-aliasing, so every pixel belongs to one segment and
the image and every map agree pixel by pixel.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from condmoe.data_prep.scenes import COLORS, IMAGE_CLASSES, SIZES
from condmoe.data_prep.shapes import shape_colour, shape_mask

LIGHT = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])
_DENSE_ID, _SPLIT_IDS = 3, {"train": 1, "val": 2}  # the rng streams of scenes.py use 1 (image) and 2 (video)

DENSE_LABELS: dict[str, dict[str, Any]] = {
    "semseg": {"member": "semseg.png", "encoding": "index", "num_classes": 1 + len(IMAGE_CLASSES), "ignore": 255,
               "names": ["background", *IMAGE_CLASSES]},
    "human_parts": {"member": "parts.png", "encoding": "index", "num_classes": 3, "ignore": 255,
                    "names": ["background", "upper half", "lower half"]},
    "saliency": {"member": "sal.png", "encoding": "binary"},
    "edge": {"member": "edge.png", "encoding": "binary"},
    "depth": {"member": "depth.png", "encoding": "scalar", "scale": 0.001, "invalid": 0},
    "normals": {"member": "normals.png", "encoding": "normal"},
}


def boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with at least one 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def encode_normals(normals_HW3: np.ndarray) -> np.ndarray:
    """Unit normals as the ``normal`` encoding's uint8 RGB (``v = round((n + 1) / 2 * 255)``)."""
    return np.clip(np.round((normals_HW3 + 1.0) * 127.5), 1, 255).astype(np.uint8)


def render_dense(seed: int, split: str, index: int, size: int = 64) -> tuple[Image.Image, dict[str, np.ndarray],
                                                                            dict[str, Any]]:
    """One scene: the RGB image, its label maps as the arrays their PNGs hold (uint8, depth uint16) and metadata."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _DENSE_ID, _SPLIT_IDS[split], index]))
    label = int(rng.integers(len(IMAGE_CLASSES)))
    shape = IMAGE_CLASSES[label]
    colour = list(COLORS)[int(rng.integers(len(COLORS)))]
    radius = float(rng.uniform(SIZES["small"], SIZES["large"])) * size
    cx, cy = (float(rng.uniform(radius + 1, size - radius - 1)) for _ in range(2))
    angle = float(rng.uniform(-30.0, 30.0))
    d0, a, b = float(rng.uniform(2.0, 3.0)), float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5))
    plate = d0 - abs(a) - abs(b) - float(rng.uniform(0.3, 0.8))  # nearer than every point of the plane

    coords = (np.arange(size) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(coords, -coords)  # v up: image row 0 is the top
    mask = shape_mask(shape, size, cx, cy, radius, angle) >= 0.5
    depth = np.where(mask, plate, d0 + a * u + b * v)
    plane_normal = np.array([a, b, 1.0]) / math.sqrt(a * a + b * b + 1.0)
    normals = np.where(mask[..., None], np.array([0.0, 0.0, 1.0]), plane_normal)

    background_albedo = rng.uniform(120.0, 230.0, size=3)
    albedo = np.where(mask[..., None], shape_colour(rng, colour), background_albedo)
    shading = np.clip(normals @ LIGHT, 0.0, 1.0)[..., None]
    image = Image.fromarray(np.clip(np.round(albedo * (0.25 + 0.75 * shading)), 0, 255).astype(np.uint8))

    rows = np.arange(size)[:, None]
    parts = np.where(mask, np.where(rows < cy, 1, 2), 0)
    maps = {
        "semseg": np.where(mask, 1 + label, 0).astype(np.uint8),
        "human_parts": parts.astype(np.uint8),
        "saliency": (mask * 255).astype(np.uint8),
        "edge": (boundary(mask) * 255).astype(np.uint8),
        "depth": np.round(depth * 1000).astype(np.uint16),
        "normals": encode_normals(normals),
    }
    meta = {"label": label, "class_name": shape, "color": colour, "plane": [round(d0, 4), round(a, 4), round(b, 4)],
            "plate_depth": round(plate, 4)}
    return image, maps, meta
