"""3D Slicer module of lowdose: denoise a low-dose CT on a lowdose server, compare it with the original side by
side, and run the anatomical fidelity check.

Slicer's scripted-module layout: the module, its widget (loads the panel and wires it), its logic (settings and
server requests) and its self-test. Mixed in from LowDoseDenoiseSlicer: the panel's slots (*_section) and the
logic's volume nodes, views and fidelity structures. What needs no Slicer (server client, background jobs,
settings, dose, fidelity table, every text shown) is in LowDoseDenoiseLib.
"""

import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time

import numpy as np
import qt
import slicer
import vtk
from LowDoseDenoiseLib import results
from LowDoseDenoiseLib.client import (
    AuthenticationError,
    Cancelled,
    ConsentRequired,
    LowDoseClient,
    ModelInfo,
    ServerUnreachable,
    Timeouts,
)
from LowDoseDenoiseLib.dose import DOSE_CHOICES, dose_label
from LowDoseDenoiseLib.ensemble import DEFAULT_ENSEMBLE, ENSEMBLE_SIZES, check_ensemble, ensemble_label
from LowDoseDenoiseLib.jobs import start_upload
from LowDoseDenoiseLib.messages import denoise_tooltip, ensemble_tooltip
from LowDoseDenoiseLib.settings import DEFAULT_SERVER_URL, JsonConsentStore, MemorySettings, ModuleSettings
from LowDoseDenoiseLib.steps import check_steps
from LowDoseDenoiseLib.strength import DEFAULT_STRENGTH, STRENGTH_CHOICES, parse_strength, strength_label
from LowDoseDenoiseSlicer import ROLE_ATTRIBUTE, SUMMARY_ATTRIBUTE
from LowDoseDenoiseSlicer.request_section import RequestSection
from LowDoseDenoiseSlicer.results_section import ResultsSection
from LowDoseDenoiseSlicer.server_section import ServerSection
from LowDoseDenoiseSlicer.structures import FidelityStructures
from LowDoseDenoiseSlicer.views import ComparisonViews, sameGrid
from LowDoseDenoiseSlicer.volumes import VolumeNodes
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

POLL_MS = 100  # how often the panel looks at a request under way


