"""Sparse upcycling: initialise an MoE model from a dense checkpoint of the same encoder.

Every expert of an MoE MLP becomes a copy of the dense block's MLP; routers keep their fresh initialisation. With
renormalised top-k gates (k >= 2, gates summing to one) and no token dropped, each MoE layer then computes
``sum_k g_k FFN(x) = FFN(x)``: the upcycled model's outputs equal the dense model's at step 0 (gate noise off).
"""

import re

import torch

from condmoe.models.generalist import UniPerceiver
from condmoe.models.moe import MoEMLP

DENSE_MLP = re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$")


def upcycle_state_dict(dense_state: dict[str, torch.Tensor], model: UniPerceiver) -> dict[str, torch.Tensor]:
    """Maps a dense state dict onto ``model``: dense MLP tensors of MoE blocks are copied into every (kept) expert,
    everything else is passed through unchanged. Router tensors are absent (the caller keeps the model's)."""
    moe_blocks = {i: b.mlp for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEMLP)}
    state = {}
    for key, value in dense_state.items():
        match = DENSE_MLP.match(key)
        if match and int(match.group(1)) in moe_blocks:
            block, layer, kind = int(match.group(1)), match.group(2), match.group(3)
            for e in range(moe_blocks[block].num_local_experts):
                state[f"blocks.{block}.mlp.experts.deepspeed_experts.{e}.{layer}.{kind}"] = value.clone()
        else:
            state[key] = value
    return state


def is_dense_checkpoint_for(dense_state: dict[str, torch.Tensor], model: UniPerceiver) -> bool:
    """True if the state dict has plain MLP weights where ``model`` has MoE layers."""
    return any((m := DENSE_MLP.match(k)) and isinstance(model.blocks[int(m.group(1))].mlp, MoEMLP)
               for k in dense_state)
