"""Dose fractions: as users write them (0.25, 1/4, 25% or auto), and as the image's own noise tells them.

Reading the dose from noise (``read_dose_from_noise``). Quantum noise variance goes as 1 / dose: measured in uniform
soft tissue of the shared series and of their simulated lower doses, variance x dose stays within 10 % of the
source's at 1/2 to 1/20 on the sample (tests/test_dose_reading.py). What a routine scan's variance is depends on
what the image shows (thin slices and sharp kernels are noisier: variance ~ 1 / thickness, and a sharper kernel
passes more of the same photons' noise, which its noise power spectrum's mean frequency f tells) and on what it
cannot show (the mAs the site chose, the patient's size under automatic exposure control). The routine level is
therefore log(variance x thickness) = ROUTINE_LOG_VARIANCE + ROUTINE_TEXTURE_SLOPE x f, fitted on single slices of
the series dose_unet trains on; the dose read is that level over the slice's own. What the image cannot show
stays: the fit's residual spread (ROUTINE_SPREAD, a factor 2.4 either way) is the range a reading allows, and
no single-image reading can be better than it on scans of unknown protocol.

An earlier reading used the low-frequency noise power (NPS(f)/f below 0.2 cycles/mm), which does not depend on the
kernel. It fell less than in proportion to the dose (at 1/20 it read 1.5-3 times too high): in a routine image
the lowest frequencies of a "uniform" patch hold anatomy as well as noise, and the anatomy does not grow when the
dose falls. Variance is carried by the mid and high frequencies, where the noise dominates.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .noise import detrended, extract_patches, noise_power_spectrum, patch_size_px, uniform_patches

__all__ = ["parse_dose", "NoiseDoseReading", "NoiseLevel", "noise_level", "read_dose_from_noise"]

# Fitted by benchmarks/normal_dose_noise.py on single body slices of the series dose_unet trains and validates on.
ROUTINE_LOG_VARIANCE = 3.430
ROUTINE_TEXTURE_SLOPE = 9.593
# A routine slice's variance lies within this factor of the fit, either way, for about 2 in 3 slices (exp of the
# residual std of log variance on the fitted slices): the range a reading allows.
ROUTINE_SPREAD = 2.43
MIN_PATCHES = 3


def parse_dose(value) -> float | str:
    """``auto`` or a dose fraction in (0, 1], given as 0.25, "1/4" or "25%"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return "auto"
    try:
        if isinstance(value, str):
            text = value.strip()
            if text.endswith("%"):
                dose = float(text[:-1]) / 100
            elif "/" in text:
                num, den = text.split("/", 1)
                dose = float(num) / float(den)
            else:
                dose = float(text)
        else:
            dose = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(f"dose must be auto or a fraction such as 0.25, 1/4 or 25%; got {value!r}") from None
    if not 0 < dose <= 1:
        raise ValueError(f"dose fraction must be in (0, 1]; got {value!r}")
    return dose


@dataclasses.dataclass(frozen=True)
class NoiseLevel:
    """The noise of a slice or slab in its uniform soft-tissue patches: what a dose is read from."""

    variance_hu2: float  # median over the patches of their (detrended) noise variance
    texture_per_mm: float  # mean frequency of the patches' noise power spectrum (sharper kernel: higher)
    patches: int
    slice_mm: float

    @property
    def routine_variance_hu2(self) -> float:
        """The variance a routine scan of this slice thickness and kernel texture holds (module docstring)."""
        return math.exp(ROUTINE_LOG_VARIANCE + ROUTINE_TEXTURE_SLOPE * self.texture_per_mm) / self.slice_mm

    @property
    def of_routine(self) -> float:
        """The dose as a fraction of a routine scan's: routine variance / this variance (not capped at 1)."""
        return self.routine_variance_hu2 / max(self.variance_hu2, 1e-12)


def noise_level(hu: np.ndarray, pixel_mm: float, slice_mm: float) -> NoiseLevel | None:
    """The noise of CT slices ``hu`` [z, y, x] (HU, square pixels of ``pixel_mm``, ``slice_mm`` thick) in their
    uniform soft-tissue patches; None when there are none."""
    if not (pixel_mm > 0 and slice_mm > 0):
        raise ValueError(f"pixel size and slice thickness must be positive; got {pixel_mm}, {slice_mm}")
    hu = np.asarray(hu)
    corners = uniform_patches(hu, pixel_mm)
    if not corners:
        return None
    patches = np.stack([detrended(p) for p in extract_patches(hu, corners, patch_size_px(pixel_mm))])
    # The median patch: a patch that caught an edge or a vessel has more variance than noise, and the median
    # ignores it where the pooled mean would not.
    variance = float(np.median(patches.var(axis=(1, 2))))
    texture = noise_power_spectrum(patches, pixel_mm, detrend=False).mean_per_mm  # detrended once, above
    return NoiseLevel(variance, texture, len(corners), float(slice_mm))


@dataclasses.dataclass(frozen=True)
class NoiseDoseReading:
    """The dose fraction read from an image's noise variance, with the range routine protocols allow.

    ``dose`` is None when the image has too few uniform soft-tissue patches (``reason`` says so); ``low``/``high``
    is the range the spread of routine protocols allows (ROUTINE_SPREAD either way); all three are capped at 1 (a
    scan quieter than routine reads as routine)."""

    dose: float | None
    low: float | None
    high: float | None
    noise_hu: float | None  # the median patch's noise std
    patches: int
    reason: str = ""
    of_routine: float | None = None  # the dose before capping at 1: routine variance / this variance

    def describe(self) -> str:
        if self.dose is None:
            return f"no dose from the noise: {self.reason}"
        return (
            f"noise {self.noise_hu:.0f} HU in {self.patches} uniform patches: "
            f"{self.dose:.2g} of a routine scan (routine protocols allow {self.low:.2g} to {self.high:.2g})"
        )


def read_dose_from_noise(hu: np.ndarray, pixel_mm: float, slice_mm: float) -> NoiseDoseReading:
    """The dose of CT slices ``hu`` [z, y, x] (HU, square pixels of ``pixel_mm``, ``slice_mm`` thick) read from
    their noise variance in uniform soft tissue against a routine scan's of that thickness and kernel texture
    (module docstring)."""
    level = noise_level(hu, pixel_mm, slice_mm)
    found = 0 if level is None else level.patches
    if level is None or found < MIN_PATCHES:
        reason = f"{found} uniform soft-tissue patches found, {MIN_PATCHES} needed"
        return NoiseDoseReading(None, None, None, None, found, reason)
    dose = level.of_routine
    low, high = dose / ROUTINE_SPREAD, dose * ROUTINE_SPREAD
    noise_hu = math.sqrt(level.variance_hu2)
    return NoiseDoseReading(min(dose, 1.0), min(low, 1.0), min(high, 1.0), noise_hu, found, of_routine=dose)
