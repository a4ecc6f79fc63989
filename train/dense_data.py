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
from condmoe.train.config import TaskConfig, dense_label_spec

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
    - depth (``scalar``): float32 ``[H, W]`` (value * scale), NaN where the value is the spec's ``invalid``.

    A class index outside ``[0, num_classes)`` other than the ignore value is a ``BadLabel``: the sample is skipped and
    counted, like a bad ``.cls``.
    """

    member: str
    family: str
    spec: dict

    def decode(self, data: bytes | None, size: tuple[int, int]) -> np.ndarray:
        encoding, width_height = self.spec["encoding"], size
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


def dense_targets(root: str | Path, tasks: Sequence[TaskConfig]) -> dict[str, DenseTarget]:
    """The dense tasks' targets by task name, from the dataset's ``dense.json`` (one-line errors name the file)."""
    dense = schema.read_dense(root)
    targets = {}
    for task in tasks:
        spec = dense_label_spec(dense, root, task)
        targets[task.name] = DenseTarget(spec["member"], task.spec.dense, spec)
    return targets
