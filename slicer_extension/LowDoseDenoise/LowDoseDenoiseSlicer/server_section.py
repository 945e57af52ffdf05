"""The panel's Server section: the server's address and access token, Connect, the permission to send volumes,
and the models the server offers (with the dose and sampling steps menus that go with them).

``ServerSection`` is mixed into LowDoseDenoiseWidget, whose ``setup`` connects these slots.
"""

import slicer
from LowDoseDenoiseLib import messages
from LowDoseDenoiseLib.client import server_key
from LowDoseDenoiseLib.steps import STEPS_CHOICES, steps_label

from . import waitCursor


class ServerSection:
    """Slots of the Server section; state on the widget: ``info`` (the server's /info/, None when not
    connected), ``connectedUrl``, ``models``, ``savedTokenShown``."""

    def serverUrl(self):
        return self.ui.serverUrlComboBox.currentText.strip()

    def serverToken(self):
        return self.ui.serverTokenLineEdit.text.strip()

    def onServerUrlEdited(self, text):
        url = text.strip()
        try:
            allowed = self.logic.consent.is_allowed(url)
        except ValueError:  # not a server address (yet)
            allowed = False
        self.ui.allowUploadCheckBox.setChecked(allowed)
        self.showSavedToken(url)
        if self.info is not None and self.connectedUrl != url:
            self.ui.serverStatusLabel.setText(messages.NOT_CONNECTED)
        self.updateButtons()

    def showSavedToken(self, url):
        """Fill the token field with the token saved for this server; another server's saved token never stays
        in it (it would be sent to this one)."""
        try:
            saved = self.logic.tokens.get(url)
        except ValueError:  # not a server address (yet)
            saved = ""
        if saved or self.ui.serverTokenLineEdit.text == self.savedTokenShown:
            self.ui.serverTokenLineEdit.setText(saved)
            self.savedTokenShown = saved

    def onConnect(self):
        url, token = self.serverUrl(), self.serverToken()
        try:
            server_key(url)
            self.logic.tokens.set(url, token)  # remembered for this server only; an empty field forgets it
        except ValueError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self.savedTokenShown = self.ui.serverTokenLineEdit.text
        self.ui.serverStatusLabel.setText(messages.CONNECTING)
        slicer.app.processEvents()
        try:
            with waitCursor():
                client = self.logic.client(url, token)
                info = client.info(timeout=30)
        except Exception as exc:
            self.info, self.models = None, []
            self.ui.serverStatusLabel.setText(messages.not_connected(exc))
            self.fillModels()
            self.showError("Could not connect to the lowdose server", exc)
            return
        self.info, self.connectedUrl, self.models = info, url, client.models(info)
        self.rememberServerUrl(url)
        self.ui.serverStatusLabel.setText(messages.connected(info, self.models))
        self.fillModels()

    def rememberServerUrl(self, url):
        urls = self.logic.settings.remember_server_url(url)
        self.ui.serverUrlComboBox.blockSignals(True)
        self.ui.serverUrlComboBox.clear()
        self.ui.serverUrlComboBox.addItems(urls)
        self.ui.serverUrlComboBox.setEditText(url)
        self.ui.serverUrlComboBox.blockSignals(False)

    def onAllowUploadClicked(self, checked):
        url = self.serverUrl()
        try:
            if not checked:
                self.logic.consent.revoke(url)
            elif not self.askConsent(url):
                self.ui.allowUploadCheckBox.setChecked(False)
        except ValueError as exc:
            self.ui.allowUploadCheckBox.setChecked(False)
            slicer.util.errorDisplay(str(exc))
        self.updateButtons()

    def askConsent(self, url):
        """Ask once per server; the answer "yes" is remembered (Slicer settings) until unticked."""
        if not slicer.util.confirmYesNoDisplay(messages.consent_question(url), windowTitle=messages.CONSENT_TITLE):
            return False
        self.logic.consent.allow(url)
        self.ui.allowUploadCheckBox.setChecked(True)
        return True

    # -- models

    def fillModels(self):
        self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for model in self.models:
            self.ui.modelComboBox.addItem(messages.model_label(model), model.task)
        self.ui.modelComboBox.setCurrentIndex(max(self.ui.modelComboBox.findData(self.logic.settings.model_task()), 0))
        self.ui.modelComboBox.blockSignals(False)
        self.onModelChanged(self.ui.modelComboBox.currentIndex)

    def currentModel(self):
        index = self.ui.modelComboBox.currentIndex
        return self.models[index] if 0 <= index < len(self.models) else None

    def onModelChanged(self, index):
        model = self.currentModel()
        self.ui.modelInfoLabel.setText("" if model is None else messages.model_description(model))
        if model is not None:
            self.logic.settings.set_model_task(model.task)
            self.ui.doseComboBox.setEnabled(model.dose_aware)
            self.ui.doseComboBox.setToolTip(messages.dose_tooltip(model))
        self.fillSteps(model)
        self.updateButtons()

    def fillSteps(self, model):
        """The sampling steps menu of ``model``: 1 to 4, its own number marked, the last choice (else its own)
        chosen; shown and enabled for a diffusion model only."""
        diffusion = model is not None and model.sampling_steps is not None
        self.ui.stepsComboBox.clear()
        if diffusion:
            for choice in STEPS_CHOICES:
                self.ui.stepsComboBox.addItem(steps_label(choice, model.sampling_steps), choice)
            chosen = self.logic.settings.steps() or model.sampling_steps
            self.ui.stepsComboBox.setCurrentIndex(list(STEPS_CHOICES).index(chosen))
            self.ui.stepsComboBox.setToolTip(messages.steps_tooltip(model))
        self.ui.stepsComboBox.setEnabled(diffusion)
        self.ui.stepsComboBox.setVisible(diffusion)
        self.ui.stepsLabel.setVisible(diffusion)
