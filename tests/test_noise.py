"""Noise measured in patient images (lowdose.noise) on the shared real series: the same photons reconstructed
with a sharp and a smooth kernel must show it, and a known noise must be measured back."""

from __future__ import annotations

import numpy as np
import pytest

from lowdose.io import load_ct
from lowdose.noise import noise_power_spectrum, slice_difference_spectrum, source_noise_spectrum

from .conftest import shared

KERNEL_PAIRS = [
    ("lungpetctdx_A0001_philips/kernel_L", "lungpetctdx_A0001_philips/kernel_B"),
    ("lungpetctdx_A0002_siemens/B70f", "lungpetctdx_A0002_siemens/B40f"),
]


@pytest.mark.parametrize("sharp, smooth", KERNEL_PAIRS)
def test_a_sharp_kernel_has_more_and_finer_noise_than_a_smooth_one_of_the_same_acquisition(sharp, smooth):
    spectra = {}
    for name in (sharp, smooth):
        volume = load_ct(shared(name))
        spectra[name] = source_noise_spectrum(volume.hu, volume.spacing_mm[0])
    assert spectra[sharp].std_hu > 2.5 * spectra[smooth].std_hu
    assert spectra[sharp].mean_per_mm > 1.1 * spectra[smooth].mean_per_mm
    print(
        f"\n{sharp}: {spectra[sharp].std_hu:.1f} HU, mean f {spectra[sharp].mean_per_mm:.2f}/mm; "
        f"{smooth}: {spectra[smooth].std_hu:.1f} HU, mean f {spectra[smooth].mean_per_mm:.2f}/mm"
    )


def test_white_noise_is_measured_back_flat_with_its_variance():
    rng = np.random.default_rng(0)
    patches = rng.normal(0.0, 20.0, (200, 32, 32))
    spectrum = noise_power_spectrum(patches, pixel_mm=0.8)
    assert spectrum.std_hu == pytest.approx(20.0, rel=0.03)
    # White noise: NPS = variance * pixel area at every frequency.
    inner = spectrum.nps[2:-2]
    assert np.allclose(inner, 400.0 * 0.8**2, rtol=0.15)


def test_own_noise_and_neighbour_slice_difference_agree_on_a_thin_slice_series():
    """Two independent ways to read a thin (1 mm) series' noise: uniform patches of each slice, and the
    difference of neighbouring slices (anatomy cancels); they agree within 30 %."""
    volume = load_ct(shared("lidc_idri_0314_philips"))
    own = source_noise_spectrum(volume.hu, volume.spacing_mm[0])
    difference = slice_difference_spectrum(volume.hu, volume.spacing_mm[0])
    assert difference.std_hu == pytest.approx(own.std_hu, rel=0.3)
    assert difference.mean_per_mm == pytest.approx(own.mean_per_mm, rel=0.15)
