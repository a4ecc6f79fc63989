"""Expert analysis and single-task extraction (Mod-Squad), on plain models in one process.

* ``collect_usage``: per routed layer and task, top-k selection counts, mean router probability and tokens seen,
  accumulated while ``track_usage(model)`` is on.
* ``task_similarity``: task x task cosine of usage vectors (averaged over layers) and overlap of kept-expert sets.
* ``experts_to_keep``: Mod-Squad's rule: keep expert e if its share of the task's selections exceeds
  ``threshold / k`` percent; at least k experts (the most used) survive.
* ``extract_task_model``: a standalone model with only the kept experts and the task's router; it runs without
  DeepSpeed and without the other tasks. Routers keep all E outputs (E x D, negligible), so routing probabilities are
  those of the full model: when every expert the task ever selects is kept, outputs are exactly the full model's.
* ``freeze_for_transfer``: freeze everything but routers and output heads to fit a new task on frozen experts.
"""

import dataclasses
from pathlib import Path

import torch
from torch import nn

from condmoe.models.generalist import UniPerceiver
from condmoe.models.linear_moe import ExpertLinear, LinearMoEMixer
from condmoe.models.moa import MoAttention
from condmoe.models.moe import RUN_STATE_BUFFERS, MoEMLP, RoutedLayer
from condmoe.models.router import RoutingContext


def routed_layers_by_name(model: nn.Module) -> dict[str, RoutedLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutedLayer)}


def track_usage(model: nn.Module, enabled: bool = True) -> None:
    for layer in routed_layers_by_name(model).values():
        layer.track_usage(enabled)


def collect_usage(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {"kind", "top_k", "counts" [X][E], "mean_prob" [X][E], "tokens" [X]}}`` (JSON-ready)."""
    usage = {}
    for name, layer in routed_layers_by_name(model).items():
        if getattr(layer, "usage", None) is None:
            continue
        tokens = layer.usage["tokens"]
        usage[name] = {
            "kind": "moa" if isinstance(layer, MoAttention) else "moe",
            "top_k": layer.top_k,
            "counts": layer.usage["counts"].tolist(),
            "mean_prob": (layer.usage["prob_sum"] / tokens.clamp_min(1)[:, None]).tolist(),
            "tokens": tokens.tolist(),
        }
    return usage


def usage_shares(usage: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Per layer, each task's share of its selections per expert ``[X, E]`` (rows sum to 1 where the task ran)."""
    shares = {}
    for name, stats in usage.items():
        counts = torch.tensor(stats["counts"], dtype=torch.float64)
        shares[name] = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    return shares


def experts_to_keep(usage: dict[str, dict], task_id: int, threshold: float) -> dict[str, list[int]]:
    """Mod-Squad's rule per layer: keep e if ``100 * share[task, e] > threshold / k``; at least k experts survive.

    ``threshold=0`` keeps every expert the task selected at least once (the exact extraction).
    """
    keep = {}
    for name, share in usage_shares(usage).items():
        k = usage[name]["top_k"]
        row = share[task_id]
        kept = torch.nonzero(100 * row > threshold / k).squeeze(1).tolist()
        if len(kept) < k:
            kept = torch.topk(row, k).indices.tolist()
        keep[name] = sorted(kept)
    return keep


def task_similarity(usage: dict[str, dict], keep_threshold: float = 3.0) -> dict[str, list[list[float]]]:
    """Task x task similarity: cosine of expert-usage vectors averaged over layers, and mean Jaccard overlap of the
    kept-expert sets (``experts_to_keep`` at ``keep_threshold``)."""
    shares = usage_shares(usage)
    num_tasks = next(iter(shares.values())).shape[0]
    cosine = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for share in shares.values():
        unit = share / share.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cosine += unit @ unit.t()
    cosine /= len(shares)
    kept = [experts_to_keep(usage, t, keep_threshold) for t in range(num_tasks)]
    overlap = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for name in shares:
        for a in range(num_tasks):
            for b in range(num_tasks):
                sa, sb = set(kept[a][name]), set(kept[b][name])
                overlap[a, b] += len(sa & sb) / max(1, len(sa | sb))
    overlap /= len(shares)
    return {"cosine": cosine.tolist(), "overlap": overlap.tolist()}


