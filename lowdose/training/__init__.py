"""Training denoisers on simulated (or real) low/normal-dose pairs: `lowdose train CONFIG`."""

from .config import TrainConfig
from .loop import export_bundle, train

__all__ = ["TrainConfig", "train", "export_bundle"]
