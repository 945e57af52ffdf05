"""Where the files lowdose ships beside its code are: the model bundles, the sample CT and the MONAI Label app.

An installed wheel carries them inside the package, in ``lowdose/_shipped/`` (copied there by ``setup.py``);
a source checkout has them at the top of the repository (``models/``, ``sample/``, ``apps/lowdose``).
"""

from __future__ import annotations

from pathlib import Path

from .errors import LowdoseError

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_DIR = PACKAGE_DIR / "_shipped"
CHECKOUT_DIR = PACKAGE_DIR.parent
# lowdose's JSON schema of a bundle's configs/metadata.json (see lowdose/bundle_configs.py).
BUNDLE_SCHEMA = PACKAGE_DIR / "bundle_metadata_schema.json"


def shipped_path(relative: str) -> Path:
    """The shipped folder ``relative`` (``models``, ``sample`` or ``apps/lowdose``): the wheel's copy when lowdose
    is installed, else the source checkout's. When neither exists, the wheel's path (for the error message)."""
    packaged = PACKAGED_DIR / relative
    if packaged.exists():
        return packaged
    # Only a lowdose checkout: an installed lowdose's parent is site-packages, where a folder called models/
    # or sample/ would belong to some other distribution.
    if (CHECKOUT_DIR / "pyproject.toml").is_file() and (CHECKOUT_DIR / relative).exists():
        return CHECKOUT_DIR / relative
    return packaged


def sample_ct_path() -> Path:
    """The bundled sample CT (20-slice abdomen DICOM series, see sample/README.md)."""
    sample = shipped_path("sample") / "abdomen_ct_dicom"  # in the installed package, or the checkout's sample/
    if not sample.is_dir():
        raise LowdoseError(
            f"{sample}: the bundled sample CT is missing (a wheel built without it? lowdose's "
            "wheel and its source checkout both have it)"
        )
    return sample
