"""Code of the LowDoseDenoise module that needs no Slicer: the server client and the background job."""

from .client import (Cancelled, ConsentRequired, ConsentStore, DenoiseResult, FidelityResult, JsonConsentStore,
                     LowDoseClient, LowDoseClientError, ModelInfo, NotAVolume, Progress, ServerError,
                     ServerUnreachable, Timeout, Timeouts, server_key, sniff_volume)
from .jobs import BackgroundJob

__all__ = ["BackgroundJob", "Cancelled", "ConsentRequired", "ConsentStore", "DenoiseResult", "FidelityResult",
           "JsonConsentStore", "LowDoseClient", "LowDoseClientError", "ModelInfo", "NotAVolume", "Progress",
           "ServerError", "ServerUnreachable", "Timeout", "Timeouts", "server_key", "sniff_volume"]
