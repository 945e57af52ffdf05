"""Packaging hook: the wheel carries the shipped model bundles, the sample CT (with its licence) and the MONAI Label
app in ``lowdose/_shipped/``, where ``lowdose.resources`` finds them, so an installed lowdose needs no checkout.

Everything else about the package is declared in pyproject.toml. In a checkout (and an editable install) lowdose
reads these folders where they are; only a built wheel gets the copies.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# repository folder -> folder under lowdose/_shipped/, and what of it stays out of the wheel
SHIPPED = {
    "models": ("models", shutil.ignore_patterns("__pycache__", "*.pyc")),
    "sample": ("sample", shutil.ignore_patterns("__pycache__", "*.pyc")),
    # MONAI Label writes logs/, model/ and bin/ into the app folder when a server starts
    "apps/lowdose": (
        "apps/lowdose",
        shutil.ignore_patterns("__pycache__", "*.pyc", ".gitignore", "logs", "model", "bin"),
    ),
}


class BuildPyWithShippedFiles(build_py):
    """``build_py`` that also copies the shipped folders into the built package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads them from the checkout
            return
        for source, (target, ignore) in SHIPPED.items():
            destination = Path(self.build_lib) / "lowdose" / "_shipped" / target
            if destination.exists():
                shutil.rmtree(destination)  # a stale copy from an earlier build in the same build folder
            shutil.copytree(ROOT / source, destination, ignore=ignore)


setup(cmdclass={"build_py": BuildPyWithShippedFiles})
