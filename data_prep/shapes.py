"""Drawing primitives of the synthetic dataset (pure PIL + numpy).

Shape outlines and anti-aliased masks, the colour palette, noisy gradient backgrounds, distractor specks, compositing
and the final sensor noise / blur.

Every function that draws at random takes the caller's ``np.random.Generator`` and consumes it in a fixed order, so
:mod:`data_prep.synthetic` stays byte-for-byte deterministic. Nothing here knows about datasets, splits or captions.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "COLORS",
    "add_specks",
    "composite",
    "finish_image",
    "gradient_background",
    "sample_blur_radius",
    "shape_colour",
    "shape_mask",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
    "cyan": (40, 210, 220),
}

_SUPERSAMPLE = 4  # masks are drawn at 4x and box-filtered down, which gives anti-aliased edges


def _regular_polygon(n: int, radius: float, phase_deg: float) -> np.ndarray:
    angles = np.deg2rad(phase_deg + 360.0 * np.arange(n) / n)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    angles = np.deg2rad(-90.0 + 180.0 * np.arange(2 * points) / points)
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(axis=0) + pts.min(axis=0)) / 2.0  # centre the bounding box
    return pts / np.abs(pts).max()


def _cross(arm: float) -> np.ndarray:
    a = arm
    return np.array(
        [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]],
        dtype=np.float64,
    )


# Outlines in units of the shape radius, centred on the origin, y pointing down (image coordinates).
_POLYGONS: dict[str, np.ndarray] = {
    "square": _regular_polygon(4, 0.85 * math.sqrt(2.0), 45.0),
    "triangle": _regular_polygon(3, 1.0, -90.0) + np.array([0.0, 0.2]),  # nudged down to centre its bounding box
    "star": _star(5, 1.0, 0.45),
    "cross": _cross(0.3),
    "diamond": np.array([[0.0, -1.0], [0.62, 0.0], [0.0, 1.0], [-0.62, 0.0]]),
    "hexagon": _regular_polygon(6, 1.0, 0.0),
    "heart": _heart(),
}


def shape_mask(shape: str, size_px: int, cx: float, cy: float, radius: float, angle_deg: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape, shape ``(size_px, size_px)`` float32."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (size_px * s, size_px * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = cx * s, cy * s, radius * s
    theta = math.radians(angle_deg)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ri = 0.58 * r
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    elif shape == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        # The bite is a slightly smaller disc shifted along the (rotated) x axis, so the crescent opens sideways.
        ri, off = 0.82 * r, 0.48 * r
        bx, by = cx + off * math.cos(theta), cy + off * math.sin(theta)
        draw.ellipse((bx - ri, by - ri, bx + ri, by + ri), fill=0)
    else:
        pts = _POLYGONS[shape]
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        xy = pts @ rot.T * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in xy.tolist()], fill=255)
    small = canvas.resize((size_px, size_px), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def gradient_background(rng: np.random.Generator, size_px: int) -> np.ndarray:
    """Dark two-colour linear gradient with Gaussian noise, float32 HxWx3 in [0, 255] (not yet clipped)."""
    c0 = rng.uniform(0.0, 60.0, size=3)
    c1 = rng.uniform(0.0, 60.0, size=3)
    phi = rng.uniform(0.0, 2.0 * math.pi)
    coords = (np.arange(size_px, dtype=np.float32) + 0.5) / size_px - 0.5
    t = np.cos(phi) * coords[None, :] + np.sin(phi) * coords[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c0[None, None, :] + (c1 - c0)[None, None, :] * t[:, :, None]
    bg += rng.normal(0.0, rng.uniform(3.0, 9.0), size=bg.shape)
    return bg.astype(np.float32)


def add_specks(rng: np.random.Generator, img: np.ndarray) -> None:
    """Paint a few small dim specks in place: clutter that is not a shape and never uses a saturated palette colour."""
    size_px = img.shape[0]
    scale = size_px / 64.0
    yy, xx = np.mgrid[0:size_px, 0:size_px].astype(np.float32) + 0.5
    for _ in range(int(rng.integers(3, 8))):
        x, y = rng.uniform(0, size_px, size=2)
        rad = rng.uniform(0.6, 1.6) * max(scale, 0.5)
        colour = rng.uniform(50.0, 130.0) + rng.uniform(-20.0, 20.0, size=3)
        a = np.clip(rad + 0.5 - np.sqrt((xx - x) ** 2 + (yy - y) ** 2), 0.0, 1.0)[:, :, None]
        img *= 1.0 - a
        img += a * colour


def shape_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    base = np.asarray(COLORS[colour], dtype=np.float32)
    return np.clip(base * rng.uniform(0.82, 1.05) + rng.uniform(-18.0, 18.0, size=3), 0.0, 255.0)


def composite(img: np.ndarray, mask: np.ndarray, colour: np.ndarray, ramp_dir: float) -> None:
    # A gentle brightness ramp across the shape (direction ramp_dir), so its pixels are not one flat colour.
    size_px = img.shape[0]
    coords = np.arange(size_px, dtype=np.float32) / size_px - 0.5
    ramp = 1.0 + 0.25 * (math.cos(ramp_dir) * coords[None, :] + math.sin(ramp_dir) * coords[:, None])
    a = mask[:, :, None]
    img *= 1.0 - a
    img += a * colour[None, None, :] * ramp[:, :, None]


def sample_blur_radius(rng: np.random.Generator, size_px: int) -> float:
    # Half of the samples get a mild Gaussian blur, scaled with resolution; 0 means no blur.
    return float(rng.uniform(0.3, 0.9)) * size_px / 64.0 if rng.random() < 0.5 else 0.0


def finish_image(img: np.ndarray, rng: np.random.Generator, blur_radius: float) -> Image.Image:
    """Mild augmentation (sensor noise, optional blur) and conversion to a PIL image."""
    img = img + rng.normal(0.0, rng.uniform(0.0, 5.0), size=img.shape)
    pil = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")
    if blur_radius > 0.0:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=blur_radius))
    return pil
