"""Import-time compatibility for timm on CPU-only PyTorch.

timm imports torchvision at import time (``timm.layers.create_norm`` needs ``FrozenBatchNorm2d``), but the
torchvision wheels on PyPI are CUDA builds whose C extension cannot load next to the CPU wheel of torch that CPU
machines use. torchvision handles a missing extension everywhere except two ``register_fake`` calls for
``torchvision::nms``/``qnms``, which raise "operator torchvision::nms does not exist" and abort the import.

Declaring the two operator schemas (with no kernels) when, and only when, the extension cannot load makes the import
succeed. condmoe never calls torchvision ops; calling one would fail with PyTorch's "no kernel" error rather than
silently. On machines where torchvision's extension loads (GPU machines, matching CPU builds) this does nothing.
"""

import importlib.util
from pathlib import Path

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the schema registrations alive for the life of the process


def _torchvision_ops_loadable(package_dir: Path) -> bool:
    candidates = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    for path in candidates:
        try:
            torch.ops.load_library(str(path))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> None:
    """Declares torchvision's nms schemas if its C extension cannot be loaded (see the module docstring)."""
    global _library
    if _library is not None:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    if _torchvision_ops_loadable(Path(next(iter(spec.submodule_search_locations)))):
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        try:
            _library.define(schema)
        except RuntimeError:  # already declared by someone else
            pass


ensure_torchvision_importable()
