"""Code of the LowDoseDenoise module that needs no Slicer: the server client and the background job."""

from .client import (AuthenticationError, Cancelled, ConsentRequired, ConsentStore, DenoiseResult, FidelityResult,
                     JsonConsentStore, LowDoseClient, LowDoseClientError, ModelInfo, NotAVolume, Progress, ServerError,
                     ServerUnreachable, Timeout, Timeouts, TokenStore, server_key, sniff_volume)
from .jobs import BackgroundJob

__all__ = ["AuthenticationError", "BackgroundJob", "Cancelled", "ConsentRequired", "ConsentStore", "DenoiseResult",
           "FidelityResult", "JsonConsentStore", "LowDoseClient", "LowDoseClientError", "ModelInfo", "NotAVolume",
           "Progress", "ServerError", "ServerUnreachable", "Timeout", "Timeouts", "TokenStore", "server_key",
           "sniff_volume"]
