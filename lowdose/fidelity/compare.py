"""Structure-by-structure comparison of label maps (and the HU under them) with verdicts.

Overlap and surface metrics follow MONAI's definitions (``monai.metrics``): edges are a mask minus its
erosion (6-connected), surface distances are exact Euclidean distances in mm from each edge voxel to the
nearest edge voxel of the other mask, the normalised surface Dice at tolerance t is the fraction of both
edge sets within t mm of the other, and HD95 is the larger of the two directed 95th percentiles.
They are computed here on each structure's bounding box, with a k-d tree (scipy) for the nearest edge
rather than MONAI's distance transform: the same numbers (the tests check them against
``monai.metrics``), 1.4x faster on compact organs and 12x on scattered labels (measured on the sample),
and no 9 s ``import monai``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np
from scipy.ndimage import binary_erosion, find_objects
from scipy.spatial import cKDTree

ROLES = ("original", "denoised", "reference")
# (test, base): how `test` differs from `base`. The first pair decides the structure's verdict.
PAIRS = (("denoised", "original"), ("denoised", "reference"), ("original", "reference"))
VERDICT_ORDER = {"changed": 0, "check": 1, "kept": 2, "absent": 3}
REFERENCE_VERDICT_ORDER = {"further": 0, "as close": 1, "closer": 2, "absent": 3}


def pair_name(test: str, base: str) -> str:
    return f"{test}_vs_{base}"


@dataclasses.dataclass(frozen=True)
class FidelityThresholds:
    """When a structure counts as kept, to check, or changed by denoising (denoised against original).

    A structure is **kept** when every figure is within its ``*_kept`` limit, **changed** when any figure
    is past its ``*_changed`` limit (or it is found in only one of the two images), and **check** in
    between. Structures smaller than ``small_structure_ml`` in both images are judged by surface Dice and
    HU only (Dice and volume change of a few voxels say little) and are never worse than **check**.
    The study verdict is the worst structure verdict.

    With a reference (normal-dose) scan, each structure is also called **closer**, **as close** or
    **further**: is the denoised scan at least as close to the reference as the low-dose one was, within
    ``reference_dice_tolerance`` in Dice and ``reference_hu_tolerance`` in |HU shift|?
    """

    dice_kept: float = 0.90
    dice_changed: float = 0.75
    nsd_tolerance_mm: float = 2.0  # the surface Dice that enters the verdict
    nsd_kept: float = 0.90
    nsd_changed: float = 0.75
    hu_shift_kept: float = 10.0  # |mean HU shift| inside the structure, HU
    hu_shift_changed: float = 25.0
    volume_change_kept_pct: float = 10.0  # |volume change|, % of the original's volume
    volume_change_changed_pct: float = 25.0
    noise_ratio_max: float = 1.10  # HU std denoised / original above this: noise went up -> check
    small_structure_ml: float = 0.5  # below this in both images: judged by surface Dice and HU only
    min_hu_voxels: int = 20  # fewer voxels in common: no HU shift is judged
    surface_tolerances_mm: tuple[float, ...] = (1.0, 2.0)
    reference_dice_tolerance: float = 0.02
    reference_hu_tolerance: float = 2.0

    def __post_init__(self):
        if self.dice_changed > self.dice_kept or self.nsd_changed > self.nsd_kept:
            raise ValueError("the 'changed' Dice/NSD limits must not be above the 'kept' ones")
        if self.hu_shift_changed < self.hu_shift_kept or self.volume_change_changed_pct < self.volume_change_kept_pct:
            raise ValueError("the 'changed' HU/volume limits must not be below the 'kept' ones")
        tolerances = tuple(float(t) for t in self.surface_tolerances_mm)
        if self.nsd_tolerance_mm not in tolerances:
            tolerances = tuple(sorted(set(tolerances) | {float(self.nsd_tolerance_mm)}))
        object.__setattr__(self, "surface_tolerances_mm", tolerances)

    @property
    def nsd_key(self) -> str:
        return nsd_key(self.nsd_tolerance_mm)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def nsd_key(tolerance_mm: float) -> str:
    return f"nsd_{tolerance_mm:g}mm"


# --------------------------------------------------------------------------------------- metrics


def _edges(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a 6-neighbour outside it (outside the array counts as outside)."""
    return mask & ~binary_erosion(mask, border_value=0)


