"""Uni-Perceiver: one shared Transformer for every modality, every task a similarity to encoded targets.

Inputs (images) and targets (class names, captions) go through the same embeddings and the same pre-LN encoder; the
``<|spe|>`` token at position 0 gives each sequence's representation, which passes ``ln_post`` and a projection, is
L2-normalised and compared by cosine similarity times a learned, capped per-task-type temperature.

Every task makes exactly two encoder passes per step: one over its inputs and one over its targets. With expert
parallelism each MoE layer exchanges tokens with its peers once per pass, so ranks that drew different tasks still
meet in the same collectives (see docs/ARCHITECTURE.md).

Shape legend: B batch, N tokens, L text length, M targets, D width.
"""

import contextlib
import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import Mlp, trunc_normal_
from timm.models.vision_transformer import Block

from condmoe.models.args import UniPerceiverArgs
from condmoe.models.captioning import caption_loss
from condmoe.models.dense import dense_family_loss, make_head
from condmoe.models.embeddings import ImageEmbed, TextEmbed
from condmoe.models.linear_moe import ExpertLinear, LinearMoEAttention, LinearMoEMixer, LinearMoEMLP
from condmoe.models.losses import (
    classification_loss,
    contrastive_loss,
    gathered_contrastive_loss,
    similarity_logits,
    soft_target_cross_entropy,
)
from condmoe.models.moa import MoAttention
from condmoe.models.moe import MoEMLP, RoutedLayer, recomputing
from condmoe.models.router import RoutingContext, routing_context
from condmoe.models.tasks import DENSE_KINDS, TASK_TYPES, task_spec


@dataclass
class TaskOutput:
    loss: torch.Tensor
    logits: torch.Tensor


class LocalCollectives:
    """One process: nothing to split or gather. ``train/collectives.py`` supplies the data-parallel version."""

    rank = 0
    world_size = 1

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks (rank-major) of equally shaped tensors, differentiable."""
        return x


class ConditionalBlock(Block):
    """timm's pre-LN ``Block`` that hands the pass's ``RoutingContext`` to routed sublayers (MoE MLP, MoA)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                ctx: RoutingContext | None = None) -> torch.Tensor:
        h = self.norm1(x)
        if getattr(self.attn, "takes_routing_context", False):
            h = self.attn(h, attn_mask=attn_mask, is_causal=is_causal, ctx=ctx)
        else:
            h = self.attn(h, attn_mask=attn_mask, is_causal=is_causal)
        x = x + self.drop_path1(self.ls1(h))
        h = self.norm2(x)
        h = self.mlp(h, ctx) if getattr(self.mlp, "takes_routing_context", False) else self.mlp(h)
        return x + self.drop_path2(self.ls2(h))


