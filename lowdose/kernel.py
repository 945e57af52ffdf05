"""A CT series as a sharper reconstruction kernel would have shown it: kernel augmentation for training.

A filtered back-projection image is the object seen through the kernel's window W(f) (parallel-beam
approximation: the image's 2-D spectrum at radial frequency f is W(f) times the object's). Two kernels of the
same acquisition therefore differ by an in-plane filter H(f) = W_sharp(f) / W_smooth(f), applied to anatomy and
noise alike, and the noise power spectra differ by |H(f)|^2. Measured on the two same-acquisition kernel pairs
of ../shared/data/ct, log H grows steadily with frequency: Philips L over B by ln 1.8 at 0.12 cycles/mm to ln 10.6
at 0.52, Siemens B70f over B40f by ln 1.2 at 0.13 to ln 8.7 at 0.75, like exp(k f^1.5). So H(f) = exp(k f^p), with
k chosen so that the re-filtered series' noise has a wanted texture (NPS mean frequency), turns a smooth-kernel
series into a plausible sharp-kernel one of the same photons: its anatomy gains the sharp kernel's edge overshoot and
its noise the sharp kernel's grain. The simulator, calibrated on the result (``match_source``), then adds
low-dose noise of that sharp texture, which is what a network must learn to remove on a sharp-kernel scan.

The exponent p sets how H rises. With p = 1.5 (the default) B40f re-filtered to B70f's texture has 34 HU of noise
(real B70f: 42) and lies 17 HU (rms) from the real B70f image, against 40 HU for B40f itself; the mean of uniform
soft tissue stays within 0.3 HU. p = 1 lifts frequencies near 0.05 cycles/mm (organ-sized) by about 20 %, which
moved the mean of uniform tissue by 5-7 HU: avoid it. p = 2 keeps organ-sized detail unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .noise import NoiseSpectrum, source_noise_spectrum
from .volume import PADDING_THRESHOLD_HU, CTVolume

__all__ = ["KernelChange", "sharpening_for", "resharpened"]

AIR_HU = -1000.0
# The steepest filter tried: exp(8 f) is 55-fold at 0.5 cycles/mm, beyond any clinical kernel pair measured.
MAX_SLOPE = 8.0
# Edge overshoot of a sharp kernel may take air below -1000 HU; it must stay above what marks padding.
LOWEST_HU = PADDING_THRESHOLD_HU + 100.0
MIN_PATCHES = 8  # as the simulator needs to calibrate on the result (lowdose.simulate)
PAD_PX = 32  # air border around each slice so the FFT's wrap-around does not mix opposite edges


@dataclasses.dataclass(frozen=True)
class KernelChange:
    """An in-plane filter H(f) = exp(slope * f^exponent) and the noise texture it gives a series."""

    slope: float  # k in exp(k f^p), f in cycles/mm
    exponent: float  # p
    source_mean_per_mm: float  # NPS mean frequency before
    mean_per_mm: float  # and after

    def gain(self, f_per_mm: np.ndarray) -> np.ndarray:
        return np.exp(self.slope * np.power(f_per_mm, self.exponent))


def _mean_after(spectrum: NoiseSpectrum, slope: float, exponent: float) -> float:
    """The NPS mean frequency after the filter exp(slope f^exponent): power goes as its square."""
    gain = np.exp(slope * np.power(spectrum.frequency_per_mm, exponent))
    return dataclasses.replace(spectrum, nps=spectrum.nps * gain**2).mean_per_mm


def sharpening_for(spectrum: NoiseSpectrum, target_mean_per_mm: float, exponent: float = 1.5) -> KernelChange | None:
    """The exp(k f^exponent) filter that moves ``spectrum``'s mean frequency to ``target_mean_per_mm`` (bisection
    on k; the mean grows monotonically with k); None when the series is already that sharp or no k up to
    MAX_SLOPE gets there (its pixels are too coarse to show such a fine grain)."""
    start = spectrum.mean_per_mm
    if target_mean_per_mm <= start or _mean_after(spectrum, MAX_SLOPE, exponent) < target_mean_per_mm:
        return None
    low, high = 0.0, MAX_SLOPE
    for _ in range(40):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if _mean_after(spectrum, middle, exponent) < target_mean_per_mm else (low, middle)
    slope = 0.5 * (low + high)
    return KernelChange(slope, exponent, start, _mean_after(spectrum, slope, exponent))


def _filtered_slice(slice_hu: np.ndarray, inside: np.ndarray, change: KernelChange, pixel_mm) -> np.ndarray:
    """One slice through H(f), outside its field of view taken as air (then restored by the caller)."""
    image = np.where(inside, slice_hu, AIR_HU).astype(np.float64)
    padded = np.pad(image, PAD_PX, mode="edge")
    ny, nx = padded.shape
    fy = np.fft.fftfreq(ny, d=pixel_mm[1])[:, None]
    fx = np.fft.rfftfreq(nx, d=pixel_mm[0])[None, :]
    gain = change.gain(np.hypot(fy, fx))
    out = np.fft.irfft2(np.fft.rfft2(padded) * gain, s=padded.shape)
    return out[PAD_PX:-PAD_PX, PAD_PX:-PAD_PX]


def resharpened(
    volume: CTVolume, target_mean_per_mm: float, exponent: float = 1.5
) -> tuple[CTVolume, KernelChange] | None:
    """``volume`` as a kernel whose noise has mean frequency ``target_mean_per_mm`` would reconstruct it, with
    the filter used; None when the series is already as sharp, too coarse, or has no uniform soft tissue to
    measure its noise in (MIN_PATCHES). Geometry and metadata are kept (``lowdose_kernel_change`` records the filter);
    padding outside the field of view is unchanged; the input is not modified."""
    pixel_mm = (float(volume.spacing_mm[0]), float(volume.spacing_mm[1]))
    try:
        spectrum = source_noise_spectrum(volume.hu, pixel_mm[0])
    except ValueError:
        return None
    if spectrum.patches < MIN_PATCHES:
        return None
    change = sharpening_for(spectrum, target_mean_per_mm, exponent)
    if change is None:
        return None
    inside = volume.field_of_view_mask()
    out = volume.hu.astype(np.float32, copy=True)
    for z in range(volume.shape[0]):
        filtered = _filtered_slice(volume.hu[z], inside[z], change, pixel_mm)
        out[z][inside[z]] = np.maximum(filtered[inside[z]], LOWEST_HU)
    path = volume.metadata.get("path", "")
    return (
        volume.with_hu(
            out,
            path=f"{path}#kernel-{target_mean_per_mm:.3f}-{exponent:g}",
            lowdose_kernel_change=dataclasses.asdict(change),
        ),
        change,
    )
