"""A crafted checkpoint: a pickle that runs code when it is unpickled (here it only creates a marker file).

This is what a malicious ``.pt``/``.pth`` handed to lowdose could do with any code at all; the tests check
that lowdose refuses such files and that the marker never appears, and, as a control, that a plain
``torch.load(weights_only=False)`` of the same file does create it.
"""

from __future__ import annotations

from pathlib import Path


class CreatesMarkerWhenUnpickled:
    """Unpickling calls ``open(marker, "w")``: the file appears if and only if the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_crafted_checkpoint(path: Path, marker: Path, contents: dict | None = None, key: str = "history") -> Path:
    """``contents`` (e.g. a real checkpoint's) with ``key`` replaced by the payload, saved with torch.save."""
    import torch

    torch.save({**(contents or {}), key: CreatesMarkerWhenUnpickled(marker)}, path)
    return path


def unsafe_load_runs_the_payload(path: Path, marker: Path) -> bool:
    """The control: whether torch.load with weights_only=False (what lowdose did before) creates ``marker``."""
    import torch

    assert not marker.exists()
    torch.load(path, map_location="cpu", weights_only=False)
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran
