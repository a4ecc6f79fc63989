"""``pascal_mt``: PASCAL-Context in the ``PASCAL_MT`` layout of Multi-Task-Learning-PyTorch -> dense multi-task samples.

The layout (folder names are options, these are the defaults)::

    ROOT/JPEGImages/<id>.jpg                 the image
    ROOT/semseg/VOC12/<id>.png               semseg: 21 classes (VOC), 255 ignore; tried first, as in the repo
    ROOT/semseg/pascal-context/<id>.png      semseg: the same 21 classes for the images VOC12 does not label
    ROOT/human_parts/<id>.png                human_parts: 7 classes (background + 6 parts), 255 ignore, PRE-CONVERTED
    ROOT/sal_distill/<id>.png                saliency: 0..255, positive where >= 128 (the repo's 0.5 threshold)
    ROOT/normals_distill/<id>.png            normals: RGB, n = 2 v / 255 - 1, stored as is
    ROOT/edge/<id>.png                       edge: non-zero = edge, PRE-CONVERTED
    ROOT/ImageSets/Context/<split>.txt       the split's ids (train: 4998, val: 5105)

The repo keeps human parts as PASCAL-Part ``human_parts/<id>.mat`` and derives edges from the PASCAL-Context
``pascal-context/trainval/<id>.mat`` label maps; reading MATLAB files needs scipy, which data_prep does not use, so
both are read from PNGs converted beforehand (docs/data.md shows how). An image with only the ``.mat`` file is counted
and named in the run's warnings. Each sample: ``.jpg``, the label members found (``semseg.png``, ``parts.png``,
``sal.png``, ``normals.png``, ``edge.png``) and ``.json``; see :mod:`data_prep.sources.dense_common`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from condmoe.data_prep.dense import binary_spec, index_spec, normal_spec
from condmoe.data_prep.errors import UserError
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

__all__ = ["HUMAN_PART_NAMES", "LABELS", "PascalMtSource", "VOC_NAMES"]

LABELS = ["semseg", "human_parts", "saliency", "normals", "edge"]
VOC_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# The repo's 6-part grouping of the PASCAL-Part person parts (HUMAN_PART[6]).
HUMAN_PART_NAMES = ("background", "head", "torso", "upper arm", "lower arm", "upper leg", "lower leg")


class PascalMtSource(DenseSource):
    """PASCAL-Context multi-task labels (see the module docstring for the layout)."""

    name = "pascal_mt"
    summary = "PASCAL-Context (PASCAL_MT layout) -> jpg + semseg/parts/sal/normals/edge PNG label maps"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--root``, ``--labels``, ``--ids``, the folder names and the image options."""
        add_dense_arguments(parser, LABELS)
        d = " (default: %(default)s)"
        parser.add_argument("--ids", type=Path, help="split list (default: ROOT/ImageSets/Context/SPLIT.txt)")
        parser.add_argument("--images-dir", default="JPEGImages", help="images, <id>.jpg" + d)
        parser.add_argument(
            "--semseg-dirs", default="semseg/VOC12,semseg/pascal-context", help="semseg PNG folders, in order" + d
        )
        parser.add_argument("--semseg-classes", type=int, default=21, help="semseg classes (255 = ignore)" + d)
        parser.add_argument("--parts-dir", default="human_parts", help="human parts PNGs (converted .mat)" + d)
        parser.add_argument("--sal-dir", default="sal_distill", help="saliency PNGs" + d)
        parser.add_argument("--normals-dir", default="normals_distill", help="normals PNGs" + d)
        parser.add_argument("--edge-dir", default="edge", help="edge PNGs (converted from the .mat label maps)" + d)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PascalMtSource:
        """Build from parsed arguments (the split list defaults to the job's ``--split``)."""
        root = require_dir(args.root, "--root")
        chosen = select_labels(args.labels, LABELS)
        if not 2 <= args.semseg_classes <= 255:
            raise UserError(f"--semseg-classes {args.semseg_classes}: expected 2..255 (255 is the ignore value)")
        names = VOC_NAMES if args.semseg_classes == len(VOC_NAMES) else None
        semseg_dirs = [d.strip().strip("/") for d in args.semseg_dirs.split(",") if d.strip()]
        labels = {
            "semseg": LabelFiles(
                "semseg",
                index_spec(DENSE_MEMBERS["semseg"], args.semseg_classes, 255, names),
                tuple((f"{d}/{{id}}.png", "index_png") for d in semseg_dirs),
            ),
            "human_parts": LabelFiles(
                "human_parts",
                index_spec(DENSE_MEMBERS["human_parts"], len(HUMAN_PART_NAMES), 255, HUMAN_PART_NAMES),
                ((f"{args.parts_dir}/{{id}}.png", "index_png"),),
                ((f"{args.parts_dir}/{{id}}.mat", "PASCAL-Part .mat"),),
            ),
            "saliency": LabelFiles(
                "saliency", binary_spec(DENSE_MEMBERS["saliency"]), ((f"{args.sal_dir}/{{id}}.png", "threshold_png"),)
            ),
            "normals": LabelFiles(
                "normals", normal_spec(DENSE_MEMBERS["normals"]), ((f"{args.normals_dir}/{{id}}.png", "normal_png"),)
            ),
            "edge": LabelFiles(
                "edge",
                binary_spec(DENSE_MEMBERS["edge"]),
                ((f"{args.edge_dir}/{{id}}.png", "nonzero_png"),),
                (("pascal-context/trainval/{id}.mat", "PASCAL-Context LabelMap .mat"),),
            ),
        }
        ids_file = args.ids if args.ids is not None else root / "ImageSets" / "Context" / f"{args.split}.txt"
        return cls(
            root,
            ImageOptions.from_args(args),
            (f"{args.images_dir}/{{id}}.jpg",),
            [labels[name] for name in chosen],
            read_id_list(ids_file, "--ids"),
        )
