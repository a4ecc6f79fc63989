"""``taskonomy``: Taskonomy's per-domain folders -> one sample per RGB view with a member per domain.

The layout (``--layout``, the folder of one domain of one building; the default is shown, Mod-Squad reads the
omnidata downloader's ``{domain}/taskonomy/{building}``)::

    ROOT/{domain}/{building}/point_<p>_view_<v>_domain_<domain>.png

A sample is an ``rgb`` view, ``<building>/point_<p>_view_<v>``; every other domain's file of the same view becomes
the member ``<domain>.png`` (a missing one is left out and counted). The buildings are ``--buildings``, else those
marked ``1`` in the ``--csv-splits`` columns of ``--splits-csv`` (Taskonomy's ``train_val_test_<size>.csv``: a header,
then ``building,train,val,test`` rows, read by position as Mod-Squad does; Mod-Squad's train split is
``--csv-splits train,val``), else every building folder of ``rgb``; ``--exclude-buildings`` drops some.

The domains are stored as they are, described in ``dense.json``:

* ``depth_euclidean``, ``depth_zbuffer``: 16-bit, 1/512 m (scale 0.001953125), 65535 invalid.
* ``normal``: RGB, stored as is (Taskonomy centres it on 127; no axis convention is converted here).
* ``edge_occlusion``, ``edge_texture``, ``keypoints2d``, ``keypoints3d``: 16-bit, scale 1/65535 (to [0, 1]).
* ``reshading``, ``segment_unsup2d``, ``segment_unsup25d``: 8-bit grey (an RGB file must have equal channels),
  scale 1/255.
* ``principal_curvature``: RGB whose first two channels are the two curvatures, stored as two 8-bit labels
  ``principal_curvature_1`` and ``principal_curvature_2`` (scale 1/255; 127 is zero curvature).

* ``class_object``, ``class_scene``: ``point_<p>_view_<v>_domain_<domain>.npy`` vectors of 1000 (ImageNet) / 365
  (Places) soft class scores, stored as ``<domain>.npy`` members (encoding ``soft``).

These domains have no unlabelled value except depth's: their ``invalid`` is ``null``. A file of another bit depth
or mode than its domain's, or a class vector of another length, skips the sample (``bad_label``).
``segment_semantic`` is not handled (Mod-Squad leaves it out too).
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path
from typing import Any

from condmoe.data_prep.dense import normal_spec, scalar_spec, soft_spec
from condmoe.data_prep.errors import ErrorItem, UserError
from condmoe.data_prep.imaging import ImageOptions
from condmoe.data_prep.sources.common import require_dir, require_file
from condmoe.data_prep.sources.dense_common import DenseSource, LabelFiles, add_dense_arguments, select_labels

__all__ = ["DOMAINS", "TaskonomySource"]

# domain -> [(label, spec arguments, reader)]: principal_curvature gives two labels, every other domain one; the
# arguments are scalar_spec's (scale, invalid), soft_spec's (num_classes,) or None (normals).
_DEPTH = (1 / 512, 65535)
_BITS16 = (1 / 65535, None)
_BITS8 = (1 / 255, None)
DOMAINS: dict[str, list[tuple[str, tuple | None, str]]] = {
    "depth_euclidean": [("depth_euclidean", _DEPTH, "uint16_png")],
    "depth_zbuffer": [("depth_zbuffer", _DEPTH, "uint16_png")],
    "normal": [("normal", None, "normal_png")],
    "edge_occlusion": [("edge_occlusion", _BITS16, "uint16_png")],
    "edge_texture": [("edge_texture", _BITS16, "uint16_png")],
    "keypoints2d": [("keypoints2d", _BITS16, "uint16_png")],
    "keypoints3d": [("keypoints3d", _BITS16, "uint16_png")],
    "principal_curvature": [
        ("principal_curvature_1", _BITS8, "red_png"),
        ("principal_curvature_2", _BITS8, "green_png"),
    ],
    "reshading": [("reshading", _BITS8, "uint8_png")],
    "segment_unsup2d": [("segment_unsup2d", _BITS8, "uint8_png")],
    "segment_unsup25d": [("segment_unsup25d", _BITS8, "uint8_png")],
    "class_object": [("class_object", (1000,), "soft_npy")],
    "class_scene": [("class_scene", (365,), "soft_npy")],
}
_RGB_NAME = re.compile(r"^point_(\d+)_view_(\d+)_domain_rgb\.png$")
_CSV_COLUMNS = {"train": 1, "val": 2, "test": 3}


def _names(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def _csv_buildings(path: Path, splits: list[str]) -> list[str]:
    unknown = [s for s in splits if s not in _CSV_COLUMNS]
    if unknown or not splits:
        raise UserError(f"--csv-splits {','.join(splits)!r}: expected a comma-separated subset of train,val,test")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"--splits-csv {path}: cannot read ({e})") from None
    buildings = []
    for number, row in enumerate(rows, 2):
        if not row:
            continue
        if len(row) < 4:
            raise UserError(f"--splits-csv {path}:{number}: expected building,train,val,test, got {row}")
        if any(row[_CSV_COLUMNS[s]].strip() == "1" for s in splits):
            buildings.append(row[0].strip())
    return buildings


def _list_views(rgb_dir: Path, buildings: list[str]) -> tuple[list[Any], list[str]]:
    """The views ``<building>/point_<p>_view_<v>`` of each building in (point, view) order, an :class:`ErrorItem`
    for each other file, and the buildings without an rgb folder."""
    ids: list[Any] = []
    absent = []
    for building in buildings:
        folder = rgb_dir / building
        if not folder.is_dir():
            absent.append(building)
            continue
        views = []
        for path in sorted(folder.iterdir()):
            match = _RGB_NAME.match(path.name)
            if match:
                views.append(((int(match[1]), int(match[2])), f"{building}/point_{match[1]}_view_{match[2]}"))
            elif not path.name.startswith("."):
                ids.append(ErrorItem(f"{building}/{path.name}", "bad_name", "not point_<p>_view_<v>_domain_rgb.png"))
        ids.extend(image_id for _, image_id in sorted(views))
    return ids, absent


class TaskonomySource(DenseSource):
    """Taskonomy views and their domains (see the module docstring for the layout)."""

    name = "taskonomy"
    summary = "Taskonomy per-domain folders -> rgb jpg + a label per domain (depth, normal, edges, ..., class .npy)"

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Add ``--root``, ``--labels`` (the domains), ``--layout``, the building selection and the image options."""
        add_dense_arguments(parser, list(DOMAINS))
        d = " (default: %(default)s)"
        parser.add_argument("--layout", default="{domain}/{building}", help="folder of a domain's building" + d)
        parser.add_argument("--buildings", help="comma-separated buildings (default: --splits-csv, else all)")
        parser.add_argument("--splits-csv", type=Path, help="Taskonomy's train_val_test_<size>.csv")
        parser.add_argument("--csv-splits", help="CSV columns to take, e.g. train,val (default: the job's --split)")
        parser.add_argument("--exclude-buildings", help="comma-separated buildings to leave out")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TaskonomySource:
        """Build from parsed arguments; lists the buildings' rgb views."""
        root = require_dir(args.root, "--root")
        domains = select_labels(args.labels, list(DOMAINS))
        layout = args.layout.strip("/")
        if "{domain}" not in layout or not layout.endswith("{building}"):
            raise UserError(f"--layout {args.layout!r}: must hold {{domain}} and end with {{building}}")
        rgb_dir = root / layout.replace("{domain}", "rgb").removesuffix("{building}")
        if args.buildings:
            buildings = _names(args.buildings)
            origin = "--buildings"
        elif args.splits_csv is not None:
            csv_path = require_file(args.splits_csv, "--splits-csv")
            buildings = _csv_buildings(csv_path, _names(args.csv_splits or args.split))
            origin = f"--splits-csv {args.splits_csv}"
        else:
            buildings = sorted(p.name for p in require_dir(rgb_dir, "rgb folder").iterdir()
                               if p.is_dir() and not p.name.startswith("."))
            origin = str(rgb_dir)
        excluded = set(_names(args.exclude_buildings))
        buildings = sorted(set(buildings) - excluded)
        if not buildings:
            raise UserError(f"no building to prepare (from {origin}, minus --exclude-buildings)")

        ids, absent = _list_views(rgb_dir, buildings)
        if not any(isinstance(i, str) for i in ids):
            raise UserError(f"no rgb view (point_<p>_view_<v>_domain_rgb.png) in the buildings' folders in {rgb_dir}")
        report = [f"warning: {len(absent)} of {len(buildings)} buildings have no rgb folder under {rgb_dir}: "
                  f"{', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}"] if absent else []

        template = layout + "/{view}_domain_{domain}.png"
        labels = []
        for domain in domains:
            for label, values, reader in DOMAINS[domain]:
                files = template.replace("{domain}", domain)
                if reader == "soft_npy":
                    files, spec = files.removesuffix(".png") + ".npy", soft_spec(f"{label}.npy", *values)
                else:
                    spec = normal_spec(f"{label}.png") if values is None else scalar_spec(f"{label}.png", *values)
                labels.append(LabelFiles(label, spec, ((files, reader),)))
        return cls(
            root,
            ImageOptions.from_args(args),
            (template.replace("{domain}", "rgb"),),
            labels,
            ids,
            notes={"buildings": buildings, "buildings_without_rgb": absent},
            report=report,
        )

    def path(self, template: str, image_id: str) -> str:
        """The file of view ``<building>/<view>`` that a template (``{building}``, ``{view}``) names."""
        building, view = image_id.split("/", 1)
        return template.format(building=building, view=view)
