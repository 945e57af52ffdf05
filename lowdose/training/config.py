"""The training runs described by one YAML file: a denoiser (data, doses, network, optimiser, schedule,
anatomy-aware terms, output) or lowdose's anatomy encoder (label maps in, an encoder bundle out)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from ..errors import LowdoseError

DEFAULT_DOSES = (1 / 2, 1 / 4, 1 / 6, 1 / 10, 1 / 20)


@dataclasses.dataclass
class DataConfig:
    """Where the CT comes from. ``mode: simulated`` makes low-dose pairs on the fly from normal-dose
    series; ``mode: paired`` reads real low/normal-dose pairs (TCIA LDCT-and-Projection-data layout:
    one folder per patient holding a full-dose and a low-dose series)."""

    mode: str = "simulated"
    train: list[str] = dataclasses.field(default_factory=list)
    validation: list[str] = dataclasses.field(default_factory=list)
    doses: list[float] = dataclasses.field(default_factory=lambda: list(DEFAULT_DOSES))
    validation_doses: list[float] = dataclasses.field(default_factory=lambda: [1 / 4, 1 / 10])
    patch_size: int = 96
    patches_per_slice: int = 8
    slices_per_epoch: int = 32
    validation_slices: int = 4
    min_tissue_fraction: float = 0.2
    simulation_cache: str | None = None  # folder that keeps simulated slices for reuse across runs
    # 0: every epoch simulates fresh runs of slices. N > 0: a fixed pool of N runs (position, dose,
    # noise seed; doses in equal shares) is simulated once and epochs draw from it with fresh crops,
    # flips and rotations -- on a CPU the simulator, not the network, is then no longer the bottleneck.
    simulation_pool: int = 0
    paired_dose: float | None = None  # paired mode: the dose fraction of the real low-dose series
    # Simulated noise calibrated to each series' own (kernel texture, noise level; lowdose.simulate
    # match_source): what a real low-dose scan of that scanner would hold. Off: the simulator's fixed model.
    match_source: bool = False
    # The share of training slabs whose neighbours are the centre slice repeated, as a lone slice or the end
    # of a series reaches a 2.5-D network at inference: it learns to denoise those too.
    single_slice_fraction: float = 0.0
    # Kernel augmentation (lowdose.kernel): each simulated training and validation series is also re-filtered to
    # each of these noise textures, [NPS mean frequency in cycles/mm, exponent p of H(f) = exp(k f^p)], and joins
    # the data as a sharper-kernel reconstruction of the same scan (when it is smoother than that).
    sharper_kernels: list[list[float]] = dataclasses.field(default_factory=list)

    def check_sharper_kernels(self, source: str) -> None:
        """Refuse a kernel augmentation entry out of range, or one asked of paired data (one kernel per scan)."""
        for kernel in self.sharper_kernels:
            if len(kernel) != 2 or not 0.1 <= float(kernel[0]) <= 1.0 or not 0.5 <= float(kernel[1]) <= 3.0:
                raise LowdoseError(
                    f"{source}: each data.sharper_kernels entry is [mean frequency in 0.1..1.0 cycles/mm, "
                    f"exponent in 0.5..3]; got {kernel!r}"
                )
        if self.sharper_kernels and self.mode != "simulated":
            raise LowdoseError(f"{source}: data.sharper_kernels needs data.mode: simulated (paired scans: one kernel)")


@dataclasses.dataclass
class NetworkConfig:
    name: str = "dose_unet"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=lambda: {"in_channels": 3, "dose_conditioning": True})
    dose_estimator: bool = True
    dose_estimator_kwargs: dict[str, Any] = dataclasses.field(default_factory=lambda: {"in_channels": 3})


@dataclasses.dataclass
class OptimConfig:
    epochs: int = 20
    batch_size: int = 16
    learning_rate: float = 2e-4
    weight_decay: float = 1e-4
    ssim_weight: float = 0.1
    # Extra weight of the pixel loss where the normal-dose slice lies in the soft-tissue window (C50/W400), where
    # low-dose noise hides low-contrast lesions; 0: every pixel alike (lung and bone as much as liver).
    soft_tissue_weight: float = 0.0
    dose_loss_weight: float = 1.0  # 0: the dose estimator is held as it came (init_bundle), not trained
    # Which epoch the bundle gets: "val_psnr" (the best on the validation series; without one, the lowest
    # training loss) or "last" (the end of the schedule, when PSNR is not what the run optimises for).
    selection: str = "val_psnr"
    # Second stage for the dose estimator: epochs over whole slices of the simulation pool (it reads
    # whole slices at inference, while the first stage only shows it the denoiser's patches).
    estimator_epochs: int = 0
    estimator_learning_rate: float = 3e-4
    estimator_batch_size: int = 8
    # The share of stage 2's slices shown at normal dose (labelled 1), so that a routine scan reads as ~1.
    estimator_normal_fraction: float = 0.0


@dataclasses.dataclass
class AnatomyConfig:
    """The ``anatomy`` section of a training config: which anatomy-aware terms are on, and their weights.

    A weight of 0 switches its term off; ``bioatt: true`` adds BioAtt attention to the generator (the
    network's ``organ_attention``), which then reads organ probabilities from the anatomy encoder.
    """

    encoder: str = "anatomy_encoder"  # lowdose bundle | totalsegmentator[:fast|:full] | timm:<name>:<checkpoint>
    mac_weight: float = 0.0  # ASCON MAC loss
    adversarial_weight: float = 0.0  # ALDEN anatomy-aware discriminator
    semantic_contrastive_weight: float = 0.0  # ALDEN semantic-guided contrastive loss
    bioatt: bool = False  # BioAtt anatomy-steered attention
    discriminator_learning_rate: float = 2e-4

    @property
    def enabled(self) -> list[str]:
        names = []
        if self.mac_weight > 0:
            names.append("ASCON MAC loss")
        if self.adversarial_weight > 0:
            names.append("ALDEN anatomy-aware discriminator")
        if self.semantic_contrastive_weight > 0:
            names.append("ALDEN semantic contrastive loss")
        if self.bioatt:
            names.append("BioAtt organ-prior attention")
        return names

    @property
    def needs_encoder(self) -> bool:
        return self.adversarial_weight > 0 or self.semantic_contrastive_weight > 0 or self.bioatt


@dataclasses.dataclass
class DaClipConfig:
    """The ``da_clip`` section: what ``network.name: da_clip`` (lowdose's DA-CLIP encoder) trains on and with.

    Region labels come from TotalSegmentator ``total`` label maps (``label_maps``: series -> label map) where
    given, else from lowdose.anatomy.regions' table of the shared series. ``held_out_regions`` never reach
    training (their slices are dropped even from a series listed in ``data.train``)."""

    label_maps: dict[str, str] = dataclasses.field(default_factory=dict)
    held_out_regions: list[str] = dataclasses.field(default_factory=list)
    doses_per_run: int = 2  # each simulated run of slices at this many doses: the dose contrast sees one anatomy
    temperature: float = 0.1
    dose_contrastive_weight: float = 1.0
    region_contrastive_weight: float = 1.0
    dose_regression_weight: float = 1.0
    region_classification_weight: float = 0.5


@dataclasses.dataclass
class DiffusionConfig:
    """The ``diffusion`` section, for the ``dose_diffusion`` network: how it trains. How it samples (steps, noise
    scale) is the network's (``network.kwargs``: ``sampling_steps``, ``noise_scale``), so its bundle keeps it."""

    loss: str = "l1"  # on the predicted residual: l1 (RDDM's and FoundDiff's) or l2
    # Region conditioning (network.kwargs.region_classes > 0): training patches carry their slice's one-hot
    # region from these TotalSegmentator label maps (series -> label map), else lowdose.anatomy.regions' table;
    # the bundle ships ``region_encoder`` (a DA-CLIP bundle, name or folder), whose region probabilities of each
    # slice condition the network at inference. Without one, inference passes no region (unknown).
    label_maps: dict[str, str] = dataclasses.field(default_factory=dict)
    region_encoder: str | None = None

    def check(self, source: str, given: bool, network: str) -> None:
        if given and network != "dose_diffusion":
            raise LowdoseError(f"{source}: a 'diffusion' section is for the dose_diffusion network, not {network}")
        if self.loss not in ("l1", "l2"):
            raise LowdoseError(f"{source}: diffusion.loss must be 'l1' or 'l2', not {self.loss!r}")


@dataclasses.dataclass
class TrainConfig:
    """Everything that decides a training run; saved beside its checkpoints so it can be repeated."""

    name: str = "dose_unet"
    description: str = ""  # one paragraph for the model card: what this model is
    version: str = "0.1.0"  # the bundle's version (metadata.json), named in every series the model denoises
    output_dir: str = "runs/dose_unet"
    init_bundle: str | None = None  # fine-tuning: start from this bundle's weights (a name under models/ or a folder)
    seed: int = 0
    device: str = "auto"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    anatomy: AnatomyConfig = dataclasses.field(default_factory=AnatomyConfig)
    da_clip: DaClipConfig = dataclasses.field(default_factory=DaClipConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise LowdoseError(f"{path}: no such training config") from None
        except yaml.YAMLError as exc:
            raise LowdoseError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        config = cls.from_dict(raw, source=str(path))
        # Relative data and output paths are relative to the config file, as a user would expect.
        base = path.resolve().parent
        config.data.train = [str((base / p).resolve()) for p in config.data.train]
        config.data.validation = [str((base / p).resolve()) for p in config.data.validation]
        config.output_dir = str((base / config.output_dir).resolve())
        if config.data.simulation_cache:
            config.data.simulation_cache = str((base / config.data.simulation_cache).resolve())
        for section in (config.da_clip, config.diffusion):
            maps = section.label_maps
            section.label_maps = {str((base / k).resolve()): str((base / v).resolve()) for k, v in maps.items()}
        encoder = config.diffusion.region_encoder
        if encoder and ("/" in encoder or encoder.startswith(".")):
            config.diffusion.region_encoder = str((base / encoder).resolve())  # a folder, not a name under models/
        if config.init_bundle and ("/" in config.init_bundle or config.init_bundle.startswith(".")):
            config.init_bundle = str((base / config.init_bundle).resolve())  # a folder, not a name under models/
        return config

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> TrainConfig:
        def build(kind, values, where):
            if not isinstance(values, dict):
                raise LowdoseError(f"{source}: '{where}' must be a mapping")
            names = {f.name for f in dataclasses.fields(kind)}
            unknown = set(values) - names
            if unknown:
                raise LowdoseError(
                    f"{source}: unknown key(s) in '{where}': {', '.join(sorted(unknown))} "
                    f"(known: {', '.join(sorted(names))})"
                )
            return values

        raw = dict(raw)
        if raw.pop("task", "denoising") != "denoising":
            raise LowdoseError(
                f"{source}: not a denoising config (task); anatomy encoders train with lowdose " "train too"
            )
        top = build(cls, raw, "top level")
        sections = ("data", "network", "optim", "anatomy", "da_clip", "diffusion")
        config = cls(**{k: v for k, v in top.items() if k not in sections})
        config.version = str(config.version)  # YAML reads "version: 8.0" as a number
        config.data = DataConfig(**build(DataConfig, top.get("data", {}), "data"))
        config.network = NetworkConfig(**build(NetworkConfig, top.get("network", {}), "network"))
        config.optim = OptimConfig(**build(OptimConfig, top.get("optim", {}), "optim"))
        config.anatomy = AnatomyConfig(**build(AnatomyConfig, top.get("anatomy", {}), "anatomy"))
        config.da_clip = DaClipConfig(**build(DaClipConfig, top.get("da_clip", {}), "da_clip"))
        config.diffusion = DiffusionConfig(**build(DiffusionConfig, top.get("diffusion", {}), "diffusion"))
        config.diffusion.check(source, given="diffusion" in top, network=config.network.name)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        if self.data.mode not in ("simulated", "paired"):
            raise LowdoseError(f"{source}: data.mode must be 'simulated' or 'paired', not {self.data.mode!r}")
        if not self.data.train:
            raise LowdoseError(f"{source}: data.train lists no CT series")
        for dose in [*self.data.doses, *self.data.validation_doses]:
            if not 0 < float(dose) <= 1:
                raise LowdoseError(f"{source}: dose fraction {dose} is not in (0, 1]")
        if self.data.simulation_pool < 0:
            raise LowdoseError(f"{source}: data.simulation_pool must be 0 (fresh runs) or a number of runs")
        if self.data.patch_size < 32:
            raise LowdoseError(f"{source}: data.patch_size must be at least 32")
        a = self.anatomy
        if min(a.mac_weight, a.adversarial_weight, a.semantic_contrastive_weight) < 0:
            raise LowdoseError(f"{source}: anatomy loss weights must be 0 (off) or positive")
        if a.bioatt and self.network.name != "dose_unet":
            raise LowdoseError(f"{source}: anatomy.bioatt needs the dose_unet network (it has the attention slots)")
        if not 0 <= self.data.single_slice_fraction <= 1:
            raise LowdoseError(f"{source}: data.single_slice_fraction must be in [0, 1]")
        self.data.check_sharper_kernels(source)
        if not 0 <= self.optim.estimator_normal_fraction < 1:
            raise LowdoseError(f"{source}: optim.estimator_normal_fraction must be in [0, 1)")
        if not self.optim.soft_tissue_weight >= 0:
            raise LowdoseError(
                f"{source}: optim.soft_tissue_weight must be 0 or more, not {self.optim.soft_tissue_weight}"
            )
        if self.optim.selection not in ("val_psnr", "last"):
            raise LowdoseError(f"{source}: optim.selection must be 'val_psnr' or 'last', not {self.optim.selection!r}")
        if self.optim.epochs < 1 or self.optim.batch_size < 1:
            raise LowdoseError(f"{source}: optim.epochs and optim.batch_size must be positive")

    def to_dict(self) -> dict:
        """The config as saved beside checkpoints and in bundles: a network's own section only for that network."""
        raw = dataclasses.asdict(self)
        for section, network in (("da_clip", "da_clip"), ("diffusion", "dose_diffusion")):
            if self.network.name != network:
                raw.pop(section)
        return raw


@dataclasses.dataclass
class AnatomyEncoderConfig:
    """One YAML file: label maps in, an anatomy encoder bundle out."""

    task: str = "anatomy_encoder"
    name: str = "anatomy_encoder"
    description: str = ""
    output_dir: str = "runs/anatomy_encoder"
    seed: int = 0
    device: str = "auto"
    images: list[str] = dataclasses.field(default_factory=list)  # CT files/series, each with its label map
    labels: list[str] = dataclasses.field(default_factory=list)  # TotalSegmentator `total` label maps
    validation_images: list[str] = dataclasses.field(default_factory=list)
    validation_labels: list[str] = dataclasses.field(default_factory=list)
    in_plane_spacing_mm: float = 1.0
    doses: list[float] = dataclasses.field(default_factory=lambda: [1.0, 0.5, 0.25, 0.1, 0.05])
    network_kwargs: dict = dataclasses.field(default_factory=dict)
    epochs: int = 40
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    presence_weight: float = 0.5

    @classmethod
    def from_yaml(cls, path: str | Path) -> AnatomyEncoderConfig:
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise LowdoseError(
                f"{path}: unknown key(s) {', '.join(sorted(unknown))} " f"(known: {', '.join(sorted(names))})"
            )
        config = cls(**raw)
        base = path.resolve().parent
        for key in ("images", "labels", "validation_images", "validation_labels"):
            setattr(config, key, [str((base / p).resolve()) for p in getattr(config, key)])
        config.output_dir = str((base / config.output_dir).resolve())
        if not config.images or len(config.images) != len(config.labels):
            raise LowdoseError(
                f"{path}: give one label map per image (images: {len(config.images)}, " f"labels: {len(config.labels)})"
            )
        if len(config.validation_images) != len(config.validation_labels):
            raise LowdoseError(f"{path}: give one label map per validation image")
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
