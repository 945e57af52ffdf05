"""Training denoisers on simulated (or real) low/normal-dose pairs, and lowdose's anatomy encoder:
`lowdose train CONFIG`. Every training runs on one engine (``engine.Trainer``) with its own objective."""

from .anatomy_encoder import AnatomyEncoderConfig, train_anatomy_encoder
from .config import TrainConfig
from .export import export_bundle
from .loop import train

__all__ = ["AnatomyEncoderConfig", "TrainConfig", "export_bundle", "train", "train_anatomy_encoder"]
