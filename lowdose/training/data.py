"""Training data: normal-dose CT made into low/normal-dose pairs by the simulator, or real pairs.

Slices are served as 2.5-D slabs (the slice and its neighbours; edges repeat the end slice), so the
network sees that noise is independent from slice to slice while anatomy is not. Patches are sampled
inside the body and flipped/rotated with MONAI transforms, identically for both images of a pair.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from .. import kernel, simulate
from ..anatomy.regions import REGIONS
from ..bundle import hu_to_input
from ..errors import LowdoseError
from ..io import GRID_SUFFIXES, load_ct
from ..slabs import BODY_HU, body_slices, slab
from ..volume import CTVolume

RUN_LENGTH = 8  # consecutive slices simulated together for one epoch


def find_ct_inputs(path: str | Path) -> list[Path]:
    """Every CT under ``path``: a file, a DICOM series folder, or a folder of those (searched down)."""
    path = Path(path)
    if not path.exists():
        raise LowdoseError(f"{path}: no such file or folder (listed in the training config)")
    if path.is_file():
        return [path]
    found: list[Path] = []
    for folder in sorted([path, *[p for p in path.rglob("*") if p.is_dir()]]):
        files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
        found += sorted(f for f in files if f.name.lower().endswith(GRID_SUFFIXES))
        if any(_looks_like_dicom(f) for f in files[:20]):
            found.append(folder)
    if not found:
        raise LowdoseError(f"{path}: holds no CT (no NIfTI/NRRD/MHA files, no DICOM series)")
    return found


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


@dataclasses.dataclass
class PairSource:
    """Where pairs come from: normal-dose volumes (simulated mode) or (low, normal, dose) triples."""

    normal: list[CTVolume]
    low: list[CTVolume] | None = None
    paired_dose: float | None = None


def load_sources(paths: list[str], mode: str, paired_dose: float | None = None) -> PairSource:
    if mode == "simulated":
        return PairSource(normal=[load_ct(p) for entry in paths for p in find_ct_inputs(entry)])
    normals, lows = [], []
    for entry in paths:
        for case in _paired_cases(Path(entry)):
            normal, low = load_ct(case[0]), load_ct(case[1])
            if normal.shape != low.shape:
                raise LowdoseError(f"{case[1]}: low-dose shape {low.shape} differs from full dose {normal.shape}")
            normals.append(normal)
            lows.append(low)
    return PairSource(normal=normals, low=lows, paired_dose=paired_dose)


def _paired_cases(root: Path) -> list[tuple[Path, Path]]:
    """(full-dose, low-dose) series folders in the TCIA LDCT-and-Projection-data layout: under each
    patient, one series whose folder name says full/normal dose and one that says low/quarter dose."""
    cases = []
    for patient in sorted([root, *[p for p in root.rglob("*") if p.is_dir()]]):
        children = [c for c in patient.iterdir() if c.is_dir()]
        full = [c for c in children if any(w in c.name.lower() for w in ("full", "normal", "ndct"))]
        low = [c for c in children if any(w in c.name.lower() for w in ("low", "quarter", "ldct"))]
        if len(full) == 1 and len(low) == 1:
            cases.append((full[0], low[0]))
    if not cases:
        raise LowdoseError(
            f"{root}: no patient folder holds one full-dose and one low-dose series folder "
            "(names containing 'full'/'normal' and 'low'/'quarter')"
        )
    return cases


def with_sharper_kernels(volumes: list[CTVolume], kernels: list[list[float]]) -> list[CTVolume]:
    """``volumes`` and, after them, each re-filtered to each ``[NPS mean frequency, exponent]`` it is smoother
    than (lowdose.kernel): the same scans as sharper reconstruction kernels would show them."""
    variants = []
    for volume in volumes:
        for mean_per_mm, exponent in kernels:
            made = kernel.resharpened(volume, float(mean_per_mm), float(exponent))
            if made is not None:
                variants.append(made[0])
    return [*volumes, *variants]


class PairSampler:
    """Makes one epoch's training patches: fresh simulated noise at random doses every epoch."""

    def __init__(
        self,
        source: PairSource,
        doses: list[float],
        channels: int,
        normalisation: dict,
        patch_size: int,
        patches_per_slice: int,
        slices_per_epoch: int,
        min_tissue_fraction: float,
        seed: int,
        cache_dir: str | None = None,
        pool_size: int = 0,
        match_source: bool = False,
        single_slice_fraction: float = 0.0,
        regions: list[np.ndarray] | None = None,
    ):
        self.cache_dir = cache_dir
        # Region index of every slice of every source (lowdose.anatomy.regions; < 0: unknown): patches then carry
        # their slice's as a one-hot ``region`` (DA-Diff's region conditioning). None: patches carry none.
        self.regions = regions
        self.single_slice_fraction = single_slice_fraction
        # One calibration per series (seconds each), reused for every run of slices simulated from it.
        self.noise_models = (
            [simulate.source_noise_model(volume, seed=seed) or False for volume in source.normal]
            if match_source
            else None
        )
        self.source, self.doses, self.channels = source, [float(d) for d in doses], channels
        self.normalisation = normalisation
        self.patch_size, self.patches_per_slice = patch_size, patches_per_slice
        self.slices_per_epoch = slices_per_epoch
        self.candidates = [
            (v, k)
            for v, volume in enumerate(source.normal)
            for k in body_slices(volume, min_tissue_fraction)
            if min(volume.shape[1:]) >= patch_size
        ]
        if not self.candidates:
            raise LowdoseError(
                f"no training slice is at least {patch_size} pixels wide with " f"{min_tissue_fraction:.0%} body in it"
            )
        self.seed = seed
        self.pool: list[tuple[int, float, int]] = []  # (candidate index, dose, noise seed)
        self._pool_memory: dict[tuple, np.ndarray] = {}
        if pool_size and source.low is None:
            rng = np.random.default_rng([seed, 7])
            self.pool = [
                (int(rng.integers(len(self.candidates))), self.doses[i % len(self.doses)], int(rng.integers(2**31)))
                for i in range(pool_size)
            ]

    def _simulate(self, volume: CTVolume, v: int, lo: int, hi: int, dose: float, seed: int) -> np.ndarray:
        """Slices lo:hi of volume v at ``dose``; cached on disk when ``cache_dir`` is set, so runs that
        share a seed (e.g. the networks of one benchmark) share the simulated data instead of redoing it."""
        cache = None
        if self.cache_dir is not None:
            # The simulator's calibration is part of the key: a recalibrated simulator makes new data.
            source = (
                f"{volume.metadata.get('path', v)}|{lo}|{hi}|{dose:.6f}|{seed}|"
                f"{simulate.FULL_DOSE_PHOTONS}|{simulate.ELECTRONIC_NOISE_PHOTONS}|{simulate.ScannerGeometry()}"
                f"|{self.noise_models[v] if self.noise_models else ''}"
            )
            key = hashlib.sha1(source.encode()).hexdigest()[:20]
            cache = Path(self.cache_dir) / f"{key}.npy"
            if cache.is_file():
                return np.load(cache)
        stack = CTVolume(
            hu=volume.hu[lo:hi],
            spacing_mm=volume.spacing_mm,
            metadata={key: value for key, value in volume.metadata.items() if key == "padding_value_hu"},
        )
        match = self.noise_models[v] if self.noise_models else False
        low = simulate.simulate_low_dose(stack, dose, seed=seed, match_source=match).hu
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, low.astype(np.float32))
            os.replace(tmp, cache)
        return low

    def _pooled(
        self, pick: int, volume: CTVolume, v: int, lo: int, hi: int, dose: float, noise_seed: int
    ) -> np.ndarray:
        """A run of the pool: simulated once, then read from the disk cache or kept in memory."""
        key = (pick, dose, noise_seed)
        low_run = self._pool_memory.get(key)
        if low_run is None:
            low_run = self._simulate(volume, v, lo, hi, dose, noise_seed)
            if self.cache_dir is None:
                self._pool_memory[key] = low_run
        return low_run

    def epoch(self, epoch: int, slice_prior=None) -> list[dict]:
        """A list of MONAI-style items {low: [C,P,P], normal: [1,P,P], dose: float} for one epoch.

        ``slice_prior`` (BioAtt): a function of a whole low-dose slice in HU giving its organ-presence
        probabilities; each patch then carries its slice's as ``organ_probabilities``, as at inference,
        where the prior is read from whole slices."""
        # monai takes seconds to import: only when a run makes patches
        from monai.transforms import Compose, RandCropByPosNegLabeld, RandFlipd, RandRotate90d

        rng = np.random.default_rng([self.seed, epoch])
        crop = Compose(
            [
                RandCropByPosNegLabeld(
                    keys=["low", "normal", "body"],
                    label_key="body",
                    spatial_size=(self.patch_size, self.patch_size),
                    pos=1,
                    neg=0,
                    num_samples=self.patches_per_slice,
                ),
                RandFlipd(keys=["low", "normal"], prob=0.5, spatial_axis=1),
                RandRotate90d(keys=["low", "normal"], prob=0.75, max_k=3),
            ]
        )
        crop.set_random_state(seed=int(rng.integers(2**31)))
        items = []
        # Simulate runs of consecutive slices: each simulated slice then serves as centre and as a
        # neighbour, about 3x cheaper than simulating every 2.5-D slab on its own.
        runs = max(1, self.slices_per_epoch // RUN_LENGTH)
        half = self.channels // 2
        picks: list[tuple[int, float | None, int | None]]  # (candidate index, dose, noise seed): the pool's or new
        if self.pool:
            picks = [self.pool[int(i)] for i in rng.choice(len(self.pool), size=runs, replace=len(self.pool) < runs)]
        else:
            picks = [
                (int(i), None, None)
                for i in rng.choice(len(self.candidates), size=runs, replace=len(self.candidates) < runs)
            ]
        for pick, dose, noise_seed in picks:
            v, k = self.candidates[pick]
            volume = self.source.normal[v]
            first = max(0, min(k, volume.shape[0] - RUN_LENGTH))
            centres = list(range(first, min(first + RUN_LENGTH, volume.shape[0])))
            lo, hi = max(0, centres[0] - half), min(volume.shape[0], centres[-1] + half + 1)
            normal_run = volume.hu[lo:hi]
            if self.source.low is not None:
                low_run, dose = self.source.low[v].hu[lo:hi], self.source.paired_dose
            elif dose is not None:
                assert noise_seed is not None  # a pooled pick: its dose and its noise seed
                low_run = self._pooled(pick, volume, v, lo, hi, dose, noise_seed)
            else:
                dose = float(rng.choice(self.doses))
                low_run = self._simulate(volume, v, lo, hi, dose, int(rng.integers(2**31)))
            for c in centres:
                normal = slab(normal_run, c - lo, self.channels)
                if (normal[half] > BODY_HU).mean() < 0.05:
                    continue
                low = slab(low_run, c - lo, self.channels)
                if self.single_slice_fraction and rng.random() < self.single_slice_fraction:  # a lone slice
                    low = np.repeat(low[half : half + 1], self.channels, axis=0)
                item = {
                    "low": hu_to_input(low, self.normalisation),
                    "normal": hu_to_input(normal[half : half + 1], self.normalisation),
                    "body": (normal[half : half + 1] > BODY_HU).astype(np.float32),
                }
                extra = {}
                if slice_prior is not None:
                    extra["organ_probabilities"] = np.asarray(slice_prior(low_run[c - lo]), dtype=np.float32)
                if self.regions is not None:
                    extra["region"] = region_one_hot(int(self.regions[v][c]))
                for patch in crop(item):
                    items.append(
                        {
                            "low": np.asarray(patch["low"], dtype=np.float32),
                            "normal": np.asarray(patch["normal"], dtype=np.float32),
                            "dose": np.float32(dose if dose is not None else np.nan),
                            **extra,
                        }
                    )
        return items

    def whole_slices(self, epoch: int, min_fraction: float = 0.2, normal_fraction: float = 0.0):
        """Whole low-dose slabs with their dose, as the dose estimator sees slices at inference.

        Yields ``(low [C, H, W] normalised, dose)`` for the body slices of every run of the pool (or of
        one epoch's fresh runs without a pool), runs in a random order and each slab randomly flipped.
        A ``normal_fraction`` of the runs are the source itself, at dose 1.
        """
        if self.source.low is not None:
            raise LowdoseError("the dose estimator is trained on simulated doses; paired data has one dose")
        rng = np.random.default_rng([self.seed, epoch, 2])
        half = self.channels // 2
        entries = self.pool or [
            (int(i), float(rng.choice(self.doses)), int(rng.integers(2**31)))
            for i in rng.choice(len(self.candidates), size=max(1, self.slices_per_epoch // RUN_LENGTH))
        ]
        for pick, dose, noise_seed in (entries[int(i)] for i in rng.permutation(len(entries))):
            v, k = self.candidates[pick]
            volume = self.source.normal[v]
            first = max(0, min(k, volume.shape[0] - RUN_LENGTH))
            centres = list(range(first, min(first + RUN_LENGTH, volume.shape[0])))
            lo, hi = max(0, centres[0] - half), min(volume.shape[0], centres[-1] + half + 1)
            if normal_fraction and rng.random() < normal_fraction:
                low_run, dose = volume.hu[lo:hi], 1.0
            else:
                low_run = self._pooled(pick, volume, v, lo, hi, dose, noise_seed)
            for c in centres:
                if (volume.hu[c] > BODY_HU).mean() < min_fraction:
                    continue
                low = hu_to_input(slab(low_run, c - lo, self.channels), self.normalisation)
                if rng.random() < 0.5:
                    low = low[:, :, ::-1]
                if rng.random() < 0.5:
                    low = low[:, ::-1, :]
                yield np.ascontiguousarray(low), dose


def region_one_hot(index: int) -> np.ndarray:
    """A slice's region index as the one-hot vector over ``REGIONS`` a region-conditioned network takes (all
    zeros when unknown: index < 0)."""
    vector = np.zeros(len(REGIONS), dtype=np.float32)
    if index >= 0:
        vector[index] = 1.0
    return vector


def validation_set(
    volumes: list[CTVolume],
    doses: list[float],
    channels: int,
    slices_per_volume: int,
    seed: int = 12345,
    match_source: bool = False,
    regions: list[np.ndarray] | None = None,
) -> list[dict]:
    """Fixed full slices for validation: the same simulated noise every epoch (HU, not normalised); with
    ``regions`` (per slice of each volume, as ``PairSampler`` takes them) each carries its one-hot ``region``."""
    items = []
    for v, volume in enumerate(volumes):
        match = (simulate.source_noise_model(volume, seed=seed) or False) if match_source else False
        candidates = body_slices(volume, 0.2) or list(range(volume.shape[0]))
        picks = [candidates[int(i)] for i in np.linspace(0, len(candidates) - 1, slices_per_volume).round()]
        for dose in doses:
            for k in sorted(set(picks)):
                normal = slab(volume.hu, k, channels)
                stack = CTVolume(hu=normal, spacing_mm=volume.spacing_mm)
                low = simulate.simulate_low_dose(stack, dose, seed=seed + 1000 * v + k, match_source=match).hu
                item = {"low_hu": low, "normal_hu": normal[channels // 2], "dose": float(dose), "volume": v, "slice": k}
                if regions is not None:
                    item["region"] = region_one_hot(int(regions[v][k]))
                items.append(item)
    return items
