"""Anatomy groups: TotalSegmentator's 117 ``total`` structures gathered into 11 groups.

The groups are what lowdose's own anatomy encoder segments and what BioAtt's organ-presence
probabilities are over (BioAtt weighs its attention by 11 organs). Eleven coarse groups rather than 117
structures because the encoder learns them from a few label maps: a rib number or a lung lobe cannot be
learnt from one patient, the bone and the lung can.
"""

from __future__ import annotations

import numpy as np

ANATOMY_GROUPS: dict[int, str] = {
    1: "liver",
    2: "spleen",
    3: "kidney",
    4: "gastrointestinal",
    5: "pancreas",
    6: "other_abdominal_organ",
    7: "lung",
    8: "heart_and_vessels",
    9: "bone",
    10: "muscle",
    11: "brain_and_spinal_cord",
}


def group_of(structure: str) -> int:
    """The group (1..11) of a TotalSegmentator ``total`` structure name."""
    s = structure
    if s == "liver":
        return 1
    if s == "spleen":
        return 2
    if s.startswith("kidney"):
        return 3
    if s in ("stomach", "small_bowel", "duodenum", "colon", "esophagus"):
        return 4
    if s == "pancreas":
        return 5
    if s in ("gallbladder", "urinary_bladder", "prostate", "thyroid_gland", "trachea") or s.startswith("adrenal"):
        return 6
    if s.startswith("lung"):
        return 7
    if s in (
        "heart",
        "aorta",
        "pulmonary_vein",
        "brachiocephalic_trunk",
        "atrial_appendage_left",
        "superior_vena_cava",
        "inferior_vena_cava",
        "portal_vein_and_splenic_vein",
    ) or s.startswith(("subclavian_artery", "common_carotid", "brachiocephalic_vein", "iliac_")):
        return 8
    if s.startswith(("vertebrae", "rib_", "humerus", "scapula", "clavicula", "femur", "hip_")) or s in (
        "sacrum",
        "skull",
        "sternum",
        "costal_cartilages",
    ):
        return 9
    if s.startswith(("gluteus", "autochthon", "iliopsoas")):
        return 10
    if s in ("brain", "spinal_cord"):
        return 11
    raise KeyError(f"{structure}: not a TotalSegmentator 'total' structure")


def group_lookup(class_names: dict[int, str]) -> np.ndarray:
    """A table that maps label values (0..max) of a label map with ``class_names`` to group values."""
    table = np.zeros(max(class_names) + 1, dtype=np.uint8)
    for value, name in class_names.items():
        table[value] = group_of(name)
    return table


def to_groups(labels: np.ndarray, class_names: dict[int, str]) -> np.ndarray:
    """A TotalSegmentator label map recoded to the 11 anatomy groups (0 stays background)."""
    table = group_lookup(class_names)
    if labels.max(initial=0) >= len(table):
        raise ValueError(f"label value {int(labels.max())} has no structure name")
    return table[labels]