def surface_distances(mask_a: np.ndarray, mask_b: np.ndarray, spacing_zyx) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each edge voxel of ``a`` to the nearest edge voxel of ``b``, and from ``b`` to ``a``.

    Both masks must be non-empty. Edges are found on the masks' joint bounding box plus one voxel; the
    distances are exact Euclidean nearest-neighbour distances between edge-voxel centres in mm.
    """
    box = _bounding_box(mask_a | mask_b, margin=1)
    scale = np.asarray(spacing_zyx, dtype=np.float64)
    points_a = np.argwhere(_edges(_crop_padded(mask_a, box))) * scale
    points_b = np.argwhere(_edges(_crop_padded(mask_b, box))) * scale
    return cKDTree(points_b).query(points_a)[0], cKDTree(points_a).query(points_b)[0]


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the smallest box holding ``mask``, widened by ``margin`` (may reach past the array)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(int(hits[0]) - margin, int(hits[-1]) + 1 + margin))
    return tuple(box)


def _crop_padded(array: np.ndarray, box: tuple[slice, ...], fill=0) -> np.ndarray:
    """``array[box]`` where the box may reach past the array: the outside is filled with ``fill``."""
    inner = tuple(slice(max(s.start, 0), min(s.stop, n)) for s, n in zip(box, array.shape))
    pad = [(max(0, -s.start), max(0, s.stop - n)) for s, n in zip(box, array.shape)]
    crop = array[inner]
    if any(p != (0, 0) for p in pad):
        crop = np.pad(crop, pad, constant_values=fill)
    return crop


def overlap_metrics(
    mask_test: np.ndarray, mask_base: np.ndarray, spacing_zyx, tolerances_mm: Iterable[float] = (1.0, 2.0)
) -> dict:
    """Dice, normalised surface Dice at each tolerance, HD95 (mm) and volume change (%) of two masks.

    ``None`` where a figure is undefined: all of them when both masks are empty; surface figures and
    volume change when only one is (Dice is then 0).
    """
    n_test, n_base = int(mask_test.sum()), int(mask_base.sum())
    result: dict[str, float | None] = {
        "dice": None,
        **{nsd_key(t): None for t in tolerances_mm},
        "hd95_mm": None,
        "volume_change_pct": None,
    }
    if n_test == 0 and n_base == 0:
        return result
    intersection = int(np.logical_and(mask_test, mask_base).sum())
    result["dice"] = 2.0 * intersection / (n_test + n_base)
    if n_base > 0:
        result["volume_change_pct"] = 100.0 * (n_test - n_base) / n_base
    if n_test == 0 or n_base == 0:
        for t in tolerances_mm:
            result[nsd_key(t)] = 0.0
        return result
    d_test, d_base = surface_distances(mask_test, mask_base, spacing_zyx)
    both = len(d_test) + len(d_base)
    for t in tolerances_mm:
        result[nsd_key(t)] = float((np.count_nonzero(d_test <= t) + np.count_nonzero(d_base <= t)) / both)
    result["hd95_mm"] = float(max(np.percentile(d_test, 95), np.percentile(d_base, 95)))
    return result


def _hu_stats(hu: np.ndarray | None, mask: np.ndarray) -> tuple[float | None, float | None]:
    if hu is None or not mask.any():
        return None, None
    values = hu[mask].astype(np.float64)
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------------- comparison


def compare_structures(
    labels: dict[str, np.ndarray],
    hu: dict[str, np.ndarray | None],
    spacing_mm,
    class_names: dict[int, str],
    thresholds: FidelityThresholds | None = None,
) -> dict:
    """Compare label maps of the same grid structure by structure.

    ``labels`` maps roles ("original", "denoised", optionally "reference") to integer label maps
    ``[z, y, x]``; ``hu`` maps the same roles to HU arrays (or None); ``spacing_mm`` is (x, y, z).
    Every structure of ``class_names`` is reported, plus any other label value found. Returns
    ``{"structures": [...], "study": {...}}`` (see ``FidelityThresholds`` for the verdicts).
    """
    thresholds = thresholds or FidelityThresholds()
    roles = _checked_roles(labels)
    spacing_zyx = tuple(float(s) for s in spacing_mm)[::-1]
    grid = _Grid(spacing_zyx=spacing_zyx, voxel_ml=float(np.prod(spacing_zyx)) / 1000.0)
    pairs = [(t, b) for t, b in PAIRS if t in roles and b in roles]
    names = {int(k): str(v) for k, v in class_names.items()}
    boxes = {role: _boxes(np.asarray(labels[role]), role, names) for role in roles}

    structures = []
    for value in sorted(names):
        found = [boxes[r][value - 1] for r in roles if value - 1 < len(boxes[r]) and boxes[r][value - 1] is not None]
        box = (
            tuple(slice(min(f[a].start for f in found), max(f[a].stop for f in found)) for a in range(3))
            if found
            else None
        )
        entry = _structure_entry(value, names[value], box, labels, hu, roles, pairs, grid, thresholds)
        structures.append(entry)

    structures.sort(key=lambda s: (VERDICT_ORDER[s["verdict"]], s["name"]))
    return {"structures": structures, "study": _study_verdict(structures, "reference" in roles)}


@dataclasses.dataclass(frozen=True)
class _Grid:
    spacing_zyx: tuple[float, ...]
    voxel_ml: float


def _checked_roles(labels: dict[str, np.ndarray]) -> list[str]:
    """The roles of ``labels`` in ROLES order, after checking that they share one shape."""
    roles = [r for r in ROLES if r in labels]
    if "original" not in roles or "denoised" not in roles:
        raise ValueError("compare_structures needs at least the 'original' and 'denoised' label maps")
    shape = labels["original"].shape
    for role in roles:
        if labels[role].shape != shape:
            raise ValueError(f"label map '{role}' has shape {labels[role].shape}, 'original' has {shape}")
    return roles


def _boxes(lab: np.ndarray, role: str, names: dict[int, str]) -> list:
    """Bounding boxes of each label value (``find_objects``); label values without a name are named in ``names``."""
    if lab.dtype.kind not in "iu":
        raise ValueError(f"label map '{role}' is {lab.dtype}, not integer")
    if not lab.size or lab.max() <= 0:
        return []
    if lab.min() < 0:
        raise ValueError(f"label map '{role}' holds negative values")
    for value in np.flatnonzero(np.bincount(lab.ravel()))[1:]:
        names.setdefault(int(value), f"label_{int(value)}")
    return find_objects(lab, max(names))


def _structure_entry(
    value: int,
    name: str,
    box: tuple[slice, ...] | None,
    labels: dict,
    hu: dict,
    roles: list[str],
    pairs: list[tuple[str, str]],
    grid: _Grid,
    thresholds: FidelityThresholds,
) -> dict:
    """One structure across the scans: its figures in each image and each pair, and its verdicts."""
    entry: dict = {"label": value, "name": name, "images": {}, "pairs": {}}
    masks = {}
    for role in roles:
        mask, mean, std, voxels = None, None, None, 0
        if box is not None:
            mask = labels[role][box] == value
            mean, std = _hu_stats(None if hu.get(role) is None else hu[role][box], mask)
            voxels = int(mask.sum())
        entry["images"][role] = {
            "present": voxels > 0,
            "voxels": voxels,
            "volume_ml": voxels * grid.voxel_ml,
            "hu_mean": mean,
            "hu_std": std,
        }
        masks[role] = mask
    for test, base in pairs:
        entry["pairs"][pair_name(test, base)] = _pair_figures(test, base, masks, hu, box, grid, thresholds)
    entry["verdict"], entry["reasons"], entry["small"] = _verdict(entry, thresholds)
    if "reference" in roles:
        entry["reference"] = _reference_verdict(entry, thresholds)
    return entry


def _pair_figures(
    test: str,
    base: str,
    masks: dict,
    hu: dict,
    box: tuple[slice, ...] | None,
    grid: _Grid,
    thresholds: FidelityThresholds,
) -> dict:
    """How the structure in ``test`` differs from ``base``: overlap, surfaces, volume and the HU under it."""
    if box is None:
        figures = overlap_metrics(
            np.zeros(1, bool), np.zeros(1, bool), grid.spacing_zyx, thresholds.surface_tolerances_mm
        )
        figures.update(common_voxels=0, hu_shift=None, hu_std_ratio=None)
        return figures
    m_test, m_base = masks[test], masks[base]
    figures = overlap_metrics(m_test, m_base, grid.spacing_zyx, thresholds.surface_tolerances_mm)
    common = m_test & m_base
    n_common = int(common.sum())
    figures["common_voxels"] = n_common
    figures["hu_shift"] = figures["hu_std_ratio"] = None
    if hu.get(test) is not None and hu.get(base) is not None and n_common >= thresholds.min_hu_voxels:
        hu_test = hu[test][box][common].astype(np.float64)
        hu_base = hu[base][box][common].astype(np.float64)
        figures["hu_shift"] = float(hu_test.mean() - hu_base.mean())
        if hu_base.std() > 0:
            figures["hu_std_ratio"] = float(hu_test.std() / hu_base.std())
    return figures


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def _verdict(entry: dict, th: FidelityThresholds) -> tuple[str, list[str], bool]:
    """Verdict of one structure for denoised against original, with the reasons in words."""
    orig, den = entry["images"]["original"], entry["images"]["denoised"]
    figures = entry["pairs"][pair_name("denoised", "original")]
    small = max(orig["volume_ml"], den["volume_ml"]) < th.small_structure_ml
    if not orig["present"] and not den["present"]:
        return "absent", [], small
    if orig["present"] != den["present"]:
        where = "denoised" if den["present"] else "original"
        size = max(orig["volume_ml"], den["volume_ml"])
        reason = f"found only in the {where} scan ({size:.2f} ml)"
        return ("check" if small else "changed"), [reason], small
    changed, check = [], []

    def judge(value, kept, changed_limit, higher_is_better, describe):
        """File ``describe(limit)`` under changed or check when ``value`` is past that limit."""
        if value is None:
            return
        past = (lambda limit: value < limit) if higher_is_better else (lambda limit: value > limit)
        if past(changed_limit) and not small:
            changed.append(describe(changed_limit))
        elif past(kept):
            check.append(describe(kept))

    if not small:
        judge(
            figures["dice"],
            th.dice_kept,
            th.dice_changed,
            True,
            lambda limit: f"Dice {_fmt(figures['dice'])} < {limit:g}",
        )
        vol = figures["volume_change_pct"]
        if vol is not None:
            judge(
                abs(vol),
                th.volume_change_kept_pct,
                th.volume_change_changed_pct,
                False,
                lambda limit: f"volume {vol:+.1f}% (limit ±{limit:g}%)",
            )
    nsd = figures.get(th.nsd_key)
    judge(
        nsd,
        th.nsd_kept,
        th.nsd_changed,
        True,
        lambda limit: f"surface Dice@{th.nsd_tolerance_mm:g}mm {_fmt(nsd)} < {limit:g}",
    )
    shift = figures["hu_shift"]
    if shift is not None:
        judge(
            abs(shift),
            th.hu_shift_kept,
            th.hu_shift_changed,
            False,
            lambda limit: f"mean HU shift {shift:+.1f} HU (limit ±{limit:g})",
        )
    ratio = figures["hu_std_ratio"]
    if ratio is not None and ratio > th.noise_ratio_max:
        check.append(f"HU noise up: std x{ratio:.2f}")
    if changed:
        return "changed", changed + check, small
    if check:
        return "check", check, small
    return "kept", [], small


def _reference_verdict(entry: dict, th: FidelityThresholds) -> dict:
    """Is the denoised scan at least as close to the reference as the low-dose one was (this structure)?"""
    dr = entry["pairs"][pair_name("denoised", "reference")]
    orr = entry["pairs"][pair_name("original", "reference")]
    if not any(entry["images"][r]["present"] for r in ("original", "denoised", "reference")):
        return {"verdict": "absent", "reasons": []}
    worse, better = [], []
    d_dr, d_or = dr["dice"] or 0.0, orr["dice"] or 0.0
    if d_dr < d_or - th.reference_dice_tolerance:
        worse.append(f"Dice to reference {_fmt(d_dr)} vs {_fmt(d_or)} before")
    elif d_dr > d_or + th.reference_dice_tolerance:
        better.append(f"Dice to reference {_fmt(d_dr)} vs {_fmt(d_or)} before")
    if dr["hu_shift"] is not None and orr["hu_shift"] is not None:
        a, b = abs(dr["hu_shift"]), abs(orr["hu_shift"])
        if a > b + th.reference_hu_tolerance:
            worse.append(f"HU off the reference by {dr['hu_shift']:+.1f} vs {orr['hu_shift']:+.1f} before")
        elif a < b - th.reference_hu_tolerance:
            better.append(f"HU off the reference by {dr['hu_shift']:+.1f} vs {orr['hu_shift']:+.1f} before")
    if worse:
        return {"verdict": "further", "reasons": worse + better}
    if better:
        return {"verdict": "closer", "reasons": better}
    return {"verdict": "as close", "reasons": []}


def _study_verdict(structures: list[dict], with_reference: bool) -> dict:
    counts = {v: 0 for v in VERDICT_ORDER}
    for s in structures:
        counts[s["verdict"]] += 1
    present = len(structures) - counts["absent"]
    if present == 0:
        verdict, summary = "check", "no structure was found in either scan"
    elif counts["changed"]:
        verdict = "changed"
        summary = f"{counts['changed']} of {present} structures changed, {counts['check']} to check"
    elif counts["check"]:
        verdict, summary = "check", f"{counts['check']} of {present} structures to check, none changed"
    else:
        verdict, summary = "kept", f"all {present} structures kept"
    study = {
        "verdict": verdict,
        "summary": summary,
        "counts": counts,
        "structures_present": present,
        "flagged": [s["name"] for s in structures if s["verdict"] in ("changed", "check")],
    }
    if with_reference:
        ref_counts = {v: 0 for v in REFERENCE_VERDICT_ORDER}
        for s in structures:
            ref_counts[s["reference"]["verdict"]] += 1
        judged = len(structures) - ref_counts["absent"]
        at_least = ref_counts["closer"] + ref_counts["as close"]
        study["reference"] = {
            "counts": ref_counts,
            "at_least_as_close": judged > 0 and ref_counts["further"] == 0,
            "summary": (
                f"denoised at least as close to the reference as the low-dose scan for {at_least} of "
                f"{judged} structures"
                if judged
                else "no structure found in any scan"
            ),
            "further": [s["name"] for s in structures if s["reference"]["verdict"] == "further"],
        }
    return study


def finite_or_none(value):
    """JSON has no NaN or infinity: such values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
