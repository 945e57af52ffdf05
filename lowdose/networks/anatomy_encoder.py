"""AnatomyUNet: lowdose's small anatomy encoder, a 2-D segmentation U-Net of the 11 anatomy groups.

Its encoder's hierarchical features are what ALDEN's discriminator and semantic contrastive loss read,
and its organ-presence head gives BioAtt's per-slice organ probabilities. It stands in for a pretrained
vision model (ALDEN) or a vision-language model (BioAtt), which cannot be downloaded here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._padding import crop_to, pad_to_multiple
from .registry import register_network


class ConvBlock(nn.Module):
    """Two 3x3 convolutions with group normalisation and LeakyReLU, plus the input (residual)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(8, channels),
            nn.LeakyReLU(0.1),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(8, channels),
        )
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + x)


@register_network("anatomy_encoder")
class AnatomyUNet(nn.Module):
    """Segments a CT slice into the 11 anatomy groups and says which groups the slice holds.

    Args:
        in_channels: 1 (a slice, HU normalised as the denoisers' input).
        num_groups: anatomy groups (background excluded); the segmentation has ``num_groups + 1`` classes.
        features: widths of the four levels (1/2, 1/4, 1/8, 1/16 of the slice).
    """

    def __init__(self, in_channels: int = 1, num_groups: int = 11, features: Sequence[int] = (24, 48, 96, 192)):
        super().__init__()
        self.in_channels, self.num_groups, self.features_per_level = in_channels, num_groups, tuple(features)
        self.multiple = 2 ** len(features)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels * 4, features[0], 3, padding=1), nn.LeakyReLU(0.1), ConvBlock(features[0])
        )
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(f_in, f_out, 2, stride=2), nn.LeakyReLU(0.1), ConvBlock(f_out))
            for f_in, f_out in zip(features[:-1], features[1:])
        )
        self.up = nn.ModuleList(nn.Conv2d(f_in, f_out, 1) for f_in, f_out in zip(features[1:], features[:-1]))
        self.decoder = nn.ModuleList(ConvBlock(f) for f in features[:-1])
        self.segmentation_head = nn.Conv2d(features[0], 4 * (num_groups + 1), 1)
        self.presence_head = nn.Linear(2 * features[-1], num_groups)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder features, fine to coarse: 1/2, 1/4, 1/8 and 1/16 of the (padded) slice."""
        h = self.stem(F.pixel_unshuffle(pad_to_multiple(x, self.multiple)[0], 2))
        levels = [h]
        for down in self.down:
            h = down(h)
            levels.append(h)
        return levels

    def _decode(self, levels: list[torch.Tensor], size) -> torch.Tensor:
        h = levels[-1]
        for up, block, skip in zip(reversed(self.up), reversed(self.decoder), reversed(levels[:-1])):
            h = block(F.interpolate(up(h), scale_factor=2, mode="bilinear", align_corners=False) + skip)
        return crop_to(F.pixel_shuffle(self.segmentation_head(h), 2), size)

    def presence_logits(self, levels: list[torch.Tensor]) -> torch.Tensor:
        bottom = levels[-1]
        return self.presence_head(torch.cat([bottom.mean(dim=(2, 3)), bottom.amax(dim=(2, 3))], dim=1))

    def organ_presence(self, x: torch.Tensor) -> torch.Tensor:
        """Per-slice probabilities [B, num_groups] that each group is in the slice (BioAtt's prior)."""
        return torch.sigmoid(self.presence_logits(self.features(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(segmentation logits [B, num_groups + 1, H, W], organ-presence logits [B, num_groups])."""
        levels = self.features(x)
        return self._decode(levels, x.shape[-2:]), self.presence_logits(levels)
