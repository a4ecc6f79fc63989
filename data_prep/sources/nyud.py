"""``nyud``: NYUD-v2 in the ``NYUD_MT`` layout of Multi-Task-Learning-PyTorch -> dense multi-task samples.

The layout (folder names are options, these are the defaults)::

    ROOT/images/<id>.jpg (or .png)          the image
    ROOT/segmentation/<id>.png              semseg: 0 void, 1..40 the 40 classes
    ROOT/depth/<id>.npy (or .png)           depth: float metres (.npy) or uint16 millimetres (.png)
    ROOT/normals/<id>.npy (or .png)         normals: float HxWx3 in [-1, 1] (.npy) or RGB (.png)
    ROOT/edge/<id>.npy (or .png)            edge: non-zero = edge
    ROOT/gt_sets/<split>.txt                the split's ids (train: 795, val: 654)

Stored as: semseg 0..39 with void -> 255 (ignore), which is how the repo loads it ("we ignore the background class
as other related works"); depth as uint16 millimetres (scale 0.001, invalid 0: zero, negative, non-finite and
beyond 65.535 m); normals as ``rint((n + 1) * 127.5)`` with zero vectors unlabelled; edges as 0 / 255. Each sample:
``.jpg``, the members found (``semseg.png``, ``depth.png``, ``normals.png``, ``edge.png``) and ``.json``; see
:mod:`data_prep.sources.dense_common`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from condmoe.data_prep.dense import binary_spec, index_spec, normal_spec, scalar_spec
from condmoe.data_prep.imaging import ImageOptions
from condmoe.data_prep.schema import DENSE_MEMBERS
from condmoe.data_prep.sources.common import require_dir
from condmoe.data_prep.sources.dense_common import (
    DenseSource,
    LabelFiles,
    add_dense_arguments,
    read_id_list,
    select_labels,
)

__all__ = ["LABELS", "NYU40_NAMES", "NyudSource"]

LABELS = ["semseg", "depth", "normals", "edge"]
# The 40-class NYUD-v2 set of Gupta et al. (class i + 1 of the PNGs is NYU40_NAMES[i] here).
NYU40_NAMES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
    "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling", "books",
    "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person", "night stand",
    "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop",
)


class NyudSource(DenseSource):
    """NYUD-v2 multi-task labels (see the module docstring for the layout)."""

    name = "nyud"
    summary = "NYUD-v2 (NYUD_MT layout) -> jpg + semseg/depth/normals/edge PNG label maps"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--root``, ``--labels``, ``--ids``, the folder names and the image options."""
        add_dense_arguments(parser, LABELS)
        d = " (default: %(default)s)"
        parser.add_argument("--ids", type=Path, help="split list (default: ROOT/gt_sets/SPLIT.txt)")
        parser.add_argument("--images-dir", default="images", help="images, <id>.jpg or <id>.png" + d)
        parser.add_argument("--semseg-dir", default="segmentation", help="40-class PNGs, 0 = void" + d)
        parser.add_argument("--depth-dir", default="depth", help="depth .npy (metres) or .png (mm)" + d)
        parser.add_argument("--normals-dir", default="normals", help="normals .npy (float) or .png (RGB)" + d)
        parser.add_argument("--edge-dir", default="edge", help="edges .npy or .png, non-zero = edge" + d)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> NyudSource:
        """Build from parsed arguments (the split list defaults to the job's ``--split``)."""
        root = require_dir(args.root, "--root")
        chosen = select_labels(args.labels, LABELS)
        labels = {
            "semseg": LabelFiles(
                "semseg",
                index_spec(DENSE_MEMBERS["semseg"], len(NYU40_NAMES), 255, NYU40_NAMES),
                ((f"{args.semseg_dir}/{{id}}.png", "nyud_semseg_png"),),
            ),
            "depth": LabelFiles(
                "depth",
                scalar_spec(DENSE_MEMBERS["depth"], 0.001, 0),
                ((f"{args.depth_dir}/{{id}}.npy", "depth_npy"), (f"{args.depth_dir}/{{id}}.png", "uint16_png")),
            ),
            "normals": LabelFiles(
                "normals",
                normal_spec(DENSE_MEMBERS["normals"]),
                ((f"{args.normals_dir}/{{id}}.npy", "normal_npy"), (f"{args.normals_dir}/{{id}}.png", "normal_png")),
            ),
            "edge": LabelFiles(
                "edge",
                binary_spec(DENSE_MEMBERS["edge"]),
                ((f"{args.edge_dir}/{{id}}.npy", "nonzero_npy"), (f"{args.edge_dir}/{{id}}.png", "nonzero_png")),
            ),
        }
        ids_file = args.ids if args.ids is not None else root / "gt_sets" / f"{args.split}.txt"
        return cls(
            root,
            ImageOptions.from_args(args),
            (f"{args.images_dir}/{{id}}.jpg", f"{args.images_dir}/{{id}}.png"),
            [labels[name] for name in chosen],
            read_id_list(ids_file, "--ids"),
        )
