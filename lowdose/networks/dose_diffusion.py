"""DoseDiffusion: lowdose's DA-Diff, a residual diffusion denoiser sampled in 1 to 4 steps, its blocks conditioned
on time, dose and body region by adaLN-Zero (FoundDiff, 2025; RDDM, Liu et al. CVPR 2024; DiT, Peebles & Xie 2023)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._padding import crop_to, pad_to_multiple
from .dose_unet import DoseEmbedding
from .registry import register_network

# The body regions a region vector ``[B, len(REGIONS)]`` gives probabilities (or one-hot) of, in this order.
REGIONS = ("head", "neck", "chest", "abdomen", "pelvis")
CONDITIONING = ("adaln_zero", "film", "none")
MAX_SAMPLING_STEPS = 4
DEFAULT_SAMPLING_STEPS = 2  # a bundle without ``sampling_steps`` in its network kwargs samples in this many


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the diffusion time ``t`` in [0, 1] (scaled to 0..1000, DDPM's range), then an MLP."""

    frequencies: torch.Tensor  # a buffer

    def __init__(self, embedding_dim: int = 64, num_frequencies: int = 32):
        super().__init__()
        self.register_buffer(
            "frequencies", torch.exp(-math.log(10000.0) * torch.arange(num_frequencies) / num_frequencies), False
        )
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_frequencies, embedding_dim), nn.SiLU(), nn.Linear(embedding_dim, embedding_dim)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 1000.0 * t[:, None] * self.frequencies
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


def layer_norm_2d(x: torch.Tensor) -> torch.Tensor:
    """Layer norm over the channels of each pixel (as DiT over each token's features), without affine: the
    conditioning gives the scale and shift. Per pixel, so 96x96 training patches and whole slices match."""
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],)).permute(0, 3, 1, 2)


