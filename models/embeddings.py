"""Modality tokenizers of the generalist: pixels and BPE ids -> token embeddings of width D.

Shape legend: B batch, N patches, L text length, D width.
"""

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, trunc_normal_


class ImageEmbed(nn.Module):
    """Conv patch embedding (timm ``PatchEmbed``) plus learned spatial positions and a visual type embedding."""

    def __init__(self, img_size: int, patch_size: int, dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, dim))
        self.type_embed = nn.Parameter(torch.zeros(1, 1, dim))

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def init_weights(self) -> None:
        # MAE: the conv as a linear layer on flattened patches.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.type_embed, std=0.02)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(images_BCHW) + self.pos_embed + self.type_embed


class TextEmbed(nn.Module):
    """Token embedding plus learned positions and a text type embedding."""

    def __init__(self, vocab_size: int, max_len: int, dim: int):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len, dim))
        self.type_embed = nn.Parameter(torch.zeros(1, 1, dim))

    def init_weights(self) -> None:
        trunc_normal_(self.token_embed.weight, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.type_embed, std=0.02)

    def forward(self, ids_BL: torch.Tensor) -> torch.Tensor:
        length = ids_BL.shape[1]
        if length > self.pos_embed.shape[1]:
            raise ValueError(f"text length {length} exceeds max_text_len={self.pos_embed.shape[1]}")
        return self.token_embed(ids_BL) + self.pos_embed[:, :length] + self.type_embed
