"""Kernel augmentation (lowdose.kernel) on the shared real kernel pairs: a smooth reconstruction re-filtered to a
sharp kernel's noise texture must come out closer to the real sharp reconstruction of the same photons."""

from __future__ import annotations

import numpy as np
import pytest

from lowdose.errors import LowdoseError
from lowdose.io import load_ct
from lowdose.kernel import resharpened
from lowdose.noise import extract_patches, patch_size_px, patch_spectrum, source_noise_spectrum, uniform_patches
from lowdose.training.config import TrainConfig
from lowdose.training.data import with_sharper_kernels
from lowdose.volume import CTVolume

from .conftest import shared


@pytest.fixture(scope="module")
def siemens_pair() -> tuple[CTVolume, CTVolume]:
    return load_ct(shared("lungpetctdx_A0002_siemens/B70f")), load_ct(shared("lungpetctdx_A0002_siemens/B40f"))


def test_a_medium_kernel_refiltered_to_the_sharp_texture_looks_like_the_real_sharp_reconstruction(siemens_pair):
    """B40f re-filtered to B70f's noise texture (NPS mean frequency) gets B70f's noise level within 25 % and is
    nearer to the real B70f image than B40f is (the same acquisition: only the kernel differs). Sharpening
    keeps the mean of uniform soft tissue (the Hounsfield scale) within 1 HU."""
    sharp, smooth = siemens_pair
    before = smooth.hu.copy()
    pixel_mm = float(smooth.spacing_mm[0])
    corners = uniform_patches(smooth.hu, pixel_mm)
    real = patch_spectrum(sharp.hu, corners, pixel_mm)
    made_volume, change = resharpened(smooth, real.mean_per_mm)
    made = patch_spectrum(made_volume.hu, corners, pixel_mm)
    print(f"\nB70f {real.std_hu:.1f} HU, f {real.mean_per_mm:.3f}; made {made.std_hu:.1f} HU, f {made.mean_per_mm:.3f}")
    assert made.mean_per_mm == pytest.approx(real.mean_per_mm, abs=0.03)
    assert made.std_hu == pytest.approx(real.std_hu, rel=0.25)
    inside = sharp.field_of_view_mask() & smooth.field_of_view_mask()
    rms_before = np.sqrt(np.mean((sharp.hu[inside] - smooth.hu[inside]) ** 2))
    rms_after = np.sqrt(np.mean((sharp.hu[inside] - made_volume.hu[inside]) ** 2))
    assert rms_after < 0.6 * rms_before
    assert change.source_mean_per_mm < change.mean_per_mm
    np.testing.assert_array_equal(smooth.hu, before)  # the input is not modified


def test_refiltering_keeps_geometry_hounsfield_scale_and_padding(siemens_pair):
    _, smooth = siemens_pair
    made, _ = resharpened(smooth, 0.5)
    assert made.shape == smooth.shape
    np.testing.assert_array_equal(made.spacing_mm, smooth.spacing_mm)
    np.testing.assert_array_equal(made.origin_mm, smooth.origin_mm)
    np.testing.assert_array_equal(made.direction, smooth.direction)
    outside = ~smooth.field_of_view_mask()
    np.testing.assert_array_equal(made.hu[outside], smooth.hu[outside])
    assert made.field_of_view_mask().sum() == smooth.field_of_view_mask().sum()
    # Sharpening keeps every flat region's level: the mean of soft tissue moves by less than 2 HU.
    pixel_mm = float(smooth.spacing_mm[0])
    corners = uniform_patches(smooth.hu, pixel_mm)
    size = patch_size_px(pixel_mm)
    shift = extract_patches(made.hu, corners, size).mean() - extract_patches(smooth.hu, corners, size).mean()
    assert abs(float(shift)) < 1.0
    assert made.metadata["path"].endswith("#kernel-0.500-1.5")


def test_no_variant_when_the_series_is_already_sharper_or_has_nothing_to_measure(siemens_pair):
    sharp, _ = siemens_pair
    assert resharpened(sharp, source_noise_spectrum(sharp.hu, sharp.spacing_mm[0]).mean_per_mm - 0.05) is None
    air = CTVolume(hu=np.full((2, 128, 128), -1000.0, dtype=np.float32), spacing_mm=np.array([0.7, 0.7, 3.0]))
    assert resharpened(air, 0.5) is None


def test_training_data_gain_the_sharper_variants_after_the_originals(siemens_pair):
    sharp, smooth = siemens_pair
    volumes = with_sharper_kernels([smooth, sharp], [[0.47, 2.0], [0.56, 1.5]])
    # B40f (mean 0.38) gains both; B70f (0.55) only the sharper one.
    assert [v.metadata["path"].rsplit("#", 1)[-1] for v in volumes[2:]] == [
        "kernel-0.470-2",
        "kernel-0.560-1.5",
        "kernel-0.560-1.5",
    ]
    assert volumes[:2] == [smooth, sharp]


@pytest.mark.parametrize("entry", [[0.47], [0.05, 1.0], [0.5, 9.0]])
def test_a_bad_sharper_kernels_entry_is_refused_naming_the_config(tmp_path, entry):
    config = tmp_path / "train.yaml"
    config.write_text(f"name: x\ndata:\n  train: [a]\n  sharper_kernels:\n  - {entry}\n")
    with pytest.raises(LowdoseError, match=r"train\.yaml.*sharper_kernels"):
        TrainConfig.from_yaml(config)
