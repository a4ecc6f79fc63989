"""Captioning as Uni-Perceiver does it: a two-stream sequence scored against the encoded vocabulary.

Training sequence (one encoder pass): ``[visual tokens (N) | text stream T_0..T_{L-1} | prediction stream
P_0..P_{L-2}]``. ``T_0`` is ``<|spe|>`` (begin), ``T_j`` the caption's tokens. ``P_j`` is the ``<|spe|>`` embedding at
the position of the token it predicts (``j + 1``): it sees the visual tokens, ``T_0..T_j`` and itself, and its output
is compared with every vocabulary token (encoded by the same encoder, the second pass) to predict ``T_{j+1}``.
Visual tokens see only visual tokens, text tokens see the visual tokens and the text before them (causal).

Generation: the visual tokens are encoded once; each step feeds the last chosen token (text stream) and one
prediction token through the blocks, attending to a KV cache of the visual and earlier text tokens (standard
attention blocks; blocks with a mixture of attention heads are recomputed without cache). Beam search on top.

Shape legend: B batch (x beams), N visual tokens, L text length, S sequence, D width, V vocabulary.
"""

import math

import torch
import torch.nn.functional as F
from timm.layers import Attention

from condmoe.models.losses import classification_loss, similarity_logits
from condmoe.models.router import ATTRIBUTES, MODALITIES, RoutingContext

IGNORE = -100


def caption_attention_mask(num_visual: int, text_mask_BL: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, S, S]`` (True = may attend) for ``[visual | text L | prediction L-1]``."""
    batch, length = text_mask_BL.shape
    device = text_mask_BL.device
    n, p = num_visual, length - 1
    size = n + length + p
    allowed = torch.zeros(batch, size, size, dtype=torch.bool, device=device)
    allowed[:, :n, :n] = True  # visual -> visual
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
    allowed[:, n:n + length, :n] = True
    allowed[:, n:n + length, n:n + length] = causal & text_mask_BL[:, None, :]
    # prediction j: the visual tokens, text 0..j, itself
    allowed[:, n + length:, :n] = True
    allowed[:, n + length:, n:n + length] = causal[:p] & text_mask_BL[:, None, :]
    allowed[:, n + length:, n + length:] = torch.eye(p, dtype=torch.bool, device=device)
    return allowed


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _context(model, num_visual: int, num_text: int, num_pred: int, batch: int, task_id: int,
             device, pad_mask_BN: torch.Tensor | None = None, visual: str = "image") -> RoutingContext:
    """Per-token side information: caption_visual attribute on visual tokens (modality ``visual``: image or video),
    caption_text on the two streams; ``pad_mask_BN`` marks the real tokens (padding is not routed)."""
    visual_A = torch.tensor(ATTRIBUTES["caption_visual"], dtype=torch.float32, device=device)
    text_A = torch.tensor(ATTRIBUTES["caption_text"], dtype=torch.float32, device=device)
    attrs = torch.cat([visual_A.expand(num_visual, -1), text_A.expand(num_text + num_pred, -1)])
    modality = torch.tensor([MODALITIES.index(visual)] * num_visual + [MODALITIES.index("text")] *
                            (num_text + num_pred), device=device)
    return RoutingContext(task_id=task_id, modality_BN=modality.expand(batch, -1),
                          attribute_BNA=attrs.expand(batch, -1, -1), pad_mask_BN=pad_mask_BN)


def _visual_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` or videos ``[B, T, 3, H, W]`` (frame-major patches with temporal positions)."""
    return model.image_embed(pixels)


def _modality(pixels: torch.Tensor) -> str:
    return "video" if pixels.dim() == 5 else "image"


def _prediction_tokens(model, positions: torch.Tensor, batch: int) -> torch.Tensor:
    """``<|spe|>`` embeddings at the given text positions (+ text type embedding)."""
    te = model.text_embed
    spe = te.token_embed.weight[model.spe_token_id]
    return (spe + te.pos_embed[0, positions] + te.type_embed[0, 0]).expand(batch, -1, -1)


