"""Simulated low-dose CT from a normal-dose CT by projection-domain noise insertion.

The normal-dose image already holds the scanner's full-dose noise, so only the *extra* noise of a
lower dose is made: each slice is forward projected (fan beam) to get the expected detector counts,
noise with the variance that a lower tube current adds is drawn for every ray, and only that noise is
reconstructed by fan-beam FBP and added to the image (Yu et al., Med Phys 39:2012; Zeng et al., IEEE
TNS 63:2016). The anatomy keeps the scanner's own reconstruction: no blur, no bias.

Why own torch code (measured on this project's 2-core CPU, benchmarks/results/simulator.md): ASTRA
2.5.0 (``astra-toolbox``) has no CPU fan-beam FBP, and its CPU fan-beam projectors alone took 4.45 s
(forward) + 4.67 s (back) per 512x512 slice at 1152 views, 1.57 s + 1.99 s at 576 views, before any
filtering or noise; the budget is 1.5 s per slice. This module does the whole simulation in about
0.5 s per 512x512 slice: the back projection is a sparse product through
``torch.nn.functional.embedding_bag`` (two weighted taps per pixel and view, slices as columns), its
pixel geometry is computed for 1/8 of the views only (the others are mirror images on a square
grid), every 2nd view is simulated with the photons of two, and the counts, which vary slowly, are
projected at reduced sampling and interpolated. Each shortcut was measured not to change the noise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .noise import patch_spectrum, uniform_patches
from .volume import CTVolume

__all__ = [
    "ScannerGeometry",
    "SourceNoiseModel",
    "simulate_low_dose",
    "source_noise_model",
    "MU_WATER_PER_MM",
    "FULL_DOSE_PHOTONS",
    "ELECTRONIC_NOISE_PHOTONS",
]

# Linear attenuation of water at ~70 keV, the effective energy of a filtered 120 kVp beam
# (NIST XCOM: 0.193 cm^2/g at 70 keV). It converts HU to attenuation and back; the added noise in
# HU depends on it only through the photon counts, which the calibration below absorbs.
MU_WATER_PER_MM = 0.0192

# Full-dose unattenuated photons per detector channel per view (1152 views per rotation) for a 3 mm
# slice, at the tube current set for the reference attenuation below. Calibrated so that a quarter
# dose adds 20-35 HU of noise in abdominal soft tissue, the level of real quarter-dose scans (Mayo
# data): about 29 HU on the sample abdomen and 23 HU on the TCIA pancreas series (simulator.md). It was
# 4.5e5 before the flying focal spot, whose finer sampling escapes some of the back projection's
# interpolation blur (the sample's added noise rose from 28.5 to 32.2 HU); 5.7e5 restores the level.
FULL_DOSE_PHOTONS = 5.7e5
# Electronic noise (std, photon equivalents, per channel per view for a 3 mm slice). Modern integrating
# detectors add little; kept so small that quantum noise dominates down to 1/20 dose, where the
# added variance still follows (1-d)/d within 10 % (with 5 photons it rose 2.5-fold at 1/20).
ELECTRONIC_NOISE_PHOTONS = 0.5
REFERENCE_SLICE_THICKNESS_MM = 3.0
# Automatic exposure control (every scanner has it; both calibration series used it): the tube
# current of a view follows exp(MODULATION_EXPONENT * path), path being the view's most attenuating
# line integral, relative to the diameter of the 32 cm CTDI body phantom (water), within a tube's
# range. Exponent 1/2 is the noise-optimal law (Gies et al., Med Phys 26:2235, 1999).
REFERENCE_LINE_INTEGRAL = MU_WATER_PER_MM * 320.0
MODULATION_EXPONENT = 0.5
MODULATION_RANGE = (0.1, 10.0)

# The default (unmatched) reconstruction's Hann window stops here at most, whatever the pixel: a soft-tissue
# kernel's band, the detector's own limit without the flying focal spot (so the default simulation kept its
# noise when the flying focal spot came; matched kernels reach the projection's limit).
SOFT_TISSUE_CUTOFF_PER_MM = 0.71
# Counts below this (photon equivalents) are clipped before the log, as scanners do for starved rays.
MIN_COUNTS = 1.0
# Body bowtie filter (used with ``match_source=True``): the incident flux falls with the fan angle to this
# fraction at the edge of the 50 cm scan field, as a Gaussian in the angle (body bowties of Siemens/GE
# scanners pass about 5-15 % at the fan edge; FDA digiNoise models one too).
BOWTIE_EDGE_FLUX = 0.1
# Source matching: slices simulated to calibrate the kernel and the photon level, and the passes over them.
CALIBRATION_SLICES = 3
CALIBRATION_PASSES = 3
CALIBRATION_DOSE = 0.25  # the photon level found at 1/4 dose serves every dose (quantum noise scales with it)


@dataclasses.dataclass(frozen=True)
class ScannerGeometry:
    """A third-generation fan-beam CT, by default a Siemens SOMATOM Definition-like geometry.

    The detector is an arc centred on the source (equiangular channels); the image centre is taken as
    the isocentre. ``fov_radius_mm`` (about 250 mm by default) is the scan field of view.

    ``flying_focal_spot``: the focal spot jumps between two positions from one view to the next, a quarter of
    a channel either side, so the two views' readings interleave into one projection sampled every half
    channel (Siemens' in-plane FFS; GE, Philips and Canon have their equivalents on their sharp-kernel
    scanners). Without it the fan is sampled every 0.70 mm at the isocentre and noise stops at 0.71
    cycles/mm, below the 0.77 cycles/mm that a sharp kernel on 0.65 mm pixels shows. It is simulated as
    a projection of twice the channels at half the angle, each sample with half a reading's photons and
    half its electronic noise variance (a pair of samples holds what one reading of each view holds).
    """

    source_to_isocentre_mm: float = 595.0
    source_to_detector_mm: float = 1085.6
    detector_channels: int = 736
    channel_pitch_mm: float = 1.285  # arc length between channels at the detector
    views_per_rotation: int = 1152
    flying_focal_spot: bool = True

    def __post_init__(self):
        if self.views_per_rotation % 8:
            raise ValueError(
                "views_per_rotation must be a multiple of 8 (every 2nd view is simulated "
                "and the back projection uses the mirror symmetry of the view set)"
            )
        if self.source_to_detector_mm <= self.source_to_isocentre_mm:
            raise ValueError("the detector must lie beyond the isocentre")

    @property
    def channel_angle_rad(self) -> float:
        return self.channel_pitch_mm / self.source_to_detector_mm

    @property
    def fov_radius_mm(self) -> float:
        return self.source_to_isocentre_mm * math.sin(self.detector_channels / 2 * self.channel_angle_rad)

    @property
    def channel_spacing_at_isocentre_mm(self) -> float:
        return self.source_to_isocentre_mm * self.channel_angle_rad

    @property
    def samples_per_channel(self) -> int:
        """Projection samples per detector channel and view pair: 2 with the flying focal spot."""
        return 2 if self.flying_focal_spot else 1

    @property
    def sampling_angle_rad(self) -> float:
        """Fan angle between neighbouring projection samples (half a channel with the flying focal spot)."""
        return self.channel_angle_rad / self.samples_per_channel

    @property
    def sampling_at_isocentre_mm(self) -> float:
        """Distance between neighbouring projection samples at the isocentre: it sets the noise's highest frequency."""
        return self.source_to_isocentre_mm * self.sampling_angle_rad