def _slice_router(router_state: dict[str, torch.Tensor], level: str, task_id: int) -> dict[str, torch.Tensor]:
    state = dict(router_state)
    if level == "task_gate":
        state["weight"] = state["weight"][task_id:task_id + 1]
    elif level == "task":
        state["embed.weight"] = state["embed.weight"][task_id:task_id + 1]
    return state


def extract_task_model(model: UniPerceiver, task_id: int, keep: dict[str, list[int]],
                       task_name: str = "") -> UniPerceiver:
    """A single-task model holding only the kept experts of each routed layer, the task's router, its task embedding
    and (a dense task) its own head.

    Args:
        model: the full (plain, one-process) model.
        task_id: the task to keep; the extracted model runs it as task 0.
        keep: layer name (``blocks.<i>.mlp`` / ``blocks.<i>.attn``) -> global expert ids to keep.
        task_name: the task's name: the dense head it keeps (every other dense head is dropped).
    """
    moe_kept, moa_kept = dict(model.args.moe_kept), dict(model.args.moa_kept)
    for name, experts in keep.items():
        block = int(name.split(".")[1])
        (moe_kept if name.endswith(".mlp") else moa_kept)[block] = sorted(experts)
    heads = {k: v for k, v in model.args.dense_heads.items() if k == task_name}
    small = UniPerceiver(dataclasses.replace(model.args, num_tasks=1, moe_kept=moe_kept, moa_kept=moa_kept,
                                             dense_heads=heads))

    full_state = model.state_dict()
    state = {k: v for k, v in full_state.items() if not _in_routed_layer(k, keep)
             and not (k.startswith("dense_heads.") and k.split(".")[1] not in heads)}
    if "task_embed" in full_state:
        state["task_embed"] = full_state["task_embed"][task_id:task_id + 1]
    for name, layer in routed_layers_by_name(model).items():
        kept = sorted(keep[name]) if name in keep else list(range(layer.num_experts))
        prefix = name + "."
        router = {k[len(prefix + "router."):]: v for k, v in full_state.items() if k.startswith(prefix + "router.")}
        for k, v in _slice_router(router, layer.router.level, task_id).items():
            state[f"{prefix}router.{k}"] = v
        for k in RUN_STATE_BUFFERS:  # the standalone model starts its own MI window (one task: MI is 0)
            if prefix + k in full_state:
                state[prefix + k] = torch.zeros_like(full_state[prefix + k][:, :1] if k == "mi_history_WXE"
                                                     else full_state[prefix + k])
        if isinstance(layer, LinearMoEMixer):  # one parameter per expert: keep the kept ones, renumbered
            for lin_name, lin in layer.named_children():
                if isinstance(lin, ExpertLinear):
                    for k in ("weight", "bias"):
                        for new, old in enumerate(kept):
                            if f"{prefix}{lin_name}.{k}.{old}" in full_state:
                                state[f"{prefix}{lin_name}.{k}.{new}"] = full_state[f"{prefix}{lin_name}.{k}.{old}"]
        elif isinstance(layer, MoEMLP):
            for new, old in enumerate(kept):
                src = f"{prefix}experts.deepspeed_experts.{old}."
                for k, v in full_state.items():
                    if k.startswith(src):
                        state[f"{prefix}experts.deepspeed_experts.{new}.{k[len(src):]}"] = v
        else:
            h = layer.head_dim
            rows = torch.cat([torch.arange(e * h, (e + 1) * h) for e in kept])
            state[prefix + "q_weight"] = full_state[prefix + "q_weight"][rows]
            if prefix + "q_bias" in full_state:
                state[prefix + "q_bias"] = full_state[prefix + "q_bias"][rows]
            state[prefix + "o_weight"] = full_state[prefix + "o_weight"][:, rows]
            for k in ("kv.weight", "kv.bias", "o_bias"):
                if prefix + k in full_state:
                    state[prefix + k] = full_state[prefix + k]
    small.load_state_dict(state, strict=True)
    return small


