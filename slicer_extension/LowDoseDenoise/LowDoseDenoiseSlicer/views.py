"""Original and denoised side by side: the layout, linked views, one window/level, and the difference volume.

``ComparisonViews`` is mixed into LowDoseDenoiseLogic; call ``ComparisonViews.__init__(self)`` from the
logic's ``__init__``.
"""

import numpy as np
import slicer
import vtk

from . import DENOISED_ATTRIBUTE, ORIGINAL_ATTRIBUTE, ROLE_ATTRIBUTE

DIFFERENCE_WINDOW_HU = 200.0  # original - denoised, shown as +-100 HU


def sameGrid(a, b, tolerance=1e-3):
    """Whether two volumes have the same IJK-to-RAS matrix (voxel grid), to ``tolerance``."""
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(ma)
    b.GetIJKToRASMatrix(mb)
    return all(abs(ma.GetElement(i, j) - mb.GetElement(i, j)) <= tolerance for i in range(4) for j in range(4))


class ComparisonViews:
    """The Red (left) and Yellow (right) slice views showing an original and its denoised volume."""

    def __init__(self):
        self.windowLevelObservers = []  # (display node, observer tag)
        self.syncingWindowLevel = False

    def sliceViews(self):
        """The (Red, Yellow) slice widgets; (None, None) without a main window (e.g. --no-main-window)."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return None, None
        return layoutManager.sliceWidget("Red"), layoutManager.sliceWidget("Yellow")

    def showSideBySide(self, original, denoised, linked=True):
        """Original (left, Red) | denoised (right, Yellow), same orientation, linked, same window/level."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        slicer.app.processEvents()
        red, yellow = self.sliceViews()
        # Unlink while the volumes are set, or a linked view would copy its volume to the other.
        self.setLinked(False)
        yellow.mrmlSliceNode().SetOrientation(red.mrmlSliceNode().GetOrientation())
        for widget, volume in ((red, original), (yellow, denoised)):
            composite = widget.sliceLogic().GetSliceCompositeNode()
            composite.SetBackgroundVolumeID(volume.GetID())
            composite.SetForegroundVolumeID(None)
            composite.SetLabelVolumeID(None)
            widget.sliceLogic().FitSliceToAll()
        yellow.mrmlSliceNode().SetFieldOfView(*red.mrmlSliceNode().GetFieldOfView())
        yellow.sliceLogic().SetSliceOffset(red.sliceLogic().GetSliceOffset())
        self.copyWindowLevel(original, denoised)
        self.observeWindowLevel(original, denoised)
        self.setLinked(linked)

    def setLinked(self, linked):
        """Link (or unlink) the slice views: scrolling, panning and zoom in one follow in the other."""
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetLinkedControl(bool(linked))
            composite.SetHotLinkedControl(bool(linked))

    def copyWindowLevel(self, source, target):
        """Give ``target`` the window/level and colour table of ``source``."""
        src, dst = source.GetDisplayNode(), target.GetDisplayNode()
        if src is None:
            source.CreateDefaultDisplayNodes()
            src = source.GetDisplayNode()
        if dst is None:
            target.CreateDefaultDisplayNodes()
            dst = target.GetDisplayNode()
        if src is None or dst is None:
            return
        wasModifying = dst.StartModify()
        dst.SetAutoWindowLevel(False)
        dst.SetWindowLevel(src.GetWindow(), src.GetLevel())
        if src.GetColorNodeID():
            dst.SetAndObserveColorNodeID(src.GetColorNodeID())
        dst.EndModify(wasModifying)

    def observeWindowLevel(self, original, denoised):
        """Keep the window/level of the two volumes equal, whichever view the user adjusts."""
        self.removeWindowLevelObservers()
        a, b = original.GetDisplayNode(), denoised.GetDisplayNode()
        if a is None or b is None:
            return
        for source, target in ((a, b), (b, a)):
            tag = source.AddObserver(vtk.vtkCommand.ModifiedEvent, self._followWindowLevel(source, target))
            self.windowLevelObservers.append((source, tag))

    def _followWindowLevel(self, source, target):
        def callback(caller, event):
            if self.syncingWindowLevel:  # the change this callback made itself
                return
            if (source.GetWindow(), source.GetLevel()) == (target.GetWindow(), target.GetLevel()):
                return
            self.syncingWindowLevel = True
            try:
                target.SetAutoWindowLevel(False)
                target.SetWindowLevel(source.GetWindow(), source.GetLevel())
            finally:
                self.syncingWindowLevel = False

        return callback

    def removeWindowLevelObservers(self):
        for node, tag in self.windowLevelObservers:
            node.RemoveObserver(tag)
        self.windowLevelObservers = []

    def differenceVolume(self, original, denoised):
        """original - denoised in HU on the same grid (computed once per pair, kept in the scene)."""
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if (
                node.GetAttribute(ROLE_ATTRIBUTE) == "difference"
                and node.GetAttribute(DENOISED_ATTRIBUTE) == denoised.GetID()
            ):
                return node
        a, b = slicer.util.arrayFromVolume(original), slicer.util.arrayFromVolume(denoised)
        if a.shape != b.shape or not sameGrid(original, denoised):
            raise ValueError("the denoised volume is not on the original's voxel grid; no difference can be shown")
        if original.GetParentTransformNode() is not None or denoised.GetParentTransformNode() is not None:
            if original.GetTransformNodeID() != denoised.GetTransformNodeID():
                raise ValueError("the two volumes are under different transforms; no difference can be shown")
        name = slicer.mrmlScene.GenerateUniqueName(f"{denoised.GetName()}_difference")
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.CopyOrientation(original)
        slicer.util.updateVolumeFromArray(node, (a.astype(np.float32) - b.astype(np.float32)))
        node.SetAndObserveTransformNodeID(denoised.GetTransformNodeID())
        node.SetAttribute(ROLE_ATTRIBUTE, "difference")
        node.SetAttribute(ORIGINAL_ATTRIBUTE, original.GetID())
        node.SetAttribute(DENOISED_ATTRIBUTE, denoised.GetID())
        self._showAsDifference(node)
        return node

    def _showAsDifference(self, node):
        """Window 200 HU centred on 0, in a diverging colour table when Slicer has it."""
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(DIFFERENCE_WINDOW_HU, 0.0)
        diverging = slicer.mrmlScene.GetFirstNodeByName("DivergingBlueRed")
        if diverging is not None:
            display.SetAndObserveColorNodeID(diverging.GetID())

    def showDifference(self, original, denoised, show):
        """Right view: original - denoised when ``show``, else the denoised volume again."""
        red, yellow = self.sliceViews()
        volume = self.differenceVolume(original, denoised) if show else denoised
        if yellow is None:
            return volume
        composite = yellow.sliceLogic().GetSliceCompositeNode()
        linked = composite.GetLinkedControl()
        self.setLinked(False)
        composite.SetBackgroundVolumeID(volume.GetID())
        self.setLinked(linked)
        return volume
