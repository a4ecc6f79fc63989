"""Modality tokenizers of the generalist: pixels and BPE ids -> token embeddings of width D.

Shape legend: B batch, T frames, N patches per frame, L text length, D width.
"""

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, resample_abs_pos_embed, trunc_normal_
from torch import nn


class ImageEmbed(nn.Module):
    """Images and videos through one conv patch embedding (timm ``PatchEmbed``; an image is a 1-frame video), plus
    learned spatial and temporal positions and a visual type embedding.

    Positions are interpolated when the resolution differs from ``img_size`` (bicubic over the patch grid) or a clip
    has more than ``max_frames`` frames (linear over time), as when fine-tuning at 224 px after pre-training at 160.
    """

    def __init__(self, img_size: int, patch_size: int, dim: int, in_chans: int = 3, max_frames: int = 8):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=dim,
                                      strict_img_size=False)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, dim))
        self.temporal_embed = nn.Parameter(torch.zeros(1, max_frames, dim))
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
        trunc_normal_(self.temporal_embed, std=0.02)
        trunc_normal_(self.type_embed, std=0.02)

    def spatial_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        if tuple(grid) == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        return resample_abs_pos_embed(self.pos_embed, list(grid), list(self.patch_embed.grid_size),
                                      num_prefix_tokens=0)

    def temporal_positions(self, num_frames: int) -> torch.Tensor:
        if num_frames <= self.temporal_embed.shape[1]:
            return self.temporal_embed[:, :num_frames]
        return F.interpolate(self.temporal_embed.transpose(1, 2), size=num_frames, mode="linear",
                             align_corners=True).transpose(1, 2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` (images) or ``[B, T, 3, H, W]`` (videos) -> ``[B, T * N, D]`` tokens, frame-major."""
        video_BTCHW = pixels if pixels.dim() == 5 else pixels.unsqueeze(1)
        batch, frames = video_BTCHW.shape[:2]
        patches = self.patch_embed(video_BTCHW.flatten(0, 1))  # [B*T, N, D]
        grid = (video_BTCHW.shape[-2] // self.patch_embed.patch_size[0],
                video_BTCHW.shape[-1] // self.patch_embed.patch_size[1])
        patches = patches + self.spatial_positions(grid)
        patches = patches.reshape(batch, frames, -1, patches.shape[-1])
        patches = patches + self.temporal_positions(frames)[:, :, None, :]
        return patches.flatten(1, 2) + self.type_embed


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
