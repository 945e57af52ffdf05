"""Anatomy awareness: the anatomy groups, the pluggable anatomy encoders that training losses and
BioAtt attention read (the encoder is trained by lowdose.training.anatomy_encoder), and the body regions and
dose/region encoder (DA-CLIP) that condition a denoiser (trained by lowdose.training.da_clip)."""

from .dose_anatomy import DoseAnatomyReader
from .encoders import AnatomyEncoder, load_anatomy_encoder
from .groups import ANATOMY_GROUPS, group_of, to_groups
from .regions import REGIONS, known_series_regions, region_of_structures, slice_regions

__all__ = [
    "ANATOMY_GROUPS",
    "REGIONS",
    "AnatomyEncoder",
    "DoseAnatomyReader",
    "group_of",
    "known_series_regions",
    "load_anatomy_encoder",
    "region_of_structures",
    "slice_regions",
    "to_groups",
]
