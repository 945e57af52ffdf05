"""Tests of the projection-domain low-dose simulator on real CT (sample abdomen, TotalSegmentator and
pydicom examples)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from lowdose import load_ct, sample_ct_path
from lowdose.metrics import soft_tissue_mask
from lowdose.simulate import MU_WATER_PER_MM, ScannerGeometry, _Plan, simulate_low_dose

from .conftest import SHARED_CT

DATA = SHARED_CT  # ../shared/data/ct beside the checkout (tests/conftest.py)
SMALL_NIFTI = DATA / "totalsegmentator" / "example_ct_sm.nii.gz"  # 122x101x30, 3 mm
CT_SMALL = DATA / "pydicom" / "CT_small.dcm"  # one 128x128 slice, padding -3024

DOSES = (1 / 2, 1 / 4, 1 / 10, 1 / 20)


def _subset(volume, slices):
    """A few slices of a volume with their geometry and metadata (DICOM headers: theirs only)."""
    metadata = dict(volume.metadata)
    if "dicom_headers" in metadata:
        metadata["dicom_headers"] = [metadata["dicom_headers"][k] for k in slices]
    return dataclasses.replace(volume, hu=volume.hu[slices].copy(), metadata=metadata)


@pytest.fixture(scope="module")
def sample():
    return load_ct(sample_ct_path())


@pytest.fixture(scope="module")
def sample_slices(sample):
    # Four slices spread over the series (3 mm thick, 2 mm apart: the headers give the thickness).
    return _subset(sample, [2, 7, 12, 17])


@pytest.fixture(scope="module")
def small():
    """Six slices (122x101, 3 mm pixels) of the TotalSegmentator example: a small non-square grid."""
    if not SMALL_NIFTI.exists():
        pytest.skip(f"{SMALL_NIFTI} not present")
    return _subset(load_ct(SMALL_NIFTI), [8, 11, 14, 17, 20, 23])


@pytest.fixture(scope="module")
def dose_table(sample_slices):
    """Added noise (std, mean) in soft tissue for each dose on the four sample slices."""
    tissue = soft_tissue_mask(sample_slices) & sample_slices.field_of_view_mask()
    assert tissue.sum() > 100_000
    table = {}
    for d in DOSES:
        low = simulate_low_dose(sample_slices, d, seed=1)
        diff = (low.hu - sample_slices.hu)[tissue].astype(np.float64)
        table[d] = (float(diff.std()), float(diff.mean()))
    return table


# ------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("dose", [0, 0.0, -0.25, 1.01, 4, float("nan"), float("inf"), "quarter", None])
def test_dose_outside_range_is_refused(small, dose):
    with pytest.raises(ValueError, match="dose_fraction"):
        simulate_low_dose(small, dose, seed=0)


def test_full_dose_returns_the_input(small):
    out = simulate_low_dose(small, 1.0, seed=0)
    np.testing.assert_array_equal(out.hu, small.hu)
    assert out.hu is not small.hu
    assert out.metadata["lowdose_dose_fraction"] == 1.0


# ------------------------------------------------------------------------------- reproducibility


def test_same_seed_same_volume_and_other_seed_other_noise(small):
    a = simulate_low_dose(small, 0.25, seed=7)
    b = simulate_low_dose(small, 0.25, seed=7)
    c = simulate_low_dose(small, 0.25, seed=8)
    np.testing.assert_array_equal(a.hu, b.hu)
    changed = np.abs(c.hu - a.hu) > 1.0
    assert changed.mean() > 0.2


def test_noise_of_a_slice_does_not_depend_on_batching(small):
    volume = _subset(small, [0, 1, 2])
    whole = simulate_low_dose(volume, 0.25, seed=3, slices_per_batch=3)
    in_two = simulate_low_dose(volume, 0.25, seed=3, slices_per_batch=2)
    np.testing.assert_allclose(whole.hu, in_two.hu, atol=0.05)


def test_input_untouched_and_geometry_and_metadata_kept(sample):
    volume = _subset(sample, [9, 10])
    before = volume.hu.copy()
    metadata_before = dict(volume.metadata)
    low = simulate_low_dose(volume, 0.25, seed=0)
    np.testing.assert_array_equal(volume.hu, before)
    assert volume.metadata == metadata_before
    assert low.hu.dtype == np.float32 and low.shape == volume.shape
    assert low.spacing_mm == volume.spacing_mm and low.origin_mm == volume.origin_mm
    np.testing.assert_array_equal(low.direction, volume.direction)
    assert low.metadata["dicom_headers"] == volume.metadata["dicom_headers"]
    assert low.metadata["series_uid"] == volume.metadata["series_uid"]
    assert low.metadata["lowdose_dose_fraction"] == 0.25
    assert low.metadata["lowdose_seed"] == 0
    assert low.metadata["lowdose_description"] == "lowdose simulated 25% dose (seed 0)"
    assert not np.array_equal(low.hu, volume.hu)


def test_progress_bar_counts_slices(small, capsys):
    simulate_low_dose(small, 0.5, seed=0, progress=True)
    assert "6/6" in capsys.readouterr().err


# ------------------------------------------------------------------------------ noise level (physics)


def test_quarter_dose_adds_real_quarter_dose_noise(dose_table):
    std, _ = dose_table[1 / 4]
    assert 20.0 <= std <= 35.0, f"added noise at 1/4 dose: {std:.1f} HU (real Mayo levels: 20-35)"


def test_added_variance_scales_as_one_minus_d_over_d(dose_table):
    normalised = {d: dose_table[d][0] ** 2 / ((1 - d) / d) for d in DOSES}
    spread = max(normalised.values()) / min(normalised.values())
    assert spread <= 1.10, f"var/((1-d)/d) by dose: {normalised}"


def test_no_bias_in_soft_tissue(dose_table):
    for d, (_, mean) in dose_table.items():
        assert abs(mean) < 3.0, f"mean HU shift {mean:+.2f} at dose {d}"


def test_thinner_slices_get_more_noise(small):
    tissue = soft_tissue_mask(small) & small.field_of_view_mask()
    variance = {}
    for thickness in (1.0, 3.0):
        low = simulate_low_dose(small, 0.25, seed=0, slice_thickness_mm=thickness)
        variance[thickness] = float((low.hu - small.hu)[tissue].var())
    assert 2.5 < variance[1.0] / variance[3.0] < 3.5


# ----------------------------------------------------------------------------- grids and padding


def test_non_square_coarse_grid(small):
    assert small.shape[1:] == (101, 122) and small.spacing_mm[0] == 3.0 and small.shape[1] != small.shape[2]
    low = simulate_low_dose(small, 0.25, seed=0)
    tissue = soft_tissue_mask(small) & small.field_of_view_mask()
    diff = (low.hu - small.hu)[tissue]
    assert np.isfinite(low.hu).all()
    assert 3.0 < diff.std() < 60.0
    assert abs(diff.mean()) < 3.0


def test_small_single_slice_with_padding():
    if not CT_SMALL.exists():
        pytest.skip(f"{CT_SMALL} not present")
    volume = load_ct(CT_SMALL)
    assert volume.shape == (1, 128, 128)
    low = simulate_low_dose(volume, 0.25, seed=0)
    inside = volume.field_of_view_mask()
    np.testing.assert_array_equal(low.hu[~inside], volume.hu[~inside])
    assert np.isfinite(low.hu).all()
    assert (np.abs(low.hu - volume.hu)[inside] > 0.5).mean() > 0.5


def test_padding_outside_the_field_of_view_is_left_alone(sample):
    volume = _subset(sample, [10])
    ny, nx = volume.shape[1:]
    yy, xx = np.mgrid[:ny, :nx]
    outside = (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 > 230**2
    volume.hu[0][outside] = -3024.0
    volume.metadata["padding_value_hu"] = -3024.0
    low = simulate_low_dose(volume, 0.25, seed=0)
    assert (low.hu[0][outside] == -3024.0).all()
    changed = np.abs(low.hu[0] - volume.hu[0])[~outside] > 0.5
    assert changed.mean() > 0.5


# ------------------------------------------------------------------------------ reconstruction core


def _disc_sinogram(plan: _Plan, discs):
    """Exact fan-beam line integrals of discs (x, y, radius mm, mu per mm), in the plan's geometry."""
    views, radius = plan.views, plan.geometry.source_to_isocentre_mm
    beta = ((torch.arange(views, dtype=torch.float64) + 0.5) * 2 * math.pi / views)[:, None]
    gamma = plan.gammas[None]
    sx, sy = radius * torch.cos(beta), radius * torch.sin(beta)
    dx, dy = -torch.cos(beta + gamma), -torch.sin(beta + gamma)
    sinogram = torch.zeros(views, plan.channels, dtype=torch.float64)
    for x0, y0, r, mu in discs:
        distance = ((x0 - sx) * dy - (y0 - sy) * dx).abs()
        sinogram += 2 * mu * torch.sqrt((r * r - distance * distance).clamp(min=0))
    return sinogram.float()


