"""A checkpoint's weights under the plain model's names, from any ZeRO stage: as the module holds them, or the fp32
master copy the optimizer keeps.

* ZeRO-1/2 (condmoe's MoE runs): the module files hold whole weights in the training precision (bf16 in bf16 runs);
  the fp32 masters are put back together from every rank's optimizer shard (``train.reshard.consolidate``, which
  knows the expert groups DeepSpeed's ``zero_to_fp32`` does not).
* ZeRO-3 (dense runs only: DeepSpeed's native MoE refuses it): the module files hold empty placeholders; the weights
  are DeepSpeed's own reconstruction of the fp32 partitions (``deepspeed.utils.zero_to_fp32``).
* ZeRO-0: the module files (the optimizer state is not sharded; fp32 runs hold fp32 weights).

``condmoe-ckpt consolidate`` writes the fp32 weights as one safetensors file; checkpoints folders get a
``zero_to_fp32.py`` that does the same, in place of DeepSpeed's copy (which cannot read condmoe's expert files).
"""

import logging
from pathlib import Path

import torch

from condmoe.models.ds_moe import plain_name
from condmoe.train import checkpoint

log = logging.getLogger("condmoe.consolidate")


MODULE_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3


def step_dir(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint (``step_N``), else the latest checkpoint of that checkpoints folder."""
    path = Path(path)
    if any((path / name).is_file() for name in MODULE_FILES):
        return path
    tag = checkpoint.latest_tag(path)
    if tag is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint ({' or '.join(MODULE_FILES)}) nor a folder with one")
    return path / tag


def zero_stage(path: Path) -> int:
    """The ZeRO stage the checkpoint was written with (its record; 0 for an uncommitted one without a record)."""
    return checkpoint.read(path).layout.zero_stage if checkpoint.is_complete(path) else 0


def plain_weights(path: str | Path, master: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint's weights (plain names, every expert): the module's, or with ``master`` the fp32 master copy
    where the optimizer keeps one (ZeRO-1/2/3). ZeRO-3 always gives the masters: its module files hold none."""
    path = step_dir(path)
    stage = zero_stage(path)
    if stage == 3:
        return _zero3_fp32(path)
    weights = checkpoint.load_plain_state_dict(path)
    if master and stage in (1, 2):
        from condmoe.train.reshard import consolidate

        masters = consolidate(path, verify=False)["params"]  # verified just above
        # Buffers (the MI window) have no master copy: they stay as the module holds them.
        weights.update({name: entry["fp32"] for name, entry in masters.items()})
    return weights


def _zero3_fp32(path: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint.check(path, checkpoint.data_files(path))  # sha256 of every file before unpickling
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    states = checkpoint.safe_load(path / MODULE_FILES[1])  # buffers are whole in every rank's module file
    weights = {plain_name(name): value.float() if value.is_floating_point() else value for name, value in state.items()}
    weights.update({plain_name(name): states["module"][name] for name in states.get("buffer_names", [])
                    if name in states["module"]})
    return weights


def init_weights(path: str | Path, model) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """What ``run.init_from`` names, as a plain state dict, and the name prefixes the source does not hold (they keep
    the model's initialisation): a condmoe checkpoint or checkpoints folder (``plain_weights``), an export folder
    (``model.safetensors`` + ``model_config.json``), or one file (``.safetensors``, else a torch pickle read with
    ``weights_only``; a ``model`` or ``state_dict`` entry is unwrapped) holding condmoe's state dict or a timm ViT's
    (``models/timm_compat.py``; the model needs ``model.timm_layout=true``)."""
    from safetensors.torch import load_file

    from condmoe.models.timm_compat import TIMM_FRESH, is_timm_vit, timm_vit_state

    path = Path(path)
    if path.is_dir() and (path / "model_config.json").is_file():
        return load_file(str(path / "model.safetensors")), ()
    if not path.is_file():
        return plain_weights(path), ()
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                        weights_only=True)
    except Exception as exc:  # a file of another format: say so in one line
        raise ValueError(f"run.init_from={path}: cannot read it as safetensors or a torch state dict ({exc})") from None
    for key in ("model", "state_dict"):
        state = state.get(key, state) if isinstance(state, dict) and isinstance(state.get(key), dict) else state
    if not is_timm_vit(state):
        return state, ()
    if not isinstance(model.embed_norm, torch.nn.Identity):
        raise ValueError(f"run.init_from={path}: a timm ViT checkpoint needs model.timm_layout=true (timm's ViT has "
                         "no embedding LayerNorm and no LayerScale)")
    log.info("run.init_from: %s is a timm ViT: mapped onto the encoder (models/timm_compat.py)", path)
    return timm_vit_state(state, model.state_dict(), model.spe_token_id), TIMM_FRESH


SHIM = '''#!/usr/bin/env python
"""condmoe's zero_to_fp32.py, written over DeepSpeed's copy (which cannot read condmoe's expert files): the fp32
master weights of a checkpoint of this folder, under the plain model's names, from any ZeRO stage.

    python zero_to_fp32.py CHECKPOINTS_DIR OUTPUT_DIR [-t step_N]     # -> OUTPUT_DIR/model.safetensors
"""
import argparse
import sys
from pathlib import Path

from condmoe.train.ckpt_cli import main

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkpoint_dir", help="this checkpoints folder")
parser.add_argument("output_dir", help="folder for model.safetensors")
parser.add_argument("-t", "--tag", default=None, help="checkpoint tag (step_N); default: the latest")
parser.add_argument("--safe_serialization", action="store_true", help="accepted for DeepSpeed's interface (always)")
args = parser.parse_args()
source = Path(args.checkpoint_dir) / args.tag if args.tag else Path(args.checkpoint_dir)
sys.exit(main(["consolidate", str(source), "--out", str(Path(args.output_dir) / "model.safetensors")]))
'''


def write_shim(ckpt_dir: Path) -> None:
    """Puts condmoe's ``zero_to_fp32.py`` into a checkpoints folder (over DeepSpeed's copy)."""
    target = ckpt_dir / "zero_to_fp32.py"
    if not target.is_file() or target.read_text() != SHIM:
        tmp = ckpt_dir / ".zero_to_fp32.py.tmp"
        tmp.write_text(SHIM)
        tmp.replace(target)
