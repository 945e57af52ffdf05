"""Image noise measured the way CT physicists measure it: in uniform tissue, as a noise power spectrum.

Used to check that simulated noise looks like the scanner's own (same texture, right amplitude), to read a
reconstruction kernel's sharpness from its noise, and to read the noise level of a single slice. A
patient image has no phantom: uniform regions are found in soft tissue (mean -150..200 HU, little
structure), each detrended by a plane fit before its spectrum is taken (ICRU Report 87; Solomon et al.,
Med Phys 39:2012 for NPS in patient images).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

SOFT_TISSUE_HU = (-30.0, 170.0)  # muscle, liver, spleen, kidney, blood; not fat
DEFAULT_PATCH_MM = 20.0


@dataclasses.dataclass(frozen=True)
class NoiseSpectrum:
    """A radially averaged noise power spectrum and the figures read from it."""

    frequency_per_mm: np.ndarray  # bin centres, cycles/mm
    nps: np.ndarray  # HU^2 mm^2
    std_hu: float  # noise standard deviation in the patches (after detrending)
    patches: int

    @property
    def peak_per_mm(self) -> float:
        """Frequency of the spectrum's maximum (cycles/mm): low for smooth kernels, high for sharp ones."""
        return float(self.frequency_per_mm[int(np.argmax(self.nps))])

    @property
    def mean_per_mm(self) -> float:
        """The spectrum's mean frequency (cycles/mm), a steadier measure of texture than the peak."""
        weights = self.nps * self.frequency_per_mm  # the 2-D spectrum's annulus areas grow with f
        return float(np.sum(self.frequency_per_mm * weights) / max(np.sum(weights), 1e-12))


def patch_size_px(pixel_mm: float, patch_mm: float = DEFAULT_PATCH_MM) -> int:
    """An even patch size in pixels covering about ``patch_mm`` (at least 16 pixels)."""
    return max(16, int(round(patch_mm / pixel_mm / 2)) * 2)


def uniform_patch_corners(
    slice_hu: np.ndarray, size: int, keep_fraction: float = 0.2, hu_range: tuple[float, float] = SOFT_TISSUE_HU
) -> list[tuple[int, int]]:
    """Top-left corners of the most uniform ``size`` x ``size`` soft-tissue patches of one slice.

    Patches on a half-overlapping grid whose lightly smoothed pixels all lie in ``hu_range`` (no air, no
    fat-muscle edge, no bone) are ranked by their structure (the spread of the patch smoothed beyond the
    noise grain, after removing its plane) and the ``keep_fraction`` most uniform ones are kept.
    """
    ny, nx = slice_hu.shape
    image = slice_hu.astype(np.float32)
    light = ndimage.gaussian_filter(image, sigma=2.0)
    coarse = ndimage.gaussian_filter(image, sigma=max(2.0, size / 8))
    low, high = hu_range
    inside = (light > low) & (light < high)
    candidates = []
    step = size // 2
    for y in range(0, ny - size + 1, step):
        for x in range(0, nx - size + 1, step):
            if not inside[y : y + size, x : x + size].all():
                continue
            candidates.append((float(detrended(coarse[y : y + size, x : x + size]).std()), y, x))
    candidates.sort()
    kept = candidates[: max(1, int(round(len(candidates) * keep_fraction)))] if candidates else []
    return [(y, x) for _, y, x in kept]


def detrended(patch: np.ndarray) -> np.ndarray:
    """``patch`` minus its least-squares plane (removes slow anatomy and cupping, keeps the noise)."""
    size_y, size_x = patch.shape
    yy, xx = np.mgrid[0:size_y, 0:size_x]
    design = np.column_stack([np.ones(patch.size), yy.ravel(), xx.ravel()])
    coefficients, *_ = np.linalg.lstsq(design, patch.ravel().astype(np.float64), rcond=None)
    return patch - (design @ coefficients).reshape(patch.shape)


