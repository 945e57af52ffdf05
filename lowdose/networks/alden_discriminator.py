"""ALDEN's anatomy-aware discriminator (MICCAI 2025): a patch discriminator whose features attend, by
cross-attention, to the hierarchical features of an anatomy encoder computed on the normal-dose reference,
so its real/fake decision is made knowing which anatomy it looks at."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_network


class AnatomyCrossAttention(nn.Module):
    """Image features (queries) attend to anatomy features (keys, values) pooled to a small grid."""

    def __init__(self, channels: int, anatomy_channels: int, heads: int = 4, grid: int = 8):
        super().__init__()
        self.grid = grid
        self.project = nn.Conv2d(anatomy_channels, channels, 1)
        self.norm = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: torch.Tensor, anatomy: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Pooled to at most grid x grid tokens: the keys say what anatomy is where, coarsely; cheap.
        kv = self.project(
            F.adaptive_avg_pool2d(anatomy, (min(self.grid, anatomy.shape[-2]), min(self.grid, anatomy.shape[-1])))
        )
        kv = kv.flatten(2).transpose(1, 2)
        q = self.norm(x.flatten(2).transpose(1, 2))
        attended, _ = self.attention(q, kv, kv, need_weights=False)
        return x + attended.transpose(1, 2).reshape(b, c, h, w)


@register_network("alden_discriminator")
class AnatomyAwareDiscriminator(nn.Module):
    """Patch discriminator (real: normal dose, fake: denoised) with anatomy cross-attention.

    Args:
        in_channels: 2: the slice in a soft-tissue window and its high-pass, as
            ``lowdose.training.anatomy_losses.discriminator_view`` makes them.
        features: widths of the three stride-2 levels.
        anatomy_channels: widths of the anatomy encoder's feature maps, fine to coarse; the last
            ``len(features)`` of them are fused into the discriminator's levels, fine to coarse.
    """

    def __init__(
        self,
        in_channels: int = 2,
        features: Sequence[int] = (32, 64, 128),
        anatomy_channels: Sequence[int] = (24, 48, 96, 192),
        heads: int = 4,
    ):
        super().__init__()
        if len(anatomy_channels) < len(features):
            raise ValueError(f"the anatomy encoder gives {len(anatomy_channels)} feature maps; {len(features)} needed")
        widths = [in_channels, *features]
        self.levels = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2))
            for a, b in zip(widths[:-1], widths[1:])
        )
        fused = list(anatomy_channels)[-len(features) :]
        self.fusion = nn.ModuleList(AnatomyCrossAttention(f, a, heads) for f, a in zip(features, fused))
        self.head = nn.Conv2d(features[-1], 1, 3, padding=1)

    def forward(self, x: torch.Tensor, anatomy_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Patch logits [B, 1, H/8, W/8]: high where the slice looks like a normal-dose one."""
        anatomy = list(anatomy_features)[-len(self.levels) :]
        h = x
        for level, fusion, a in zip(self.levels, self.fusion, anatomy):
            h = fusion(level(h), a)
        return self.head(h)
