"""The fidelity check's structures in Slicer: its two label maps as segmentations named by structure, drawn on
the two slice views (the original's on the left, the denoised scan's on the right).

``FidelityStructures`` is mixed into LowDoseDenoiseLogic, next to ``views.ComparisonViews`` (``sliceViews``).
"""

import os

import slicer
from LowDoseDenoiseLib import results

from . import ORIGINAL_ATTRIBUTE, ROLE_ATTRIBUTE

_LOADED_FILES = ("labels_original", "labels_denoised", "denoised")  # removed once in the scene


class FidelityStructures:
    """Segmentations of the structures TotalSegmentator found in the original and in the denoised scan."""

    def loadFidelitySegmentations(self, original, denoised, result):
        """The label maps of the fidelity check as two segmentations named by structure; (original, denoised)."""
        colorNode = self.structureColors(results.fidelity_label_names(result.report))
        model = result.report.get("denoising", {}).get("model", "?")
        try:
            return tuple(
                self._labelsToSegmentation(original, reference, str(result.files[key]), title, colorNode)
                for key, reference, title in (
                    ("labels_original", original, "structures (original)"),
                    ("labels_denoised", denoised or original, f"structures (denoised {model})"),
                )
            )
        finally:
            slicer.mrmlScene.RemoveNode(colorNode)
            if result.folder is not None:
                for key in _LOADED_FILES:
                    path = result.files.get(key)
                    if path is not None and os.path.exists(str(path)):
                        os.remove(str(path))  # loaded; the HTML report stays until Slicer exits

    def _labelsToSegmentation(self, original, reference, path, title, colorNode):
        label = slicer.util.loadLabelVolume(path, {"show": False})
        label.GetDisplayNode().SetAndObserveColorNodeID(colorNode.GetID())
        segmentation = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(f"{original.GetName()} {title}")
        )
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(label, segmentation)
        slicer.mrmlScene.RemoveNode(label)
        segmentation.SetAttribute(ROLE_ATTRIBUTE, "structures")
        segmentation.SetAttribute(ORIGINAL_ATTRIBUTE, original.GetID())
        segmentation.CreateDefaultDisplayNodes()
        return segmentation

    def structureColors(self, names):
        """A colour table naming each label value after its structure (colours of GenericAnatomyColors)."""
        colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "LowDoseDenoise structures")
        colorNode.SetTypeToUser()
        colorNode.SetHideFromEditors(True)
        tableNames = results.colour_table_names(names)
        colorNode.SetNumberOfColors(len(tableNames))
        lookup = slicer.mrmlScene.GetFirstNodeByName("GenericAnatomyColors")
        for value, name in enumerate(tableNames):
            rgba = [0.0, 0.0, 0.0, 0.0]
            if value and lookup is not None:
                lookup.GetColor(value % max(lookup.GetNumberOfColors(), 1), rgba)
            elif value:
                rgba[:3] = results.structure_colour(value)
            colorNode.SetColor(value, name, rgba[0], rgba[1], rgba[2], 1.0 if value else 0.0)
        return colorNode

    def showFidelitySegmentations(self, segmentations, show, report, flaggedOnly=False):
        """Original's structures on the left view, the denoised scan's on the right (outlines)."""
        flagged = results.flagged_structures(report)
        for segmentation, widget in zip(segmentations, self.sliceViews()):
            display = segmentation.GetDisplayNode()
            if display is None:
                continue
            display.SetVisibility(bool(show))
            display.SetVisibility3D(False)
            display.SetOpacity2DFill(0.15)
            if widget is not None:
                display.RemoveAllViewNodeIDs()
                display.AddViewNodeID(widget.mrmlSliceNode().GetID())
            seg = segmentation.GetSegmentation()
            for index in range(seg.GetNumberOfSegments()):
                segmentId = seg.GetNthSegmentID(index)
                name = seg.GetSegment(segmentId).GetName()
                display.SetSegmentVisibility(segmentId, not flaggedOnly or name in flagged)

    def hideSegmentations(self, segmentations):
        """Hide segmentations still in the scene (an earlier check's, when a new one arrives)."""
        for segmentation in segmentations:
            if segmentation.GetScene() is not None and segmentation.GetDisplayNode() is not None:
                segmentation.GetDisplayNode().SetVisibility(False)

    def jumpToStructure(self, segmentations, name):
        """Centre the (linked) views on a structure of the original's segmentation."""
        for segmentation in segmentations:
            segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
            if segmentId and hasattr(segmentation, "GetSegmentCenterRAS"):
                center = segmentation.GetSegmentCenterRAS(segmentId)
                slicer.modules.markups.logic().JumpSlicesToLocation(center[0], center[1], center[2], True)
                return True
        return False
