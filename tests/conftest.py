"""Shared test fixtures: the real CT data (bundled sample and ../shared/data/ct)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DICOM = REPO / "sample" / "abdomen_ct_dicom"
SAMPLE_SEG = REPO / "sample" / "abdomen_ct_totalseg.nii.gz"
SHARED_CT = Path(os.environ.get("LOWDOSE_SHARED_CT", REPO.parent / "shared" / "data" / "ct"))


def shared(relative: str) -> Path:
    """A file of the shared CT collection; a missing one fails the test (never skips it)."""
    path = SHARED_CT / relative
    assert path.exists(), f"shared test data missing: {path} (CI clones ../shared beside the repo)"
    return path


@pytest.fixture(scope="session")
def sample_volume():
    from lowdose import load_ct

    return load_ct(SAMPLE_DICOM)