@pytest.mark.parametrize("nx,ny,sx,sy", [(160, 120, 1.5, 2.0), (128, 128, 2.0, 2.0)])
def test_fan_beam_fbp_reconstructs_water_disc(nx, ny, sx, sy):
    """FBP of exact projections of a water disc with a bone insert gives back water within 1 HU."""
    water = MU_WATER_PER_MM
    discs = [(0.0, 0.0, 100.0, water), (40.0, -20.0, 20.0, water)]  # the insert doubles mu
    plan = _Plan(ScannerGeometry(), nx, ny, sx, sy, 120.0)
    image = plan.reconstruct(_disc_sinogram(plan, discs)[None])[0].numpy()
    x = (np.arange(nx) - (nx - 1) / 2) * sx
    y = (np.arange(ny) - (ny - 1) / 2) * sy
    yy, xx = np.meshgrid(y, x, indexing="ij")
    water_only = (xx**2 + yy**2 < 90**2) & ((xx - 40) ** 2 + (yy + 20) ** 2 > 30**2)
    insert = (xx - 40) ** 2 + (yy + 20) ** 2 < 12**2
    hu = (image / water - 1.0) * 1000.0
    assert abs(np.median(hu[water_only])) < 1.0
    assert abs(np.median(hu[insert]) - 1000.0) < 10.0


