"""The panel's requests: Denoise and Run fidelity check send the volume in the background, the progress bar
and Cancel follow them, and what comes back is loaded and shown (errors in a message box).

``RequestSection`` is mixed into LowDoseDenoiseWidget, whose ``setup`` connects these slots and whose timer
calls ``onPoll``.
"""

import logging
import shutil

import slicer
from LowDoseDenoiseLib import messages, results
from LowDoseDenoiseLib.client import Cancelled
from LowDoseDenoiseLib.dose import dose_choice, parse_dose
from LowDoseDenoiseLib.ensemble import ensemble_choice
from LowDoseDenoiseLib.steps import steps_choice
from LowDoseDenoiseLib.strength import parse_strength

from . import waitCursor


class RequestSection:
    """Slots of the requests; state on the widget: ``job`` (the BackgroundJob under way, or None), ``jobKind``
    (messages.DENOISE or messages.FIDELITY) and ``jobContext`` (input volume ID, model, dose, strength, steps,
    ensemble)."""

    def prepareRequest(self):
        """(volume, model, dose, strength, steps, ensemble) when everything needed is there and sending is
        allowed, else None; ``steps`` is a diffusion model's sampling steps, None for a model that takes none;
        ``ensemble`` the self-ensemble (1: off)."""
        volume, model, url = self.ui.inputVolumeSelector.currentNode(), self.currentModel(), self.serverUrl()
        if volume is None or model is None:
            slicer.util.errorDisplay(messages.NEEDS_VOLUME_AND_MODEL)
            return None
        doseText = dose_choice(self.ui.doseComboBox.currentText)
        try:
            dose = parse_dose(doseText) if model.dose_aware else "auto"
            strength = parse_strength(self.ui.strengthComboBox.currentText)
            steps = None if model.sampling_steps is None else steps_choice(self.ui.stepsComboBox.currentText)
            ensemble = ensemble_choice(self.ui.ensembleComboBox.currentText)
            if not self.logic.consent.is_allowed(url) and not self.askConsent(url):
                return None
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return None
        if model.dose_aware:
            self.logic.settings.set_dose(doseText)
        self.logic.settings.set_strength(strength)
        if steps is not None:  # the model's own number is remembered as "each model's own"
            self.logic.settings.set_steps(None if steps == model.sampling_steps else steps)
        self.logic.settings.set_ensemble(ensemble)
        return volume, model, dose, strength, steps, ensemble

    def onDenoise(self):
        request = self.prepareRequest()
        if request is not None:
            volume, model, dose, strength, steps, ensemble = request
            self.startJob(
                messages.DENOISE,
                request,
                lambda: self.logic.startDenoise(
                    volume,
                    self.serverUrl(),
                    model,
                    dose,
                    token=self.serverToken(),
                    strength=strength,
                    steps=steps,
                    ensemble=ensemble,
                ),
            )

    def onFidelity(self):
        request = self.prepareRequest()
        if request is not None:
            volume, model, dose, strength, steps, ensemble = request
            self.startJob(
                messages.FIDELITY,
                request,
                lambda: self.logic.startFidelity(
                    volume,
                    self.serverUrl(),
                    model,
                    dose,
                    token=self.serverToken(),
                    strength=strength,
                    steps=steps,
                    ensemble=ensemble,
                ),
            )

    def startJob(self, kind, request, start):
        """Start a request (``start()`` returns its BackgroundJob) and follow it with the timer."""
        if self.job is not None:
            return
        try:
            with waitCursor():
                self.job = start()
        except Exception as exc:
            self.showError(f"Could not start the {kind} request", exc)
            return
        volume, model, dose, strength, steps, ensemble = request
        self.jobKind, self.jobContext = kind, {"volumeID": volume.GetID(), "model": model, "dose": dose}
        self.jobContext.update(strength=strength, steps=steps, ensemble=ensemble)
        self.ui.statusLabel.setText(messages.request_started(kind))
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
            self.ui.statusLabel.setText(messages.CANCELLING)

    def onPoll(self):
        """Show the job's progress; once it has ended, its result, its error or its cancellation."""
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
                self.ui.statusLabel.setText(messages.CANCELLED)
            elif job.error is not None:
                self.ui.statusLabel.setText(messages.request_failed(kind, job.error))
                self.showError(f"The {kind} request failed", job.error)
            elif kind == messages.DENOISE:
                self.finishDenoise(job.result, context)
            else:
                self.finishFidelity(job.result, context)
        except Exception as exc:
            self.showError(f"Could not show the {kind} result", exc)
        finally:
            self.updateButtons()

    def showProgress(self, report):
        text, percent = messages.progress(report)
        self.ui.progressBar.setRange(0, 0 if percent is None else 100)  # (0, 0): busy, no end known
        if percent is not None:
            self.ui.progressBar.setValue(percent)
        self.ui.statusLabel.setText(text)

    def finishDenoise(self, result, context):
        original = slicer.mrmlScene.GetNodeByID(context["volumeID"])
        if original is None:
            shutil.rmtree(str(result.folder), ignore_errors=True)
            self.ui.statusLabel.setText(messages.INPUT_REMOVED)
            return
        with waitCursor():
            denoised = self.logic.loadDenoised(
                original, result, context["model"], context["strength"], context["steps"], context["ensemble"]
            )
            self.showPair(original, denoised)
        self.ui.statusLabel.setText(messages.denoise_done(result.summary, denoised.GetName()))

    def finishFidelity(self, result, context):
        original = slicer.mrmlScene.GetNodeByID(context["volumeID"])
        if original is None:
            self.ui.statusLabel.setText(messages.INPUT_REMOVED)
            return
        with waitCursor():
            denoised = self.logic.fidelityDenoised(
                original,
                result,
                context["model"],
                context["dose"],
                context["strength"],
                context["steps"],
                context["ensemble"],
            )
            self.logic.hideSegmentations(self.fidelitySegmentations)  # an earlier check's structures
            self.fidelityResult = result
            self.fidelitySegmentations = self.logic.loadFidelitySegmentations(original, denoised, result)
            if denoised is not None:
                self.showPair(original, denoised)
            self.fillFidelityTable()
            self.onSegmentationDisplayChanged()
        self.ui.fidelityVerdictLabel.setText(results.fidelity_verdict(result.report))
        self.ui.statusLabel.setText(messages.FIDELITY_DONE)

    def showError(self, what, error):
        text, foreseen = messages.error_text(what, error)
        if not foreseen:  # the details go to the log; the message box has one line
            logging.error(f"{what}: {error!r}", exc_info=(type(error), error, error.__traceback__))
        slicer.util.errorDisplay(text)