class LowDoseDenoise(ScriptedLoadableModule):
    """The module's entry in Slicer: title, category, help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Low-dose CT Denoise"
        self.parent.categories = ["Filtering.Denoising"]
        self.parent.dependencies = []
        self.parent.contributors = ["lowdose"]
        self.parent.helpText = (
            "Denoise a low-dose CT volume with a lowdose server (MONAI Label app), compare original and "
            "denoised side by side with linked views, and check structure by structure that the anatomy was kept. "
            "The volume is sent to the server only after you allow it for that server."
        )
        self.parent.acknowledgementText = (
            "lowdose: low-dose CT denoising with an anatomical fidelity check (TotalSegmentator structures)."
        )


#
# Widget
#


class LowDoseDenoiseWidget(
    ScriptedLoadableModuleWidget, VTKObservationMixin, ServerSection, RequestSection, ResultsSection
):
    """The module's panel: loads the .ui and connects each widget to its slot (the slots are the sections')."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self.timer = self.info = self.connectedUrl = None
        self.models = []
        self.job, self.jobKind, self.jobContext = None, None, {}
        self.fidelityResult, self.fidelitySegmentations = None, ()
        self.savedTokenShown = ""  # the token field's text when it was filled from the settings

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
        self.fillChoices()
        self.ui.serverUrlComboBox.connect("currentTextChanged(QString)", self.onServerUrlEdited)
        self.ui.serverTokenLineEdit.connect("returnPressed()", self.onConnect)
        self.ui.connectButton.connect("clicked()", self.onConnect)
        self.ui.allowUploadCheckBox.connect("clicked(bool)", self.onAllowUploadClicked)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.denoiseButton.connect("clicked()", self.onDenoise)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.denoisedVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.sideBySideButton.connect("clicked()", self.onSideBySide)
        self.ui.differenceCheckBox.connect("toggled(bool)", self.onDifferenceToggled)
        self.ui.linkViewsCheckBox.connect("toggled(bool)", self.onLinkToggled)
        self.ui.fidelityButton.connect("clicked()", self.onFidelity)
        self.ui.fidelityTable.connect("cellClicked(int,int)", self.onFidelityRowClicked)
        self.ui.showSegmentationsCheckBox.connect("toggled(bool)", self.onSegmentationDisplayChanged)
        self.ui.flaggedOnlyCheckBox.connect("toggled(bool)", self.onFlaggedOnlyToggled)
        self.ui.openReportButton.connect("clicked()", self.onOpenReport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.onServerUrlEdited(self.serverUrl())

    def fillChoices(self):
        """The addresses used before, the dose, strength and self-ensemble menus (the sampling steps menu stays
        hidden until a diffusion model is chosen), the denoised-volume list and the fidelity table's columns."""
        self.ui.serverUrlComboBox.clear()
        self.ui.serverUrlComboBox.addItems(self.logic.settings.server_urls())
        self.ui.serverUrlComboBox.setEditText(self.logic.settings.server_url())
        self.ui.doseComboBox.clear()
        for choice in DOSE_CHOICES:
            self.ui.doseComboBox.addItem(dose_label(choice), choice)
        index = self.ui.doseComboBox.findData(self.logic.settings.dose())
        if index >= 0:
            self.ui.doseComboBox.setCurrentIndex(index)
        else:
            self.ui.doseComboBox.setEditText(self.logic.settings.dose())
        self.ui.strengthComboBox.clear()
        for choice in STRENGTH_CHOICES:
            self.ui.strengthComboBox.addItem(strength_label(choice), choice)
        index = self.ui.strengthComboBox.findData(self.logic.settings.strength())
        self.ui.strengthComboBox.setCurrentIndex(
            index if index >= 0 else self.ui.strengthComboBox.findData(DEFAULT_STRENGTH)
        )
        self.ui.ensembleComboBox.clear()
        for choice in ENSEMBLE_SIZES:
            self.ui.ensembleComboBox.addItem(ensemble_label(choice), choice)
        self.ui.ensembleComboBox.setCurrentIndex(list(ENSEMBLE_SIZES).index(self.logic.settings.ensemble()))
        self.ui.ensembleComboBox.setToolTip(ensemble_tooltip())
        self.fillSteps(None)
        self.ui.denoisedVolumeSelector.addAttribute("vtkMRMLScalarVolumeNode", ROLE_ATTRIBUTE, "denoised")
        self.ui.denoisedVolumeSelector.setMRMLScene(slicer.mrmlScene)
        self.ui.fidelityTable.setColumnCount(len(results.FIDELITY_COLUMNS))
        self.ui.fidelityTable.setHorizontalHeaderLabels(list(results.FIDELITY_COLUMNS))
        self.ui.fidelityTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.fidelityTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()

    def cleanup(self):
        if self.job is not None:
            self.job.cancel()
        if self.timer is not None:
            self.timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.removeWindowLevelObservers()

    def onReload(self):
        """Reload the module's packages too: Slicer's Reload reloads only this file."""
        for name in [n for n in sys.modules if n.split(".")[0] in ("LowDoseDenoiseLib", "LowDoseDenoiseSlicer")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def onSceneStartClose(self, caller, event):
        if self.job is not None:
            self.job.cancel()  # its result would have nowhere to go
        self.logic.removeWindowLevelObservers()
        self.fidelityResult, self.fidelitySegmentations = None, ()
        self.ui.fidelityTable.setRowCount(0)
        self.ui.fidelityVerdictLabel.setText("")

    def updateButtons(self, *unused):
        """Enable what can be done now: nothing that sends while a request is under way."""
        busy, haveModel = self.job is not None, self.currentModel() is not None
        haveInput = self.ui.inputVolumeSelector.currentNode() is not None
        havePair = self.ui.denoisedVolumeSelector.currentNode() is not None
        self.ui.denoiseButton.setEnabled(not busy and haveModel and haveInput)
        self.ui.denoiseButton.setToolTip(denoise_tooltip(haveInput, haveModel))
        self.ui.fidelityButton.setEnabled(
            not busy and haveModel and haveInput and self.info is not None and LowDoseClient.has_fidelity(self.info)
        )
        self.ui.connectButton.setEnabled(not busy)
        self.ui.sideBySideButton.setEnabled(havePair)
        self.ui.differenceCheckBox.setEnabled(havePair)
        self.ui.openReportButton.setEnabled(self.fidelityResult is not None and "html" in self.fidelityResult.files)


#
# Logic
#


class LowDoseDenoiseLogic(ScriptedLoadableModuleLogic, VolumeNodes, ComparisonViews, FidelityStructures):
    """What the module does, usable from scripts: the settings and the server requests here; mixed in, the
    volume nodes sent and loaded, the side-by-side views and the fidelity structures."""

    def __init__(self, consent=None, timeouts=None, tokens=None, settings=None):
        ScriptedLoadableModuleLogic.__init__(self)
        ComparisonViews.__init__(self)
        self.settings = settings if settings is not None else ModuleSettings(qt.QSettings())
        self.consent = consent if consent is not None else self.settings.consent()
        self.tokens = tokens if tokens is not None else self.settings.tokens()
        self.timeouts = timeouts or self.settings.timeouts()

    def client(self, url, token=None):
        """A client of the server at ``url`` with ``token`` (None: the token saved for that server)."""
        return LowDoseClient(url, self.consent, self.timeouts, token=self.tokens.get(url) if token is None else token)

    # -- requests (the network in a BackgroundJob; the scene is touched only in the GUI thread)

    def startDenoise(
        self,
        volumeNode,
        url,
        model,
        dose="auto",
        token=None,
        strength=DEFAULT_STRENGTH,
        steps=None,
        ensemble=DEFAULT_ENSEMBLE,
    ):
        """Export the volume and start the request; poll the returned BackgroundJob (result: DenoiseResult).
        ``strength``: "low", "medium", "high" or a number in [0, 1]; ``steps``: a diffusion model's sampling
        steps, 1 to 4 (None: the model's own); ``ensemble``: the self-ensemble, 1 (off), 2, 4 or 8. ValueError,
        nothing sent, when any is bad."""
        strength, steps, ensemble = parse_strength(strength), check_steps(steps), check_ensemble(ensemble)
        return start_upload(
            self.client(url, token),
            lambda: self.exportVolume(volumeNode),
            lambda client, path, **follow: client.denoise(
                path, model.task, dose=dose, strength=strength, steps=steps, ensemble=ensemble, **follow
            ),
            name="lowdose-denoise",
        )

    def startFidelity(
        self,
        volumeNode,
        url,
        model,
        dose="auto",
        token=None,
        strength=DEFAULT_STRENGTH,
        steps=None,
        ensemble=DEFAULT_ENSEMBLE,
    ):
        """Export the volume and start the fidelity check (result: FidelityResult with the label maps)."""
        strength, steps, ensemble = parse_strength(strength), check_steps(steps), check_ensemble(ensemble)
        return start_upload(
            self.client(url, token),
            lambda: self.exportVolume(volumeNode),
            lambda client, path, **follow: client.fidelity(
                path, model.model, dose=dose, labels=True, strength=strength, steps=steps, ensemble=ensemble, **follow
            ),
            name="lowdose-fidelity",
        )

    def denoise(
        self,
        volumeNode,
        url,
        model,
        dose="auto",
        timeout=None,
        token=None,
        strength=DEFAULT_STRENGTH,
        steps=None,
        ensemble=DEFAULT_ENSEMBLE,
    ):
        """Denoise and load the result, waiting while Slicer stays responsive (for scripts and the self-test)."""
        if isinstance(model, str):
            model = next(
                (m for m in self.client(url, token).models() if model in (m.task, m.model)), None
            ) or ModelInfo(task=model, model=model)
        job = self.startDenoise(
            volumeNode, url, model, dose, token=token, strength=strength, steps=steps, ensemble=ensemble
        )
        job.wait(timeout, between=slicer.app.processEvents)
        if not job.done:
            job.cancel()
            job.wait(5)
            raise Cancelled("no result in the given time")
        if job.error is not None:
            raise job.error
        return self.loadDenoised(volumeNode, job.result, model, strength, steps, ensemble)


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
        settings = ModuleSettings(MemorySettings())  # the user's settings stay as they are
        self.tokens = settings.tokens()
        self.token = os.environ.get("LOWDOSE_TOKEN", "")
        self.tokens.set(self.url, self.token)
        self.logic = LowDoseDenoiseLogic(
            consent=self.consent,
            timeouts=Timeouts(connect=10, response=1800, idle=120),
            tokens=self.tokens,
            settings=settings,
        )

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
        rng = np.random.default_rng(0)
        z, y, x = np.mgrid[0:8, 0:128, 0:128]
        hu = np.full(z.shape, -1000.0, dtype=np.float32)
        body = ((y - 64) / 50.0) ** 2 + ((x - 64) / 56.0) ** 2 < 1
        hu[body] = 40.0
        ring = ((y - 64) / 20.0) ** 2 + ((x - 64) / 20.0) ** 2
        hu[body & (ring > 0.8) & (ring < 1)] = 700.0
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
        self.delayDisplay(f"Denoise on {self.url}")
        self.consent.allow(self.url)
        model = self.firstModel()
        volume = self.phantom()
        denoised = self.logic.denoise(volume, self.url, model, dose="1/4", timeout=1800, strength="low")
        self.assertTrue(denoised.IsA("vtkMRMLScalarVolumeNode") and not denoised.IsA("vtkMRMLLabelMapVolumeNode"))
        self.assertIn(volume.GetName(), denoised.GetName())
        self.assertIn(model.model, denoised.GetName())
        a, b = slicer.util.arrayFromVolume(volume), slicer.util.arrayFromVolume(denoised)
        self.assertEqual(a.shape, b.shape)
        self.assertTrue(sameGrid(volume, denoised), "the denoised volume is not on the input's grid")
        self.assertTrue(np.isfinite(b).all() and -3100 <= b.min() and b.max() <= 4100)
        summary = json.loads(denoised.GetAttribute(SUMMARY_ATTRIBUTE))
        self.assertAlmostEqual(summary["dose_fraction"], 0.25, places=6)
        self.assertAlmostEqual(summary["strength"], 0.4, places=6)
        self.assertTrue(denoised.GetName().endswith("_low"), denoised.GetName())
        self.assertEqual(self.logic.denoisedFor(volume, model, 0.25, "low"), denoised)
        self.assertIsNone(self.logic.denoisedFor(volume, model, 0.25, "high"))  # another strength: not it

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
        rows = results.fidelity_rows(result.report)
        names = {
            s.GetSegmentation().GetSegment(s.GetSegmentation().GetNthSegmentID(i)).GetName()
            for s in segmentations
            for i in range(s.GetSegmentation().GetNumberOfSegments())
        }
        self.assertTrue(names <= set(results.fidelity_label_names(result.report).values()), names)
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