def test_scanner_geometry_defaults():
    g = ScannerGeometry()
    assert 245 < g.fov_radius_mm < 255  # the 50 cm scan field of view of a Definition
    assert abs(g.channel_spacing_at_isocentre_mm - 0.704) < 0.01
    assert g.flying_focal_spot and g.sampling_at_isocentre_mm == pytest.approx(0.352, rel=0.01)
    with pytest.raises(ValueError):
        ScannerGeometry(views_per_rotation=1150)


@pytest.mark.parametrize("relative", ["lungpetctdx_A0001_philips/kernel_L", "lungpetctdx_A0001_philips/kernel_B"])
def test_source_matched_noise_has_the_scanners_texture_and_the_physical_level(relative):
    """One acquisition reconstructed with a sharp (L) and a standard (B) kernel: at 1/4 dose the added noise
    must have sqrt(1/d - 1) times each source's own noise and the same spectrum (mean frequency) within 15 %,
    measured in the same uniform patches (the default simulator misses both on the sharp kernel: 0.17 and
    0.68, benchmarks/results/simulator_realism.md). Same seed, same result."""
    from lowdose.noise import extract_patches, noise_power_spectrum, patch_size_px, uniform_patches

    volume = load_ct(DATA / relative).slices(9, 21)
    pixel_mm = volume.spacing_mm[0]
    low = simulate_low_dose(volume, 0.25, seed=5, match_source=True)
    assert low.metadata["lowdose_noise_match"]["matched"], low.metadata["lowdose_noise_match"]
    corners, size = uniform_patches(volume.hu, pixel_mm), patch_size_px(pixel_mm)
    source = noise_power_spectrum(extract_patches(volume.hu, corners, size), pixel_mm)
    added = noise_power_spectrum(extract_patches(low.hu - volume.hu, corners, size), pixel_mm)
    assert added.std_hu / source.std_hu == pytest.approx(3**0.5, rel=0.15)
    assert added.mean_per_mm == pytest.approx(source.mean_per_mm, rel=0.15)
    np.testing.assert_array_equal(simulate_low_dose(volume, 0.25, seed=5, match_source=True).hu, low.hu)
    print(
        f"\n{relative}: source {source.std_hu:.1f} HU f {source.mean_per_mm:.2f}/mm; added {added.std_hu:.1f} HU "
        f"f {added.mean_per_mm:.2f}/mm"
    )


