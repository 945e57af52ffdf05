"""Image-quality metrics checked against scikit-image and against answers known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lowdose import simulate_low_dose
from lowdose.metrics import WINDOWS, apply_window, compare, noise_std, psnr, rmse_hu, soft_tissue_mask, ssim


@pytest.fixture(scope="module")
def slices(sample_volume):
    reference = sample_volume.hu[8:11].copy()
    noisy = reference + np.random.default_rng(1).normal(0, 25, reference.shape).astype(np.float32)
    return reference, noisy


def test_windows_are_the_fields_windows():
    assert WINDOWS == {"chest": (-600.0, 1500.0), "abdomen": (50.0, 400.0), "head": (40.0, 80.0)}
    np.testing.assert_allclose(apply_window(np.array([-150.0, 50.0, 250.0, 1000.0]), "abdomen"), [0, 0.5, 1, 1])


@pytest.mark.parametrize("window", ["abdomen", "chest", "head"])
def test_psnr_and_ssim_agree_with_scikit_image(slices, window):
    reference, noisy = slices
    ref01, noisy01 = apply_window(reference, window), apply_window(noisy, window)
    assert psnr(reference, noisy, window) == pytest.approx(
        peak_signal_noise_ratio(ref01, noisy01, data_range=1.0), abs=1e-6
    )
    expected_ssim = np.mean([structural_similarity(r, t, data_range=1.0) for r, t in zip(ref01, noisy01)])
    assert ssim(reference, noisy, window) == pytest.approx(expected_ssim, abs=1e-9)


def test_known_offset_gives_known_figures(slices):
    reference, _ = slices
    inside = (reference > -100) & (reference < 150)  # stays inside the abdomen window after +10 HU
    shifted = reference + 10.0
    assert rmse_hu(reference, shifted) == pytest.approx(10.0, abs=1e-4)
    # 10 HU in a 400 HU window is 0.025: PSNR = -20 log10(0.025) = 32.04 dB
    assert psnr(reference, shifted, "abdomen", mask=inside) == pytest.approx(32.0412, abs=1e-3)
    assert ssim(reference, reference, "abdomen") == pytest.approx(1.0)
    assert psnr(reference, reference) == float("inf")


def test_noise_std_in_soft_tissue_recovers_added_noise(sample_volume):
    reference = sample_volume.hu[5:15]
    noisy = reference + np.random.default_rng(7).normal(0, 20, reference.shape).astype(np.float32)
    tissue = soft_tissue_mask(reference, spacing_mm=sample_volume.spacing_mm)
    assert tissue.sum() > 50_000, "the abdomen sample holds plenty of soft tissue"
    assert noise_std(noisy - reference, tissue) == pytest.approx(20.0, rel=0.02)
    # tissue only: fat, air and bone are outside the mask
    assert reference[tissue].min() > -120 and reference[tissue].max() < 220
    assert noise_std(reference, (slice(0, 1), slice(250, 260), slice(250, 260))) >= 0.0
    with pytest.raises(ValueError, match="fewer than two"):
        noise_std(reference, np.zeros(reference.shape, bool))


def test_padding_outside_the_field_of_view_is_left_out(slices):
    reference, noisy = slices
    padded_ref, padded_noisy = reference.copy(), noisy.copy()
    padded_ref[:, :40, :40] = padded_noisy[:, :40, :40] = -3024.0
    padded_noisy[:, :40, :40] = -2000.0  # different padding values must not count as error either
    fov = (padded_ref > -1400) & (padded_noisy > -1400)
    assert rmse_hu(padded_ref, padded_noisy) == pytest.approx(rmse_hu(reference[fov], noisy[fov]), rel=1e-9)


def test_compare_returns_every_figure(sample_volume, slices):
    reference, noisy = slices
    figures = compare(reference, noisy)
    assert set(figures) == {
        "psnr_abdomen",
        "ssim_abdomen",
        "psnr_chest",
        "ssim_chest",
        "rmse_hu",
        "soft_tissue_noise_std_hu",
        "soft_tissue_mean_shift_hu",
    }
    assert figures["soft_tissue_noise_std_hu"] == pytest.approx(25.0, rel=0.03)
    assert abs(figures["soft_tissue_mean_shift_hu"]) < 1.0
    assert figures["psnr_abdomen"] < figures["psnr_chest"]  # the narrower window shows noise more
    with pytest.raises(ValueError, match="differ in shape"):
        compare(reference, noisy[:2])


def test_over_smoothing_measures_see_blur_and_not_noise(sample_volume):
    """Edge sharpness and NPS mean frequency: 1 for the image itself, well below 1 when it is blurred, and
    not lowered by added noise (noise is not smoothing)."""
    from scipy.ndimage import gaussian_filter

    from lowdose.labels import load_label_map
    from lowdose.metrics import edge_sharpness_ratio, nps_mean_frequency

    from .conftest import SAMPLE_SEG

    normal = sample_volume.slices(8, 12)
    low = simulate_low_dose(normal, 0.25, seed=1).hu
    blurred = gaussian_filter(normal.hu, (0, 1.5, 1.5))
    assert edge_sharpness_ratio(normal.hu, normal.hu) == pytest.approx(1.0)
    assert edge_sharpness_ratio(normal.hu, blurred) < 0.7 < 0.95 < edge_sharpness_ratio(normal.hu, low)
    labels, _ = load_label_map(SAMPLE_SEG, sample_volume)
    liver = labels[8:12] == 5  # TotalSegmentator `total`: 5 = liver
    f_normal = nps_mean_frequency(normal.hu, liver, normal.spacing_mm[0])
    assert 0.1 < f_normal < 0.5  # cycles/mm, below the 0.51 Nyquist limit of 0.98 mm pixels
    assert nps_mean_frequency(blurred, liver, normal.spacing_mm[0]) < 0.6 * f_normal
    assert nps_mean_frequency(low, liver, normal.spacing_mm[0]) > 0.95 * f_normal
    with pytest.raises(ValueError, match="no 24x24 region"):
        nps_mean_frequency(normal.hu, np.zeros_like(liver), 1.0)