def noise_power_spectrum(
    patches: np.ndarray, pixel_mm: float, bins: int | None = None, detrend: bool = True
) -> NoiseSpectrum:
    """The radially averaged NPS of noise ``patches`` [n, size, size] (HU) with square pixels of ``pixel_mm``.

    NPS(f) = <|DFT(patch)|^2> * pixel area / patch pixels, the standard normalisation whose integral over
    the 2-D frequency plane is the noise variance.
    """
    patches = np.asarray(patches, dtype=np.float64)
    if patches.ndim != 3 or patches.shape[0] == 0 or patches.shape[1] != patches.shape[2]:
        raise ValueError(f"patches must be [n, size, size] with n >= 1; got shape {patches.shape}")
    n, size, _ = patches.shape
    if detrend:
        patches = np.stack([detrended(p) for p in patches])
    else:
        patches = patches - patches.mean(axis=(1, 2), keepdims=True)
    power = np.mean(np.abs(np.fft.fft2(patches)) ** 2, axis=0) * pixel_mm**2 / (size * size)
    freq = np.fft.fftfreq(size, d=pixel_mm)
    radius = np.hypot(*np.meshgrid(freq, freq, indexing="ij"))
    nyquist = 0.5 / pixel_mm
    bins = bins or size // 2
    edges = np.linspace(0.0, nyquist, bins + 1)
    which = np.digitize(radius.ravel(), edges) - 1
    valid = (which >= 0) & (which < bins)
    sums = np.bincount(which[valid], weights=power.ravel()[valid], minlength=bins)
    counts = np.bincount(which[valid], minlength=bins)
    nps = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    centres = 0.5 * (edges[1:] + edges[:-1])
    return NoiseSpectrum(frequency_per_mm=centres, nps=nps, std_hu=float(patches.std()), patches=n)


def extract_patches(hu: np.ndarray, corners: list[tuple[int, int, int]], size: int) -> np.ndarray:
    """The ``size`` x ``size`` patches of volume ``hu`` [z, y, x] at ``(z, y, x)`` corners."""
    if not corners:
        return np.zeros((0, size, size), dtype=np.float32)
    return np.stack([hu[z, y : y + size, x : x + size] for z, y, x in corners]).astype(np.float32)


def patch_spectrum(hu: np.ndarray, corners: list[tuple[int, int, int]], pixel_mm: float) -> NoiseSpectrum:
    """The NPS of volume ``hu`` in the patches at ``corners`` (from ``uniform_patches`` with the same pixel size)."""
    size = patch_size_px(pixel_mm)
    return noise_power_spectrum(extract_patches(hu, corners, size), pixel_mm)


def uniform_patches(
    hu: np.ndarray,
    pixel_mm: float,
    slices: list[int] | None = None,
    keep_fraction: float = 0.2,
    patch_mm: float = DEFAULT_PATCH_MM,
) -> list[tuple[int, int, int]]:
    """``(z, y, x)`` corners of uniform soft-tissue patches over the given ``slices`` (default: all)."""
    size = patch_size_px(pixel_mm, patch_mm)
    corners = []
    for z in range(hu.shape[0]) if slices is None else slices:
        corners += [(z, y, x) for y, x in uniform_patch_corners(hu[z], size, keep_fraction)]
    return corners


def source_noise_spectrum(hu: np.ndarray, pixel_mm: float, slices: list[int] | None = None) -> NoiseSpectrum:
    """The scanner's own noise in a normal-dose image: NPS of its uniform soft-tissue patches, detrended.

    What remains after detrending also holds fine tissue texture; in the most uniform patches of liver,
    spleen or muscle that is small next to the noise (checked against the difference of neighbouring thin
    slices in tests/test_noise.py).
    """
    corners = uniform_patches(hu, pixel_mm, slices)
    if not corners:
        raise ValueError("no uniform soft-tissue region found to measure the noise in")
    return patch_spectrum(hu, corners, pixel_mm)


def slice_difference_spectrum(hu: np.ndarray, pixel_mm: float, slices: list[int] | None = None) -> NoiseSpectrum:
    """The noise of a thin-slice series from neighbouring slices: (s[k] - (s[k-1] + s[k+1]) / 2) / sqrt(1.5)
    in uniform patches, whose anatomy cancels when it changes little over three slices; each slice's noise
    is independent of its neighbours' in an axial reconstruction without overlap."""
    size = patch_size_px(pixel_mm)
    inner = [z for z in (slices if slices is not None else range(hu.shape[0])) if 0 < z < hu.shape[0] - 1]
    corners = uniform_patches(hu, pixel_mm, inner)
    if not corners:
        raise ValueError("no uniform soft-tissue region found to measure the noise in")
    difference = np.stack(
        [
            (
                hu[z, y : y + size, x : x + size]
                - 0.5 * (hu[z - 1, y : y + size, x : x + size] + hu[z + 1, y : y + size, x : x + size])
            )
            for z, y, x in corners
        ]
    ) / np.sqrt(1.5)
    return noise_power_spectrum(difference, pixel_mm)