class UniPerceiver(nn.Module):
    """The generalist encoder and its task heads, built from a ``UniPerceiverArgs`` (``create_model`` builds one
    from a named size)."""

    def __init__(self, args: UniPerceiverArgs):
        super().__init__()
        self.args = args  # what it takes to rebuild this model (extracted models are saved with it)
        dim, depth, num_heads = args.dim, args.depth, args.num_heads
        moe_kept, moa_kept, num_prompts = args.moe_kept, args.moa_kept, args.num_prompts
        self.dim = dim
        self.depth = depth
        self.spe_token_id = args.spe_token_id
        self.moe_layers = args.moe_layers
        self.moa_layers = args.moa_layers
        self.image_embed = ImageEmbed(args.img_size, args.patch_size, dim, max_frames=args.max_frames)
        self.text_embed = TextEmbed(args.vocab_size, args.max_text_len, dim)
        # eps 1e-6 as in timm's ViT (and its blocks here), so that timm weights give timm's features.
        self.embed_norm = nn.LayerNorm(dim, eps=1e-6) if args.embed_norm else nn.Identity()  # shared by all modalities
        ffn_layers = self.moe_layers if "ffn" in args.moe.targets else ()
        moe_mlp = partial(LinearMoEMLP if args.moe.expert_type == "linear" else MoEMLP, args=args.moe,
                          num_tasks=args.num_tasks)
        self.blocks = nn.ModuleList([
            ConditionalBlock(dim, num_heads, mlp_ratio=args.mlp_ratio, qkv_bias=True,
                             init_values=args.layer_scale_init, drop_path=args.drop_path_rate,
                             mlp_layer=partial(moe_mlp, kept_experts=moe_kept.get(i)) if i in ffn_layers else Mlp)
            for i in range(depth)
        ])
        # timm's Block only takes attention classes: routed attention is swapped in afterwards
        for i in self.moa_layers:
            self.blocks[i].attn = MoAttention(dim, num_heads, args.moa, num_tasks=args.num_tasks,
                                              kept_experts=moa_kept.get(i))
        for i in self.moe_layers if "attn" in args.moe.targets else ():
            self.blocks[i].attn = LinearMoEAttention(dim, num_heads, args.moe, num_tasks=args.num_tasks,
                                                     kept_experts=moa_kept.get(i))
        self.ln_post = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.full((len(TASK_TYPES),), math.log(1 / 0.07)))
        self.collectives = LocalCollectives()  # split target sets / gathered negatives (set by the trainer)
        # Deep prompts (Uni-Perceiver's prompt tuning): per block, P tokens for input passes and P for target passes,
        # placed before the sequence at every block and dropped after it.
        self.prompts = nn.Parameter(torch.zeros(2, depth, num_prompts, dim)) if num_prompts else None
        # Uni-Perceiver's prompt-tuning head (fc_prompt): a zero-initialised linear map of the input feature whose
        # output is added to the classification logits (the similarity to the class names).
        self.class_head = nn.Linear(dim, args.head_classes) if args.head_classes else None
        # Dense prediction: one head per dense task on the patch tokens, and Mod-Squad's task embedding.
        self.dense_heads = nn.ModuleDict({
            name: make_head("pooled" if DENSE_KINDS[head["family"]] == "soft" else args.dense_head, dim,
                            args.patch_size, int(head["channels"]))
            for name, head in args.dense_heads.items()}) if args.dense_heads else None
        self.task_embed = nn.Parameter(torch.zeros(args.num_tasks, dim)) if args.task_embedding else None
        self.grad_checkpointing = False
        self.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (timm's switch): activations are recomputed in the backward pass."""
        self.grad_checkpointing = enable

    # ----------------------------------------------------------------------------------------------- init / optim
    def init_weights(self) -> None:
        """MAE-style: xavier-uniform linears, truncated-normal embeddings, unit LayerNorms."""
        self.apply(_init_module)
        self.image_embed.init_weights()
        self.text_embed.init_weights()
        if self.prompts is not None:
            trunc_normal_(self.prompts, std=0.02)
        if self.class_head is not None:
            nn.init.zeros_(self.class_head.weight)
            nn.init.zeros_(self.class_head.bias)
        if self.task_embed is not None:
            trunc_normal_(self.task_embed, std=0.02)
        if self.dense_heads is not None:  # timm's ViT head init (the linear decoder's as in Mod-Squad)
            for m in self.dense_heads.modules():
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, RoutedLayer):
                m.init_weights()

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (``timm.models.group_parameters``; layer-wise lr decay): the embeddings first, then
        each block; the parameters it does not name (``ln_post``, projection, heads, temperatures) come last."""
        return {"stem": r"^(?:image_embed|text_embed|embed_norm|task_embed|prompts)", "blocks": r"^blocks\.(\d+)"}

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay besides biases and norms (which have ndim < 2)."""
        names = {"image_embed.pos_embed", "image_embed.temporal_embed", "image_embed.type_embed",
                 "text_embed.pos_embed", "text_embed.type_embed", "logit_scale"}
        return (names | ({"prompts"} if self.prompts is not None else set())
                | ({"task_embed"} if self.task_embed is not None else set()))

    # ---------------------------------------------------------------------------------------------------- encoder
    def encode_hidden(self, x_BND: torch.Tensor, pad_mask_BN: torch.Tensor | None = None,
                      ctx: RoutingContext | None = None, attn_mask: torch.Tensor | None = None,
                      prompt_side: int = 0) -> torch.Tensor:
        """Shared encoder over embedded tokens: the last block's hidden states ``[B, N, D]``. ``attn_mask`` (additive,
        ``[B, 1, N, N]``) replaces the padding mask when a task needs its own pattern (captioning's two streams).
        ``prompt_side`` picks the deep prompts (0 inputs, 1 targets) when the model has them."""
        if attn_mask is None and pad_mask_BN is not None:
            # Additive float mask (works in timm's fused and unfused attention): padded keys get -inf-like scores.
            attn_mask = torch.zeros(pad_mask_BN.shape, dtype=x_BND.dtype, device=x_BND.device)
            attn_mask = attn_mask.masked_fill(~pad_mask_BN, torch.finfo(x_BND.dtype).min)[:, None, None, :]
        x_BND = self.embed_norm(x_BND)
        task_D = None
        if self.task_embed is not None:  # Mod-Squad: the pass's task embedding is added before every block
            task_D = self.task_embed[ctx.task_id if ctx is not None else 0].to(x_BND.dtype)
        if self.prompts is None:
            for block in self.blocks:
                x_BND = self._run_block(block, x_BND if task_D is None else x_BND + task_D, attn_mask, ctx)
            return x_BND
        num = self.prompts.shape[2]
        attn_mask, ctx = _prefix_mask(attn_mask, num, x_BND), _prefix_context(ctx, num)
        for i, block in enumerate(self.blocks):
            prompts = self.prompts[prompt_side, i].to(x_BND.dtype).expand(x_BND.shape[0], -1, -1)
            x_BND = x_BND if task_D is None else x_BND + task_D
            x_BND = self._run_block(block, torch.cat([prompts, x_BND], dim=1), attn_mask, ctx)[:, num:]
        return x_BND

    def _run_block(self, block: nn.Module, x_BND: torch.Tensor, attn_mask: torch.Tensor | None,
                   ctx: RoutingContext | None) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG state (dropout, drop-path, gate noise) for the
            # recomputation, which therefore routes exactly as the forward pass did (the same all-to-all sizes).
            return torch.utils.checkpoint.checkpoint(block, x_BND, attn_mask=attn_mask, ctx=ctx, use_reentrant=False,
                                                     context_fn=_recompute_contexts)
        return block(x_BND, attn_mask=attn_mask, ctx=ctx)

    def head(self, h_ND: torch.Tensor) -> torch.Tensor:
        """``ln_post`` + projection: the feature compared with targets."""
        return self.proj(self.ln_post(h_ND))

    def encode(self, x_BND: torch.Tensor, pad_mask_BN: torch.Tensor | None = None,
               ctx: RoutingContext | None = None, prompt_side: int = 0) -> torch.Tensor:
        """The projected ``<|spe|>`` feature ``[B, D]`` of embedded tokens."""
        return self.head(self.encode_hidden(x_BND, pad_mask_BN, ctx, prompt_side=prompt_side)[:, 0])

    def visual_tokens(self, pixels: torch.Tensor, task_id: int = 0,
                      attribute: str = "visual_input") -> tuple[torch.Tensor, RoutingContext]:
        """Images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]`` as the encoder's input: ``<|spe|>`` then the patch
        embeddings ``[B, 1 + N, D]``, with their routing context."""
        patches_BND = self.image_embed(pixels)
        spe_ids = torch.full((patches_BND.shape[0], 1), self.spe_token_id, device=patches_BND.device)
        x_BND = torch.cat([self.text_embed.token_embed(spe_ids), patches_BND], dim=1)
        modality = "video" if pixels.dim() == 5 else "image"
        return x_BND, routing_context(x_BND, modality, attribute, task_id)

    def encode_images(self, pixels: torch.Tensor, task_id: int = 0, attribute: str = "visual_input") -> torch.Tensor:
        """Images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]`` -> ``[B, D]``."""
        x_BND, ctx = self.visual_tokens(pixels, task_id, attribute)
        return self.encode(x_BND, ctx=ctx)

    def visual_features(self, pixels: torch.Tensor, task_id: int = 0) -> torch.Tensor:
        """``ln_post`` of the ``<|spe|>`` output before the projection: timm's ``forward_features(x)[:, 0]``."""
        x_BND, ctx = self.visual_tokens(pixels, task_id)
        hidden = self.encode_hidden(x_BND, ctx=ctx)
        return self.ln_post(hidden[:, 0])

    def encode_texts(self, ids_BL: torch.Tensor, mask_BL: torch.Tensor, task_id: int = 0,
                     attribute: str = "text_target") -> torch.Tensor:
        x_BND = self.text_embed(ids_BL)
        side = 1 if attribute.endswith("target") else 0
        return self.encode(x_BND, mask_BL, routing_context(x_BND, "text", attribute, task_id, mask_BL), side)

    # ------------------------------------------------------------------------------------------------------ tasks
    def forward(self, task_type: str | tuple[str, ...], batch: dict[str, torch.Tensor], label_smoothing: float = 0.0,
                task_id: int | tuple[int, ...] = 0, split_targets: bool = False, gather_negatives: bool = False,
                head: str | tuple[str, ...] = "") -> TaskOutput:
        """One task step; ``task_id`` (the task's index in the run) feeds task-conditioned routing. ``batch`` keys:

        * ``image_classification`` / ``video_classification``: ``images`` [B,3,H,W] or ``videos`` [B,T,3,H,W],
          ``labels`` [B], ``target_ids``/``target_mask`` [M, L] (the tokenised class names), optionally
          ``soft_labels`` [B, M] (mixup/cutmix targets).
        * ``image_text_retrieval`` / ``video_text_retrieval``: ``images`` or ``videos``, ``text_ids``/``text_mask``.
        * ``mlm``: ``text_ids``/``text_mask`` (masked), ``mlm_labels`` [B, L] (token ids, -100 where not predicted),
          ``target_ids``/``target_mask`` [V, L] (every vocabulary token as a one-token sentence, row v = token v).
        * ``captioning`` / ``video_captioning``: ``images`` or ``videos``, ``text_ids``/``text_mask`` (the caption),
          and the vocabulary targets as for MLM.
        * dense types (``semseg``, ``saliency``, ``normals``, ``edge``, ``depth`` ...): ``images`` and the label map
          ``target.<head>`` of the task's head ``head`` (``models/dense.py`` says each family's encoding).

        A group (Mod-Squad's step: ``task_type``, ``task_id`` and ``head`` tuples of one entry per task) encodes the
        same ``images`` once per task, each pass with its own task id (task router, task embedding), and returns the
        tasks' losses stacked ``[T]`` (logits None); routing statistics accumulate over all passes, so the
        mutual-information loss sees every task of the step.

        Each makes exactly two encoder passes: its inputs, then its targets. ``split_targets``: each rank encodes
        1/world of the target set (class names, vocabulary) and the encodings are all-gathered with gradients.
        ``gather_negatives``: retrieval against every rank's pairs. Both are collectives: every rank must run the same
        task at the same step (``run.task_sampling=synchronized``).
        """
        if isinstance(task_type, tuple):
            losses = [self(t, batch, label_smoothing, i, split_targets, gather_negatives, h).loss
                      for t, i, h in zip(task_type, task_id, head, strict=True)]
            return TaskOutput(torch.stack(losses), None)
        spec = task_spec(task_type)
        loss_fn = getattr(self, spec.loss)  # the task table names each type's loss method
        options = {"head": head} if spec.targets == "pixels" else {}
        out = loss_fn(task_type, batch, label_smoothing=label_smoothing, task_id=task_id, split_targets=split_targets,
                      gather_negatives=gather_negatives, **options)
        if self.class_head is not None and spec.targets != "classes":
            # exact-zero gradient: every parameter gets one whatever the task (ZeRO); classification uses the head
            out = TaskOutput(out.loss + 0.0 * sum(p.sum() for p in self.class_head.parameters()), out.logits)
        return out

    def encode_target_set(self, ids_ML: torch.Tensor, mask_ML: torch.Tensor, task_id: int, attribute: str,
                          split: bool) -> torch.Tensor:
        """Encodes a target set ``[M, D]``; with ``split`` each rank encodes a contiguous 1/world of the rows (padded
        to equal chunks) and the chunks are all-gathered with their gradients."""
        world, rank = self.collectives.world_size, self.collectives.rank
        if not split or world == 1:
            return self.encode_texts(ids_ML, mask_ML, task_id, attribute)
        total = ids_ML.shape[0]
        chunk = -(-total // world)
        pad = chunk * world - total
        if pad:  # repeat the first rows so every rank encodes the same number (discarded after the gather)
            ids_ML, mask_ML = torch.cat([ids_ML, ids_ML[:pad]]), torch.cat([mask_ML, mask_ML[:pad]])
        rows = slice(rank * chunk, (rank + 1) * chunk)
        mine = self.encode_texts(ids_ML[rows], mask_ML[rows], task_id, attribute)
        return self.collectives.all_gather(mine)[:total]

    # Loss methods (TaskSpec.loss): one signature; each uses the options that apply to it (the config refuses the rest).
    def classification(self, task_type: str, batch: dict[str, torch.Tensor], *, label_smoothing: float = 0.0,
                       task_id: int = 0, split_targets: bool = False, gather_negatives: bool = False) -> TaskOutput:
        inputs_BD = self.encode_images(_pixels(batch), task_id)
        targets_MD = self.encode_target_set(batch["target_ids"], batch["target_mask"], task_id, "text_target",
                                            split_targets)
        logits = self.classification_logits(inputs_BD, targets_MD, task_type)
        if "soft_labels" in batch:  # mixup / cutmix targets
            return TaskOutput(soft_target_cross_entropy(logits, batch["soft_labels"]), logits)
        return TaskOutput(classification_loss(logits, batch["labels"], label_smoothing), logits)

    def classification_logits(self, inputs_BD: torch.Tensor, targets_MD: torch.Tensor,
                              task_type: str = "image_classification") -> torch.Tensor:
        """Scaled cosine similarity of input features to class-name features ``[B, M]``, plus the prompt-tuning head's
        output when the model has one."""
        logits = similarity_logits(inputs_BD, targets_MD, self.logit_scale[TASK_TYPES.index(task_type)])
        if self.class_head is None:
            return logits
        if self.class_head.out_features != logits.shape[1]:
            raise ValueError(f"the model's class head has {self.class_head.out_features} classes, the task "
                             f"{logits.shape[1]} (model.head_classes)")
        return logits + self.class_head(inputs_BD).to(logits.dtype)

    def retrieval(self, task_type: str, batch: dict[str, torch.Tensor], *, label_smoothing: float = 0.0,
                  task_id: int = 0, split_targets: bool = False, gather_negatives: bool = False) -> TaskOutput:
        visual_BD = self.encode_images(_pixels(batch), task_id)
        texts_BD = self.encode_texts(batch["text_ids"], batch["text_mask"], task_id)
        scale = self.logit_scale[TASK_TYPES.index(task_type)]
        if gather_negatives and self.collectives.world_size > 1:
            gather = self.collectives.all_gather
            loss, logits = gathered_contrastive_loss(visual_BD, texts_BD, gather(visual_BD), gather(texts_BD),
                                                     self.collectives.rank, scale, label_smoothing)
            return TaskOutput(loss, logits)
        logits = similarity_logits(visual_BD, texts_BD, scale)
        return TaskOutput(contrastive_loss(logits, label_smoothing), logits)

    def masked_language_modelling(self, task_type: str, batch: dict[str, torch.Tensor], *,
                                  label_smoothing: float = 0.0, task_id: int = 0, split_targets: bool = False,
                                  gather_negatives: bool = False) -> TaskOutput:
        """Masked tokens' hidden states against the encoded vocabulary: logits ``[masked tokens, V]``."""
        ids_BL, mask_BL, labels_BL = batch["text_ids"], batch["text_mask"], batch["mlm_labels"]
        x_BLD = self.text_embed(ids_BL)
        hidden_BLD = self.encode_hidden(x_BLD, mask_BL, routing_context(x_BLD, "text", "text_input", task_id,
                                                                        mask_BL))
        predicted = labels_BL >= 0
        inputs_PD = self.head(hidden_BLD[predicted])  # P masked positions (boolean index: one host sync)
        vocab_VD = self.encode_target_set(batch["target_ids"], batch["target_mask"], task_id, "vocab_target",
                                          split_targets)
        logits = similarity_logits(inputs_PD, vocab_VD, self.logit_scale[TASK_TYPES.index(task_type)])
        loss = classification_loss(logits, labels_BL[predicted], label_smoothing)
        # Text-only: the visual embedding gets an exact-zero gradient, so that every parameter has a gradient whatever
        # task a rank drew (ZeRO reduces the same gradient buckets on every rank).
        loss = loss + 0.0 * sum(p.sum() for p in self.image_embed.parameters())
        return TaskOutput(loss, logits)

    def captioning(self, task_type: str, batch: dict[str, torch.Tensor], *, label_smoothing: float = 0.0,
                   task_id: int = 0, split_targets: bool = False, gather_negatives: bool = False) -> TaskOutput:
        """Teacher-forced next-token prediction against the encoded vocabulary (``models/captioning.py``)."""
        vocab_VD = self.encode_target_set(batch["target_ids"], batch["target_mask"], task_id, "vocab_target",
                                          split_targets)
        return TaskOutput(*caption_loss(self, _pixels(batch), batch["text_ids"], batch["text_mask"], vocab_VD,
                                        task_id, label_smoothing))

    def dense_prediction(self, task_type: str, batch: dict[str, torch.Tensor], *, label_smoothing: float = 0.0,
                         task_id: int = 0, split_targets: bool = False, gather_negatives: bool = False,
                         head: str = "") -> TaskOutput:
        """A dense task: the head's map ``[B, C, H, W]`` of the images' patch tokens against ``target.<head>``."""
        pred = self.dense_predict(batch["images"], task_id, head)
        loss = dense_family_loss(task_spec(task_type).dense, pred, batch[f"target.{head}"])
        # The other tasks' heads get an exact-zero gradient: every parameter has one whatever the task (ZeRO).
        others = [p for name, m in self.dense_heads.items() if name != head for p in m.parameters()]
        if others:
            loss = loss + 0.0 * sum(p.sum() for p in others)
        return TaskOutput(loss, pred)

    def dense_predict(self, images: torch.Tensor, task_id: int, head: str) -> torch.Tensor:
        """The dense head ``head``'s output ``[B, C, H, W]`` for images ``[B, 3, H, W]`` (raw: logits for
        segmentation, saliency and edges, unnormalised normals, scalars), ``[B, K]`` for a soft classification."""
        if self.dense_heads is None or head not in self.dense_heads:
            raise ValueError(f"the model has no dense head {head!r} (has {sorted(self.dense_heads or {})})")
        x_BND, ctx = self.visual_tokens(images, task_id)
        hidden_BND = self.encode_hidden(x_BND, ctx=ctx)
        grid = self.image_embed.patch_embed.grid_size
        return self.dense_heads[head](hidden_BND[:, 1:], grid).float()  # each head normalises its tokens

    def caption_scale(self) -> torch.Tensor:
        return self.logit_scale[TASK_TYPES.index("captioning")]

    # ---------------------------------------------------------------------------------------------------- helpers
    # ------------------------------------------------------------------------------------------------ file layout
    def save_pretrained(self, path: str | Path, meta: dict | None = None) -> Path:
        """``model.safetensors`` (the state dict) + ``model_config.json`` (the constructor arguments, ``model_args``,
        and ``meta``) in folder ``path``: the layout ``from_pretrained`` reads, plain PyTorch, no DeepSpeed."""
        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(out / "model.safetensors"))
        (out / "model_config.json").write_text(json.dumps({"model_args": self.args.to_dict(), **(meta or {})},
                                                          indent=2))
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "UniPerceiver":
        """The model ``save_pretrained`` (or ``condmoe-export``) wrote to folder ``path``, in eval mode."""
        from safetensors.torch import load_file

        path = Path(path)
        config = json.loads((path / "model_config.json").read_text())
        if "model_args" not in config:
            raise ValueError(f"{path / 'model_config.json'}: no model_args (written by an older condmoe: export it "
                             "again)")
        model = cls(UniPerceiverArgs.from_dict(config["model_args"]))
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        return model.eval()

    def num_params(self, active_only: bool = False, embeddings: bool = True) -> int:
        """Parameter count; ``active_only`` counts what a token meets: ``top_k`` experts of an MoE MLP and of a
        token-routed linear MoE, one (merged) expert of a statically routed linear MoE. ``embeddings=False`` leaves
        out the tables a token looks up or adds instead of multiplying (the text token table, positions, type
        embeddings): what an MFU estimate counts as compute (the patch embedding is a matmul and stays)."""
        total = sum(p.numel() for p in self.parameters())
        if not embeddings:
            image = self.image_embed
            total -= sum(p.numel() for p in (*self.text_embed.parameters(), image.pos_embed, image.temporal_embed,
                                              image.type_embed))
        if active_only:
            for m in self.modules():
                if isinstance(m, MoEMLP):
                    per_expert = sum(p.numel() for p in m.experts.deepspeed_experts[0].parameters())
                    total -= per_expert * (m.num_local_experts - m.top_k)
                elif isinstance(m, LinearMoEMixer):
                    per_expert = sum(lin.weight[0].numel() + (0 if lin.bias is None else lin.bias[0].numel())
                                     for lin in m.children() if isinstance(lin, ExpertLinear))
                    total -= per_expert * (m.num_local_experts - (1 if m.router.is_static else m.top_k))
        return total


def _recompute_contexts():
    return contextlib.nullcontext(), recomputing()


def _prefix_mask(attn_mask: torch.Tensor | None, num: int, x_BND: torch.Tensor) -> torch.Tensor | None:
    """The attention mask of ``[prompts | sequence]``: prompts see and are seen by every token."""
    if attn_mask is None:
        return None
    batch, _, rows, cols = attn_mask.shape
    out = attn_mask.new_zeros(batch, 1, rows + num if rows > 1 else 1, cols + num)
    out[..., -rows:, num:] = attn_mask
    return out


def _prefix_context(ctx: RoutingContext | None, num: int) -> RoutingContext | None:
    """Prompt tokens route like the sequence's first token (its modality and attribute)."""
    if ctx is None:
        return None

    def prefix(t):
        return None if t is None else torch.cat([t[:, :1].expand(-1, num, *t.shape[2:]), t], dim=1)

    return RoutingContext(task_id=ctx.task_id, modality_BN=prefix(ctx.modality_BN),
                          attribute_BNA=prefix(ctx.attribute_BNA), pad_mask_BN=prefix(ctx.pad_mask_BN))


def _pixels(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["videos"] if "videos" in batch else batch["images"]


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        trunc_normal_(m.weight, std=0.02)
