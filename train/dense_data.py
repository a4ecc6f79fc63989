"""Dense tasks' targets: how a label map member of a sample (``data_prep/schema.py``'s encodings, described by the
dataset's ``dense.json``) becomes the array ``models/dense.py``'s losses and ``train/dense_metrics.py``'s meters read.
"""

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from condmoe.data_prep import schema
from condmoe.train.config import TaskConfig, dense_label_specs

DENSE_IGNORE = 255  # unlabelled pixels of a segmentation target (the losses' and meters' ignore index)


class BadLabel(ValueError):
    """A label outside the task's classes (a ``.cls`` or a label map's class index): the sample is skipped and counted
    like any bad sample."""


@dataclass(frozen=True)
class DenseTarget:
    """How one dense task's target is read from a sample: its member and ``dense.json`` spec (``data_prep/schema``'s
    encodings), decoded to what ``models/dense.py``'s losses take:

    - segmentation (``index``): int64 ``[H, W]`` class indices, 255 unlabelled (the spec's ``ignore`` value, and a
      sample without the member, e.g. a PASCAL image without human parts);
    - saliency, edge (``binary``): float32 ``[H, W]`` in {0, 1}, NaN unlabelled (no member);
    - normals (``normal``): float32 ``[H, W, 3]`` unit vectors, zero unlabelled;
    - depth and Taskonomy's regressions (``scalar``): float32 ``[H, W]`` (value * scale), NaN where the value is the
      spec's ``invalid`` (and everywhere without the member);
    - soft classification (``soft``): float32 ``[K]``, the class distribution of the image (NaN without the
      member); a vector of another length, negative or non-finite is a ``BadLabel``.

    A class index outside ``[0, num_classes)`` other than the ignore value is a ``BadLabel``: the sample is skipped and
    counted, like a bad ``.cls``.
    """

    member: str
    family: str
    spec: dict

    @property
    def members(self) -> tuple[str, ...]:
        return (self.member,)

    def read(self, sample: dict, size: tuple[int, int]) -> np.ndarray:
        """The decoded target of a sample (its members by name) whose image is ``size`` (width, height)."""
        return self.decode(sample.get(self.member), size)

    def decode(self, data: bytes | None, size: tuple[int, int]) -> np.ndarray:
        encoding, width_height = self.spec["encoding"], size
        if encoding == "soft":
            return self._soft(data)
        if data is None:
            shape = (width_height[1], width_height[0])
            if encoding == "index":
                return np.full(shape, DENSE_IGNORE, dtype=np.int64)
            return np.zeros((*shape, 3), np.float32) if encoding == "normal" else np.full(shape, np.nan, np.float32)
        with Image.open(io.BytesIO(data)) as image:
            if image.size != width_height:
                raise ValueError(f"{self.member} is {image.size[0]}x{image.size[1]}, its image {size[0]}x{size[1]}")
            if encoding == "normal":
                array = np.asarray(image.convert("RGB"))
            elif image.mode in ("RGB", "RGBA", "LA"):
                array = np.asarray(image.convert("L"))
            else:  # L, P (palette indices), I;16, I
                array = np.asarray(image)
        if encoding == "index":
            labels = array.astype(np.int64)
            ignored = labels == int(self.spec["ignore"])
            bad = ~ignored & ((labels < 0) | (labels >= int(self.spec["num_classes"])))
            if bad.any():
                raise BadLabel(f"{self.member}: class {int(labels[bad][0])} outside [0, {self.spec['num_classes']}) "
                               f"(ignore {self.spec['ignore']})")
            labels[ignored] = DENSE_IGNORE
            return labels
        if encoding == "binary":
            return (array >= 128).astype(np.float32)
        if encoding == "normal":
            normals = array.astype(np.float32) * (2 / 255) - 1
            normals[(array == 0).all(axis=-1)] = 0.0
            return normals
        values = array.astype(np.float32) * float(self.spec["scale"])
        if self.spec["invalid"] is not None:  # null: every value is a label (Taskonomy's edges, keypoints ...)
            values[array == self.spec["invalid"]] = np.nan
        return values

    def _soft(self, data: bytes | None) -> np.ndarray:
        classes = int(self.spec["num_classes"])
        if data is None:
            return np.full(classes, np.nan, np.float32)
        try:
            vector = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadLabel(f"{self.member}: not a .npy array ({e})") from None
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vector.shape != (classes,) or not np.isfinite(vector).all() or (vector < 0).any():
            raise BadLabel(f"{self.member}: expected {classes} finite non-negative class scores, got "
                           f"{vector.size} values (min {vector.min() if vector.size else 'none'})")
        return vector


@dataclass(frozen=True)
class StackedTarget:
    """Several scalar labels of one task stacked as the channels of a ``[H, W, C]`` target (curvature's two
    principal curvatures, stored as two labels)."""

    parts: tuple[DenseTarget, ...]

    @property
    def family(self) -> str:
        return self.parts[0].family

    @property
    def spec(self) -> dict:
        return self.parts[0].spec

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(part.member for part in self.parts)

    def read(self, sample: dict, size: tuple[int, int]) -> np.ndarray:
        return np.stack([part.read(sample, size) for part in self.parts], axis=-1)


def dense_targets(root: str | Path, tasks: Sequence[TaskConfig]) -> dict[str, DenseTarget | StackedTarget]:
    """The dense tasks' targets by task name, from the dataset's ``dense.json`` (one-line errors name the file)."""
    dense = schema.read_dense(root)
    targets = {}
    for task in tasks:
        parts = tuple(DenseTarget(spec["member"], task.spec.dense, spec)
                      for spec in dense_label_specs(dense, root, task))
        targets[task.name] = parts[0] if len(parts) == 1 else StackedTarget(parts)
    return targets
