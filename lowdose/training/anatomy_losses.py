"""Anatomy-aware training terms, usable with any of lowdose's generators.

- ``MACLoss``: ASCON's multi-scale anatomical contrastive loss (global BYOL branch + pixel InfoNCE with
  hard negatives), on a MAC-Net whose EMA target reads the normal-dose slice.
- ``SemanticContrastiveLoss``: ALDEN's semantic-guided contrastive loss on a frozen anatomy encoder's
  features: the denoised slice pulled to the normal dose, pushed from two negatives.
- ``AnatomyAwareAdversary``: ALDEN's discriminator (anatomy cross-attention) and its LSGAN losses.

``anatomy_terms.AnatomyTerms`` plugs the switched-on ones into a denoising run.

All work on the denoiser's normalised images (``hu_to_input``); encoders receive HU.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowdoseError
from ..networks import build_network
from ..networks.macnet import MACNet
from ..windows import SOFT_TISSUE, bounds

SOFT_TISSUE_BOUNDS = bounds(SOFT_TISSUE)  # -150..250 HU: what the discriminator sees


class MACLoss(nn.Module):
    """ASCON's MAC loss (Chen et al., MICCAI 2023): online MAC-Net on the denoised slice, target MAC-Net
    (EMA of the online one) on the normal-dose slice.

    - global branch: BYOL (Grill et al., NeurIPS 2020) on ``global_points`` positions of the 1/16 features:
      online projection + predictor regresses the target projection (2 - 2 cos);
    - pixel branch: InfoNCE on ``pixel_points`` positions of the full-resolution features: the positive is
      the target feature at the same place, the negatives the ``negatives`` target features most similar to
      it among its ``window`` x ``window`` neighbours (hard negatives: nearby anatomy that looks alike).
    """

    offsets: torch.Tensor  # a buffer

    def __init__(
        self,
        global_points: int = 32,
        pixel_points: int = 512,
        negatives: int = 24,
        window: int = 7,
        temperature: float = 0.1,
        ema: float = 0.99,
    ):
        super().__init__()
        self.online = cast(MACNet, build_network("macnet"))
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        dim = self.online.global_head.out_channels
        self.predictor = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim))
        self.global_points, self.pixel_points = global_points, pixel_points
        self.negatives, self.window, self.temperature, self.ema = negatives, window, temperature, ema
        half = window // 2
        offsets = [(dy, dx) for dy in range(-half, half + 1) for dx in range(-half, half + 1) if (dy, dx) != (0, 0)]
        self.register_buffer("offsets", torch.tensor(offsets), persistent=False)
        if negatives > len(offsets):
            raise LowdoseError(f"MAC: {negatives} negatives asked, a {window}x{window} window has {len(offsets)}")

    @torch.no_grad()
    def update_target(self) -> None:
        """EMA step of the target network (after each optimiser step)."""
        for t, o in zip(self.target.parameters(), self.online.parameters()):
            t.mul_(self.ema).add_(o.detach(), alpha=1 - self.ema)
        for target_buffer, online_buffer in zip(self.target.buffers(), self.online.buffers()):
            target_buffer.copy_(online_buffer)

    @staticmethod
    def _sample(features: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, h, w = features.shape
        index_b = torch.randint(0, b, (count,), device=features.device)
        index_y = torch.randint(0, h, (count,), device=features.device)
        index_x = torch.randint(0, w, (count,), device=features.device)
        return index_b, index_y, index_x

    def forward(self, denoised: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        pixel_online, global_online = self.online(denoised)
        with torch.no_grad():
            self.target.eval()
            pixel_target, global_target = self.target(normal)
        # Global branch (BYOL).
        b, y, x = self._sample(global_online, self.global_points)
        q = F.normalize(self.predictor(global_online[b, :, y, x]), dim=1)
        z = F.normalize(global_target[b, :, y, x], dim=1)
        global_loss = (2 - 2 * (q * z).sum(dim=1)).mean()
        # Pixel branch (InfoNCE with hard negatives from the normal-dose neighbourhood).
        b, y, x = self._sample(pixel_online, self.pixel_points)
        h, w = pixel_target.shape[-2:]
        anchor = F.normalize(pixel_online[b, :, y, x], dim=1)  # [N, C]
        target = F.normalize(pixel_target, dim=1)
        positive = target[b, :, y, x]  # [N, C]
        ny = (y[:, None] + self.offsets[None, :, 0]).clamp(0, h - 1)
        nx = (x[:, None] + self.offsets[None, :, 1]).clamp(0, w - 1)
        neighbours = target[b[:, None], :, ny, nx]  # [N, K, C]
        similarity = (neighbours * positive[:, None]).sum(-1)  # to the positive
        hard = similarity.topk(self.negatives, dim=1).indices
        negatives = torch.gather(neighbours, 1, hard[..., None].expand(-1, -1, neighbours.shape[-1]))
        logits = (
            torch.cat([(anchor * positive).sum(-1, keepdim=True), torch.einsum("nc,nkc->nk", anchor, negatives)], dim=1)
            / self.temperature
        )
        pixel_loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
        return global_loss + pixel_loss


def _blur(x: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return F.conv2d(x, kernel.view(1, 1, -1, 1))


class SemanticContrastiveLoss(nn.Module):
    """ALDEN's semantic-guided contrastive loss on the anatomy encoder's features, level by level:
    ``d(denoised, normal) / (d(denoised, low) + d(denoised, smoothed normal))`` with ``d`` the mean L1
    distance of features. The positive pair keeps tissue patterns; the "dual negatives" are our reading of
    the paper (its exact pairing is not public): the low-dose slice (noise, streaks) and an over-smoothed
    normal-dose slice (lost texture), so the loss pushes away from both ways of failing."""

    def __init__(self, encoder, smoothing_sigma: float = 1.5):
        super().__init__()
        self.encoder, self.smoothing_sigma = encoder, smoothing_sigma

    def forward(
        self,
        denoised_hu: torch.Tensor,
        normal_hu: torch.Tensor,
        low_hu: torch.Tensor,
        normal_features: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        with torch.no_grad():
            normal_features = normal_features or self.encoder.features(normal_hu)
            low_features = self.encoder.features(low_hu)
            smooth_features = self.encoder.features(_blur(normal_hu, self.smoothing_sigma))
        denoised_features = self.encoder.features(denoised_hu)
        terms = []
        for d, n, lo, s in zip(denoised_features, normal_features, low_features, smooth_features):
            positive = (d - n).abs().mean()
            negative = (d - lo.detach()).abs().mean() + (d - s.detach()).abs().mean()
            terms.append(positive / (negative + 1e-6))
        return torch.stack(terms).mean()


def discriminator_view(hu: torch.Tensor, window: tuple[float, float] = SOFT_TISSUE_BOUNDS) -> torch.Tensor:
    """What ALDEN's discriminator looks at: the slice in a soft-tissue window scaled to [-1, 1], and its
    high-pass (the windowed slice minus its 5x5 mean, 1 unit = 10 HU). Measured: fed HU / 1000 or the
    windowed slice alone, the discriminator stayed at chance (LSGAN loss 0.25) on our denoiser's output vs
    normal dose, even at 1/20 dose; with the high-pass channel its loss is 0.086 after 200 steps at 1/4 dose
    (0.131 at 1/20): the texture is where denoised and normal-dose CT differ."""
    low, high = window
    windowed = ((hu - low) / (high - low)).clamp(0, 1) * 2 - 1
    local_mean = F.avg_pool2d(F.pad(windowed, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
    return torch.cat([windowed, (windowed - local_mean) * (high - low) / 20.0], dim=1)


class AnatomyAwareAdversary(nn.Module):
    """ALDEN's discriminator with least-squares GAN losses (Mao et al., ICCV 2017); the anatomy features of
    the normal-dose reference condition both the real and the fake decision. Slices in HU; the
    discriminator sees them through ``discriminator_view``."""

    def __init__(self, encoder, channels: list[int]):
        super().__init__()
        self.encoder = encoder
        self.discriminator = build_network("alden_discriminator", in_channels=2, anatomy_channels=channels)

    def generator_loss(self, denoised_hu: torch.Tensor, normal_features: list[torch.Tensor]) -> torch.Tensor:
        self.discriminator.requires_grad_(False)
        try:
            return ((self.discriminator(discriminator_view(denoised_hu), normal_features) - 1) ** 2).mean()
        finally:
            self.discriminator.requires_grad_(True)

    def discriminator_loss(
        self, denoised_hu: torch.Tensor, normal_hu: torch.Tensor, normal_features: list[torch.Tensor]
    ) -> torch.Tensor:
        real = self.discriminator(discriminator_view(normal_hu), normal_features)
        fake = self.discriminator(discriminator_view(denoised_hu.detach()), normal_features)
        return 0.5 * (((real - 1) ** 2).mean() + (fake**2).mean())
