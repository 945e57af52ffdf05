"""Anatomy awareness: the anatomy groups, the pluggable anatomy encoders that training losses and
BioAtt attention read (the encoder is trained by lowdose.training.anatomy_encoder)."""

from .encoders import AnatomyEncoder, load_anatomy_encoder
from .groups import ANATOMY_GROUPS, group_of, to_groups

__all__ = ["ANATOMY_GROUPS", "AnatomyEncoder", "group_of", "load_anatomy_encoder", "to_groups"]
