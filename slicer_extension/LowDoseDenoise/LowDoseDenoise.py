"""3D Slicer module of lowdose: denoise a low-dose CT on a lowdose server, compare it with the original side by
side, and run the anatomical fidelity check. The server client lives in LowDoseDenoiseLib (no Slicer import).
"""

import json
import logging
import os
import shutil
import tempfile
import time

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from LowDoseDenoiseLib.client import (DOSE_CHOICES, FIDELITY_COLUMNS, AuthenticationError, Cancelled,
                                      ConsentRequired, ConsentStore, JsonConsentStore, LowDoseClient,
                                      LowDoseClientError, ModelInfo, ServerUnreachable, Timeouts, TokenStore,
                                      fidelity_label_names, fidelity_rows, parse_dose, server_key)
from LowDoseDenoiseLib.jobs import BackgroundJob

SETTINGS_GROUP = "LowDoseDenoise"
DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
MAX_URL_HISTORY = 10
POLL_MS = 100
DIFFERENCE_WINDOW_HU = 200.0  # original - denoised, shown as +-100 HU

ROLE_ATTRIBUTE = "LowDoseDenoise.Role"  # "denoised", "difference", "structures"
ORIGINAL_ATTRIBUTE = "LowDoseDenoise.OriginalVolumeID"
DENOISED_ATTRIBUTE = "LowDoseDenoise.DenoisedVolumeID"
SUMMARY_ATTRIBUTE = "LowDoseDenoise.Summary"


#
# Module
#