def test_flying_focal_spot_lets_a_sharp_kernels_noise_reach_the_pixel_grids_limit():
    """Siemens B70f on 0.65 mm pixels (its noise reaches 0.77 cycles/mm): without the flying focal spot the fan
    is sampled every 0.70 mm and the matched noise's mean frequency falls short of the source's (measured
    0.85x); with it (the default) the projection is sampled every 0.35 mm and the texture is the source's within
    5 %. The noise level is matched either way, and the default soft-tissue simulation keeps its band."""
    from lowdose.noise import patch_spectrum, uniform_patches
    from lowdose.simulate import source_noise_model

    volume = load_ct(DATA / "lungpetctdx_A0002_siemens/B70f")
    part = volume.slices(volume.shape[0] // 2 - 3, volume.shape[0] // 2 + 3)
    pixel_mm = float(volume.spacing_mm[0])
    corners = uniform_patches(part.hu, pixel_mm)
    source = patch_spectrum(part.hu, corners, pixel_mm)
    mean_f, default_f = {}, {}
    for ffs in (False, True):
        geometry = ScannerGeometry(flying_focal_spot=ffs)
        assert geometry.sampling_at_isocentre_mm == pytest.approx(0.704 / (2 if ffs else 1), rel=0.01)
        model = source_noise_model(volume, seed=0, geometry=geometry)
        low = simulate_low_dose(part, 0.25, seed=1, geometry=geometry, match_source=model)
        added = patch_spectrum(low.hu - part.hu, corners, pixel_mm)
        mean_f[ffs] = added.mean_per_mm / source.mean_per_mm
        assert added.std_hu / source.std_hu > 1.2  # the level is matched on the whole series either way
        plain = simulate_low_dose(part, 0.25, seed=1, geometry=geometry)
        default_f[ffs] = patch_spectrum(plain.hu - part.hu, corners, pixel_mm).mean_per_mm
    assert mean_f[False] < 0.9
    assert mean_f[True] == pytest.approx(1.0, abs=0.05)
    assert default_f[True] == pytest.approx(default_f[False], rel=0.1)


def test_tube_current_of_each_slice_comes_from_its_dicom_header():
    """The Philips series was tube-current modulated (407-505 mA): each slice's relative current, which sets
    its photons with match_source, is read from its own header (the highest current where the header says)."""
    from lowdose.simulate import _dicom_slice_currents

    volume = load_ct(DATA / "tcia_pancreatic_ct_cbct_seg").slices(40, 100)
    currents = _dicom_slice_currents(volume)
    assert currents.shape == (60,) and currents.mean() == pytest.approx(1.0)
    assert currents.max() / currents.min() > 1.05
    headers = volume.metadata["dicom_headers"]
    assert np.argmax(currents) == int(np.argmax([float(h.XRayTubeCurrent) for h in headers]))


def test_a_calibration_made_once_serves_any_part_of_the_series():
    """source_noise_model on the series, then a few-slice stack without headers (as the training sampler
    simulates): the added noise keeps the calibrated level and texture at another dose (1/10)."""
    from lowdose import CTVolume
    from lowdose.noise import extract_patches, noise_power_spectrum, patch_size_px, uniform_patches
    from lowdose.simulate import source_noise_model

    volume = load_ct(DATA / "lungpetctdx_A0001_philips/kernel_L").slices(9, 21)
    model = source_noise_model(volume, seed=1)
    assert model is not None and model.source_std_hu > 20
    stack = CTVolume(hu=volume.hu[4:8].copy(), spacing_mm=volume.spacing_mm)
    low = simulate_low_dose(stack, 0.1, seed=3, match_source=model)
    pixel_mm = volume.spacing_mm[0]
    corners, size = uniform_patches(stack.hu, pixel_mm), patch_size_px(pixel_mm)
    assert len(corners) >= 8
    source = noise_power_spectrum(extract_patches(stack.hu, corners, size), pixel_mm)
    added = noise_power_spectrum(extract_patches(low.hu - stack.hu, corners, size), pixel_mm)
    assert added.std_hu / source.std_hu == pytest.approx(9**0.5, rel=0.2)
    assert added.mean_per_mm == pytest.approx(source.mean_per_mm, rel=0.15)
    assert low.metadata["lowdose_noise_match"]["matched"]
