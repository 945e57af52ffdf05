"""MAC-Net: ASCON's multi-scale anatomical contrastive network (Chen et al., MICCAI 2023).

A small U-Net that maps a CT slice to pixel-level features (full resolution, for the pixel InfoNCE
branch) and coarse features (1/16, for the global BYOL branch). ASCON runs two copies: the online one
on the denoised slice and a target one, an exponential moving average of it, on the normal-dose slice.
The loss lives in ``lowdose.training.anatomy_losses.MACLoss``; this file is only the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._padding import crop_to, pad_to_multiple
from .registry import register_network


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)
    )


@register_network("macnet")
class MACNet(nn.Module):
    """Encoder 1 -> 1/16 with a decoder back to full resolution.

    Args:
        in_channels: 1 (the denoised or normal-dose slice, normalised as the denoiser's output).
        features: widths at full, 1/2, 1/4, 1/8 and 1/16 resolution.
        pixel_dim: width of the pixel-level embedding; ``global_dim``: of the coarse one.
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (16, 32, 64, 64, 128),
        pixel_dim: int = 32,
        global_dim: int = 128,
    ):
        super().__init__()
        self.multiple = 2 ** (len(features) - 1)
        self.stem = _conv(in_channels, features[0])
        self.down = nn.ModuleList(_conv(a, b, stride=2) for a, b in zip(features[:-1], features[1:]))
        self.up = nn.ModuleList(_conv(b + a, a) for a, b in zip(features[:-1], features[1:]))
        self.pixel_head = nn.Conv2d(features[0], pixel_dim, 1)
        self.global_head = nn.Conv2d(features[-1], global_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel features [B, pixel_dim, H, W], global features [B, global_dim, H/16, W/16])."""
        h, size = pad_to_multiple(x, self.multiple)
        h = self.stem(h)
        skips = [h]
        for down in self.down:
            h = down(h)
            skips.append(h)
        coarse = self.global_head(h)
        for up, skip in zip(reversed(self.up), reversed(skips[:-1])):
            h = up(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1))
        return crop_to(self.pixel_head(h), size), coarse