class LowDoseDenoise(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Low-dose CT Denoise"
        self.parent.categories = ["Filtering.Denoising"]
        self.parent.dependencies = []
        self.parent.contributors = ["lowdose"]
        self.parent.helpText = (
            "Denoise a low-dose CT volume with a lowdose server (MONAI Label app), compare original and "
            "denoised side by side with linked views, and check structure by structure that the anatomy was kept. "
            "The volume is sent to the server only after you allow it for that server.")
        self.parent.acknowledgementText = (
            "lowdose: low-dose CT denoising with an anatomical fidelity check (TotalSegmentator structures).")


#
# Settings (QSettings)
#


def _settings_value(key, default=None):
    value = qt.QSettings().value(f"{SETTINGS_GROUP}/{key}")
    return default if value is None or value == "" else value


def _set_settings_value(key, value):
    settings = qt.QSettings()
    settings.setValue(f"{SETTINGS_GROUP}/{key}", value)
    settings.sync()


def settingsTimeouts():
    """Time limits from the settings LowDoseDenoise/{Connect,Response,Idle}TimeoutSeconds (defaults otherwise)."""
    default = Timeouts()
    values = {}
    for field, key in (("connect", "ConnectTimeoutSeconds"), ("response", "ResponseTimeoutSeconds"),
                       ("idle", "IdleTimeoutSeconds")):
        try:
            values[field] = float(_settings_value(key, getattr(default, field)))
        except (TypeError, ValueError):
            values[field] = getattr(default, field)
    return Timeouts(**values)


class QSettingsConsentStore(ConsentStore):
    """The user's per-server permission to send volumes, kept in Slicer's settings (QSettings)."""

    KEY = "UploadConsent"

    def __init__(self):
        ConsentStore.__init__(self, lambda: _settings_value(self.KEY, None),
                              lambda text: _set_settings_value(self.KEY, text))


class QSettingsTokenStore(TokenStore):
    """Each server's access token, kept in Slicer's settings (QSettings) like the server addresses."""

    KEY = "ServerTokens"

    def __init__(self):
        TokenStore.__init__(self, lambda: _settings_value(self.KEY, None),
                            lambda text: _set_settings_value(self.KEY, text))


#
# Widget
#


class LowDoseDenoiseWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.info = None
        self.models = []
        self.job = None
        self.jobKind = None
        self.jobContext = {}
        self.fidelityResult = None
        self.fidelitySegmentations = ()
        self.timer = None
        self._savedTokenShown = ""  # the token field's text when it was filled from the settings

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LowDoseDenoise.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LowDoseDenoiseLogic()

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.onPoll)

        # Server
        history = _settings_value("ServerUrlHistory", "")
        urls = [u for u in str(history).split("\n") if u] or [DEFAULT_SERVER_URL]
        self.ui.serverUrlComboBox.clear()
        self.ui.serverUrlComboBox.addItems(urls)
        self.ui.serverUrlComboBox.setEditText(str(_settings_value("ServerUrl", urls[0])))
        self.ui.serverUrlComboBox.connect("currentTextChanged(QString)", self.onServerUrlEdited)
        self.ui.serverTokenLineEdit.connect("returnPressed()", self.onConnect)
        self.ui.connectButton.connect("clicked()", self.onConnect)
        self.ui.allowUploadCheckBox.connect("clicked(bool)", self.onAllowUploadClicked)

        # Denoise
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.doseComboBox.clear()
        for choice in DOSE_CHOICES:
            self.ui.doseComboBox.addItem(_dose_text(choice), choice)
        saved_dose = str(_settings_value("Dose", "auto"))
        index = self.ui.doseComboBox.findData(saved_dose)
        if index >= 0:
            self.ui.doseComboBox.setCurrentIndex(index)
        else:
            self.ui.doseComboBox.setEditText(saved_dose)
        self.ui.denoiseButton.connect("clicked()", self.onDenoise)
        self.ui.cancelButton.connect("clicked()", self.onCancel)

        # Compare
        self.ui.denoisedVolumeSelector.addAttribute("vtkMRMLScalarVolumeNode", ROLE_ATTRIBUTE, "denoised")
        self.ui.denoisedVolumeSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.denoisedVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.sideBySideButton.connect("clicked()", self.onSideBySide)
        self.ui.differenceCheckBox.connect("toggled(bool)", self.onDifferenceToggled)
        self.ui.linkViewsCheckBox.connect("toggled(bool)", self.onLinkToggled)

        # Fidelity
        self.ui.fidelityButton.connect("clicked()", self.onFidelity)
        self.ui.fidelityTable.setColumnCount(len(FIDELITY_COLUMNS))
        self.ui.fidelityTable.setHorizontalHeaderLabels(list(FIDELITY_COLUMNS))
        self.ui.fidelityTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.fidelityTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.fidelityTable.connect("cellClicked(int,int)", self.onFidelityRowClicked)
        self.ui.showSegmentationsCheckBox.connect("toggled(bool)", self.onSegmentationDisplayChanged)
        self.ui.flaggedOnlyCheckBox.connect("toggled(bool)", self.onFlaggedOnlyToggled)
        self.ui.openReportButton.connect("clicked()", self.onOpenReport)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        self.onServerUrlEdited(self.serverUrl())
        self.updateButtons()

    def cleanup(self):
        if self.job is not None:
            self.job.cancel()
        if self.timer is not None:
            self.timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.removeWindowLevelObservers()

    def onSceneStartClose(self, caller, event):
        if self.job is not None:
            self.job.cancel()  # its result would have nowhere to go
        self.logic.removeWindowLevelObservers()
        self.fidelityResult = None
        self.fidelitySegmentations = ()
        self.ui.fidelityTable.setRowCount(0)
        self.ui.fidelityVerdictLabel.setText("")

    # -- server

    def serverUrl(self):
        return self.ui.serverUrlComboBox.currentText.strip()

    def serverToken(self):
        return self.ui.serverTokenLineEdit.text.strip()

    def onServerUrlEdited(self, text):
        try:
            allowed = self.logic.consent.is_allowed(text.strip())
        except ValueError:
            allowed = False
        self.ui.allowUploadCheckBox.setChecked(allowed)
        self.showSavedToken(text.strip())
        if self.info is not None and getattr(self, "_connectedUrl", None) != text.strip():
            self.ui.serverStatusLabel.setText("Not connected: press Connect.")
        self.updateButtons()

    def showSavedToken(self, url):
        """Fill the token field with the token saved for this server; another server's saved token never stays
        in it (it would be sent to this one)."""
        try:
            saved = self.logic.tokens.get(url)
        except ValueError:  # not a server address (yet)
            saved = ""
        if saved or self.ui.serverTokenLineEdit.text == self._savedTokenShown:
            self.ui.serverTokenLineEdit.setText(saved)
            self._savedTokenShown = saved

    def onConnect(self):
        url, token = self.serverUrl(), self.serverToken()
        try:
            server_key(url)
            self.logic.tokens.set(url, token)  # remembered for this server only; an empty field forgets it
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._savedTokenShown = self.ui.serverTokenLineEdit.text
        self.ui.serverStatusLabel.setText("Connecting...")
        slicer.app.processEvents()
        try:
            with _WaitCursor():
                client = self.logic.client(url, token)
                info = client.info(timeout=30)
        except Exception as exc:
            self.info, self.models = None, []
            self.ui.serverStatusLabel.setText("Not connected: the server needs its access token (Server token)."
                                              if isinstance(exc, AuthenticationError) else "Not connected.")
            self.fillModels()
            self.showError("Could not connect to the lowdose server", exc)
            return
        self.info, self._connectedUrl = info, url
        self.models = client.models(info)
        self.rememberServerUrl(url)
        lowdose = info.get("lowdose", {})
        self.ui.serverStatusLabel.setText(
            f"Connected: lowdose {lowdose.get('version', '?')} on {lowdose.get('device', '?')}, "
            f"{len(self.models)} model(s){', fidelity check' if LowDoseClient.has_fidelity(info) else ''}.")
        self.fillModels()

    def rememberServerUrl(self, url):
        urls = [url] + [self.ui.serverUrlComboBox.itemText(i) for i in range(self.ui.serverUrlComboBox.count)
                        if self.ui.serverUrlComboBox.itemText(i) != url]
        urls = urls[:MAX_URL_HISTORY]
        _set_settings_value("ServerUrl", url)
        _set_settings_value("ServerUrlHistory", "\n".join(urls))
        self.ui.serverUrlComboBox.blockSignals(True)
        self.ui.serverUrlComboBox.clear()
        self.ui.serverUrlComboBox.addItems(urls)
        self.ui.serverUrlComboBox.setEditText(url)
        self.ui.serverUrlComboBox.blockSignals(False)

    def fillModels(self):
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for model in self.models:
            self.ui.modelComboBox.addItem(model.model + ("  (dose-aware)" if model.dose_aware else ""), model.task)
        saved = _settings_value("ModelTask", "")
        index = self.ui.modelComboBox.findData(saved)
        self.ui.modelComboBox.setCurrentIndex(index if index >= 0 else 0)
        self.ui.modelComboBox.blockSignals(False)
        self.onModelChanged(self.ui.modelComboBox.currentIndex)

    def currentModel(self):
        index = self.ui.modelComboBox.currentIndex
        return self.models[index] if 0 <= index < len(self.models) else None

    def onModelChanged(self, index):
        model = self.currentModel()
        if model is None:
            self.ui.modelInfoLabel.setText("")
        else:
            _set_settings_value("ModelTask", model.task)
            validation = model.validation or {}
            figure = (f" Validation PSNR (abdomen): {validation['val_psnr_abdomen']:.2f} dB."
                      if isinstance(validation.get("val_psnr_abdomen"), (int, float)) else "")
            self.ui.modelInfoLabel.setText(model.description + figure)
            self.ui.doseComboBox.setEnabled(model.dose_aware)
            self.ui.doseComboBox.setToolTip(
                "Dose of the scan as a fraction of a normal dose (auto: estimated from the image)." if model.dose_aware
                else "This model does not use the dose.")
        self.updateButtons()

    def onAllowUploadClicked(self, checked):
        url = self.serverUrl()
        try:
            if checked:
                if not self.askConsent(url):
                    self.ui.allowUploadCheckBox.setChecked(False)
            else:
                self.logic.consent.revoke(url)
        except ValueError as exc:
            self.ui.allowUploadCheckBox.setChecked(False)
            slicer.util.errorDisplay(str(exc))
        self.updateButtons()

    def askConsent(self, url):
        """Ask once per server; the answer "yes" is remembered (Slicer settings) until unticked."""
        key = server_key(url)
        local = key.split("://", 1)[1].split(":")[0] in ("127.0.0.1", "localhost", "[::1]")
        where = ("a server on this computer" if local else
                 "ANOTHER COMPUTER: make sure your institution allows sending patient images to it")
        text = (f"Allow sending CT volumes to {key}?\n\nThe volume's voxels and geometry are written to a file and "
                f"uploaded to {where}. No patient name or other DICOM header is sent. The server keeps no copy after "
                "answering (see its documentation).\n\nThis permission is remembered for this server until you "
                "untick 'Allow sending volumes to this server'.")
        if not slicer.util.confirmYesNoDisplay(text, windowTitle="Send volume to lowdose server?"):
            return False
        self.logic.consent.allow(url)
        self.ui.allowUploadCheckBox.setChecked(True)
        return True

    # -- denoise

    def selectedDoseText(self):
        """The chosen dose as the user means it: an item's value ("auto", "1/4") or what was typed."""
        index = self.ui.doseComboBox.currentIndex
        text = self.ui.doseComboBox.currentText
        if index >= 0 and self.ui.doseComboBox.itemText(index) == text:
            return str(self.ui.doseComboBox.itemData(index))
        return text.strip()

    def prepareRequest(self):
        """(volume, model, dose) when everything needed is there and sending is allowed, else None."""
        volume = self.ui.inputVolumeSelector.currentNode()
        model = self.currentModel()
        if volume is None or model is None:
            slicer.util.errorDisplay("Choose a CT volume and connect to a server first.")
            return None
        try:
            dose = parse_dose(self.selectedDoseText()) if model.dose_aware else "auto"
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return None
        url = self.serverUrl()
        if not self.logic.consent.is_allowed(url) and not self.askConsent(url):
            return None
        _set_settings_value("Dose", self.selectedDoseText() if model.dose_aware else _settings_value("Dose", "auto"))
        return volume, model, dose

    def onDenoise(self):
        request = self.prepareRequest()
        if request is None:
            return
        volume, model, dose = request
        self.startJob("denoise", lambda: self.logic.startDenoise(volume, self.serverUrl(), model, dose,
                                                                 token=self.serverToken()),
                      {"volumeID": volume.GetID(), "model": model, "dose": dose})

    def onFidelity(self):
        request = self.prepareRequest()
        if request is None:
            return
        volume, model, dose = request
        self.startJob("fidelity", lambda: self.logic.startFidelity(volume, self.serverUrl(), model, dose,
                                                                   token=self.serverToken()),
                      {"volumeID": volume.GetID(), "model": model, "dose": dose})

    def startJob(self, kind, start, context):
        if self.job is not None:
            return
        try:
            with _WaitCursor():
                self.job = start()
        except Exception as exc:
            self.showError(f"Could not start the {kind} request", exc)
            return
        self.jobKind, self.jobContext = kind, context
        self.ui.statusLabel.setText("Sending the volume..." if kind == "denoise" else
                                    "Sending the volume for the fidelity check (segmenting two scans takes minutes)...")
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.show()
        self.ui.cancelButton.show()
        self.ui.cancelButton.setEnabled(True)
        self.updateButtons()
        self.timer.start()

    def onCancel(self):
        if self.job is not None:
            self.job.cancel()
            self.ui.cancelButton.setEnabled(False)
            self.ui.statusLabel.setText("Cancelling...")

    def onPoll(self):
        job = self.job
        if job is None:
            self.timer.stop()
            return
        for report in job.poll():
            self.showProgress(report)
        if not job.done:
            return
        self.timer.stop()
        self.job = None
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        kind, context = self.jobKind, self.jobContext
        try:
            if isinstance(job.error, Cancelled):
                self.ui.statusLabel.setText("Cancelled (the server may finish its current step, and discards it).")
            elif job.error is not None:
                self.ui.statusLabel.setText(f"The {kind} request failed" + (
                    ": the server needs its access token (Server token)." if isinstance(job.error, AuthenticationError)
                    else "."))
                self.showError(f"The {kind} request failed", job.error)
            elif kind == "denoise":
                self.finishDenoise(job.result, context)
            else:
                self.finishFidelity(job.result, context)
        except Exception as exc:
            self.showError(f"Could not show the {kind} result", exc)
        finally:
            self.updateButtons()

    def showProgress(self, report):
        if report.stage == "waiting":
            self.ui.progressBar.setRange(0, 0)  # busy: the server does not say how far it is
            self.ui.statusLabel.setText(f"The server is working... {report.elapsed_s:.0f} s")
            return
        self.ui.progressBar.setRange(0, 100)
        fraction = report.fraction or 0.0
        self.ui.progressBar.setValue(int(100 * fraction))
        self.ui.statusLabel.setText(report.describe()[0].upper() + report.describe()[1:])

    def finishDenoise(self, result, context):
        original = slicer.mrmlScene.GetNodeByID(context["volumeID"])
        if original is None:
            shutil.rmtree(str(result.folder), ignore_errors=True)
            self.ui.statusLabel.setText("The input volume was removed while the server worked.")
            return
        with _WaitCursor():
            denoised = self.logic.loadDenoised(original, result, context["model"])
            self.ui.denoisedVolumeSelector.setCurrentNode(denoised)
            self.ui.differenceCheckBox.blockSignals(True)
            self.ui.differenceCheckBox.setChecked(False)
            self.ui.differenceCheckBox.blockSignals(False)
            self.logic.showSideBySide(original, denoised, linked=self.ui.linkViewsCheckBox.checked)
        summary = result.summary
        self.ui.statusLabel.setText(f"Done: {summary.get('description', denoised.GetName())} "
                                    f"in {summary.get('seconds') or 0:.1f} s on the server.")

    def finishFidelity(self, result, context):
        original = slicer.mrmlScene.GetNodeByID(context["volumeID"])
        if original is None:
            self.ui.statusLabel.setText("The input volume was removed while the server worked.")
            return
        with _WaitCursor():
            denoised = self.logic.denoisedFor(original, context["model"], context["dose"])
            if denoised is None and "denoised" in result.files:
                denoised = self.logic.loadDenoisedFile(original, str(result.files["denoised"]), context["model"],
                                                       result.report.get("denoising", {}))
            for previous in self.fidelitySegmentations:  # an earlier check's structures: out of the way
                if previous.GetScene() is not None and previous.GetDisplayNode() is not None:
                    previous.GetDisplayNode().SetVisibility(False)
            self.fidelityResult = result
            self.fidelitySegmentations = self.logic.loadFidelitySegmentations(original, denoised, result)
            if denoised is not None:
                self.ui.denoisedVolumeSelector.setCurrentNode(denoised)
                self.logic.showSideBySide(original, denoised, linked=self.ui.linkViewsCheckBox.checked)
            self.fillFidelityTable()
            self.onSegmentationDisplayChanged()
        study = result.report.get("study", {})
        self.ui.fidelityVerdictLabel.setText(
            f"Verdict: {study.get('verdict', '?').upper()} - {study.get('summary', '')}")
        self.ui.statusLabel.setText("Fidelity check done.")

    def showError(self, what, error):
        if isinstance(error, (LowDoseClientError, ValueError, OSError)):  # foreseen: the message says it all
            slicer.util.errorDisplay(f"{what}:\n\n{error}")
        else:  # not foreseen: the details go to the log, the user gets one line
            logging.error(f"{what}: {error!r}", exc_info=(type(error), error, error.__traceback__))
            slicer.util.errorDisplay(f"{what}:\n\n{type(error).__name__}: {error}\n\n(Details are in the log.)")

    # -- compare

    def currentPair(self):
        denoised = self.ui.denoisedVolumeSelector.currentNode()
        if denoised is None:
            return None, None
        original = slicer.mrmlScene.GetNodeByID(denoised.GetAttribute(ORIGINAL_ATTRIBUTE) or "")
        return original, denoised

    def onSideBySide(self):
        original, denoised = self.currentPair()
        if original is None:
            slicer.util.errorDisplay("The original of this denoised volume is no longer in the scene.")
            return
        self.logic.showSideBySide(original, denoised, linked=self.ui.linkViewsCheckBox.checked)
        if self.ui.differenceCheckBox.checked:
            self.onDifferenceToggled(True)

    def onDifferenceToggled(self, show):
        original, denoised = self.currentPair()
        if original is None:
            return
        try:
            with _WaitCursor():
                self.logic.showDifference(original, denoised, show)
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            self.ui.differenceCheckBox.setChecked(False)

    def onLinkToggled(self, linked):
        self.logic.setLinked(linked)

    # -- fidelity

    def fillFidelityTable(self):
        table = self.ui.fidelityTable
        table.setRowCount(0)
        if self.fidelityResult is None:
            return
        rows = fidelity_rows(self.fidelityResult.report, flagged_only=self.ui.flaggedOnlyCheckBox.checked)
        table.setRowCount(len(rows))
        colours = {"changed": qt.QColor(255, 200, 200), "check": qt.QColor(255, 235, 190)}
        for r, row in enumerate(rows):
            cells = [row["name"], row["verdict"], _number(row["dice"], 3), _number(row["hu_mean_before"], 1),
                     _number(row["hu_mean_after"], 1), _number(row["hu_sd_before"], 1),
                     _number(row["hu_sd_after"], 1), "yes" if row["flagged"] else ""]
            for c, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setData(qt.Qt.UserRole, row["name"])
                if row["reasons"]:
                    item.setToolTip(row["reasons"])
                if row["verdict"] in colours:
                    item.setBackground(qt.QBrush(colours[row["verdict"]]))
                table.setItem(r, c, item)
        table.resizeColumnsToContents()

    def onFidelityRowClicked(self, row, column):
        item = self.ui.fidelityTable.item(row, 0)
        if item is not None:
            self.logic.jumpToStructure(self.fidelitySegmentations, item.data(qt.Qt.UserRole))

    def onSegmentationDisplayChanged(self, *unused):
        if self.fidelityResult is None:
            return
        self.logic.showFidelitySegmentations(self.fidelitySegmentations,
                                             self.ui.showSegmentationsCheckBox.checked,
                                             self.fidelityResult.report, self.ui.flaggedOnlyCheckBox.checked)

    def onFlaggedOnlyToggled(self, flaggedOnly):
        self.fillFidelityTable()
        self.onSegmentationDisplayChanged()

    def onOpenReport(self):
        if self.fidelityResult is not None and "html" in self.fidelityResult.files:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self.fidelityResult.files["html"])))

    # -- state

    def updateButtons(self, *unused):
        busy = self.job is not None
        haveModel = self.currentModel() is not None
        haveInput = self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.denoiseButton.setEnabled(not busy and haveModel and haveInput)
        self.ui.fidelityButton.setEnabled(not busy and haveModel and haveInput and self.info is not None
                                          and LowDoseClient.has_fidelity(self.info))
        self.ui.connectButton.setEnabled(not busy)
        havePair = self.ui.denoisedVolumeSelector.currentNode() is not None
        self.ui.sideBySideButton.setEnabled(havePair)
        self.ui.differenceCheckBox.setEnabled(havePair)
        self.ui.openReportButton.setEnabled(self.fidelityResult is not None and "html" in self.fidelityResult.files)
        if not haveInput:
            self.ui.denoiseButton.setToolTip("Choose a CT volume.")
        elif not haveModel:
            self.ui.denoiseButton.setToolTip("Connect to a lowdose server first.")
        else:
            self.ui.denoiseButton.setToolTip("Send the volume to the server and load the denoised volume.")


