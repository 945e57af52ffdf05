"""DoseAnatomyEncoder: lowdose's DA-CLIP, embeddings of a slice's dose level and of its body region.

After FoundDiff's DA-CLIP (Hao et al. 2025, github hao1635/FoundDiff), whose dose and anatomy embeddings
condition its diffusion denoiser. FoundDiff's is a CLIP ResNet-50 with learnt text prompts; this one is a
CPU-sized CNN trained from scratch by contrast between simulated low-dose slices (no downloaded weights, no
text), see lowdose.training.da_clip.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ._noise_energy import log_noise_energy
from .registry import register_network

REGIONS: tuple[str, ...] = ("head", "neck", "chest", "abdomen", "pelvis")  # the order of ``region_logits``


@dataclasses.dataclass
class DoseAnatomyEmbedding:
    """What the encoder says of a batch of slices: two unit-norm embeddings ``[B, E]`` (what a denoiser is
    conditioned on), ``log(dose_fraction)`` ``[B]`` read from the dose embedding, region logits ``[B, 5]``."""

    dose_embedding: torch.Tensor
    region_embedding: torch.Tensor
    log_dose: torch.Tensor
    region_logits: torch.Tensor

    def dose_fraction(self) -> torch.Tensor:
        """The dose fraction of each slice, ``[B]``, in (0, 1]."""
        return self.log_dose.detach().exp().clamp(1e-6, 1.0)

    def region(self) -> list[str]:
        """The most likely region of each slice (names of ``REGIONS``)."""
        return [REGIONS[int(i)] for i in self.region_logits.argmax(1)]


# The heads (region classifier, dose regressor) read the unit-norm embeddings scaled by this (1 / the contrastive
# losses' temperature): unscaled, the region logits stayed within +-0.2 after 80 steps, the class biases
# outweighed them and every validation slice was given one region (accuracy flipping between 0.7 and 0;
# measured). Scaled, a probe on 79 real slices reached cross-entropy 0.1 in 5 steps, against 1.3.
HEAD_INPUT_SCALE = 10.0


def _keep_scale(stack: nn.Sequential) -> None:
    """He initialisation for a stack of convolutions with LeakyReLU, biases zero. PyTorch's default shrinks
    activations about 1.7-fold per layer and adds random biases: after the region branch's eight layers the
    features of different slices differed by 6e-6 (measured), below the batch normalisation's epsilon, and
    the region embeddings of every slice collapsed to one point."""
    for layer in stack:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, a=0.1, mode="fan_in", nonlinearity="leaky_relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def _strided(widths: Sequence[int], width: int) -> tuple[nn.Sequential, int]:
    """Stride-2 3x3 convolutions with LeakyReLU; returns the stack and its output width."""
    layers: list[nn.Module] = []
    for f in widths:
        layers += [nn.Conv2d(width, f, 3, stride=2, padding=1), nn.LeakyReLU(0.1)]
        width = f
    return nn.Sequential(*layers), width


def _projection(width: int, embedding_dim: int) -> nn.Sequential:
    """The MLP from pooled features to an embedding. Its batch normalisation (as in SimCLR's and SupCon's heads)
    removes what all slices share: without it the pooled features of every slice point the same way and the
    unit-norm embeddings start (and stay) within 1 degree of each other."""
    return nn.Sequential(nn.Linear(width, 128), nn.BatchNorm1d(128), nn.LeakyReLU(0.1), nn.Linear(128, embedding_dim))


@register_network("da_clip")
class DoseAnatomyEncoder(nn.Module):
    """Two branches on one slice: noise for the dose, anatomy for the region, each ending in an embedding.

    Dose branch: the in-plane noise measure of ``DoseEstimator`` (the slice minus its 3x3 local mean, a learnt
    bank of high-pass filters, squared, averaged over 4x4 blocks and logged), with the block-averaged image
    beside it, then strided convolutions, a learnt spatially weighted mean and an MLP to the dose embedding;
    ``log_dose`` is a small regressor on that unit-norm embedding, so the embedding itself must carry the dose.
    No normalisation layer: it would divide out the noise amplitude being measured.

    Region branch: the slice resized to ``region_size`` pixels (its field of view, not its pixel size, sets the
    scale; noise is averaged away), strided convolutions, mean and max pooling and an
    MLP to the region embedding; ``region_logits`` is a linear classifier on it. No normalisation layer here
    either: a per-image (instance or group) normalisation before the global pooling removed what tells one
    slice's anatomy from another's (the embeddings of a first version collapsed to one point).

    With ``in_channels=1`` a 2.5-D slab is read by its centre slice, in-plane only, like
    ``DoseEstimator(in_channels=1)``. Any H, W. With the defaults: 0.44 M parameters and 0.29 GFLOPs per
    512x512 slice.

    Args:
        in_channels: channels of the slices read (1).
        embedding_dim: E, the width of both embeddings.
        noise_filters: learnt high-pass filters whose log-energy the dose branch measures.
        dose_features: widths of the dose branch's stride-2 convolutions after the 4x4 energy averaging.
        region_features: widths of the region branch's stride-2 convolutions.
        region_size: the side the slice is resized to for the region branch.
        num_regions: region classes (``REGIONS``: head, neck, chest, abdomen, pelvis).
        initial_dose_fraction: ``log_dose`` before training (the middle of 1/2..1/20 in log scale).
    """

    def __init__(
        self,
        in_channels: int = 1,
        embedding_dim: int = 64,
        noise_filters: int = 16,
        dose_features: Sequence[int] = (32, 64, 96),
        region_features: Sequence[int] = (16, 32, 64, 128),
        region_size: int = 128,
        num_regions: int = len(REGIONS),
        initial_dose_fraction: float = 0.2,
    ):
        super().__init__()
        self.in_channels, self.embedding_dim, self.region_size = in_channels, embedding_dim, region_size
        self.noise_filter_bank = nn.Conv2d(in_channels, noise_filters, 3, padding=1, bias=False)
        self.dose_features, width = _strided(dose_features, noise_filters + in_channels)
        self.dose_pool_weight = nn.Conv2d(width, 1, 1)
        self.dose_projection = _projection(width + noise_filters, embedding_dim)
        self.dose_regressor = nn.Sequential(nn.Linear(embedding_dim, 32), nn.LeakyReLU(0.1), nn.Linear(32, 1))
        # log(dose) = -softplus(z) keeps the dose <= 1; the bias puts z where it gives the initial dose.
        output = cast(nn.Linear, self.dose_regressor[-1])
        nn.init.zeros_(output.weight)
        nn.init.constant_(output.bias, math.log(math.expm1(-math.log(initial_dose_fraction))))

        layers: list[nn.Module] = []
        width = in_channels
        for f in region_features:
            layers += [nn.Conv2d(width, f, 3, stride=2, padding=1), nn.LeakyReLU(0.1)]
            layers += [nn.Conv2d(f, f, 3, padding=1), nn.LeakyReLU(0.1)]
            width = f
        self.region_features = nn.Sequential(*layers)
        self.region_projection = _projection(2 * width, embedding_dim)
        self.region_classifier = nn.Linear(embedding_dim, num_regions)
        for stack in (self.dose_features, self.region_features):
            _keep_scale(stack)

    def _centre(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.in_channels:  # a wider 2.5-D slab: its centre slice(s) only, in-plane
            first = (x.shape[1] - self.in_channels) // 2
            x = x[:, first : first + self.in_channels]
        return x

    def dose_features_of(self, x: torch.Tensor) -> torch.Tensor:
        """The dose branch's pooled features ``[B, F]`` (before the projection to the embedding)."""
        log_energy, context = log_noise_energy(x, self.noise_filter_bank)
        h = self.dose_features(torch.cat([log_energy, context], dim=1))
        weight = torch.sigmoid(self.dose_pool_weight(h))
        pooled = (h * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp_min(1e-6)
        return torch.cat([pooled, log_energy.mean(dim=(2, 3))], dim=1)

    def pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each branch's pooled features ``[B, F]`` of slices ``[B, C, H, W]``: slices of different sizes are
        pooled apart, then go through ``heads`` together (its batch normalisation sees the whole batch)."""
        x = self._centre(x)
        small = F.interpolate(x, size=(self.region_size, self.region_size), mode="area")
        h = self.region_features(small)
        return self.dose_features_of(x), torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    def heads(self, dose_features: torch.Tensor, region_features: torch.Tensor) -> DoseAnatomyEmbedding:
        """The embeddings, log dose and region logits from ``pooled``'s features."""
        dose_embedding = F.normalize(self.dose_projection(dose_features), dim=1)
        log_dose = -F.softplus(self.dose_regressor(HEAD_INPUT_SCALE * dose_embedding)).squeeze(1)
        region_embedding = F.normalize(self.region_projection(region_features), dim=1)
        return DoseAnatomyEmbedding(
            dose_embedding, region_embedding, log_dose, self.region_classifier(HEAD_INPUT_SCALE * region_embedding)
        )

    def forward(self, x: torch.Tensor) -> DoseAnatomyEmbedding:
        return self.heads(*self.pooled(x))
