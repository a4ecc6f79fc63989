"""Loading a timm ViT into the dense encoder, so that it gives timm's features for the same image.

Build the model with timm's layout: same dim/depth/heads/patch/image size, ``layer_scale_init`` as the timm model
(None for the standard ViTs), ``embed_norm=False`` (timm has no embedding LayerNorm), no MoE. Mapping:

| timm                          | condmoe                                                        |
|-------------------------------|----------------------------------------------------------------|
| ``patch_embed.proj``          | ``image_embed.patch_embed.proj``                               |
| ``pos_embed[:, 1:]``          | ``image_embed.pos_embed`` (temporal and type embeddings zero)  |
| ``cls_token + pos_embed[:, 0]`` | ``text_embed.token_embed.weight[spe_token_id]`` (the ``<|spe|>`` row) |
| ``blocks.{i}.*``              | ``blocks.{i}.*`` (the same timm ``Block`` parameters)          |
| ``norm``                      | ``ln_post``                                                    |
| ``head``                      | not used (targets are encoded, not a classifier)               |

Then ``model.visual_features(x)`` equals ``timm_model.forward_features(x)[:, 0]``.
"""

import torch

from condmoe.models.generalist import UniPerceiver


def is_timm_vit(state: dict[str, torch.Tensor]) -> bool:
    """A timm ``VisionTransformer`` state dict (class token, patch embedding, blocks)."""
    return {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(state)


def timm_vit_state(timm_state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                   spe_token_id: int) -> dict[str, torch.Tensor]:
    """A timm ViT state dict under condmoe's names (the table above), for a model whose state dict is ``own``: its
    token table with the ``<|spe|>`` row replaced, zero temporal and type embeddings. The spatial positions keep
    timm's grid (``run.init_from`` resizes them to the model's)."""
    state = {}
    for key, value in timm_state.items():
        if key.startswith("blocks."):
            state[key] = value
        elif key.startswith("patch_embed."):
            state["image_embed." + key] = value
        elif key.startswith("norm."):
            state["ln_post." + key[len("norm."):]] = value
    pos = timm_state["pos_embed"]
    state["image_embed.pos_embed"] = pos[:, 1:]
    state["image_embed.temporal_embed"] = torch.zeros_like(own["image_embed.temporal_embed"])
    state["image_embed.type_embed"] = torch.zeros_like(own["image_embed.type_embed"])
    tokens = own["text_embed.token_embed.weight"].clone()
    tokens[spe_token_id] = timm_state["cls_token"][0, 0] + pos[0, 0]
    state["text_embed.token_embed.weight"] = tokens
    return state


# What a timm ViT does not hold: condmoe's own text positions and type, output projection and temperatures.
TIMM_FRESH = ("text_embed.", "proj.", "logit_scale")


def load_timm_vit(model: UniPerceiver, timm_state: dict[str, torch.Tensor]) -> None:
    """Copies a timm ``VisionTransformer`` state dict (class token, no register tokens) into ``model``."""
    if not isinstance(model.embed_norm, torch.nn.Identity):
        raise ValueError("build the model with embed_norm=False to load a timm ViT (timm has no embedding norm)")
    if model.moe_layers or model.moa_layers:
        raise ValueError("load the timm ViT into the dense encoder; upcycle it into MoE afterwards")
    own = model.state_dict()
    pos = timm_state["pos_embed"]
    if pos.shape[1] != own["image_embed.pos_embed"].shape[1] + 1:
        raise ValueError(f"timm pos_embed has {pos.shape[1] - 1} patch positions, the model "
                         f"{own['image_embed.pos_embed'].shape[1]}: same img_size and patch_size needed")
    state = timm_vit_state(timm_state, own, model.spe_token_id)
    missing = [k for k in own if k not in state and not k.startswith(TIMM_FRESH)]
    if missing:
        raise ValueError(f"timm state dict lacks {missing[:3]} (a ViT with the same depth and layout is needed)")
    model.load_state_dict(state, strict=False)
