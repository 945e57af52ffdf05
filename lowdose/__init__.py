"""lowdose: low-dose CT denoising that proves, structure by structure, that it kept the anatomy.

The public functions are importable from here: ``load_ct``, ``save_ct``, ``simulate_low_dose``,
``denoise`` and ``check_fidelity``.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CTInputError, CTOutputError, LowdoseError
from .io import load_ct, save_ct
from .volume import CTVolume

__version__ = "0.1.0"

_SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "abdomen_ct_dicom"


def sample_ct_path() -> Path:
    """The bundled sample CT (20-slice abdomen DICOM series, see sample/README.md)."""
    if not _SAMPLE.is_dir():
        raise LowdoseError(f"{_SAMPLE}: the bundled sample CT is missing (run lowdose from its repository)")
    return _SAMPLE


def simulate_low_dose(volume, dose_fraction, seed=None, **kwargs):
    """See ``lowdose.simulate.simulate_low_dose`` (imported lazily: it loads torch)."""
    from .simulate import simulate_low_dose as _simulate

    return _simulate(volume, dose_fraction, seed=seed, **kwargs)


def denoise(volume, model="dose_unet", dose="auto", device="auto", progress=False):
    """See ``lowdose.denoise.denoise`` (imported lazily: it loads torch)."""
    from .denoise import denoise as _denoise

    return _denoise(volume, model=model, dose=dose, device=device, progress=progress)


def check_fidelity(original, denoised, reference=None, out_dir=None, **kwargs):
    """See ``lowdose.fidelity.check_fidelity`` (imported lazily: it loads TotalSegmentator)."""
    from .fidelity import check_fidelity as _check

    return _check(original, denoised, reference=reference, out_dir=out_dir, **kwargs)


__all__ = ["CTVolume", "CTInputError", "CTOutputError", "LowdoseError", "load_ct", "save_ct",
           "simulate_low_dose", "denoise", "check_fidelity", "sample_ct_path"]