def simulate_low_dose(
    volume: CTVolume,
    dose_fraction: float,
    seed: int | None = None,
    *,
    progress: bool = False,
    geometry: ScannerGeometry | None = None,
    full_dose_photons: float = FULL_DOSE_PHOTONS,
    electronic_noise_photons: float = ELECTRONIC_NOISE_PHOTONS,
    slice_thickness_mm: float | None = None,
    slices_per_batch: int = 16,
    match_source: bool | SourceNoiseModel = False,
) -> CTVolume:
    """The CT as it would look at ``dose_fraction`` of its dose (0.25 = quarter dose), in HU.

    ``seed`` makes the noise reproducible (the same seed gives the same volume; ``None`` draws fresh
    noise). Voxels outside the reconstructed field of view (scanner padding) and outside the scan
    field of view are returned unchanged. ``slice_thickness_mm`` (default: the DICOM SliceThickness,
    else the slice spacing) sets the photons per slice: thin slices get more noise, as on a scanner.
    ``full_dose_photons`` and ``electronic_noise_photons`` are explained at the module constants.
    Slices are processed ``slices_per_batch`` at a time (memory grows with it: about 45 MB per
    512x512 slice) on all of torch's threads. The input volume is not modified.

    ``match_source=True`` makes the added noise look like this scanner's own (the physics a real low-dose
    scan of this patient would have): the source's noise is measured in its uniform soft tissue (noise
    power spectrum, lowdose.noise); the reconstruction filter is shaped so the added noise has the same
    spectrum (a sharp kernel's noise stays sharp), and the photon level is set so the added noise is
    sqrt(1/d - 1) times the source's own; a bowtie makes the periphery noisier; the tube current follows
    the DICOM ``XRayTubeCurrent`` of each slice when present. Without uniform soft tissue to measure, the
    default model is used and ``metadata["lowdose_noise_match"]`` says why. A ``SourceNoiseModel``
    (``source_noise_model(whole_series)``) applies a calibration made once to any part of that series, e.g.
    the few slices a training sampler simulates at a time.

    Example: ``low = simulate_low_dose(load_ct("ct.nii.gz"), 0.25, seed=0)``
    """
    d = _checked_dose_fraction(dose_fraction)
    slice_thickness_mm = _checked_settings(
        volume, seed, slice_thickness_mm, full_dose_photons, electronic_noise_photons, slices_per_batch
    )
    geometry = geometry or ScannerGeometry()
    description = (
        f"lowdose simulated {_percent(d)} dose " f"({'seed ' + str(seed) if seed is not None else 'unseeded'})"
    )
    metadata: dict[str, Any] = dict(
        lowdose_dose_fraction=d, lowdose_seed=None if seed is None else int(seed), lowdose_description=description
    )
    if d == 1.0:
        return volume.with_hu(volume.hu.copy(), **metadata)

    nz = volume.shape[0]
    plan, fov, photons, electronic_std = _set_up(
        volume, geometry, slice_thickness_mm, full_dose_photons, electronic_noise_photons
    )
    # One child seed per slice: the noise of a slice does not depend on how slices are batched.
    children = np.random.SeedSequence(None if seed is None else int(seed)).spawn(nz + 1)
    slice_seeds = [int(c.generate_state(1, dtype=np.uint64)[0]) >> 1 for c in children[:nz]]
    currents = np.ones(nz)
    if match_source is not False:
        photons, currents, metadata["lowdose_noise_match"] = _matched(
            plan, volume, fov, photons, electronic_std, match_source, children[nz]
        )

    out = volume.hu.copy()
    with tqdm(total=nz, desc=f"simulating {_percent(d)} dose", unit="slice", disable=not progress) as bar:
        for z0 in range(0, nz, slices_per_batch):
            z1 = min(nz, z0 + slices_per_batch)
            _add_noise(out, z0, z1, plan, volume, fov, photons * currents[z0:z1], d, electronic_std, slice_seeds)
            bar.update(z1 - z0)
    return volume.with_hu(out, **metadata)


