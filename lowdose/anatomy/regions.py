"""Body regions of CT slices (head, neck, chest, abdomen, pelvis): the anatomy labels of lowdose's DA-CLIP.

A slice's region comes from the structures a TotalSegmentator ``total`` label map puts in it
(``region_of_structures``), and for a series without a label map from what is known of it
(``KNOWN_SERIES_REGIONS``: the shared CT series, slice ranges read off their images).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..networks.da_clip import REGIONS  # the order of DoseAnatomyEncoder's region logits

__all__ = ["KNOWN_SERIES_REGIONS", "REGIONS", "known_series_regions", "region_of_structures", "slice_regions"]

PRESENT_MM2 = 100.0  # a structure counts in a slice from this area (1 cm^2): specks of a neighbour do not

_ABDOMINAL_ORGANS = ("liver", "spleen", "kidney", "pancreas", "stomach", "gallbladder", "adrenal", "duodenum")
_PELVIC = ("hip_", "sacrum", "femur", "urinary_bladder", "prostate", "gluteus", "vertebrae_S1")
_NECK = ("vertebrae_C", "thyroid_gland", "common_carotid", "trachea", "esophagus")
_CHEST = ("lung", "heart", "vertebrae_T", "rib_", "sternum", "atrial_appendage", "pulmonary_vein")


def _area(areas: Mapping[str, float], prefixes: tuple[str, ...]) -> float:
    return sum(a for name, a in areas.items() if name.startswith(prefixes))


def region_of_structures(areas: Mapping[str, float]) -> str | None:
    """The body region of a slice from the area (mm^2) of each TotalSegmentator structure in it, or None.

    In this order: brain or skull -> head; lungs larger than the abdominal organs -> chest (so the lung bases
    around the liver dome stay abdomen and the liver dome under large lungs is chest); abdominal organs
    (liver, spleen, kidneys, pancreas, stomach, gallbladder, adrenals, duodenum) -> abdomen; pelvic bones,
    bladder, prostate, gluteal muscles -> pelvis (so the iliac crest beside the kidneys' lower poles is
    abdomen, below them pelvis); lumbar vertebrae or bowel alone -> abdomen; cervical vertebrae, thyroid,
    carotids, trachea, oesophagus -> neck; thoracic vertebrae, ribs, heart -> chest.

        >>> region_of_structures({"liver": 15000.0, "lung_lower_lobe_right": 2000.0})
        'abdomen'
    """
    present = {name: a for name, a in areas.items() if a >= PRESENT_MM2}
    if _area(present, ("brain", "skull")) > 0:
        return "head"
    lung, organs = _area(present, ("lung",)), _area(present, _ABDOMINAL_ORGANS)
    if lung > 0 and lung >= organs:
        return "chest"
    if organs > 0:
        return "abdomen"
    if _area(present, _PELVIC) > 0:
        return "pelvis"
    if _area(present, ("vertebrae_L", "small_bowel", "colon")) > 0:
        return "abdomen"
    if _area(present, _NECK) > 0:
        return "neck"
    if _area(present, _CHEST) > 0:
        return "chest"
    return None


def slice_regions(labels: np.ndarray, class_names: Mapping[int, str], pixel_area_mm2: float) -> list[str | None]:
    """The region of each slice of a TotalSegmentator ``total`` label map ``[z, y, x]`` (None: no structure
    tells); ``pixel_area_mm2`` is the in-plane pixel area of its grid."""
    regions: list[str | None] = []
    for k in range(labels.shape[0]):
        values, counts = np.unique(labels[k], return_counts=True)
        areas = {
            class_names[int(v)]: float(c) * pixel_area_mm2
            for v, c in zip(values, counts)
            if v and int(v) in class_names
        }
        regions.append(region_of_structures(areas))
    return regions


# The shared series (../shared/data/ct, see its README) without a label map: their regions by slice range
# (first, last inclusive, in the order lowdose.load_ct reads the slices), read off their images by the rule
# above. Keys are path endings (a series folder or a single-slice file).
KNOWN_SERIES_REGIONS: dict[str, tuple[tuple[int, int, str], ...]] = {
    "tcia_pancreatic_ct_cbct_seg": ((0, 23, "pelvis"), (24, 97, "abdomen"), (98, 133, "chest")),
    "dcmqa_ge_head": ((0, 27, "head"),),
    "hnpetct_HN-CHUS-052_philips": ((0, 29, "neck"), (30, 59, "head")),
    "lungmask_chest": ((0, 1, "chest"),),
    "totalsegmentator/pulmonary_report_ct_cropped.nii.gz": ((0, 11, "abdomen"), (12, 111, "chest")),
    "lungpetctdx_A0001_philips/kernel_L": ((0, 29, "chest"),),
    "lungpetctdx_A0001_philips/kernel_B": ((0, 29, "chest"),),
    "lungpetctdx_A0002_siemens/B70f": ((0, 6, "abdomen"), (7, 29, "chest")),
    "lungpetctdx_A0002_siemens/B40f": ((0, 6, "abdomen"), (7, 29, "chest")),
    "lidc_idri_0001_ge": ((0, 12, "abdomen"), (13, 59, "chest")),
    "lidc_idri_0314_philips": ((0, 39, "chest"),),
    "crlm_1004_ge": ((0, 27, "abdomen"), (28, 40, "chest")),
    "crlm_1006_ge": ((0, 21, "abdomen"), (22, 24, "chest")),
    "nsclc_radiogenomics_R01-001_siemens": ((0, 39, "chest"),),
    # COVID-19-NY-SBU single slices: the slice shown, not the exam's name (an abdomen/pelvis exam's slice may
    # be chest).
    **{
        f"covid19_ny_sbu_slices/{name}": ((0, 0, region),)
        for region, names in (
            (
                "chest",
                (
                    "A002304/19001231-076.dcm",
                    "A002304/19010112-135.dcm",
                    "A046441/19001111-045.dcm",
                    "A046441/19010101-23.dcm",
                    "A048383/19001231-30.dcm",
                    "A048383/19010410-30.dcm",
                    "A056642/19001229-053.dcm",
                    "A056642/19010107-111.dcm",
                    "A072894/19010103-40.dcm",
                    "A098752/19001231-32.dcm",
                    "A098752/19010127-128.dcm",
                ),
            ),
            (
                "abdomen",
                (
                    "A027284/19000925-116.dcm",
                    "A027284/19001231-131.dcm",
                    "A058062/19001231-084.dcm",
                    "A058062/19010108-078.dcm",
                    "A062055/19001127-136.dcm",
                    "A062055/19001228-131.dcm",
                    "A067967/19001006-028.dcm",
                    "A067967/19001231-270.dcm",
                ),
            ),
        )
        for name in names
    },
}


def known_series_regions(path: str | Path, slices: int) -> list[str | None] | None:
    """The regions of a known series' ``slices`` slices from ``KNOWN_SERIES_REGIONS`` (None: not known)."""
    text = Path(path).as_posix().rstrip("/")
    for ending, ranges in KNOWN_SERIES_REGIONS.items():
        if text == ending or text.endswith("/" + ending):
            regions: list[str | None] = [None] * slices
            for first, last, region in ranges:
                for k in range(first, min(last, slices - 1) + 1):
                    regions[k] = region
            return regions
    return None
