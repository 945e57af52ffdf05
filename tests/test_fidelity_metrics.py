"""The per-structure metrics and verdicts of the fidelity check, on real TotalSegmentator label maps.

Label maps: the bundled sample's (512x512x20, 0.977x0.977x2 mm) and TotalSegmentator's example
(122x101x30, 3 mm, with its CT). Known answers come from simple geometry (a copy, a shifted copy, an
eroded copy) and from independent computations (scipy's distance transform, MONAI's metric functions).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lowdose import CTInputError
from lowdose.fidelity import (
    FidelityThresholds,
    compare_structures,
    load_label_map,
    overlap_metrics,
    save_label_map,
    total_class_names,
)
from lowdose.volume import CTVolume

from .conftest import SAMPLE_SEG, shared

NAMES = total_class_names()
ID = {name: k for k, name in NAMES.items()}


def _read(path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


@pytest.fixture(scope="module")
def example():
    """TotalSegmentator's example CT (3 mm) and its `total` label map: (labels, hu, spacing_xyz)."""
    labels, spacing = _read(shared("totalsegmentator/example_seg.nii.gz"))
    hu, spacing_ct = _read(shared("totalsegmentator/example_ct_sm.nii.gz"))
    assert spacing == spacing_ct and labels.shape == hu.shape
    return labels.astype(np.uint8), hu.astype(np.float32), spacing


@pytest.fixture(scope="module")
def sample_labels(sample_volume):
    labels, how = load_label_map(SAMPLE_SEG, sample_volume)
    return labels


def _by_name(result):
    return {s["name"]: s for s in result["structures"]}


def _shift(labels, k, axis):
    """The label map moved k voxels along ``axis`` inside a zero border wide enough that nothing is cut."""
    pad = [(k, k) if a == axis else (0, 0) for a in range(3)]
    padded = np.pad(labels, pad)
    return padded, np.roll(padded, k, axis=axis)


def test_label_map_against_itself_is_perfect_and_absent_stays_absent(sample_volume, sample_labels):
    result = compare_structures(
        {"original": sample_labels, "denoised": sample_labels},
        {"original": sample_volume.hu, "denoised": sample_volume.hu},
        sample_volume.spacing_mm,
        NAMES,
    )
    structures = _by_name(result)
    assert len(structures) == 117
    present = [s for s in structures.values() if s["images"]["original"]["present"]]
    assert len(present) == len(np.unique(sample_labels)) - 1 >= 25
    for s in present:
        p = s["pairs"]["denoised_vs_original"]
        assert (p["dice"], p["nsd_1mm"], p["nsd_2mm"], p["hd95_mm"], p["volume_change_pct"], p["hu_shift"]) == (
            1.0,
            1.0,
            1.0,
            0.0,
            0.0,
            0.0,
        ), s["name"]
        assert s["verdict"] == "kept"
    brain = structures["brain"]  # not in an abdomen slab
    assert brain["verdict"] == "absent" and brain["pairs"]["denoised_vs_original"]["dice"] is None
    assert result["study"]["verdict"] == "kept"
    assert result["study"]["counts"]["absent"] == 117 - len(present)


@pytest.mark.parametrize("k, axis", [(1, 1), (2, 2), (1, 0)])
def test_shifted_copy_hd95_is_the_shift_and_dice_the_overlap(example, k, axis):
    labels, _, spacing = example
    base, moved = _shift(labels, k, axis)
    spacing_zyx = spacing[::-1]
    result = _by_name(compare_structures({"original": base, "denoised": moved}, {}, spacing, NAMES))
    step = k * spacing_zyx[axis]
    for name in ("liver", "spleen", "kidney_left", "aorta", "vertebrae_L1"):
        mask = base == ID[name]
        # Overlap of a mask with its shifted self, counted by slicing (no roll).
        lead = [slice(None)] * 3
        trail = [slice(None)] * 3
        lead[axis], trail[axis] = slice(k, None), slice(None, -k)
        expected_dice = 2 * np.count_nonzero(mask[tuple(lead)] & mask[tuple(trail)]) / (2 * mask.sum())
        p = result[name]["pairs"]["denoised_vs_original"]
        assert p["dice"] == pytest.approx(expected_dice, abs=1e-12), name
        assert p["hd95_mm"] == pytest.approx(step), name
        assert p["volume_change_pct"] == 0.0
        # Every edge point is at most one shift from the other surface: NSD is 1 at that tolerance.
        assert overlap_metrics(moved == ID[name], mask, spacing_zyx, [step])[f"nsd_{step:g}mm"] == 1.0
    # A 3 mm shift is past 2 mm: the big structures are flagged.
    if step > 2.0:
        assert result["liver"]["verdict"] in ("check", "changed")