def _add_noise(out, z0, z1, plan, volume, fov, photons, dose, electronic_std, slice_seeds) -> None:
    """Add slices z0:z1's extra noise to ``out`` inside the reconstructed and the scan field of view."""
    inside = torch.from_numpy(np.ascontiguousarray(fov[z0:z1]))
    delta_hu = _extra_noise_hu(plan, volume.hu[z0:z1], inside, photons, dose, electronic_std, slice_seeds[z0:z1])
    keep = inside & plan.scan_fov
    block = out[z0:z1]
    block[keep.numpy()] += delta_hu[keep].numpy()


def _checked_settings(volume, seed, slice_thickness_mm, full_dose_photons, electronic_noise_photons, batch) -> float:
    """The slice thickness to simulate (given or from the headers), after checking every setting."""
    if seed is not None and not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer or None; got {seed!r}")
    if slice_thickness_mm is None:
        slice_thickness_mm = volume.slice_thickness_mm
    if not slice_thickness_mm > 0 or not full_dose_photons > 0 or not electronic_noise_photons >= 0:
        raise ValueError(
            "slice_thickness_mm and full_dose_photons must be positive, electronic_noise_photons non-negative"
        )
    if batch < 1:
        raise ValueError(f"slices_per_batch must be at least 1; got {batch}")
    return float(slice_thickness_mm)


def _checked_dose_fraction(dose_fraction) -> float:
    try:
        d = float(dose_fraction)
    except (TypeError, ValueError):
        raise ValueError(
            f"dose_fraction must be a number in (0, 1], e.g. 0.25 for a quarter dose; " f"got {dose_fraction!r}"
        ) from None
    if not 0.0 < d <= 1.0:
        raise ValueError(
            f"dose_fraction must be in (0, 1] (1 = the normal dose, 0.25 = a quarter); " f"got {dose_fraction!r}"
        )
    return d


def _extra_noise_hu(
    plan: _Plan,
    hu_slices: np.ndarray,
    inside: torch.Tensor,
    photons: float | np.ndarray,
    dose: float,
    electronic_std: float,
    seeds: list[int],
) -> torch.Tensor:
    """The noise (HU) that ``dose`` adds to a batch of slices: projected, drawn per ray, reconstructed.

    ``photons`` is one number, or one per slice (tube current of each slice).
    """
    hu = torch.from_numpy(np.ascontiguousarray(hu_slices))
    mu = torch.where(inside, (hu / 1000.0 + 1.0) * MU_WATER_PER_MM, 0.0).clamp_(min=0.0)
    line = plan.forward_project(mu)
    per_slice = torch.as_tensor(np.broadcast_to(np.asarray(photons, dtype=np.float64), (hu.shape[0],)).copy())
    angular = _tube_current_modulation(line, plan.channels)
    if plan.slice_currents_given:  # the DICOM current of each slice sets its level; attenuation only the angles
        angular = angular / angular.mean(dim=1, keepdim=True)
    modulation = per_slice.float()[:, None] * angular
    counts = modulation[..., None] * plan.bowtie * torch.exp(-line)
    delta_p = _log_noise(counts, dose, electronic_std, seeds)
    return plan.reconstruct(delta_p) * (1000.0 / MU_WATER_PER_MM)


# ------------------------------------------------------------------------------------------ noise


def _log_noise(counts: torch.Tensor, d: float, electronic_std: float, seeds: list[int]) -> torch.Tensor:
    """Log-domain noise that turns full-dose data into ``d``-dose data, ray by ray.

    Full-dose counts scaled by d have mean d*I and variance d^2*(I + s_e^2); the low-dose scan has
    variance d*I + s_e^2. The difference, d(1-d)*I (Poisson) + (1-d^2)*s_e^2 (Gaussian), is drawn here.
    """
    mean = d * counts
    rate = (1.0 - d) * mean
    electronic = electronic_std * math.sqrt(1.0 - d * d)
    noisy = torch.empty_like(counts)
    for b, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        quantum = torch.poisson(rate[b], generator=gen) - rate[b]
        noisy[b] = mean[b] + quantum + electronic * torch.randn(rate[b].shape, generator=gen)
    return torch.log(mean.clamp(min=MIN_COUNTS)) - torch.log(noisy.clamp_(min=MIN_COUNTS))


