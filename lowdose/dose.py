"""Dose fractions: as users write them (0.25, 1/4, 25% or auto), and as the image's own noise tells them.

Reading the dose from noise (``read_dose_from_noise``). Quantum noise power at low spatial frequency does not
depend on the reconstruction kernel: clinical kernels differ in how they pass fine detail, not coarse (their
windows are about 1 below ~0.2 cycles/mm). The noise power spectrum of uniform soft tissue divided by the ramp
(NPS(f) / f, averaged over LOW_BAND) therefore measures photons per slice, whatever the kernel: on the shared
same-acquisition pairs it differs 2.1-fold (Philips L / B) and 1.4-fold (Siemens B70f / B40f), where the noise
variances differ 32- and 13-fold. Scaled by the slice thickness (noise power goes as 1 / thickness) and compared
with what routine scans hold, it gives the dose: d = ROUTINE_LOW_BAND_POWER / (NPS_low / f x thickness).
ROUTINE_LOW_BAND_POWER is its geometric mean over the 32 shared routine series (benchmarks/normal_dose_noise.py);
left out one at a time, a series' routine level is predicted within a factor whose log has std 0.38 (the
truth over the dose read: 0.40 to 2.8 for 80 % of the series, 0.23 to 5.4 for all), the protocol spread (mAs,
patient size, region) that one image cannot tell from a dose change. The reading is monotone in the noise,
has no training, and says when there is too little uniform tissue to read from.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .noise import NoiseSpectrum, patch_spectrum, uniform_patches

__all__ = ["parse_dose", "NoiseDoseReading", "low_band_power", "read_dose_from_noise"]

LOW_BAND = (0.06, 0.2)  # cycles/mm: below every clinical kernel's roll-off, above a 20 mm patch's lowest bins
# exp(2 * 4.807): the fit of log std = c - 0.5 log(NPS-shape ratio) - 0.5 log(thickness) on the routine series,
# i.e. the routine NPS(f)/f level x thickness (HU^2 mm^2 per cycle/mm x mm).
ROUTINE_LOW_BAND_POWER = math.exp(2 * 4.807)
# The lowest and highest left-out log-std residuals over the 32 routine series: the true dose lay between
# exp(2 * -0.74) = 0.23 and exp(2 * 0.85) = 5.4 times the dose read for every one of them. The range is that wide
# on purpose: it is there to catch gross errors of another estimate. A narrower (10-90 %) one raised correct
# readings of quiet scans, whose patches' low frequencies hold as much anatomy as noise.
ROUTINE_SPREAD_LOG_STD = (-0.74, 0.85)
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
class NoiseDoseReading:
    """The dose fraction read from an image's low-frequency noise power, with the range routine protocols allow.

    ``dose`` is None when the image has too little uniform soft tissue (``reason`` says so); ``low``/``high`` is
    the range the spread of routine protocols allows (ROUTINE_SPREAD_LOG_STD); all three are capped at 1 (a scan
    quieter than routine reads as routine)."""

    dose: float | None
    low: float | None
    high: float | None
    noise_hu: float | None  # std in the uniform patches
    patches: int
    reason: str = ""
    of_routine: float | None = None  # the dose before capping at 1: low-frequency noise power of a routine scan / this

    def describe(self) -> str:
        if self.dose is None:
            return f"no dose from the noise: {self.reason}"
        return (
            f"noise {self.noise_hu:.0f} HU in {self.patches} uniform patches: "
            f"{self.dose:.2g} of a routine scan (routine protocols allow {self.low:.2g} to {self.high:.2g})"
        )


def low_band_power(spectrum: NoiseSpectrum, slice_mm: float) -> float | None:
    """The kernel-independent noise level of ``spectrum``: NPS(f) / f over LOW_BAND times the slice thickness
    (None when the spectrum has fewer than 2 bins in the band)."""
    f = spectrum.frequency_per_mm
    band = (f > LOW_BAND[0]) & (f < LOW_BAND[1])
    if band.sum() < 2:
        return None
    return float(np.mean(spectrum.nps[band] / f[band])) * slice_mm


def read_dose_from_noise(hu: np.ndarray, pixel_mm: float, slice_mm: float) -> NoiseDoseReading:
    """The dose of CT slices ``hu`` [z, y, x] (HU, square pixels of ``pixel_mm``, ``slice_mm`` thick) read from
    the kernel-independent low-frequency power of their noise in uniform soft tissue (module docstring)."""
    if not (pixel_mm > 0 and slice_mm > 0):
        raise ValueError(f"pixel size and slice thickness must be positive; got {pixel_mm}, {slice_mm}")
    corners = uniform_patches(np.asarray(hu), pixel_mm)
    if len(corners) < MIN_PATCHES:
        reason = f"{len(corners)} uniform soft-tissue patches found, {MIN_PATCHES} needed"
        return NoiseDoseReading(None, None, None, None, len(corners), reason)
    spectrum = patch_spectrum(np.asarray(hu), corners, pixel_mm)
    power = low_band_power(spectrum, slice_mm)
    if power is None:
        reason = f"patches too small to see {LOW_BAND[0]}-{LOW_BAND[1]} cycles/mm"
        return NoiseDoseReading(None, None, None, spectrum.std_hu, spectrum.patches, reason)
    dose = ROUTINE_LOW_BAND_POWER / max(power, 1e-12)
    low, high = (dose * math.exp(2 * s) for s in ROUTINE_SPREAD_LOG_STD)
    return NoiseDoseReading(
        min(dose, 1.0), min(low, 1.0), min(high, 1.0), spectrum.std_hu, spectrum.patches, of_routine=dose
    )