def test_eroded_copy_has_the_known_volume_change(example):
    labels, hu, spacing = example
    liver = labels == ID["liver"]
    eroded = ndimage.binary_erosion(liver)
    smaller = labels.copy()
    smaller[liver & ~eroded] = 0
    result = _by_name(
        compare_structures({"original": labels, "denoised": smaller}, {"original": hu, "denoised": hu}, spacing, NAMES)
    )
    p = result["liver"]["pairs"]["denoised_vs_original"]
    assert p["volume_change_pct"] == pytest.approx(100.0 * (eroded.sum() - liver.sum()) / liver.sum())
    assert p["dice"] == pytest.approx(2 * eroded.sum() / (eroded.sum() + liver.sum()))
    assert 0 < p["hd95_mm"] <= max(spacing) + 1e-9  # one voxel layer removed
    assert p["hu_shift"] == 0.0  # same image, measured where both masks agree
    assert result["liver"]["images"]["denoised"]["volume_ml"] == pytest.approx(eroded.sum() * np.prod(spacing) / 1000)
    assert result["liver"]["verdict"] in ("check", "changed")
    assert any(r.startswith("volume") for r in result["liver"]["reasons"])
    assert result["spleen"]["verdict"] == "kept"


def _scipy_surface_distances(a, b, spacing_zyx):
    """Independent surface distances: scipy's Euclidean distance transform over the whole volume."""

    def edges(m):
        return m & ~ndimage.binary_erosion(m, border_value=0)

    ea, eb = edges(a), edges(b)
    return (
        ndimage.distance_transform_edt(~eb, sampling=spacing_zyx)[ea],
        ndimage.distance_transform_edt(~ea, sampling=spacing_zyx)[eb],
    )


def test_surface_figures_agree_with_scipy_distance_transform_and_monai(sample_labels, sample_volume):
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    spacing_zyx = sample_volume.spacing_mm[::-1]  # anisotropic: 2 x 0.977 x 0.977 mm
    # The part of the sample that holds these structures (keeps the whole-volume transforms quick).
    keep = np.isin(sample_labels, [ID["liver"], ID["spleen"], ID["aorta"]])
    rows, cols = np.flatnonzero(keep.any(axis=(0, 2))), np.flatnonzero(keep.any(axis=(0, 1)))
    sample_labels = sample_labels[:, rows[0] - 8 : rows[-1] + 8, cols[0] - 8 : cols[-1] + 8]
    # A perturbed copy: dilated, eroded and shifted structures, as a denoiser might leave them.
    other = sample_labels.copy()
    liver = sample_labels == ID["liver"]
    other[ndimage.binary_dilation(liver, iterations=2) & (sample_labels == 0)] = ID["liver"]
    spleen = sample_labels == ID["spleen"]
    other[spleen & ~ndimage.binary_erosion(spleen, iterations=2)] = 0
    other[np.roll(sample_labels == ID["aorta"], 3, axis=2)] = ID["aorta"]
    for name in ("liver", "spleen", "aorta"):
        a, b = other == ID[name], sample_labels == ID[name]
        ours = overlap_metrics(a, b, spacing_zyx, [1.0, 2.0])
        d_ab, d_ba = _scipy_surface_distances(a, b, spacing_zyx)
        hd95 = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
        assert ours["hd95_mm"] == pytest.approx(hd95, abs=1e-6), name
        ta, tb = torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]
        monai_hd = compute_hausdorff_distance(ta, tb, include_background=True, percentile=95, spacing=spacing_zyx)
        assert ours["hd95_mm"] == pytest.approx(float(monai_hd), abs=1e-4), name
        for tolerance in (1.0, 2.0):
            nsd = (np.sum(d_ab <= tolerance) + np.sum(d_ba <= tolerance)) / (len(d_ab) + len(d_ba))
            assert ours[f"nsd_{tolerance:g}mm"] == pytest.approx(nsd, abs=1e-12), name
            monai_nsd = compute_surface_dice(ta, tb, [tolerance], include_background=True, spacing=spacing_zyx)
            assert ours[f"nsd_{tolerance:g}mm"] == pytest.approx(float(monai_nsd), abs=1e-6), name
        assert ours["dice"] < 1.0 and ours["hd95_mm"] > 1.0, name


