"""``UniPerceiverArgs``: everything that defines a ``UniPerceiver``, and the schema of ``model_config.json``."""

import dataclasses
from dataclasses import dataclass, field

from condmoe.models.dense import HEAD_KINDS
from condmoe.models.moa import MoAArgs
from condmoe.models.moe import MoEArgs
from condmoe.models.tasks import DENSE_KINDS


@dataclass
class UniPerceiverArgs:
    """Everything that defines a ``UniPerceiver`` (``models/registry.py`` holds the named sizes). Extracted models are
    saved with it (``to_dict``/``from_dict``), so it is also the schema of ``model_config.json``.

    Args:
        vocab_size: text vocabulary (BPE plus special tokens).
        spe_token_id: id of ``<|spe|>``, prepended to visual sequences (text sequences carry it already).
        img_size, patch_size: visual tokenizer geometry.
        max_text_len: longest text sequence (learned positions).
        max_frames: video frames with their own learned temporal position (more are interpolated).
        dim, depth, num_heads, mlp_ratio: encoder size.
        drop_path_rate: stochastic depth, constant over blocks as in Uni-Perceiver.
        layer_scale_init: LayerScale initial value (None disables).
        num_tasks: tasks known to task-level routers, task gates and the MI loss.
        moe_layers: indices of MoE blocks, built from ``moe``: their FFN (``MoEMLP``, or ``LinearMoEMLP`` for linear
            experts) and, with ``moe.targets`` holding 'attn', their attention (``LinearMoEAttention``).
        moa_layers: indices of blocks whose attention is a mixture of attention heads (``MoAttention``), from ``moa``.
        moe_kept, moa_kept: per block, the experts to build of its routed FFN / routed attention (MoA or linear MoE
            attention): an extracted model, see ``models/extract.py``.
        embed_norm: the LayerNorm shared by all modalities' embeddings (Uni-Perceiver); False gives timm's ViT layout
            (``models/timm_compat.py`` loads timm ViT weights into such a model).
        num_prompts: learned prompt tokens per block and side (inputs, targets) for prompt tuning (0: none).
        head_classes: classes of the zero-initialised prompt-tuning head (0: none).
        dense_heads: per dense task (by task name), its head's output: ``{"family": ..., "channels": C}``
            (``models/tasks.py`` DENSE_KINDS; C classes for segmentation and soft classification, 1 for saliency and
            edges, 3 for normals, one per stacked label for scalars).
        dense_head: the map heads' form: ``linear`` (Mod-Squad's Taskonomy decoder: one linear map per patch
            token to its p x p pixels) or ``uphead`` (M3ViT's convolutional up-sampling head, PASCAL-Context); soft
            classification always takes the pooled head (LayerNorm and Linear on the mean patch token).
        task_embedding: a learned embedding per task added to the tokens before every block (Mod-Squad).
    """

    vocab_size: int
    spe_token_id: int
    img_size: int = 224
    patch_size: int = 16
    max_text_len: int = 64
    max_frames: int = 8
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    layer_scale_init: float | None = 1e-3
    num_tasks: int = 1
    moe_layers: tuple[int, ...] = ()
    moe: MoEArgs = field(default_factory=MoEArgs)
    moa_layers: tuple[int, ...] = ()
    moa: MoAArgs = field(default_factory=MoAArgs)
    moe_kept: dict[int, list[int]] = field(default_factory=dict)
    moa_kept: dict[int, list[int]] = field(default_factory=dict)
    embed_norm: bool = True
    num_prompts: int = 0
    head_classes: int = 0
    dense_heads: dict[str, dict] = field(default_factory=dict)
    dense_head: str = "linear"
    task_embedding: bool = False

    def __post_init__(self):
        self.moe_layers, self.moa_layers = tuple(self.moe_layers), tuple(self.moa_layers)
        self.moe_kept = {int(k): sorted(v) for k, v in self.moe_kept.items()}  # JSON keys are strings
        self.moa_kept = {int(k): sorted(v) for k, v in self.moa_kept.items()}
        for name, layers in (("moe_layers", self.moe_layers), ("moa_layers", self.moa_layers)):
            if any(not 0 <= i < self.depth for i in layers):
                raise ValueError(f"{name} {list(layers)} must index blocks in [0, {self.depth})")
        if self.dense_head not in HEAD_KINDS:
            raise ValueError(f"dense_head={self.dense_head!r} must be one of {', '.join(HEAD_KINDS)}")
        for name, head in self.dense_heads.items():
            if head.get("family") not in DENSE_KINDS or not int(head.get("channels", 0)) >= 1:
                raise ValueError(f"dense_heads[{name!r}]={head!r}: needs a family in {sorted(DENSE_KINDS)} and "
                                 "channels >= 1")
        both = sorted(set(self.moe_layers) & set(self.moa_layers))
        if "attn" in self.moe.targets and both:
            raise ValueError(f"blocks {both} would get both a linear-MoE attention (moe.targets has attn) and MoA")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "UniPerceiverArgs":
        values = dict(values)
        values["moe"], values["moa"] = MoEArgs(**values.get("moe", {})), MoAArgs(**values.get("moa", {}))
        return cls(**values)