class ConditionedBlock(nn.Module):
    """A residual block whose mixer is a 1x1 expansion, a depthwise 3x3 and a 1x1 projection (MobileNetV2),
    in place of FoundDiff's SS2D (Mamba) mixer: on a CPU a depthwise-separable mixer costs a fraction of a scan.

    ``adaln_zero``: ``x + gate * (mixer(norm(x) * (1 + scale) + shift) + region)``, scale, shift and gate from the
    time+dose embedding by a zero-initialised layer, so every block starts as the identity (DiT's adaLN-Zero);
    the region embedding is added to the mixer's output (FoundDiff's DACB). ``film``: the same scale and shift,
    no gate (the block starts as a plain pre-norm residual block). ``none``: no embedding reaches the block.
    """

    def __init__(self, channels: int, expansion: int, embedding_dim: int, conditioning: str):
        super().__init__()
        hidden = channels * expansion
        self.conditioning = conditioning
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, channels, 1)
        self.act = nn.LeakyReLU(0.1, inplace=True)
        self.modulation: nn.Linear | None = None
        self.region: nn.Linear | None = None
        if conditioning != "none":
            self.modulation = nn.Linear(embedding_dim, (3 if conditioning == "adaln_zero" else 2) * channels)
            # Zero: the region term starts at nothing, so region conditioning can be added to a trained network.
            self.region = nn.Linear(embedding_dim, channels, bias=False)
            for layer in (self.modulation, self.region):
                nn.init.zeros_(layer.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward(
        self, x: torch.Tensor, embedding: torch.Tensor | None, region_embedding: torch.Tensor | None
    ) -> torch.Tensor:
        if self.conditioning == "adaln_zero" and embedding is None:
            return x  # no embedding, no gate: the block stays what it starts as
        h = layer_norm_2d(x)
        gate = None
        if self.modulation is not None and embedding is not None:
            shift, scale, *rest = self.modulation(F.silu(embedding)).chunk(
                3 if self.conditioning == "adaln_zero" else 2, 1
            )
            h = torch.addcmul(shift[:, :, None, None], h, 1 + scale[:, :, None, None])
            gate = rest[0] if rest else None
        h = self.project(self.act(self.depthwise(self.act(self.expand(h)))))
        if self.region is not None and region_embedding is not None:
            h = h + self.region(region_embedding)[:, :, None, None]
        if gate is not None:
            h = h * gate[:, :, None, None]
        return x + h


class _Stage(nn.Module):
    """Blocks that all receive the same embeddings."""

    def __init__(self, channels: int, num_blocks: int, expansion: int, embedding_dim: int, conditioning: str):
        super().__init__()
        self.blocks = nn.ModuleList(
            ConditionedBlock(channels, expansion, embedding_dim, conditioning) for _ in range(num_blocks)
        )

    def forward(self, x: torch.Tensor, embedding: torch.Tensor | None, region: torch.Tensor | None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, embedding, region)
        return x


@register_network("dose_diffusion")
class DoseDiffusion(nn.Module):
    """Residual diffusion denoiser (our DA-Diff): the residual ``r = x_LD - x_ND`` of the centre slice is diffused
    and the network predicts it from the 2.5-D low-dose slab and the noisy state, in 1 to 4 sampling steps.

    Forward process (RDDM, continuous time t in [0, 1]): ``x_t = x_ND + t * r + noise_scale * sqrt(t) * eps``,
    so ``x_1 = x_LD + noise_scale * eps`` and ``x_0 = x_ND``. Sampling is RDDM's deterministic (DDIM, eta 0)
    residual sampler from ``x_1`` over ``sampling_steps`` equal steps; its last step returns ``x_LD - r_hat``
    exactly, so with one step it is a residual regressor that sees a noised copy of its input, with two a second
    pass refines the first. The only randomness is the starting noise ``eps``, drawn from a generator seeded by
    the slab's own values (and ``seed``): the same input gives the same output, bit for bit on a CPU, whatever
    else is in the batch; another seed gives another (close) sample.

    ``forward(x, dose_fraction)`` is the whole sampler (what the inference engine, validation and FLOP counts
    call); ``predict_residual`` is one step of the network (what training calls). The backbone is ``dose_unet``'s
    (pixel-unshuffle, depthwise-separable blocks, added skips): 9.7 GFLOPs per 512x512 slice and step with the
    defaults, so 2 steps cost about 2x ``dose_unet``.

    Args:
        in_channels: slices of the low-dose slab (3: the slice and its two neighbours); the noisy state is
            one more input channel; the output is the centre slice, 1 channel.
        features, blocks_per_level, expansion: the U-Net's widths, blocks per level, block expansion (as
            ``dose_unet``).
        embedding_dim: width of the time, dose and region embeddings.
        conditioning: ``adaln_zero`` (FoundDiff), ``film`` or ``none`` (the ablation's arms; see ConditionedBlock).
        dose_conditioning: the dose fraction (``forward(x, dose_fraction)``, one per slice or one for all) is
            embedded (sinusoidal features of its log, an MLP) and folded into the time embedding.
        region_classes: length of the region vector ``region`` ``[B, R]`` (probabilities or one-hot over
            ``REGIONS``: 5); 0 for none. A region of None adds nothing (the region is unknown).
        dose_embedding_dim, region_embedding_dim: widths of external embeddings (``dose_embedding``,
            ``region_embedding`` ``[B, E]``, e.g. a DA-CLIP encoder's), projected into the network's own; 0 for none.
            Given, an external dose embedding replaces the one of ``dose_fraction``, a region one that of ``region``.
        sampling_steps: steps of the sampler (1 to 4); the bundle keeps it, ``forward(steps=)`` overrides it.
        noise_scale: std of the noise at t = 1, in normalised units (HU / 1000); RDDM's ``sqrt(sum_scale)``
            of its conditional restoration setting (0.1). 0 makes the diffusion a deterministic (cold) one.
    """

    def __init__(
        self,
        in_channels: int = 3,
        features: Sequence[int] = (32, 64, 128, 256),
        blocks_per_level: Sequence[int] = (1, 2, 2, 4),
        expansion: int = 2,
        embedding_dim: int = 64,
        conditioning: str = "adaln_zero",
        dose_conditioning: bool = False,
        region_classes: int = 0,
        dose_embedding_dim: int = 0,
        region_embedding_dim: int = 0,
        sampling_steps: int = DEFAULT_SAMPLING_STEPS,
        noise_scale: float = 0.1,
    ):
        super().__init__()
        if len(features) != len(blocks_per_level) or len(features) < 2:
            raise ValueError("features and blocks_per_level need the same length, at least 2")
        if conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {', '.join(CONDITIONING)}, not {conditioning!r}")
        if conditioning == "none" and (
            dose_conditioning or region_classes or dose_embedding_dim or region_embedding_dim
        ):
            raise ValueError("conditioning 'none' gives the blocks no embedding: dose and region would be ignored")
        if noise_scale < 0:
            raise ValueError(f"noise_scale must be 0 or more, not {noise_scale}")
        self.in_channels, self.conditioning = in_channels, conditioning
        self.dose_conditioning, self.region_classes = dose_conditioning, region_classes
        self.sampling_steps = check_steps(sampling_steps)
        self.noise_scale = float(noise_scale)
        self.unshuffle = 2
        self.multiple = self.unshuffle * 2 ** (len(features) - 1)
        self.time_embedding = TimestepEmbedding(embedding_dim)
        self.dose_embedding = DoseEmbedding(embedding_dim) if dose_conditioning else None
        self.external_dose = nn.Linear(dose_embedding_dim, embedding_dim) if dose_embedding_dim else None
        # Without biases: an all-zero region vector (none known) embeds to zero.
        self.region_embedding = (
            nn.Sequential(
                nn.Linear(region_classes, embedding_dim, bias=False),
                nn.SiLU(),
                nn.Linear(embedding_dim, embedding_dim, bias=False),
            )
            if region_classes
            else None
        )
        self.external_region = (
            nn.Linear(region_embedding_dim, embedding_dim, bias=False) if region_embedding_dim else None
        )

        def stage(f: int, n: int) -> _Stage:
            return _Stage(f, n, expansion, embedding_dim, conditioning)

        self.stem = nn.Conv2d((in_channels + 1) * self.unshuffle**2, features[0], 3, padding=1)
        self.encoder = nn.ModuleList(stage(f, n) for f, n in zip(features[:-1], blocks_per_level[:-1]))
        self.down = nn.ModuleList(nn.Conv2d(a, b, 2, stride=2) for a, b in zip(features[:-1], features[1:]))
        self.bottom = stage(features[-1], blocks_per_level[-1])
        self.up = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(features[1:], features[:-1]))
        self.decoder = nn.ModuleList(stage(f, n) for f, n in zip(features[:-1], blocks_per_level[:-1]))
        self.head = nn.Conv2d(features[0], self.unshuffle**2, 3, padding=1)
        # A zero residual at initialisation: the untrained sampler returns its input's centre slice.
        assert self.head.bias is not None  # a Conv2d has a bias unless made with bias=False
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @staticmethod
    def check_steps(steps: int) -> int:
        """``steps`` when the sampler can take that many (1 to MAX_SAMPLING_STEPS), else ValueError."""
        return check_steps(steps)

    def centre(self, x: torch.Tensor) -> torch.Tensor:
        """The centre slice ``[B, 1, H, W]`` of a slab."""
        return x[:, self.in_channels // 2 : self.in_channels // 2 + 1]

    def noisy_state(self, centre: torch.Tensor, residual: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """The forward process: ``x_t`` of the normal-dose slice ``centre - residual`` at times ``t`` ``[B]``."""
        t = t[:, None, None, None]
        return centre - (1 - t) * residual + self.noise_scale * t.sqrt() * noise

    def conditions(
        self,
        batch: int,
        like: torch.Tensor,
        dose_fraction: torch.Tensor | float | None = None,
        region: torch.Tensor | None = None,
        dose_embedding: torch.Tensor | None = None,
        region_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The dose embedding (to fold into the time embedding) and the region embedding, each ``[1 or B, E]``
        or None when absent; checks that what is given is what the network was built for."""
        dose = None
        if dose_embedding is not None:
            if self.external_dose is None:
                raise ValueError("this network takes no external dose embedding (dose_embedding_dim 0)")
            dose = self.external_dose(dose_embedding.to(like.dtype))
        elif self.dose_embedding is not None:
            if dose_fraction is None:
                raise ValueError("this network is dose-conditioned: pass dose_fraction (e.g. from DoseEstimator)")
            fractions = torch.as_tensor(dose_fraction, dtype=like.dtype, device=like.device).reshape(-1)
            if fractions.numel() not in (1, batch):
                raise ValueError(f"{fractions.numel()} doses for {batch} slices: give one, or one per slice")
            dose = self.dose_embedding(fractions)
        regions = None
        if region_embedding is not None:
            if self.external_region is None:
                raise ValueError("this network takes no external region embedding (region_embedding_dim 0)")
            regions = self.external_region(region_embedding.to(like.dtype))
        elif region is not None:
            if self.region_embedding is None or region.shape[-1] != self.region_classes:
                raise ValueError(
                    f"region must be [B, {self.region_classes}] (region_classes); got {tuple(region.shape)}"
                )
            regions = self.region_embedding(region.to(like.dtype))
        return dose, regions

    def predict_residual(
        self,
        x: torch.Tensor,
        state: torch.Tensor,
        t: torch.Tensor,
        dose: torch.Tensor | None = None,
        regions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One step of the network: the residual ``[B, 1, H, W]`` predicted from the slab ``x``, the state ``x_t``
        and the times ``t`` ``[B]`` (or one for all), given the embeddings of ``conditions``."""
        embedding = None
        if self.conditioning != "none":
            embedding = self.time_embedding(t.to(x.dtype).reshape(-1).expand(x.shape[0]))
            if dose is not None:
                embedding = embedding + dose
        h, size = pad_to_multiple(torch.cat([x, state], dim=1), self.multiple)
        # channels-last: oneDNN's depthwise and 1x1 kernels prefer it on a CPU (as in dose_unet)
        h = self.stem(F.pixel_unshuffle(h, self.unshuffle).contiguous(memory_format=torch.channels_last))
        skips = []
        for level, down in zip(self.encoder, self.down):
            h = level(h, embedding, regions)
            skips.append(h)
            h = down(h)
        h = self.bottom(h, embedding, regions)
        for level, up, skip in zip(reversed(self.decoder), reversed(self.up), reversed(skips)):
            h = F.interpolate(up(h), scale_factor=2, mode="bilinear", align_corners=False).add_(skip)
            h = level(h, embedding, regions)
        return crop_to(F.pixel_shuffle(self.head(h), self.unshuffle), size).contiguous()

    def forward(
        self,
        x: torch.Tensor,
        dose_fraction: torch.Tensor | float | None = None,
        region: torch.Tensor | None = None,
        dose_embedding: torch.Tensor | None = None,
        region_embedding: torch.Tensor | None = None,
        *,
        steps: int | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """The denoised centre slice ``[B, 1, H, W]``: ``steps`` (default ``sampling_steps``) of the sampler."""
        steps = check_steps(self.sampling_steps if steps is None else steps)
        dose, regions = self.conditions(x.shape[0], x, dose_fraction, region, dose_embedding, region_embedding)
        centre = self.centre(x)
        state = centre + self.noise_scale * starting_noise(x, seed) if self.noise_scale else centre
        times = [1 - k / steps for k in range(steps + 1)]  # equal steps from 1 down to 0
        for t, s in zip(times[:-1], times[1:]):
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
            residual = self.predict_residual(x, state, t_batch, dose, regions)
            state = self.step(state, centre, residual, t, s)
        return state

    def step(self, state: torch.Tensor, centre: torch.Tensor, residual: torch.Tensor, t: float, s: float):
        """RDDM's deterministic step from time ``t`` to ``s`` < ``t``: the noise implied by the predicted residual
        is kept, the residual removed down to ``s``. At ``s`` = 0 the result is ``centre - residual``."""
        start = centre - residual  # the normal-dose slice it predicts
        if s == 0:
            return start
        sigma_t, sigma_s = self.noise_scale * math.sqrt(t), self.noise_scale * math.sqrt(s)
        noise = (state - start - t * residual) / sigma_t if sigma_t > 0 else 0.0
        return start + s * residual + sigma_s * noise


def check_steps(steps: int) -> int:
    """A number of sampling steps, 1 to MAX_SAMPLING_STEPS (the few-step regime the network is trained for)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_SAMPLING_STEPS:
        raise ValueError(f"sampling steps must be an integer from 1 to {MAX_SAMPLING_STEPS}, not {steps!r}")
    return steps


def starting_noise(x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
    """Standard normal noise ``[B, 1, H, W]`` for the sampler's start, each slab's drawn from a CPU generator
    seeded by a hash of its own values (and ``seed``): reproducible, independent of the batch and the device."""
    batch, _, height, width = x.shape
    if x.device.type == "meta":  # FLOP counting: no values, nothing to draw
        return torch.empty((batch, 1, height, width), device=x.device, dtype=x.dtype)
    draws = []
    for slab in x.detach().float().cpu().numpy():
        digest = hashlib.blake2b(b"" if seed is None else f"seed {seed};".encode(), digest_size=8)
        digest.update(slab.tobytes())
        generator = torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        draws.append(torch.randn((1, height, width), generator=generator))
    return torch.stack(draws).to(device=x.device, dtype=x.dtype)
