from .denoise import DenoiseTask, discover_models
from .fidelity import FidelityTask

__all__ = ["DenoiseTask", "FidelityTask", "discover_models"]
