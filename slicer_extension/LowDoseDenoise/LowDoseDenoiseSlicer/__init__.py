"""The parts of the LowDoseDenoise module that need Slicer, beyond its four classes in LowDoseDenoise.py.

The widget's sections (``server_section``, ``request_section``, ``results_section``) are mixed into
LowDoseDenoiseWidget; the logic's parts (``volumes``: volume nodes sent and loaded; ``views``: original and
denoised side by side; ``structures``: the fidelity check's segmentations) into LowDoseDenoiseLogic. What needs
no Slicer is in LowDoseDenoiseLib.
"""

import contextlib

import qt
import slicer

# Attributes the module sets on the nodes it makes, so that it finds them again in the scene.
ROLE_ATTRIBUTE = "LowDoseDenoise.Role"  # "denoised", "difference", "structures"
ORIGINAL_ATTRIBUTE = "LowDoseDenoise.OriginalVolumeID"
DENOISED_ATTRIBUTE = "LowDoseDenoise.DenoisedVolumeID"
SUMMARY_ATTRIBUTE = "LowDoseDenoise.Summary"  # the record of a denoised volume (LowDoseDenoiseLib.results)


@contextlib.contextmanager
def waitCursor():
    """Show the wait cursor while a block runs (works on every Slicer 5 version)."""
    slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
    try:
        yield
    finally:
        slicer.app.restoreOverrideCursor()