def caption_loss(model, images: torch.Tensor, ids_BL: torch.Tensor, mask_BL: torch.Tensor, vocab_VD: torch.Tensor,
                 task_id: int = 0, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced loss over the prediction stream; returns ``(loss, logits [predicted tokens, V])``. ``images``
    may be videos ``[B, T, 3, H, W]``."""
    batch, length = ids_BL.shape
    visual = _visual_tokens(model, images)
    text = model.text_embed(ids_BL)
    preds = _prediction_tokens(model, torch.arange(1, length, device=ids_BL.device), batch)
    x = torch.cat([visual, text, preds], dim=1)
    num_visual = visual.shape[1]
    attn_mask = _additive(caption_attention_mask(num_visual, mask_BL), x.dtype)
    # Real tokens: every visual token, the caption's tokens, and the prediction tokens of real next tokens.
    real_BN = torch.cat([mask_BL.new_ones(batch, num_visual), mask_BL, mask_BL[:, 1:]], dim=1)
    ctx = _context(model, num_visual, length, length - 1, batch, task_id, x.device, real_BN, _modality(images))
    hidden = model.encode_hidden(x, ctx=ctx, attn_mask=attn_mask)[:, num_visual + length:]
    labels = ids_BL[:, 1:].masked_fill(~mask_BL[:, 1:], IGNORE)
    predicted = labels != IGNORE
    logits = similarity_logits(model.head(hidden[predicted]), vocab_VD, model.caption_scale())
    return classification_loss(logits, labels[predicted], label_smoothing), logits


class _Decoder:
    """Incremental decoding state for one batch of images: per block, cached keys/values of the visual tokens and of
    the text tokens fed so far (``cache=True``), or the whole prefix recomputed each step (``cache=False``)."""

    def __init__(self, model, images: torch.Tensor, task_id: int, cache: bool):
        self.model, self.task_id = model, task_id
        self.visual, self.modality = _visual_tokens(model, images), _modality(images)
        self.cache = cache and model.prompts is None and all(isinstance(b.attn, Attention) for b in model.blocks)
        self.kv = None
        if self.cache:
            self.kv = self._encode_visual()

    def _encode_visual(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Runs the visual tokens through every block, keeping each block's keys and values."""
        model, x = self.model, self.model.embed_norm(self.visual)
        ctx = _context(model, x.shape[1], 0, 0, x.shape[0], self.task_id, x.device, visual=self.modality)
        cache = []
        for block in model.blocks:
            x, k, v = _block_step(block, x, None, None, None, ctx)
            cache.append((k, v))
        return cache

    def reorder(self, index: torch.Tensor) -> None:
        self.visual = self.visual.index_select(0, index)
        if self.kv is not None:
            self.kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.kv]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` [B, t+1] (text so far, starting with <|spe|>) -> feature of the next token's prediction [B, D]."""
        model = self.model
        batch, t1 = tokens.shape
        if not self.cache:  # recompute: [visual | text T_0..T_t | one prediction token at position t + 1]
            n = self.visual.shape[1]
            size = n + t1 + 1
            allowed = torch.zeros(batch, size, size, dtype=torch.bool, device=tokens.device)
            allowed[:, :n, :n] = True
            allowed[:, n:, :n] = True
            allowed[:, n:n + t1, n:n + t1] = torch.tril(torch.ones(t1, t1, dtype=torch.bool, device=tokens.device))
            allowed[:, -1, n:] = True
            pred = _prediction_tokens(model, torch.tensor([t1], device=tokens.device), batch)
            x = torch.cat([self.visual, model.text_embed(tokens), pred], dim=1)
            ctx = _context(model, n, t1, 1, batch, self.task_id, x.device, visual=self.modality)
            hidden = model.encode_hidden(x, ctx=ctx, attn_mask=_additive(allowed, x.dtype))
            return model.head(hidden[:, -1])
        # cached: feed the newest text token and one prediction token
        new_text = model.text_embed.token_embed(tokens[:, -1:]) + model.text_embed.pos_embed[:, t1 - 1:t1] + \
            model.text_embed.type_embed
        pred = _prediction_tokens(model, torch.tensor([t1], device=tokens.device), batch)
        x = model.embed_norm(torch.cat([new_text, pred], dim=1))
        ctx = _context(model, 0, 1, 1, batch, self.task_id, x.device)
        new_cache = []
        for block, (k_cache, v_cache) in zip(model.blocks, self.kv):
            x, k_new, v_new = _block_step(block, x, k_cache, v_cache, "text_then_prediction", ctx)
            # keep the text token's keys/values (position 0 of the two new tokens), not the prediction's
            new_cache.append((torch.cat([k_cache, k_new[:, :, :1]], dim=2), torch.cat([v_cache, v_new[:, :, :1]], 2)))
        self.kv = new_cache
        return model.head(x[:, -1])


def _block_step(block, x, k_cache, v_cache, mode, ctx):
    """One timm-style block over new tokens ``x`` attending to cached keys/values; returns (x, k_new, v_new)."""
    attn = block.attn
    batch, n, dim = x.shape
    h = block.norm1(x)
    qkv = attn.qkv(h).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    keys = k if k_cache is None else torch.cat([k_cache, k], dim=2)
    values = v if v_cache is None else torch.cat([v_cache, v], dim=2)
    mask = None
    if mode == "text_then_prediction":  # new = [text token, prediction token]: the text token must not see P
        allowed = torch.ones(n, keys.shape[2], dtype=torch.bool, device=x.device)
        allowed[0, -1] = False
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed,
                                                                                     torch.finfo(x.dtype).min)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    out = attn.proj(attn.norm(out.transpose(1, 2).reshape(batch, n, dim)))
    x = x + block.drop_path1(block.ls1(out))
    h = block.norm2(x)
    h = block.mlp(h, ctx) if getattr(block.mlp, "takes_routing_context", False) else block.mlp(h)
    return x + block.drop_path2(block.ls2(h)), k, v


@torch.no_grad()
def generate(model, images: torch.Tensor, vocab_VD: torch.Tensor, spe_id: int, eos_id: int, max_length: int = 20,
             beam_size: int = 2, task_id: int = 0, cache: bool = True, banned: list[int] | None = None
             ) -> list[tuple[list[int], float]]:
    """Beam search (``beam_size=1``: greedy). Returns per image the best ``(token ids, log-probability)``; the ids
    exclude the leading <|spe|> and include <|endoftext|> when it was produced."""
    model.eval()
    vocab_VD = F.normalize(vocab_VD, dim=-1)
    scale = model.caption_scale().clamp(max=math.log(100.0)).exp()
    batch = images.shape[0]
    decoder = _Decoder(model, images.repeat_interleave(beam_size, 0), task_id, cache)
    tokens = torch.full((batch * beam_size, 1), spe_id, dtype=torch.long, device=images.device)
    scores = torch.zeros(batch, beam_size, device=images.device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand from the first only
    finished = torch.zeros(batch * beam_size, dtype=torch.bool, device=images.device)
    for _ in range(max_length):
        feats = F.normalize(decoder.step(tokens), dim=-1)
        logp = torch.log_softmax(scale * feats @ vocab_VD.t(), dim=-1)  # [B*beam, V]
        if banned:
            logp[:, banned] = float("-inf")
        # finished beams only extend with eos at no cost
        logp = torch.where(finished[:, None], torch.full_like(logp, float("-inf")), logp)
        logp[finished, eos_id] = 0.0
        total = (scores.reshape(-1, 1) + logp).reshape(batch, -1)  # [B, beam*V]
        scores, flat = total.topk(beam_size, dim=-1)
        beam_of = flat // logp.shape[1]
        token = flat % logp.shape[1]
        index = (torch.arange(batch, device=images.device)[:, None] * beam_size + beam_of).reshape(-1)
        decoder.reorder(index)
        tokens = torch.cat([tokens.index_select(0, index), token.reshape(-1, 1)], dim=1)
        finished = finished.index_select(0, index) | token.reshape(-1).eq(eos_id)
        if bool(finished.all()):
            break
    best = scores.argmax(dim=-1)
    out = []
    for b in range(batch):
        row = tokens[b * beam_size + int(best[b]), 1:].tolist()
        if eos_id in row:
            row = row[:row.index(eos_id) + 1]
        out.append((row, float(scores[b, best[b]])))
    return out
