"""The denoising strength (lowdose.strength): low, medium and high blend the network's noise removal into the
scan, keeping the rest of the scan's own noise; the shipped model on a crop of the real sample."""

from __future__ import annotations

import numpy as np
import pytest

from lowdose.strength import STRENGTHS, parse_strength, strength_label


def test_strength_words_and_numbers():
    assert [parse_strength(w) for w in ("low", "Medium", " HIGH ")] == [0.4, 0.7, 1.0]
    assert parse_strength("0.55") == 0.55 and parse_strength(0) == 0.0 and parse_strength(1) == 1.0
    for bad in ("max", 1.5, -0.1, None, True, "nan"):
        with pytest.raises(ValueError, match="strength"):
            parse_strength(bad)
    assert [strength_label(v) for v in STRENGTHS.values()] == ["low", "medium", "high"]
    assert strength_label(0.55) == "0.55"


def test_each_level_keeps_its_share_of_the_scans_own_noise(sample_volume):
    """medium = input + 0.7 (full - input) voxel for voxel; padding untouched; more strength, less noise."""
    from lowdose.denoise import Denoiser
    from lowdose.metrics import soft_tissue_mask
    from lowdose.simulate import simulate_low_dose

    crop = sample_volume.slices(8, 11)
    low = simulate_low_dose(crop, 0.25, seed=3)
    denoiser = Denoiser("dose_unet", device="cpu")
    results = {name: denoiser(low, dose=0.25, strength=name) for name in ("low", "medium", "high")}
    assert np.array_equal(results["high"].volume.hu, denoiser(low, dose=0.25).volume.hu)  # the library default
    full = results["high"].volume.hu
    for name, result in results.items():
        expected = low.hu + np.float32(STRENGTHS[name]) * (full - low.hu)
        fov = low.field_of_view_mask()
        np.testing.assert_allclose(result.volume.hu[fov], expected[fov], atol=1e-3)
        assert result.strength == STRENGTHS[name]
        assert result.description.endswith(")") and (name == "high") != ("strength " + name in result.description)
    tissue = soft_tissue_mask(crop.hu) & low.field_of_view_mask()
    noise = {name: float(np.std((r.volume.hu - crop.hu)[tissue])) for name, r in results.items()}
    assert noise["high"] < noise["medium"] < noise["low"] < float(np.std((low.hu - crop.hu)[tissue]))
