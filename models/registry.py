"""Model sizes by name, like torchtitan's dict of model args. ``debug`` is what tests and the CPU demo use."""

from condmoe.models.args import UniPerceiverArgs
from condmoe.models.generalist import UniPerceiver

SIZES: dict[str, dict] = {
    # debug: LayerScale 0.1 rather than 1e-3 so that a few hundred CPU steps escape the collapsed start.
    "debug": dict(dim=64, depth=4, num_heads=4, mlp_ratio=2.0, patch_size=8, img_size=32, drop_path_rate=0.0,
                  layer_scale_init=0.1),
    "small": dict(dim=384, depth=12, num_heads=6),
    "base": dict(dim=768, depth=12, num_heads=12),
    "large": dict(dim=1024, depth=24, num_heads=16, drop_path_rate=0.2),
}


def moe_layer_indices(depth: int, every: int = 2, offset: int = 0) -> tuple[int, ...]:
    """Blocks that carry MoE: ``offset, offset + every, ...``. Uni-Perceiver-MoE's 'odd' placement is every=2,
    offset=0 (blocks 0, 2, 4, ...); every=1 puts MoE in every block."""
    if every < 1 or not 0 <= offset < every:
        raise ValueError(f"moe placement needs every >= 1 and 0 <= offset < every, got every={every}, offset={offset}")
    return tuple(range(offset, depth, every))


def model_args(size: str, vocab_size: int, spe_token_id: int, **overrides) -> UniPerceiverArgs:
    """The ``UniPerceiverArgs`` of a registered size; keyword overrides (its fields) win over the size's defaults."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {', '.join(SIZES)}")
    return UniPerceiverArgs(vocab_size=vocab_size, spe_token_id=spe_token_id, **{**SIZES[size], **overrides})


def create_model(size: str, vocab_size: int, spe_token_id: int, **overrides) -> UniPerceiver:
    """Builds a ``UniPerceiver`` of a registered size (``model_args``)."""
    return UniPerceiver(model_args(size, vocab_size, spe_token_id, **overrides))