def _tube_current_modulation(line: torch.Tensor, channels: int) -> torch.Tensor:
    """Relative tube current per view [B, views], as automatic exposure control would set it.

    Large patients and lateral views get more photons, as on a real scanner; without it one photon
    level gave a large patient four times the noise variance of a slim one, and starved its lateral
    rays at 1/20 dose.
    """
    width = max(1, channels // 20) | 1  # ~5 % of the fan, so that a thin bone does not set the current
    smooth = F.avg_pool1d(line.reshape(-1, 1, line.shape[-1]), width, stride=1, padding=width // 2)
    path = smooth.amax(-1).reshape(line.shape[:2])
    current = torch.exp((path - REFERENCE_LINE_INTEGRAL) * MODULATION_EXPONENT)
    return current.clamp_(*MODULATION_RANGE)


# ------------------------------------------------------------------------------------ projection


class _Plan:
    """Fan-beam projection and FBP for one slice grid (the geometry is the same for every slice)."""

    # Every 2nd scanner view is simulated, with the photons of two: at 1/4 dose the added noise std
    # (centre, periphery, air) and the mean frequency of its power spectrum stayed within 1.5 % of
    # those with all 1152 views, as with every 3rd (simulator.md); it halves the time. (At 1/20 the
    # photon starvation of the most attenuated rays comes out slightly milder: twice the counts.)
    VIEW_DECIMATION = 2
    # Counts are projected every 4th simulated view and every 4th channel on an image pooled to about
    # 2 mm, then interpolated: the count level varies slowly, and this changed the added noise std by
    # about 1 % against projecting every ray at full resolution, for a fifth of the time.
    PROJECTION_VIEW_STEP = 4
    PROJECTION_CHANNEL_STEP = 4
    PROJECTION_PIXEL_MM = 2.0
    # Elements per block of temporary tensors, to bound memory.
    BLOCK = 1 << 22

    def __init__(self, geometry: ScannerGeometry, nx: int, ny: int, sx: float, sy: float, body_radius_mm: float):
        g = self.geometry = geometry
        self.nx, self.ny, self.sx, self.sy = nx, ny, sx, sy
        radius = g.source_to_isocentre_mm
        dgamma = g.sampling_angle_rad
        # Body beyond the scan field of view (extended-FOV reconstructions, resampled images): widen
        # the detector virtually rather than leave that tissue without noise.
        half = g.detector_channels * g.samples_per_channel / 2
        if body_radius_mm > g.fov_radius_mm:
            needed = math.asin(min(body_radius_mm / radius, 0.95)) / dgamma
            half = max(half, math.ceil(needed) + 1)
        self.channels = 2 * int(math.ceil(half))
        self.fov_radius_mm = radius * math.sin(self.channels / 2 * dgamma)
        self.views = g.views_per_rotation // self.VIEW_DECIMATION
        self.gammas = (torch.arange(self.channels, dtype=torch.float64) - (self.channels - 1) / 2) * dgamma

        x = (torch.arange(nx, dtype=torch.float64) - (nx - 1) / 2) * sx
        y = (torch.arange(ny, dtype=torch.float64) - (ny - 1) / 2) * sy
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        self.scan_fov = (xx**2 + yy**2) <= self.fov_radius_mm**2
        flat = torch.full((ny, nx), -1, dtype=torch.long)
        flat[self.scan_fov] = torch.arange(int(self.scan_fov.sum()))
        self.pixel_x = xx[self.scan_fov].float()
        self.pixel_y = yy[self.scan_fov].float()
        self.symmetries, self.symmetry_sources = self._symmetries(xx, yy, flat)
        self.filter_fft, self.filter_length = self._filter()
        self.bowtie = torch.ones(self.channels)  # relative incident flux per channel (no bowtie by default)
        self.slice_currents_given = False  # True: each slice's tube current comes from its DICOM header

    # --------------------------------------------------------------------------- forward projection

    def forward_project(self, mu: torch.Tensor) -> torch.Tensor:
        """Line integrals [B, views, channels] of attenuation images ``mu`` [B, ny, nx] (per mm)."""
        g = self.geometry
        b = mu.shape[0]
        kx = max(1, min(round(self.PROJECTION_PIXEL_MM / self.sx), self.nx // 2))
        ky = max(1, min(round(self.PROJECTION_PIXEL_MM / self.sy), self.ny // 2))
        px, py = (-self.nx) % kx, (-self.ny) % ky
        pooled = mu
        if kx > 1 or ky > 1:
            pooled = F.avg_pool2d(F.pad(mu[:, None], (px // 2, px - px // 2, py // 2, py - py // 2)), (ky, kx))[:, 0]
        hp, wp = pooled.shape[-2:]
        step = min(kx * self.sx, ky * self.sy)

        views = torch.arange(0, self.views, self.PROJECTION_VIEW_STEP, dtype=torch.float64)
        betas = (views + 0.5) * (2 * math.pi / self.views)
        n_fp_channels = (self.channels - 1) // self.PROJECTION_CHANNEL_STEP + 2
        gammas = torch.linspace(float(self.gammas[0]), float(self.gammas[-1]), n_fp_channels, dtype=torch.float64)
        radius = g.source_to_isocentre_mm
        reach = self.fov_radius_mm + step
        samples = max(2, int(math.ceil(2 * reach / step)))
        # Every ray is sampled along its chord of the circle of radius `reach` (outside it is air).
        half_chord = torch.sqrt((reach**2 - (radius * torch.sin(gammas)) ** 2).clamp(min=0.0))
        t0 = radius * torch.cos(gammas) - half_chord
        dt = 2 * half_chord / samples
        ts = t0[:, None] + dt[:, None] * (torch.arange(samples, dtype=torch.float64) + 0.5)  # [C', S]

        # Mapping mm -> grid_sample coordinates of the pooled image (align_corners=True).
        def to_grid(coord_mm, spacing, n, k, pad_before, n_pooled):
            index = (coord_mm / spacing + (n - 1) / 2 + pad_before - (k - 1) / 2) / k
            return index * (2.0 / max(n_pooled - 1, 1)) - 1.0

        line = torch.empty(b, len(betas), len(gammas))
        rays_per_block = max(1, 4 * self.BLOCK // (samples * len(gammas) * max(b, 1)))
        source = pooled[None]
        for v0 in range(0, len(betas), rays_per_block):
            beta = betas[v0 : v0 + rays_per_block, None, None]
            gam = gammas[None, :, None]
            # Source at radius*(cos b, sin b); ray direction rotated by gamma from the central ray.
            dx = -torch.cos(beta + gam)
            dy = -torch.sin(beta + gam)
            x = radius * torch.cos(beta) + ts[None] * dx
            y = radius * torch.sin(beta) + ts[None] * dy
            grid = torch.stack(
                [to_grid(x, self.sx, self.nx, kx, px // 2, wp), to_grid(y, self.sy, self.ny, ky, py // 2, hp)], -1
            ).float()
            n_views = grid.shape[0]
            values = F.grid_sample(
                source, grid.reshape(1, -1, samples, 2), mode="bilinear", padding_mode="zeros", align_corners=True
            )[0]
            line[:, v0 : v0 + n_views] = (values.sum(-1) * dt.float().repeat(n_views)).reshape(b, n_views, -1)

        # Back to every view (periodic) and every channel.
        position = torch.arange(self.views, dtype=torch.float64) / self.PROJECTION_VIEW_STEP
        lower = position.floor().long()
        frac = (position - lower).float()[None, :, None]
        lower = lower % len(betas)
        upper = (lower + 1) % len(betas)
        line = line[:, lower] * (1 - frac) + line[:, upper] * frac
        return F.interpolate(line, size=self.channels, mode="linear", align_corners=True)

    # ------------------------------------------------------------------------- filtered back projection

    def _filter(self, gain=None):
        """FFT of the equiangular fan-beam ramp filter, Hann-apodised like a soft-tissue kernel.

        The cut-off is 1.4x the pixel Nyquist frequency, at most SOFT_TISSUE_CUTOFF_PER_MM: at the pixel
        Nyquist the window has fallen to 0.18, so little noise aliases onto the pixel grid. ``gain``
        (a function of frequency in cycles/mm at the isocentre) reshapes the window: another kernel,
        which may reach the projection's own limit (``_window_from``).
        """
        g = self.geometry
        dgamma = g.sampling_angle_rad
        n = self.channels
        length = 1 << int(math.ceil(math.log2(2 * n - 1)))
        k = torch.arange(length, dtype=torch.float64)
        k = torch.where(k < length // 2, k, k - length)  # circular lags
        ramp = torch.zeros(length, dtype=torch.float64)
        ramp[k == 0] = 1.0 / (4 * dgamma**2)
        odd = (k.abs() % 2) == 1
        ramp[odd] = -1.0 / (math.pi**2 * k[odd] ** 2 * dgamma**2)
        freq = torch.fft.fftfreq(length, dtype=torch.float64).abs()  # cycles per sample
        pixel_mm = max(self.sx, self.sy)
        cutoff_lp_mm = min(_kernel_cutoff_per_mm(pixel_mm, g), SOFT_TISSUE_CUTOFF_PER_MM)
        cutoff = cutoff_lp_mm * g.sampling_at_isocentre_mm  # cycles per sample
        window = torch.where(freq < cutoff, 0.5 * (1 + torch.cos(math.pi * freq / cutoff)), 0.0)
        if gain is not None:
            freq_mm = freq / g.sampling_at_isocentre_mm
            window = torch.where(freq < 0.5, torch.as_tensor(gain(freq_mm.numpy()), dtype=torch.float64), 0.0)
        kernel = torch.fft.ifft(torch.fft.fft(ramp) * window).real
        angle = k * dgamma
        fan = torch.where(k == 0, torch.ones_like(angle), angle / torch.sin(torch.where(k == 0, 1.0, angle)))
        kernel = 0.5 * fan**2 * kernel
        return torch.fft.rfft(kernel).to(torch.complex64), length

    def set_kernel(self, gain) -> None:
        """Reconstruct with the window ``gain(f)`` (f in cycles/mm at the isocentre) instead of the Hann window."""
        self.filter_fft, self.filter_length = self._filter(gain)

    def reconstruct(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Fan-beam FBP of ``sinogram`` [B, views, channels] (line integrals) -> [B, ny, nx] per mm."""
        g = self.geometry
        b = sinogram.shape[0]
        radius = g.source_to_isocentre_mm
        dgamma = g.sampling_angle_rad
        views, channels = self.views, self.channels
        cos_gamma = torch.cos(self.gammas).float()
        weighted = sinogram * (radius * cos_gamma)
        filtered = torch.fft.irfft(
            torch.fft.rfft(weighted, n=self.filter_length) * self.filter_fft, n=self.filter_length
        )[..., :channels]
        # 1/L^2 = cos^2(gamma)/U^2: the cos^2 goes with the channel, 1/U^2 with the pixel.
        filtered = filtered * (cos_gamma**2 * (dgamma * 2 * math.pi / views))

        # One table for the sparse product below: rows (base view, channel), columns (symmetry,
        # slice); the rows of differences to the next channel sit under the values, for interpolation.
        base_views = views // len(self.symmetries)
        base = torch.arange(base_views)
        rows = base_views * channels
        columns = []
        for view_of, flip in self.symmetries:
            part = filtered.index_select(1, view_of(base) % views)
            columns.append(part.flip(-1) if flip else part)
        table = torch.stack(columns).permute(2, 3, 0, 1).reshape(rows, -1)
        table = torch.cat([table, table[1:] - table[:-1]])

        n_pixels = self.pixel_x.numel()
        accum = torch.zeros(n_pixels, table.shape[1])
        chunk = max(1, min(base_views, self.BLOCK // max(n_pixels, 1)))
        pixels = torch.stack([self.pixel_x, self.pixel_y, torch.ones_like(self.pixel_x)], 1)  # [P, 3]
        for v0 in range(0, base_views, chunk):
            v = torch.arange(v0, min(base_views, v0 + chunk))
            n = len(v)
            beta = (v.double() + 0.5) * (2 * math.pi / views)
            cb, sb = torch.cos(beta), torch.sin(beta)
            # Distance from the source along the central ray (u) and across it (s), for all pixels.
            # (Channel angles grow counter-clockwise seen from the source, as in forward_project.)
            coefficients = torch.cat(
                [torch.stack([-cb, -sb, torch.full_like(cb, radius)]), torch.stack([sb, -cb, torch.zeros_like(cb)])], 1
            ).float()
            us = pixels @ coefficients
            u, s = us[:, :n], us[:, n:]
            position = torch.div(s, u).atan_().mul_(1.0 / dgamma).add_((channels - 1) / 2)
            position = position.clamp_(0.0, channels - 1.001)
            lower = position.to(torch.int32)
            weight = u.mul(u).reciprocal_()
            # Linear interpolation: value + fraction * (next value - value), two taps per view; rows
            # of the table are (view, channel), so each view's channels one after the other.
            first = (v.to(torch.int32) * channels)[None]
            index = torch.cat([lower + first, lower + (first + rows)], 1).view(-1)
            weights = torch.cat([weight, position.sub_(lower).mul_(weight)], 1).view(-1)
            bags = torch.arange(0, n_pixels * 2 * n, 2 * n, dtype=torch.int32)
            # (1-D input with given offsets: the 2-D form of embedding_bag is several times slower.)
            accum += F.embedding_bag(index, table, bags, per_sample_weights=weights, mode="sum")
        accum = accum.view(n_pixels, len(self.symmetries), b)
        total = accum[:, 0].clone()
        for k in range(1, len(self.symmetries)):
            total += accum[self.symmetry_sources[k], k]
        image = torch.zeros(b, self.ny, self.nx)
        image[:, self.scan_fov] = total.T
        return image

    def _symmetries(self, xx: torch.Tensor, yy: torch.Tensor, flat: torch.Tensor):
        """Symmetries of the pixel grid that map the view set onto itself.

        A grid symmetric under a rotation by phi sees view beta+phi as view beta sees the rotated grid;
        under a reflection across the line at angle a, view 2a-beta with the channels reversed. So the
        pixel geometry (the costly part) is computed for 1/4 (rectangular grid) or 1/8 (square grid)
        of the views only. Returns (view map, channel flip) pairs and, for each, where pixel p's
        contribution is held (the inverse image of p).
        """
        views = self.views
        square = self.nx == self.ny and abs(self.sx - self.sy) < 1e-6 * self.sx and views % 8 == 0
        q = views // 4
        # (rotation quarter-turns, or reflection axis in multiples of 45 degrees)
        elements = [("rot", 0), ("rot", 2), ("ref", 0), ("ref", 2)]
        if square:
            elements += [("rot", 1), ("rot", 3), ("ref", 1), ("ref", 3)]
        symmetries, sources = [], []
        x, y = xx[self.scan_fov], yy[self.scan_fov]
        for kind, m in elements:
            if kind == "rot":
                symmetries.append(((lambda v, m=m: v + m * q), False))
                angle = -m * math.pi / 2  # inverse rotation
                xs = x * math.cos(angle) - y * math.sin(angle)
                ys = x * math.sin(angle) + y * math.cos(angle)
            else:
                symmetries.append(((lambda v, m=m: m * q - 1 - v + views), True))
                axis = m * math.pi / 4  # a reflection is its own inverse
                xs = x * math.cos(2 * axis) + y * math.sin(2 * axis)
                ys = x * math.sin(2 * axis) - y * math.cos(2 * axis)
            cols = torch.round(xs / self.sx + (self.nx - 1) / 2).long()
            rows = torch.round(ys / self.sy + (self.ny - 1) / 2).long()
            sources.append(flat[rows, cols])
        assert all(bool((s >= 0).all()) for s in sources), "pixel grid symmetry broken"
        return symmetries, sources


# ------------------------------------------------------------------------------- matching the source


@dataclasses.dataclass(frozen=True)
class SourceNoiseModel:
    """One series' noise as the simulator reproduces it: the reconstruction window's gain over frequency (its
    kernel) and the full-dose photon level (its dose), calibrated on the series itself."""

    frequency_per_mm: tuple[float, ...]
    kernel_gain: tuple[float, ...]
    photons: float  # per simulated view and channel at the series' mean tube current
    source_std_hu: float
    source_mean_f_per_mm: float
    added_std_hu: float  # at CALIBRATION_DOSE
    added_mean_f_per_mm: float
    patches: int

    def summary(self) -> dict:
        """What was matched, for the simulated volume's metadata."""
        return {
            "matched": True,
            "source_std_hu": round(self.source_std_hu, 2),
            "source_mean_f_per_mm": round(self.source_mean_f_per_mm, 3),
            f"added_std_hu_at_{CALIBRATION_DOSE:g}": round(self.added_std_hu, 2),
            "added_mean_f_per_mm": round(self.added_mean_f_per_mm, 3),
            "patches": self.patches,
        }


def source_noise_model(
    volume: CTVolume, seed: int = 0, geometry: ScannerGeometry | None = None
) -> SourceNoiseModel | None:
    """Calibrate the simulator to ``volume``'s own noise once (None when it has too little uniform soft tissue).

    Pass the result as ``simulate_low_dose(part, dose, match_source=model)`` for any part of the same series.
    """
    plan, fov, photons, electronic_std = _set_up(
        volume, geometry or ScannerGeometry(), volume.slice_thickness_mm, FULL_DOSE_PHOTONS, ELECTRONIC_NOISE_PHOTONS
    )
    currents = _with_source_physics(plan, volume)
    model = _calibrated_model(plan, volume, fov, photons, electronic_std, currents, np.random.SeedSequence(seed))
    return model if isinstance(model, SourceNoiseModel) else None


def _matched(plan, volume, fov, photons, electronic_std, match_source, seed_sequence) -> tuple[float, np.ndarray, dict]:
    """Set ``plan`` up for the source's noise (bowtie, kernel); the photons, each slice's tube current and a
    summary of what was matched (or why it could not be)."""
    currents = _with_source_physics(plan, volume)
    model: SourceNoiseModel | str = (
        match_source
        if isinstance(match_source, SourceNoiseModel)
        else _calibrated_model(plan, volume, fov, photons, electronic_std, currents, seed_sequence)
    )
    if isinstance(model, str):
        return photons, currents, {"matched": False, "reason": model}
    plan.set_kernel(_window_from(plan, np.asarray(model.frequency_per_mm), np.asarray(model.kernel_gain)))
    return model.photons, currents, model.summary()


def _set_up(volume: CTVolume, geometry, slice_thickness_mm: float, full_dose_photons: float, electronic_photons: float):
    """The projection plan of ``volume``'s slice grid, its field-of-view mask, and the photons and electronic
    noise per simulated view and channel for its slice thickness."""
    _, ny, nx = volume.shape
    sx, sy = volume.spacing_mm[0], volume.spacing_mm[1]
    fov = volume.field_of_view_mask()
    plan = _Plan(geometry, nx, ny, sx, sy, _body_radius_mm(volume.hu, fov, sx, sy))
    scale = slice_thickness_mm / REFERENCE_SLICE_THICKNESS_MM
    # Each simulated view stands for VIEW_DECIMATION scanner views: it gets their photons and their
    # summed electronic noise, so the dose and the noise stay those of the full view count.
    # With the flying focal spot a sample holds half a reading (ScannerGeometry).
    sampling = _Plan.VIEW_DECIMATION / geometry.samples_per_channel
    photons = full_dose_photons * scale * sampling
    electronic_std = electronic_photons * math.sqrt(scale * sampling)
    return plan, fov, photons, electronic_std


def _with_source_physics(plan: _Plan, volume: CTVolume) -> np.ndarray:
    """Give ``plan`` a bowtie and each slice's DICOM tube current; the relative currents."""
    currents = _dicom_slice_currents(volume)
    plan.slice_currents_given = bool(np.ptp(currents) > 0)
    plan.bowtie = _bowtie(plan)
    return currents


def _bowtie(plan: _Plan) -> torch.Tensor:
    """Relative incident flux per channel behind a body bowtie: 1 at the centre, BOWTIE_EDGE_FLUX at 250 mm."""
    edge = math.asin(min(250.0 / plan.geometry.source_to_isocentre_mm, 0.95))
    return torch.exp(math.log(BOWTIE_EDGE_FLUX) * (plan.gammas / edge) ** 2).float()


def _dicom_slice_currents(volume: CTVolume) -> np.ndarray:
    """Each slice's tube current relative to the series mean, from DICOM XRayTubeCurrent (else Exposure); ones
    when the headers do not say (the attenuation-driven modulation then stands alone)."""
    headers = volume.metadata.get("dicom_headers") or []
    values = []
    for ds in headers:
        value = ds.get("XRayTubeCurrent", None) or ds.get("Exposure", None)
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            return np.ones(volume.shape[0])
    if len(values) != volume.shape[0] or min(values) <= 0:
        return np.ones(volume.shape[0])
    currents = np.asarray(values)
    return currents / currents.mean()


def _calibrated_model(plan, volume, fov, photons, electronic_std, currents, seed_sequence) -> SourceNoiseModel | str:
    """Calibrate the kernel (NPS shape) and the photon level (noise std) on a few slices of the source, at
    CALIBRATION_DOSE; the reason as text when the source has too little uniform soft tissue to measure."""
    pixel_mm = float(volume.spacing_mm[0])
    corners = uniform_patches(volume.hu, pixel_mm)
    if len(corners) < 8:
        return f"too little uniform soft tissue to measure the source's noise ({len(corners)} patches, 8 needed)"
    source = patch_spectrum(volume.hu, corners, pixel_mm)
    counts = np.bincount([z for z, _, _ in corners], minlength=volume.shape[0])
    chosen = sorted(np.argsort(counts)[::-1][:CALIBRATION_SLICES].tolist())
    local = [(chosen.index(z), y, x) for z, y, x in corners if z in chosen]
    dose = CALIBRATION_DOSE
    target_std = math.sqrt(1.0 / dose - 1.0) * source.std_hu
    seeds = [int(s) >> 1 for s in seed_sequence.generate_state(len(chosen), dtype=np.uint64)]
    inside = torch.from_numpy(np.ascontiguousarray(fov[chosen]))
    freq, gain = source.frequency_per_mm, np.ones_like(source.frequency_per_mm)
    for calibration in range(CALIBRATION_PASSES):
        slices = volume.hu[chosen]
        noise = _extra_noise_hu(plan, slices, inside, photons * currents[chosen], dose, electronic_std, seeds)
        added = patch_spectrum(noise.numpy(), local, pixel_mm)
        photons *= (added.std_hu / target_std) ** 2  # quantum noise variance goes as 1 / photons
        if calibration < CALIBRATION_PASSES - 1:
            gain = gain * _shape_correction(source.nps, added.nps)
            plan.set_kernel(_window_from(plan, freq, gain))
    return SourceNoiseModel(
        frequency_per_mm=tuple(float(f) for f in freq),
        kernel_gain=tuple(float(g) for g in gain),
        photons=float(photons),
        source_std_hu=source.std_hu,
        source_mean_f_per_mm=source.mean_per_mm,
        added_std_hu=added.std_hu,
        added_mean_f_per_mm=added.mean_per_mm,
        patches=source.patches,
    )


def _shape_correction(source_nps: np.ndarray, added_nps: np.ndarray) -> np.ndarray:
    """Per-frequency amplitude factor that turns the added noise's spectrum shape into the source's."""
    source = source_nps / max(source_nps.sum(), 1e-12)
    added = added_nps / max(added_nps.sum(), 1e-12)
    ratio = np.sqrt(np.where(added > 0, source / np.maximum(added, 1e-20), 1.0))
    ratio = np.convolve(np.pad(ratio, 1, mode="edge"), np.ones(3) / 3, mode="valid")  # 3-bin smoothing
    return np.clip(ratio, 0.25, 4.0)


def _window_from(plan: _Plan, freq: np.ndarray, gain: np.ndarray):
    """The reconstruction window: the default Hann window times ``gain`` measured at ``freq`` (cycles/mm)."""
    g = plan.geometry
    pixel_mm = max(plan.sx, plan.sy)
    cutoff = _kernel_cutoff_per_mm(pixel_mm, g)

    def window(f_mm: np.ndarray) -> np.ndarray:
        hann = np.where(f_mm < cutoff, 0.5 * (1 + np.cos(np.pi * f_mm / cutoff)), 0.0)
        # Beyond the pixel grid's Nyquist the image cannot show the noise: keep the last measured factor.
        return hann * np.interp(f_mm, freq, gain, left=gain[0], right=gain[-1])

    return window


# --------------------------------------------------------------------------------------- helpers


def _kernel_cutoff_per_mm(pixel_mm: float, geometry: ScannerGeometry) -> float:
    """The highest frequency a reconstruction window passes: 1.4x the pixel Nyquist frequency, within the
    projection's sampling (0.71 cycles/mm without the flying focal spot, 1.42 with it)."""
    return min(1.4 / (2 * pixel_mm), 1.0 / (2 * geometry.sampling_at_isocentre_mm))


def _body_radius_mm(hu: np.ndarray, fov: np.ndarray, sx: float, sy: float) -> float:
    """Largest distance from the image centre of anything denser than lung (the patient and table)."""
    dense = ((hu > -500.0) & fov).any(axis=0)
    if not dense.any():
        return 0.0
    ny, nx = dense.shape
    rows, cols = np.nonzero(dense)
    x = (cols - (nx - 1) / 2) * sx
    y = (rows - (ny - 1) / 2) * sy
    return float(np.sqrt(x * x + y * y).max()) + max(sx, sy)


def _percent(d: float) -> str:
    return f"{d * 100:.3g}%"