class _WaitCursor:
    """Show the wait cursor while a block runs (works on every Slicer 5 version)."""

    def __enter__(self):
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        return self

    def __exit__(self, *exc):
        slicer.app.restoreOverrideCursor()
        return False


def _dose_text(choice):
    if choice == "auto":
        return "auto (estimated from the image)"
    dose = parse_dose(choice)
    return f"{choice} ({100 * dose:.3g} % of normal dose)"


def _number(value, digits):
    return "" if value is None else f"{value:.{digits}f}"


#
# Logic
#


class LowDoseDenoiseLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable from scripts: export, server requests, loading and display."""

    def __init__(self, consent=None, timeouts=None, tokens=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.consent = consent if consent is not None else QSettingsConsentStore()
        self.tokens = tokens if tokens is not None else QSettingsTokenStore()
        self.timeouts = timeouts or settingsTimeouts()
        self._windowLevelObservers = []
        self._syncingWindowLevel = False

    def client(self, url, token=None):
        """A client of the server at ``url`` with ``token`` (None: the token saved for that server)."""
        return LowDoseClient(url, self.consent, self.timeouts, token=self.tokens.get(url) if token is None else token)

    # -- requests (network in a BackgroundJob; the scene is touched only here, in the GUI thread)

    def exportVolume(self, volumeNode):
        """Write the volume to a temporary NRRD (voxel values as they are, i.e. HU; geometry in the header)."""
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode") or volumeNode.IsA(
                "vtkMRMLLabelMapVolumeNode"):
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

    def startDenoise(self, volumeNode, url, model, dose="auto", token=None):
        """Export the volume and start the request; poll the returned BackgroundJob (result: DenoiseResult)."""
        return self._startUpload(volumeNode, url, token, "lowdose-denoise",
                                 lambda client, path, progress, cancel: client.denoise(
                                     path, model.task, dose=dose, progress=progress, cancel=cancel))

    def startFidelity(self, volumeNode, url, model, dose="auto", token=None):
        return self._startUpload(volumeNode, url, token, "lowdose-fidelity",
                                 lambda client, path, progress, cancel: client.fidelity(
                                     path, model.model, dose=dose, labels=True, progress=progress, cancel=cancel))

    def _startUpload(self, volumeNode, url, token, name, call):
        """Consent check, export to a temporary file, then ``call`` in a BackgroundJob that removes the file."""
        client = self.client(url, token)
        if not client.upload_allowed:
            raise ConsentRequired(server_key(url))
        path, folder = self.exportVolume(volumeNode)

        def work(progress, cancel):
            try:
                return call(client, path, progress, cancel)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        return BackgroundJob(work, name=name).start()

    def denoise(self, volumeNode, url, model, dose="auto", timeout=None, token=None):
        """Denoise and load the result, waiting while Slicer stays responsive (for scripts and the self-test)."""
        if isinstance(model, str):
            model = next((m for m in self.client(url, token).models() if model in (m.task, m.model)),
                         None) or ModelInfo(task=model, model=model)
        job = self.startDenoise(volumeNode, url, model, dose, token=token)
        job.wait(timeout, between=slicer.app.processEvents)
        if not job.done:
            job.cancel()
            job.wait(5)
            raise Cancelled("no result in the given time")
        if job.error is not None:
            raise job.error
        return self.loadDenoised(volumeNode, job.result, model)

    # -- results

    def loadDenoised(self, original, result, model):
        """Load a DenoiseResult as a scalar volume (HU) named after the input and the model."""
        try:
            return self.loadDenoisedFile(original, str(result.path), model, result.summary)
        finally:
            shutil.rmtree(str(result.folder), ignore_errors=True)

    def loadDenoisedFile(self, original, path, model, summary):
        name = slicer.mrmlScene.GenerateUniqueName(f"{original.GetName()}_denoised_{model.model}")
        node = slicer.util.loadVolume(path, {"name": name, "labelmap": False, "show": False, "singleFile": True})
        node.SetAttribute(ROLE_ATTRIBUTE, "denoised")
        node.SetAttribute(ORIGINAL_ATTRIBUTE, original.GetID())
        node.SetAttribute(SUMMARY_ATTRIBUTE, json.dumps({"model": model.model, "task": model.task, **summary}))
        if original.GetParentTransformNode() is not None and getattr(slicer.util, "exportNode", None) is None:
            node.SetAndObserveTransformNodeID(original.GetTransformNodeID())  # the export ignored the transform
        storage = node.GetStorageNode()
        if storage is not None:
            storage.SetFileName("")  # the temporary file is gone; saving the scene writes a new one
        self._copyWindowLevel(original, node)
        return node

    def denoisedFor(self, original, model, dose):
        """The most recent denoised volume of ``original`` made with ``model`` at ``dose`` (None when none)."""
        found = None
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.GetAttribute(ROLE_ATTRIBUTE) != "denoised" or node.GetAttribute(ORIGINAL_ATTRIBUTE) != original.GetID():
                continue
            summary = json.loads(node.GetAttribute(SUMMARY_ATTRIBUTE) or "{}")
            if dose == "auto":
                same_dose = summary.get("dose_source") == "estimated"
            else:
                same_dose = abs(float(summary.get("dose_fraction") or -1) - float(dose)) < 1e-6
            if summary.get("model") == model.model and same_dose:
                found = node
        return found

    # -- display

    def sliceViews(self):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:  # no main window (e.g. --no-main-window): nothing to show
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
        self._copyWindowLevel(original, denoised)
        self.observeWindowLevel(original, denoised)
        self.setLinked(linked)

    def setLinked(self, linked):
        """Link (or unlink) the slice views: scrolling, panning and zoom in one follow in the other."""
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetLinkedControl(bool(linked))
            composite.SetHotLinkedControl(bool(linked))

    def _copyWindowLevel(self, source, target):
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

        def follow(source, target):
            def callback(caller, event):
                if self._syncingWindowLevel:
                    return
                if (source.GetWindow(), source.GetLevel()) == (target.GetWindow(), target.GetLevel()):
                    return
                self._syncingWindowLevel = True
                try:
                    target.SetAutoWindowLevel(False)
                    target.SetWindowLevel(source.GetWindow(), source.GetLevel())
                finally:
                    self._syncingWindowLevel = False
            return callback

        for source, target in ((a, b), (b, a)):
            tag = source.AddObserver(vtk.vtkCommand.ModifiedEvent, follow(source, target))
            self._windowLevelObservers.append((source, tag))

    def removeWindowLevelObservers(self):
        for node, tag in self._windowLevelObservers:
            node.RemoveObserver(tag)
        self._windowLevelObservers = []

    def differenceVolume(self, original, denoised):
        """original - denoised in HU on the same grid (computed once per pair, kept in the scene)."""
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if node.GetAttribute(ROLE_ATTRIBUTE) == "difference" and node.GetAttribute(DENOISED_ATTRIBUTE) == denoised.GetID():
                return node
        import numpy as np

        a = slicer.util.arrayFromVolume(original)
        b = slicer.util.arrayFromVolume(denoised)
        if a.shape != b.shape or not _same_grid(original, denoised):
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
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(DIFFERENCE_WINDOW_HU, 0.0)
        diverging = slicer.mrmlScene.GetFirstNodeByName("DivergingBlueRed")
        if diverging is not None:
            display.SetAndObserveColorNodeID(diverging.GetID())
        return node

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

    def loadFidelitySegmentations(self, original, denoised, result):
        """The label maps of the fidelity check as two segmentations named by structure; (original, denoised)."""
        names = fidelity_label_names(result.report)
        colorNode = self._structureColors(names)
        nodes = []
        model = result.report.get("denoising", {}).get("model", "?")
        try:
            for key, reference, title in (("labels_original", original, "structures (original)"),
                                          ("labels_denoised", denoised or original, f"structures (denoised {model})")):
                label = slicer.util.loadLabelVolume(str(result.files[key]), {"show": False})
                label.GetDisplayNode().SetAndObserveColorNodeID(colorNode.GetID())
                segmentation = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(f"{original.GetName()} {title}"))
                segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
                slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(label, segmentation)
                slicer.mrmlScene.RemoveNode(label)
                segmentation.SetAttribute(ROLE_ATTRIBUTE, "structures")
                segmentation.SetAttribute(ORIGINAL_ATTRIBUTE, original.GetID())
                segmentation.CreateDefaultDisplayNodes()
                nodes.append(segmentation)
        finally:
            slicer.mrmlScene.RemoveNode(colorNode)
            if result.folder is not None:
                for key in ("labels_original", "labels_denoised", "denoised"):
                    path = result.files.get(key)
                    if path is not None and os.path.exists(str(path)):
                        os.remove(str(path))  # loaded; the HTML report stays until Slicer exits
        return tuple(nodes)

    def _structureColors(self, names):
        colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "LowDoseDenoise structures")
        colorNode.SetTypeToUser()
        colorNode.SetHideFromEditors(True)
        count = max(names) + 1 if names else 1
        colorNode.SetNumberOfColors(count)
        lookup = slicer.mrmlScene.GetFirstNodeByName("GenericAnatomyColors")
        for value in range(count):
            rgba = [0.0, 0.0, 0.0, 0.0]
            if value and lookup is not None:
                lookup.GetColor(value % max(lookup.GetNumberOfColors(), 1), rgba)
            elif value:
                rgba = [((value * 67) % 255) / 255.0, ((value * 151) % 255) / 255.0, ((value * 29) % 255) / 255.0]
            colorNode.SetColor(value, names.get(value, f"label_{value}" if value else "background"),
                               rgba[0], rgba[1], rgba[2], 1.0 if value else 0.0)
        return colorNode

    def showFidelitySegmentations(self, segmentations, show, report, flaggedOnly=False):
        """Original's structures on the left view, the denoised scan's on the right (outlines)."""
        red, yellow = self.sliceViews()
        flagged = {row["name"] for row in fidelity_rows(report, flagged_only=True)}
        for segmentation, widget in zip(segmentations, (red, yellow)):
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

    def jumpToStructure(self, segmentations, name):
        """Centre the (linked) views on a structure of the original's segmentation."""
        for segmentation in segmentations:
            segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)
            if segmentId and hasattr(segmentation, "GetSegmentCenterRAS"):
                center = segmentation.GetSegmentCenterRAS(segmentId)
                slicer.modules.markups.logic().JumpSlicesToLocation(center[0], center[1], center[2], True)
                return True
        return False


