"""The volume nodes the module writes and reads: the input written to a temporary NRRD for the server, and each
denoised volume loaded beside its original with the record of how it was made, so it is found again.

``VolumeNodes`` is mixed into LowDoseDenoiseLogic, next to ``views.ComparisonViews`` (``copyWindowLevel``).
"""

import os
import shutil
import tempfile

import slicer
from LowDoseDenoiseLib import results
from LowDoseDenoiseLib.steps import steps_used

from . import ORIGINAL_ATTRIBUTE, ROLE_ATTRIBUTE, SUMMARY_ATTRIBUTE


class VolumeNodes:
    """The CT volumes sent to the server and the denoised volumes that come back."""

    def exportVolume(self, volumeNode):
        """Write the volume to a temporary NRRD (voxel values as they are, i.e. HU; geometry in the header)."""
        if (
            volumeNode is None
            or not volumeNode.IsA("vtkMRMLScalarVolumeNode")
            or volumeNode.IsA("vtkMRMLLabelMapVolumeNode")
        ):
            raise ValueError("choose a scalar CT volume (not a label map or a color image)")
        if volumeNode.GetImageData() is None:
            raise ValueError(f"{volumeNode.GetName()} holds no voxels")
        if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
            raise ValueError(f"{volumeNode.GetName()} is not a single-channel CT volume")
        folder = tempfile.mkdtemp(prefix="lowdose-slicer-export-")
        path = os.path.join(folder, "volume.nrrd")
        exportNode = getattr(slicer.util, "exportNode", None)
        if exportNode is not None:  # writes the file without re-pointing the node's storage at it
            exportNode(volumeNode, path, {"useCompression": 1}, world=True)
            ok = os.path.isfile(path)
        else:
            storage = volumeNode.GetStorageNode()
            previous = storage.GetFileName() if storage is not None else None
            ok = slicer.util.saveNode(volumeNode, path, {"useCompression": 1})
            if storage is not None and previous:
                storage.SetFileName(previous)
        if not ok:
            shutil.rmtree(folder, ignore_errors=True)
            raise ValueError(f"could not write {volumeNode.GetName()} to a temporary file")
        return path, folder

    def loadDenoised(self, original, result, model, strength="medium", steps=None, ensemble=1):
        """Load a DenoiseResult as a scalar volume (HU) named after the input, the model, the strength, a
        diffusion model's sampling steps and a self-ensemble larger than 1."""
        try:
            return self.loadDenoisedFile(original, str(result.path), model, result.summary, strength, steps, ensemble)
        finally:
            shutil.rmtree(str(result.folder), ignore_errors=True)

    def loadDenoisedFile(self, original, path, model, summary, strength="medium", steps=None, ensemble=1):
        """Load a denoised CT file beside ``original``, with the record of how it was made (the server's summary;
        ``strength``, ``steps`` and ``ensemble``, those asked for (None steps: the model's own), when the summary
        does not say)."""
        used = steps_used(steps, model.sampling_steps)
        record = results.denoised_record(model.model, model.task, summary, strength, used, ensemble)
        strength, steps = results.record_strength(record), results.record_steps(record)
        ensemble = results.record_ensemble(record)
        name = results.denoised_volume_name(original.GetName(), model.model, strength, steps, ensemble)
        name = slicer.mrmlScene.GenerateUniqueName(name)
        node = slicer.util.loadVolume(path, {"name": name, "labelmap": False, "show": False, "singleFile": True})
        node.SetAttribute(ROLE_ATTRIBUTE, "denoised")
        node.SetAttribute(ORIGINAL_ATTRIBUTE, original.GetID())
        node.SetAttribute(SUMMARY_ATTRIBUTE, record)
        if original.GetParentTransformNode() is not None and getattr(slicer.util, "exportNode", None) is None:
            node.SetAndObserveTransformNodeID(original.GetTransformNodeID())  # the export ignored the transform
        storage = node.GetStorageNode()
        if storage is not None:
            storage.SetFileName("")  # the temporary file is gone; saving the scene writes a new one
        self.copyWindowLevel(original, node)
        return node

    def denoisedFor(self, original, model, dose, strength="medium", steps=None, ensemble=1):
        """The most recent denoised volume of ``original`` made with ``model`` at ``dose`` and ``strength`` in
        ``steps`` sampling steps (None: the model's own) with the self-ensemble ``ensemble``; None when there is
        none."""
        steps = steps_used(steps, model.sampling_steps)
        made = [
            node
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            if node.GetAttribute(ROLE_ATTRIBUTE) == "denoised"
            and node.GetAttribute(ORIGINAL_ATTRIBUTE) == original.GetID()
            and results.made_with(
                node.GetAttribute(SUMMARY_ATTRIBUTE), model.model, dose, strength, steps, ensemble, model.version
            )
        ]
        return made[-1] if made else None

    def fidelityDenoised(self, original, result, model, dose, strength="medium", steps=None, ensemble=1):
        """The denoised volume to show after a fidelity check: one made before with this model, dose, strength,
        sampling steps and self-ensemble, else the check's own denoised scan (loaded), else None."""
        denoised = self.denoisedFor(original, model, dose, strength, steps, ensemble)
        if denoised is None and "denoised" in result.files:
            summary = result.report.get("denoising", {})
            path = str(result.files["denoised"])
            denoised = self.loadDenoisedFile(original, path, model, summary, strength, steps, ensemble)
        return denoised

    def originalOf(self, node):
        """The original volume a denoised or difference volume was made from (None when it left the scene)."""
        return slicer.mrmlScene.GetNodeByID(node.GetAttribute(ORIGINAL_ATTRIBUTE) or "")
