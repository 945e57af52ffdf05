"""lowdose: low-dose CT denoising that proves, structure by structure, that it kept the anatomy.

The data's road, one public function per step::

    from lowdose import check_fidelity, denoise, load_ct, save_ct, simulate_low_dose

    normal = load_ct("ct.nii.gz")                       # CTVolume: HU with its geometry
    low = simulate_low_dose(normal, 0.25, seed=0)       # a quarter-dose scan of it
    result = denoise(low)                               # DenoiseResult: volume, dose used, model, timings
    save_ct(result.volume, "denoised/", description=result.description)
    report = check_fidelity(low, result.volume, out_dir="fidelity")   # FidelityReport
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import CTInputError, CTOutputError, LowdoseError
from .resources import sample_ct_path
from .volume import CTVolume

if TYPE_CHECKING:
    from .denoise import DenoiseResult, denoise
    from .fidelity import FidelityReport, check_fidelity
    from .io import load_ct, save_ct
    from .simulate import simulate_low_dose

# Public names -> the module that defines them, imported on first use: the readers (SimpleITK, pydicom), torch
# and the fidelity check take seconds to import, which `import lowdose.<module>` should not pay for.
_LAZY = {
    "load_ct": "io",
    "save_ct": "io",
    "simulate_low_dose": "simulate",
    "denoise": "denoise",
    "DenoiseResult": "denoise",
    "check_fidelity": "fidelity",
    "FidelityReport": "fidelity",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CTInputError",
    "CTOutputError",
    "CTVolume",
    "DenoiseResult",
    "FidelityReport",
    "LowdoseError",
    "__version__",
    "check_fidelity",
    "denoise",
    "load_ct",
    "sample_ct_path",
    "save_ct",
    "simulate_low_dose",
]