def test_hu_shift_and_noise_drive_the_verdict(example):
    labels, hu, spacing = example
    both = {"original": labels, "denoised": labels}
    body = labels > 0

    def verdicts(denoised_hu):
        result = compare_structures(both, {"original": hu, "denoised": denoised_hu}, spacing, NAMES)
        return _by_name(result), result["study"]

    shifted, study = verdicts(np.where(body, hu + 15.0, hu))
    assert shifted["liver"]["pairs"]["denoised_vs_original"]["hu_shift"] == pytest.approx(15.0, abs=1e-3)
    assert shifted["liver"]["verdict"] == "check" and "mean HU shift +15.0" in shifted["liver"]["reasons"][0]
    assert study["verdict"] == "check"
    shifted, study = verdicts(np.where(body, hu - 30.0, hu))
    assert shifted["liver"]["verdict"] == "changed" and study["verdict"] == "changed"

    rng = np.random.default_rng(1)
    noisier, _ = verdicts(hu + rng.normal(0, 40, hu.shape).astype(np.float32))
    liver = noisier["liver"]
    assert liver["pairs"]["denoised_vs_original"]["hu_std_ratio"] > 1.1
    assert liver["verdict"] == "check" and any("noise up" in r for r in liver["reasons"])
    # A perfect denoiser: low-dose = CT + noise, denoised = the CT. Noise down, mean kept.
    low = hu + rng.normal(0, 30, hu.shape).astype(np.float32)
    result = compare_structures(both, {"original": low, "denoised": hu}, spacing, NAMES)
    liver = _by_name(result)["liver"]
    assert liver["images"]["denoised"]["hu_std"] < 0.8 * liver["images"]["original"]["hu_std"]
    assert abs(liver["pairs"]["denoised_vs_original"]["hu_shift"]) < 2.0
    assert liver["verdict"] == "kept" and result["study"]["verdict"] == "kept"


def test_structure_found_in_one_scan_only_is_flagged_and_small_ones_are_judged_gently(example):
    labels, _, spacing = example
    missing = labels.copy()
    missing[labels == ID["gallbladder"]] = 0
    tiny = np.zeros_like(labels)
    tiny[10, 50, 60:63] = ID["adrenal_gland_left"]  # 3 voxels = 0.08 ml
    moved_tiny = np.roll(tiny, 2, axis=2)
    result = _by_name(
        compare_structures(
            {
                "original": np.maximum(labels * (labels != ID["adrenal_gland_left"]), tiny),
                "denoised": np.maximum(missing * (missing != ID["adrenal_gland_left"]), moved_tiny),
            },
            {},
            spacing,
            NAMES,
        )
    )
    gallbladder = result["gallbladder"]
    assert gallbladder["verdict"] == "changed"
    assert gallbladder["reasons"][0].startswith("found only in the original")
    p = gallbladder["pairs"]["denoised_vs_original"]
    assert p["dice"] == 0.0 and p["hd95_mm"] is None and p["nsd_2mm"] == 0.0
    adrenal = result["adrenal_gland_left"]
    assert adrenal["small"] and adrenal["pairs"]["denoised_vs_original"]["dice"] < 0.5
    assert adrenal["verdict"] == "check"  # a few voxels moved: look, but not "changed"


