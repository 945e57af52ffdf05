"""DoseAwareUNet: lowdose's default denoiser, a small noise-predicting U-Net fast enough for CPU."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._noise_energy import measured_noise
from ._padding import crop_to, pad_to_multiple
from .registry import register_network


class DoseEmbedding(nn.Module):
    """Embeds ``log(dose_fraction)``: Fourier features, then a two-layer MLP.

    The log makes equal dose ratios equally far apart (1/2 -> 1/4 like 1/10 -> 1/20), and smooth
    features of a continuous value let unseen doses (1/3, 1/8) fall between the trained ones.
    """

    frequencies: torch.Tensor  # a buffer

    def __init__(self, embedding_dim: int = 64, num_frequencies: int = 4):
        super().__init__()
        # Periods 16, 8, 4, 2 in log-dose (1/2..1/20 spans 2.3): none so fine that it would oscillate
        # between two trained doses, so an unseen dose lands between their embeddings.
        self.register_buffer("frequencies", math.pi / 8 * 2.0 ** torch.arange(num_frequencies), persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(1 + 2 * num_frequencies, embedding_dim),
            nn.SiLU(),
            nn.Linear(embedding_dim, embedding_dim),
            nn.SiLU(),
        )

    def forward(self, dose_fraction: torch.Tensor) -> torch.Tensor:
        log_dose = dose_fraction.clamp(1e-4, 1.0).log()[:, None]
        angles = log_dose * self.frequencies
        return self.mlp(torch.cat([log_dose, angles.sin(), angles.cos()], dim=1))


class NoiseEmbedding(nn.Module):
    """Embeds the noise measured on the input slice itself (level and texture, ``measured_noise``), added to the
    dose embedding.

    The relative dose says what fraction of the noise to remove, not how loud it is: sources differ by 2x in
    noise at full dose and a sharp kernel's noise is 3x a smooth one's. Conditioned on dose alone, version 2
    removed too little of loud noise and too much of quiet noise on held-out series (scaling its noise removal
    after the fact, the best factor ran from 0.55 on quiet to 1.4 on loud sources). FFDNet (Zhang et al., IEEE
    TIP 2018) conditions on the noise level likewise. The last layer starts at zero, so a network fine-tuned with
    it starts as it was. Fine-tuned into version 2 it gained nothing measurable over the same run without it
    (within 0.04 dB, benchmarks/results/dose_unet_v7.md): the network already reads the noise it sees.
    """

    def __init__(self, embedding_dim: int = 64):
        super().__init__()
        last = nn.Linear(embedding_dim, embedding_dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(nn.Linear(2, embedding_dim), nn.SiLU(), last)

    def forward(self, centre: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = measured_noise(centre.float()).to(centre.dtype)
        return self.mlp(features)


class InvertedResidualBlock(nn.Module):
    """1x1 expand, depthwise 3x3, 1x1 project, plus the input (MobileNetV2, Sandler et al. CVPR 2018).

    With ``embedding_dim`` the expanded features get a dose-dependent FiLM scale and shift
    (Perez et al. AAAI 2018) from a zero-initialised layer, as adaLN-Zero does in DiT
    (Peebles & Xie, ICCV 2023): at initialisation the block is exactly the unconditioned one.
    """

    def __init__(self, channels: int, expansion: int = 2, embedding_dim: int | None = None):
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, channels, 1)
        # In place: on CPU these layers are bound by memory traffic, not arithmetic.
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.film = None
        if embedding_dim is not None:
            self.film = nn.Linear(embedding_dim, 2 * hidden)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, dose_embedding: torch.Tensor | None = None) -> torch.Tensor:
        if self.film is None:
            h = self.expand(x)
        else:
            scale, shift = self.film(dose_embedding).chunk(2, dim=1)
            if scale.shape[0] == 1 and not torch.is_grad_enabled():
                # Inference with one dose for the whole batch: FiLM folded into the 1x1 expansion's weights
                # and bias (both linear), which saves a pass over the widest tensor: 16 % of the CPU
                # time of a 512x512 slice, measured with torch.profiler.
                weight = self.expand.weight * (1 + scale[0])[:, None, None, None]
                h = F.conv2d(x, weight, self.expand.bias * (1 + scale[0]) + shift[0])
            else:
                h = torch.addcmul(shift[:, :, None, None], self.expand(x), 1 + scale[:, :, None, None])
        h = self.act(self.depthwise(self.act(h)))
        return self.project(h).add_(x)


class OrganPriorAttention(nn.Module):
    """BioAtt's spatial attention steered by anatomy (BioAtt, 2025): one CBAM-style spatial map per organ
    group (Woo et al., ECCV 2018: a 7x7 convolution over the channel mean and max), mixed by the slice's
    organ-presence probabilities, so the network attends where the organs the slice holds are.

    The maps start at zero and the gate is ``2 * sigmoid``: at initialisation the features pass unchanged,
    so attention can be added to a trained network and fine-tuned.
    """

    def __init__(self, num_organs: int):
        super().__init__()
        self.maps = nn.Conv2d(2, num_organs, 7, padding=3)
        assert self.maps.bias is not None  # a Conv2d has a bias unless made with bias=False
        nn.init.zeros_(self.maps.weight)
        nn.init.zeros_(self.maps.bias)

    def forward(self, x: torch.Tensor, organ_probabilities: torch.Tensor) -> torch.Tensor:
        maps = self.maps(torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1))
        weights = organ_probabilities / organ_probabilities.sum(dim=1, keepdim=True).clamp_min(1e-6)
        attention = (maps * weights[:, :, None, None].to(maps.dtype)).sum(dim=1, keepdim=True)
        return x * (2 * torch.sigmoid(attention))


class _Stage(nn.Module):
    """A sequence of blocks that all receive the dose embedding."""

    def __init__(self, channels: int, num_blocks: int, expansion: int, embedding_dim: int | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            InvertedResidualBlock(channels, expansion, embedding_dim) for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, dose_embedding: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, dose_embedding)
        return x


@register_network("dose_unet")
class DoseAwareUNet(nn.Module):
    """Small U-Net that predicts the noise of a low-dose slice, optionally told the dose.

    Built for CPU inference: pixel-unshuffle (Shi et al. CVPR 2016) folds 2x2 pixels into channels so
    every level works at half resolution or less, blocks are depthwise-separable inverted residuals,
    and skips are added rather than concatenated. The output is ``centre slice - predicted noise``,
    so an untrained or unsure network errs towards returning its input. With the defaults:
    1.6 M parameters (2.1 M dose-conditioned), 9.5 GFLOPs per 512x512 slice with 2.5-D input.

    Dose conditioning follows FoundDiff (2025), whose blocks are conditioned on a dose embedding by
    adaLN-Zero: here each block's features are scaled and shifted (FiLM) by functions of
    ``log(dose_fraction)`` that start at zero, so training starts from the plain network.

    Args:
        in_channels: 1 for a slice, 3 for a slice and its two neighbours (2.5-D); the output is
            always the centre slice, 1 channel.
        features: widths of the levels, top to bottom (each level halves the resolution).
        blocks_per_level: blocks at each level in the encoder; the decoder repeats those of the
            upper levels; the bottom level's blocks are shared by both.
        expansion: width multiplier inside each inverted-residual block.
        dose_conditioning: if True, ``forward(x, dose_fraction)`` needs the dose fraction of each slice.
        embedding_dim: width of the dose embedding.
        noise_conditioning: if True (with ``dose_conditioning``), the measured noise of the input's centre slice
            (level and texture, ``NoiseEmbedding``) is added to the dose embedding.
        organ_attention: number of organ groups for BioAtt's anatomy-steered spatial attention after the
            bottom and every decoder stage (0: none); ``forward`` then needs ``organ_probabilities``
            ``[B, organ_attention]`` (from lowdose's anatomy encoder, shipped in the bundle).
    """

    def __init__(
        self,
        in_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256),
        blocks_per_level: Sequence[int] = (1, 2, 2, 4),
        expansion: int = 2,
        dose_conditioning: bool = False,
        embedding_dim: int = 64,
        organ_attention: int = 0,
        noise_conditioning: bool = False,
    ):
        super().__init__()
        if len(features) != len(blocks_per_level) or len(features) < 2:
            raise ValueError("features and blocks_per_level need the same length, at least 2")
        self.in_channels = in_channels
        self.dose_conditioning = dose_conditioning
        self.unshuffle = 2
        self.multiple = self.unshuffle * 2 ** (len(features) - 1)
        cond_dim = embedding_dim if dose_conditioning else None
        self.dose_embedding = DoseEmbedding(embedding_dim) if dose_conditioning else None
        if noise_conditioning and not dose_conditioning:
            raise ValueError("noise_conditioning adds to the dose embedding: it needs dose_conditioning")
        self.noise_embedding = NoiseEmbedding(embedding_dim) if noise_conditioning else None

        self.stem = nn.Conv2d(in_channels * self.unshuffle**2, features[0], 3, padding=1)
        self.encoder = nn.ModuleList(
            _Stage(f, n, expansion, cond_dim) for f, n in zip(features[:-1], blocks_per_level[:-1])
        )
        self.down = nn.ModuleList(
            nn.Conv2d(f_in, f_out, 2, stride=2) for f_in, f_out in zip(features[:-1], features[1:])
        )
        self.bottom = _Stage(features[-1], blocks_per_level[-1], expansion, cond_dim)
        # 1x1 before upsampling: the same as after (both are linear) but on 4x fewer pixels.
        self.up = nn.ModuleList(nn.Conv2d(f_in, f_out, 1) for f_in, f_out in zip(features[1:], features[:-1]))
        self.decoder = nn.ModuleList(
            _Stage(f, n, expansion, cond_dim) for f, n in zip(features[:-1], blocks_per_level[:-1])
        )
        self.organ_attention = organ_attention
        if organ_attention:
            self.attention = nn.ModuleList(OrganPriorAttention(organ_attention) for _ in features)
        self.head = nn.Conv2d(features[0], self.unshuffle**2, 3, padding=1)
        # Zero noise estimate at initialisation: training starts from the identity, never below the input.
        assert self.head.bias is not None  # a Conv2d has a bias unless made with bias=False
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(
        self,
        x: torch.Tensor,
        dose_fraction: torch.Tensor | float | None = None,
        organ_probabilities: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.organ_attention and (
            organ_probabilities is None or organ_probabilities.shape != (x.shape[0], self.organ_attention)
        ):
            raise ValueError(
                f"this network has BioAtt attention: pass organ_probabilities [{x.shape[0]}, "
                f"{self.organ_attention}] (from the anatomy encoder)"
            )
        dose_embedding = None
        if self.dose_conditioning:
            assert self.dose_embedding is not None  # made with dose_conditioning
            if dose_fraction is None:
                raise ValueError("this network is dose-conditioned: pass dose_fraction (e.g. from DoseEstimator)")
            dose_fraction = torch.as_tensor(dose_fraction, dtype=x.dtype, device=x.device).reshape(-1)
            if dose_fraction.numel() not in (1, x.shape[0]):
                raise ValueError(f"{dose_fraction.numel()} doses for {x.shape[0]} slices: give one, or one per slice")
            dose_embedding = self.dose_embedding(dose_fraction)  # [1, E] (one dose for all) or [B, E]

        centre = x[:, self.in_channels // 2 : self.in_channels // 2 + 1]
        if self.noise_embedding is not None:
            dose_embedding = dose_embedding + self.noise_embedding(centre)  # [B, E]
        h, size = pad_to_multiple(x, self.multiple)
        # channels-last halves CPU time here (oneDNN's depthwise and 1x1 kernels prefer it); same numbers.
        h = self.stem(F.pixel_unshuffle(h, self.unshuffle).contiguous(memory_format=torch.channels_last))
        skips = []
        for stage, down in zip(self.encoder, self.down):
            h = stage(h, dose_embedding)
            skips.append(h)
            h = down(h)
        h = self.bottom(h, dose_embedding)
        if self.organ_attention:
            h = self.attention[-1](h, organ_probabilities)
        for level, (stage, up, skip) in enumerate(zip(reversed(self.decoder), reversed(self.up), reversed(skips))):
            h = F.interpolate(up(h), scale_factor=2, mode="bilinear", align_corners=False).add_(skip)
            h = stage(h, dose_embedding)
            if self.organ_attention:
                h = self.attention[-2 - level](h, organ_probabilities)
        noise = F.pixel_shuffle(self.head(h), self.unshuffle)
        return (centre - crop_to(noise, size)).contiguous()
