"""ESAU-Net: the efficient self-attention U-Net that generates ASCON's denoised images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._padding import crop_to, pad_to_multiple
from .registry import register_network


class ChannelSelfAttention(nn.Module):
    """Multi-head self-attention across channels ("transposed" attention, Restormer, Zamir et al. CVPR 2022).

    The attention map is channels x channels, not pixels x pixels, so its cost grows linearly with
    the image size: this is what makes attention affordable at full CT resolution.
    """

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must divide by num_heads ({num_heads})")
        self.num_heads = num_heads
        # A learnt temperature per head replaces the 1/sqrt(d) scale, since q and k are L2-normalised.
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        # The depthwise 3x3 gives q, k, v local spatial context the channel attention itself lacks.
        self.qkv_local = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1, groups=3 * channels, bias=False)
        self.project_out = nn.Conv2d(channels, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_local(self.to_qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attention = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
        return self.project_out((attention @ v).reshape(b, c, h, w))


class ConvFeedForward(nn.Module):
    """Two 3x3 convolutions with LeakyReLU and a residual (1x1 projection when the width changes)."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(hidden_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )
        self.act = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x)))) + self.shortcut(x)


class ESAUBlock(nn.Module):
    """Channel self-attention with a residual, then the convolutional feed-forward."""

    def __init__(self, in_channels: int, out_channels: int, num_heads: int, hidden_channels: int | None = None):
        super().__init__()
        self.attention = ChannelSelfAttention(in_channels, num_heads)
        self.feed_forward = ConvFeedForward(in_channels, hidden_channels or in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(x + self.attention(x))


@register_network("esaunet")
class ESAUNet(nn.Module):
    """ESAU-Net, the generator of ASCON.

    Z. Chen, Q. Gao, Y. Zhang, H. Shan, "ASCON: Anatomy-aware Supervised Contrastive Learning
    Framework for Low-dose CT Denoising", MICCAI 2023 (arXiv:2307.12225).

    A 3x3 stem, then four levels of ESAU blocks (channel self-attention + two 3x3 convolutions) with
    max-pooling between them; the decoder upsamples bilinearly and ADDS the skip (no concatenation),
    then two 3x3 convolutions give the image. It predicts the image itself, without a global residual,
    as published. With the defaults: 4.9 M parameters, 208 GFLOPs per 512x512 slice.

    Args:
        in_channels: 1 for a slice, 3 for a slice and its two neighbours (2.5-D).
        out_channels: channels of the output image.
        features: widths of the stem and of the encoder's three upper levels; the bottom level keeps
            the last width and widens its feed-forward to twice that.
        num_heads: attention heads at the four levels, top to bottom.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256),
        num_heads: Sequence[int] = (1, 2, 4, 8),
    ):
        super().__init__()
        if len(features) != 4 or len(num_heads) != 4:
            raise ValueError("ESAU-Net needs 4 features (stem + 3 levels) and 4 num_heads")
        self.in_channels = in_channels
        f0, f1, f2, f3 = features
        self.stem = nn.Sequential(nn.Conv2d(in_channels, f0, 3, padding=1, bias=False), nn.LeakyReLU())
        self.enc1 = ESAUBlock(f0, f1, num_heads[0])
        self.enc2 = ESAUBlock(f1, f2, num_heads[1])
        self.enc3 = ESAUBlock(f2, f3, num_heads[2])
        self.bottom = ESAUBlock(f3, f3, num_heads[3], hidden_channels=2 * f3)
        self.dec3 = ESAUBlock(f3, f2, num_heads[2])
        self.dec2 = ESAUBlock(f2, f1, num_heads[1])
        self.dec1 = ESAUBlock(f1, f0, num_heads[0])
        self.head = nn.Sequential(
            nn.Conv2d(f0, f0, 3, padding=1, bias=False),
            nn.LeakyReLU(),
            nn.Conv2d(f0, out_channels, 3, padding=1, bias=False),
        )

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = pad_to_multiple(x, 8)  # three 2x poolings
        x1 = self.enc1(self.stem(x))
        x2 = self.enc2(F.max_pool2d(x1, 2))
        x3 = self.enc3(F.max_pool2d(x2, 2))
        out = self.bottom(F.max_pool2d(x3, 2))
        out = self.dec3(self._up(out) + x3)
        out = self.dec2(self._up(out) + x2)
        out = self.dec1(self._up(out) + x1)
        return crop_to(self.head(out), size)