def test_reference_pairs_answer_whether_denoising_came_closer(example):
    labels, hu, spacing = example
    _, worse = _shift(labels, 2, 2)
    padded = np.pad(labels, [(0, 0), (0, 0), (2, 2)])
    hu_padded = np.pad(hu, [(0, 0), (0, 0), (2, 2)])
    result = compare_structures(
        {"original": padded, "denoised": worse, "reference": padded},
        {"original": hu_padded, "denoised": hu_padded, "reference": hu_padded},
        spacing,
        NAMES,
    )
    liver = _by_name(result)["liver"]
    assert liver["pairs"]["original_vs_reference"]["dice"] == 1.0
    assert liver["pairs"]["denoised_vs_reference"]["dice"] < 0.98
    assert liver["reference"]["verdict"] == "further"
    assert "liver" in result["study"]["reference"]["further"]
    assert result["study"]["reference"]["at_least_as_close"] is False
    # And the other way round: denoised back on the reference, low-dose off it.
    result = compare_structures({"original": worse, "denoised": padded, "reference": padded}, {}, spacing, NAMES)
    assert _by_name(result)["liver"]["reference"]["verdict"] == "closer"
    assert result["study"]["reference"]["at_least_as_close"] is True


def test_thresholds_are_configurable_and_checked(example):
    labels, _, spacing = example
    base, moved = _shift(labels, 1, 2)
    default = _by_name(compare_structures({"original": base, "denoised": moved}, {}, spacing, NAMES))
    lenient = FidelityThresholds(
        dice_kept=0.5,
        dice_changed=0.3,
        nsd_kept=0.0,
        nsd_changed=0.0,
        volume_change_kept_pct=50,
        volume_change_changed_pct=60,
    )
    relaxed = _by_name(compare_structures({"original": base, "denoised": moved}, {}, spacing, NAMES, lenient))
    assert default["liver"]["verdict"] != "kept" and relaxed["liver"]["verdict"] == "kept"
    assert FidelityThresholds(nsd_tolerance_mm=3.0).surface_tolerances_mm == (1.0, 2.0, 3.0)
    with pytest.raises(ValueError):
        FidelityThresholds(dice_kept=0.8, dice_changed=0.9)
    with pytest.raises(ValueError):
        FidelityThresholds(hu_shift_kept=20, hu_shift_changed=10)


def test_label_map_is_put_on_the_ct_grid(sample_volume, sample_labels, tmp_path):
    import SimpleITK as sitk

    # The sample's NIfTI stores rows in the other y order (RAS-style): moved exactly, not interpolated.
    raw, _ = _read(SAMPLE_SEG)
    assert np.array_equal(sample_labels, raw[:, ::-1, :])
    liver_x = np.nonzero(sample_labels == ID["liver"])[2].mean()
    spleen_x = np.nonzero(sample_labels == ID["spleen"])[2].mean()
    assert liver_x < spleen_x  # LPS: x grows to the patient's left; the liver is on the right

    # Written with the CT's geometry and read back: the same grid.
    path = save_label_map(sample_labels, sample_volume, tmp_path / "labels.nii.gz")
    again, how = load_label_map(path, sample_volume)
    assert how == "same grid" and np.array_equal(again, sample_labels)

    # A label map on a coarser grid of the same space is resampled onto the CT grid.
    coarse = sitk.ReadImage(str(path))[::2, ::2, :]
    sitk.WriteImage(coarse, str(tmp_path / "coarse.nii.gz"))
    resampled, how = load_label_map(tmp_path / "coarse.nii.gz", sample_volume)
    assert how == "resampled" and resampled.shape == sample_volume.shape
    dice = (
        2
        * np.sum((resampled == ID["liver"]) & (sample_labels == ID["liver"]))
        / (np.sum(resampled == ID["liver"]) + np.sum(sample_labels == ID["liver"]))
    )
    assert dice > 0.95

    # Elsewhere in space: refused, naming the file.
    far = CTVolume(
        np.zeros(sample_volume.shape, np.float32),
        sample_volume.spacing_mm,
        tuple(np.add(sample_volume.origin_mm, (0, 0, 5000))),
    )
    with pytest.raises(CTInputError, match="coarse.nii.gz: does not overlap"):
        load_label_map(tmp_path / "coarse.nii.gz", far)
    ct_like = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 5, 6), 0.5, np.float32)), str(ct_like))
    with pytest.raises(CTInputError, match="non-integer"):
        load_label_map(ct_like, far)
