"""The panel's Compare and Fidelity sections: a denoised volume beside its original (linked views, the
difference), and the fidelity check's table, structures and report.

``ResultsSection`` is mixed into LowDoseDenoiseWidget, whose ``setup`` connects these slots.
"""

import qt
import slicer
from LowDoseDenoiseLib import messages, results

from . import waitCursor


class ResultsSection:
    """Slots of the Compare and Fidelity sections; state on the widget: ``fidelityResult`` (the last check's
    FidelityResult, or None) and ``fidelitySegmentations`` (its structures: original's, denoised scan's)."""

    # -- compare

    def currentPair(self):
        """(original, denoised) of the volume chosen in Denoised volume; (None, None) without one."""
        denoised = self.ui.denoisedVolumeSelector.currentNode()
        return (None, None) if denoised is None else (self.logic.originalOf(denoised), denoised)

    def showPair(self, original, denoised):
        """Choose a denoised volume and show it beside its original (the difference unticked)."""
        self.ui.denoisedVolumeSelector.setCurrentNode(denoised)
        self.ui.differenceCheckBox.blockSignals(True)
        self.ui.differenceCheckBox.setChecked(False)
        self.ui.differenceCheckBox.blockSignals(False)
        self.logic.showSideBySide(original, denoised, linked=self.ui.linkViewsCheckBox.checked)

    def onSideBySide(self):
        original, denoised = self.currentPair()
        if original is None:
            slicer.util.errorDisplay(messages.ORIGINAL_REMOVED)
            return
        self.logic.showSideBySide(original, denoised, linked=self.ui.linkViewsCheckBox.checked)
        if self.ui.differenceCheckBox.checked:
            self.onDifferenceToggled(True)

    def onDifferenceToggled(self, show):
        original, denoised = self.currentPair()
        if original is None:
            return
        try:
            with waitCursor():
                self.logic.showDifference(original, denoised, show)
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            self.ui.differenceCheckBox.setChecked(False)

    def onLinkToggled(self, linked):
        self.logic.setLinked(linked)

    # -- fidelity

    def fillFidelityTable(self):
        """One row per structure (flagged ones first, coloured; the reasons in the tooltip)."""
        self.ui.fidelityTable.setRowCount(0)
        if self.fidelityResult is None:
            return
        rows = results.fidelity_rows(self.fidelityResult.report, flagged_only=self.ui.flaggedOnlyCheckBox.checked)
        self.ui.fidelityTable.setRowCount(len(rows))
        for r, row in enumerate(rows):
            colour = results.VERDICT_COLOURS.get(row["verdict"])
            for c, text in enumerate(results.fidelity_cells(row)):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, row["name"])
                if row["reasons"]:
                    item.setToolTip(row["reasons"])
                if colour is not None:
                    item.setBackground(qt.QBrush(qt.QColor(*colour)))
                self.ui.fidelityTable.setItem(r, c, item)
        self.ui.fidelityTable.resizeColumnsToContents()

    def onFidelityRowClicked(self, row, column):
        item = self.ui.fidelityTable.item(row, 0)
        if item is not None:
            self.logic.jumpToStructure(self.fidelitySegmentations, item.data(qt.Qt.UserRole))

    def onSegmentationDisplayChanged(self, *unused):
        if self.fidelityResult is not None:
            self.logic.showFidelitySegmentations(
                self.fidelitySegmentations,
                self.ui.showSegmentationsCheckBox.checked,
                self.fidelityResult.report,
                self.ui.flaggedOnlyCheckBox.checked,
            )

    def onFlaggedOnlyToggled(self, flaggedOnly):
        self.fillFidelityTable()
        self.onSegmentationDisplayChanged()

    def onOpenReport(self):
        if self.fidelityResult is not None and "html" in self.fidelityResult.files:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self.fidelityResult.files["html"])))