def _same_grid(a, b, tolerance=1e-3):
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(ma)
    b.GetIJKToRASMatrix(mb)
    return all(abs(ma.GetElement(i, j) - mb.GetElement(i, j)) <= tolerance for i in range(4) for j in range(4))


#
# Self-test (inside 3D Slicer, against a running lowdose server)
#


class LowDoseDenoiseTest(ScriptedLoadableModuleTest):
    """End-to-end test of the logic inside Slicer against a running server.

    The server address comes from the environment variable LOWDOSE_SERVER_URL (default
    http://127.0.0.1:8000), its access token from LOWDOSE_TOKEN (as for `lowdose serve`). The volume is a
    synthetic phantom made here (no patient data); permission to send it is recorded in a temporary file and
    the token kept in memory, never in the user's settings.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()
        if getattr(self, "folder", None):  # runTest() calls setUp() again after the test runner did
            shutil.rmtree(self.folder, ignore_errors=True)
        self.url = os.environ.get("LOWDOSE_SERVER_URL", DEFAULT_SERVER_URL)
        self.folder = tempfile.mkdtemp(prefix="lowdose-selftest-")
        self.consent = JsonConsentStore(os.path.join(self.folder, "consent.json"))
        memory = {}
        self.tokens = TokenStore(lambda: memory.get("text"), lambda text: memory.__setitem__("text", text))
        self.token = os.environ.get("LOWDOSE_TOKEN", "")
        self.tokens.set(self.url, self.token)
        self.logic = LowDoseDenoiseLogic(consent=self.consent, timeouts=Timeouts(connect=10, response=1800, idle=120),
                                         tokens=self.tokens)

    def tearDown(self):
        self.logic.removeWindowLevelObservers()
        shutil.rmtree(self.folder, ignore_errors=True)

    def runTest(self):
        self.setUp()
        try:
            self.test_refuses_without_consent()
            self.test_unreachable_server()
            self.test_wrong_token()
            self.test_denoise_compare_difference()
            self.test_cancel()
            self.test_fidelity()
        finally:
            self.tearDown()

    def phantom(self, name="phantom_ct"):
        """A CT-like volume in HU: air, a water body with noise, a bone ring; an oblique, flipped geometry."""
        import numpy as np

        rng = np.random.default_rng(0)
        z, y, x = np.mgrid[0:8, 0:128, 0:128]
        hu = np.full(z.shape, -1000.0, dtype=np.float32)
        body = ((y - 64) / 50.0) ** 2 + ((x - 64) / 56.0) ** 2 < 1
        hu[body] = 40.0
        hu[body & (((y - 64) / 20.0) ** 2 + ((x - 64) / 20.0) ** 2 > 0.8) & (((y - 64) / 20.0) ** 2 + ((x - 64) / 20.0) ** 2 < 1)] = 700.0
        hu += rng.normal(0, 40, hu.shape).astype(np.float32)
        node = slicer.util.addVolumeFromArray(np.rint(hu).astype(np.int16), name=name)
        node.SetSpacing(0.8, 0.8, 2.5)
        node.SetOrigin(-51.2, 40.0, -100.0)
        directions = vtk.vtkMatrix4x4()
        directions.SetElement(1, 1, -1.0)  # the y axis flipped, as in many DICOM series
        node.SetIJKToRASDirectionMatrix(directions)
        return node

    def test_refuses_without_consent(self):
        self.delayDisplay("Refusal without consent")
        volume = self.phantom()
        with self.assertRaises(ConsentRequired):
            self.logic.startDenoise(volume, self.url, ModelInfo(task="denoise_x", model="x"))

    def test_unreachable_server(self):
        self.delayDisplay("Unreachable server")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with self.assertRaises(ServerUnreachable):
            self.logic.client(f"http://127.0.0.1:{port}").info()

    def test_wrong_token(self):
        if not self.token:
            self.delayDisplay("LOWDOSE_TOKEN is not set: the refusal of a wrong token is not tested")
            return
        self.delayDisplay("Wrong token")
        with self.assertRaises(AuthenticationError) as caught:
            self.logic.client(self.url, self.token + "-wrong").info()
        self.assertIn("lowdose serve --show-token", str(caught.exception))
        self.assertNotIn(self.token, str(caught.exception))

    def firstModel(self):
        models = self.logic.client(self.url).models()
        self.assertTrue(models, f"the server at {self.url} offers no denoising model")
        return models[0]

    def test_denoise_compare_difference(self):
        import numpy as np

        self.delayDisplay(f"Denoise on {self.url}")
        self.consent.allow(self.url)
        model = self.firstModel()
        volume = self.phantom()
        denoised = self.logic.denoise(volume, self.url, model, dose="1/4", timeout=1800)
        self.assertTrue(denoised.IsA("vtkMRMLScalarVolumeNode") and not denoised.IsA("vtkMRMLLabelMapVolumeNode"))
        self.assertIn(volume.GetName(), denoised.GetName())
        self.assertIn(model.model, denoised.GetName())
        a, b = slicer.util.arrayFromVolume(volume), slicer.util.arrayFromVolume(denoised)
        self.assertEqual(a.shape, b.shape)
        self.assertTrue(_same_grid(volume, denoised), "the denoised volume is not on the input's grid")
        self.assertTrue(np.isfinite(b).all() and -3100 <= b.min() and b.max() <= 4100)
        summary = json.loads(denoised.GetAttribute(SUMMARY_ATTRIBUTE))
        self.assertAlmostEqual(summary["dose_fraction"], 0.25, places=6)

        self.delayDisplay("Side by side, linked, same window/level")
        self.logic.showSideBySide(volume, denoised)
        red, yellow = self.logic.sliceViews()
        if red is not None:
            self.assertEqual(slicer.app.layoutManager().layout, slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
            self.assertEqual(red.sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID(), volume.GetID())
            self.assertEqual(yellow.sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID(), denoised.GetID())
            self.assertTrue(red.sliceLogic().GetSliceCompositeNode().GetLinkedControl())
            self.assertEqual(red.mrmlSliceNode().GetOrientation(), yellow.mrmlSliceNode().GetOrientation())
        volume.GetDisplayNode().SetAutoWindowLevel(False)
        volume.GetDisplayNode().SetWindowLevel(400, 40)
        self.assertEqual((denoised.GetDisplayNode().GetWindow(), denoised.GetDisplayNode().GetLevel()), (400, 40))

        self.delayDisplay("Difference")
        difference = self.logic.showDifference(volume, denoised, True)
        np.testing.assert_allclose(slicer.util.arrayFromVolume(difference), a.astype(np.float32) - b, atol=1e-3)
        if yellow is not None:
            self.assertEqual(yellow.sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID(), difference.GetID())
        self.logic.showDifference(volume, denoised, False)
        if yellow is not None:
            self.assertEqual(yellow.sliceLogic().GetSliceCompositeNode().GetBackgroundVolumeID(), denoised.GetID())
        self.assertIs(self.logic.differenceVolume(volume, denoised), difference)  # computed once
        self.delayDisplay("Denoise passed")

    def test_cancel(self):
        self.delayDisplay("Cancel")
        self.consent.allow(self.url)
        job = self.logic.startDenoise(self.phantom("cancelled"), self.url, self.firstModel())
        job.cancel()
        started = time.monotonic()
        self.assertTrue(job.wait(10, between=slicer.app.processEvents))
        self.assertIsInstance(job.error, Cancelled)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_fidelity(self):
        info = self.logic.client(self.url).info()
        if not LowDoseClient.has_fidelity(info):
            self.delayDisplay("The server has no fidelity task: fidelity not tested")
            return
        self.delayDisplay("Fidelity check (segments two scans: minutes on a CPU)")
        self.consent.allow(self.url)
        volume = self.phantom("fidelity_phantom")
        model = self.firstModel()
        job = self.logic.startFidelity(volume, self.url, model, dose=0.25)
        job.wait(3600, between=slicer.app.processEvents)
        self.assertTrue(job.done)
        if job.error is not None:
            raise job.error
        result = job.result
        self.assertIn(result.report["study"]["verdict"], ("kept", "check", "changed"))
        segmentations = self.logic.loadFidelitySegmentations(volume, None, result)
        self.assertEqual(len(segmentations), 2)
        self.logic.showFidelitySegmentations(segmentations, True, result.report)
        rows = fidelity_rows(result.report)
        names = {s.GetSegmentation().GetSegment(s.GetSegmentation().GetNthSegmentID(i)).GetName()
                 for s in segmentations for i in range(s.GetSegmentation().GetNumberOfSegments())}
        self.assertTrue(names <= set(fidelity_label_names(result.report).values()), names)
        self.delayDisplay(f"Fidelity passed: {len(rows)} structures, verdict {result.report['study']['verdict']}")


def runSelfTest():
    """Run LowDoseDenoiseTest and return 0 when it passed, 1 when not (for `Slicer --python-code`)."""
    try:
        LowDoseDenoiseTest().runTest()
    except Exception:
        logging.exception("LowDoseDenoiseTest failed")
        return 1
    print("LowDoseDenoiseTest passed")
    return 0
