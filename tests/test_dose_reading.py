"""The dose read from an image's own noise (lowdose.dose.read_dose_from_noise) on real series: it must not
depend on the reconstruction kernel, must fall in proportion to the dose, and must say when it cannot read."""

from __future__ import annotations

import numpy as np
import pytest

from lowdose import load_ct, sample_ct_path
from lowdose.dose import read_dose_from_noise
from lowdose.simulate import simulate_low_dose
from lowdose.volume import CTVolume

from .conftest import shared


def _read(volume: CTVolume):
    return read_dose_from_noise(volume.hu, float(volume.spacing_mm[0]), volume.slice_thickness_mm)


def test_two_kernels_of_the_same_photons_read_alike():
    """Siemens B70f and B40f of one acquisition: noise std 42 and 11 HU, yet the dose read from the
    kernel-independent low-frequency noise power agrees within a factor 1.6 and neither reads as low dose."""
    sharp = _read(load_ct(shared("lungpetctdx_A0002_siemens/B70f")))
    smooth = _read(load_ct(shared("lungpetctdx_A0002_siemens/B40f")))
    print(f"\nB70f: {sharp.describe()}\nB40f: {smooth.describe()}")
    assert sharp.noise_hu > 3 * smooth.noise_hu
    assert sharp.dose is not None and smooth.dose is not None
    assert max(sharp.dose, smooth.dose) / min(sharp.dose, smooth.dose) < 1.6
    assert min(sharp.dose, smooth.dose) > 0.5


def test_the_reading_falls_in_proportion_to_the_simulated_dose():
    """The sample (Siemens Br38f abdomen) read at full dose and simulated 1/2, 1/4, 1/10 with its own scanner's
    noise: each reading (before the cap at 1: this quiet scan reads above routine) is the dose times the
    full-dose reading, within 30 % (45 % at 1/10: the simulator matches the source's noise spectrum near its peak,
    its lowest frequencies less closely; measured 0.14); the readings are ordered."""
    volume = load_ct(sample_ct_path())
    part = CTVolume(hu=volume.hu[4:8].copy(), spacing_mm=volume.spacing_mm, metadata=dict(volume.metadata))
    full = _read(part)
    assert full.dose is not None and full.of_routine is not None and full.dose > 0.5
    readings = []
    for dose in (0.5, 0.25, 0.1):
        reading = _read(simulate_low_dose(part, dose, seed=1, match_source=True))
        assert reading.dose is not None
        print(f"dose {dose}: {reading.describe()}")
        assert reading.of_routine / full.of_routine == pytest.approx(dose, rel=0.3 if dose > 0.2 else 0.45)
        assert reading.low < reading.dose <= reading.high
        readings.append(reading.of_routine)
    assert readings == sorted(readings, reverse=True)


def test_no_reading_without_uniform_soft_tissue():
    air = np.full((1, 256, 256), -1000.0, dtype=np.float32)
    reading = read_dose_from_noise(air, 0.7, 3.0)
    assert reading.dose is None and reading.patches == 0
    assert "uniform soft-tissue patches" in reading.describe()
    with pytest.raises(ValueError, match="positive"):
        read_dose_from_noise(air, 0.7, 0.0)