def merge_static(model: UniPerceiver, ctx: RoutingContext) -> UniPerceiver:
    """Uni-Perceiver-MoE's deployment model for one static routing group: a dense ``UniPerceiver`` whose every linear
    MoE layer is replaced by the merged linears ``sum_k g_k W_k`` its router picks for ``ctx`` (an attribute, a
    modality or a task). It computes exactly what ``model`` computes on passes of that group (e.g. the image encoder
    of ``visual_input``, the text encoder of ``text_target``) at dense size.

    Raises ValueError for models with MLP experts (``sum_k g_k FFN_k`` is not one FFN) or per-token routing.
    """
    layers = routed_layers_by_name(model)
    if not layers or any(not isinstance(m, LinearMoEMixer) for m in layers.values()):
        raise ValueError("only models whose routed layers all have linear experts (moe.expert_type=linear, no MoA) "
                         "merge into a dense model")
    state = {k: v for k, v in model.state_dict().items() if not _in_routed_layer(k, layers)}
    for name, layer in layers.items():
        for linear, (weight, bias) in layer.merged_linears(ctx).items():
            state[f"{name}.{linear}.weight"] = weight.detach().clone()
            if bias is not None:
                state[f"{name}.{linear}.bias"] = bias.detach().clone()
    dense = UniPerceiver(dataclasses.replace(model.args, moe_layers=(), moe_kept={}, moa_kept={}))
    dense.load_state_dict(state, strict=True)
    return dense


def _in_routed_layer(key: str, keep: dict[str, list[int]]) -> bool:
    return any(key.startswith(name + ".") for name in keep)


def save_extracted(model: UniPerceiver, out_dir: str | Path, meta: dict | None = None) -> Path:
    """``model.save_pretrained``: ``model.safetensors`` + ``model_config.json`` (constructor arguments and ``meta``)."""
    return model.save_pretrained(out_dir, meta)


def load_extracted(path: str | Path) -> UniPerceiver:
    """``UniPerceiver.from_pretrained``."""
    return UniPerceiver.from_pretrained(path)


def freeze_for_transfer(model: UniPerceiver) -> list[str]:
    """Freezes every parameter except routers (task gates, router embeddings) and the output heads (``ln_post``,
    ``proj``, ``logit_scale``): a new task then learns which frozen experts to use. Returns the trainable names."""
    trainable = []
    for name, param in model.named_parameters():
        train = ".router." in name or name.startswith(("ln_post.", "proj.", "logit_scale"))
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    return trainable


def freeze_for_prompt_tuning(model: UniPerceiver) -> list[str]:
    """Uni-Perceiver's prompt tuning: only the deep prompts, every LayerNorm, ``ln_post``, the temperatures and the
    class head (when the model has one) train; the rest of the backbone (attention, MLPs, experts, embeddings,
    projection) is frozen. Returns the trainable names."""
    if model.prompts is None:
        raise ValueError("prompt tuning needs a model with prompts (model.num_prompts > 0)")
    norms = {name for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    trainable = []
    for name, param in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        train = name in ("prompts", "logit_scale") or owner in norms or owner == "class_head"
        param.requires_grad_(train)
        if train:
            trainable.append(name)
    return trainable


def estimate_flops_per_token(model: UniPerceiver) -> float:
    """Forward multiply-adds x 2 per token of the encoder's matmuls (attention scores excluded): dense layers count
    fully, an MoE MLP k experts, a mixture of attention heads all of its (kept) query/output projections."""
    flops = 0.0
    for block in model.blocks:
        for sub in (block.attn, block.mlp):
            if isinstance(sub, MoEMLP):
                expert = sub.experts.deepspeed_experts[0]
                flops += 2 * sub.top_k * sum(p.numel() for n, p in expert.named_parameters() if n.endswith("weight"))
                flops += 2 * sub.router.weight[..., 0].numel() * sub.dim
            elif isinstance(sub, LinearMoEMixer):  # static levels merge: one linear per token; others mix k
                per_token = 1 if sub.router.is_static else sub.top_k
                flops += 2 * per_token * sum(m.weight[0].numel() for m in sub.children() if isinstance(m, ExpertLinear))
                flops += 2 * sub.router.weight[..., 0].numel() * sub.dim
            else:
                flops += 2 * sum(p.numel() for n, p in sub.named_parameters() if p.dim() >= 2 and "router" not in n)
    return flops
