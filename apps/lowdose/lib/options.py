"""The app's options, from MONAI Label's ``--conf KEY VALUE`` pairs (all strings), checked once at start-up."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lowdose.bundle import DEFAULT_MODEL, MODELS_DIR
from lowdose.errors import LowdoseError
from lowdose.limits import InputLimits

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


@dataclasses.dataclass
class AppOptions:
    """What ``--conf`` can set (see apps/lowdose/README.md)."""

    models_dir: Path = MODELS_DIR
    models: tuple[str, ...] = ()  # empty: every bundle in models_dir
    default_model: str = DEFAULT_MODEL
    device: str = "auto"
    batch_size: int = 0  # 0: automatic (1 slice per pass on a CPU, 8 on a GPU)
    max_upload_mb: float = 2048.0
    max_unzipped_mb: float = 2048.0  # largest expanded input (zip, gzip) a request may bring
    max_voxels: int = 1024 * 1024 * 3000  # the largest real CT, about
    max_compression_ratio: float = 100.0  # CT compresses about 3:1; zeros 1000:1 (a bomb)
    output_dtype: str = "int16"
    store_to_pacs: bool = True
    infer_concurrency: int = 1
    infer_queue: int = 8  # requests that may wait for a free slot; more get 503 with Retry-After
    pacs_connect_timeout: float = 3.0  # seconds to reach the PACS
    pacs_read_timeout: float = 60.0  # seconds for the PACS to answer once reached
    fidelity_segmenter: str = "auto"
    allowed_origins: str = ""  # web origins (besides the server's own) whose pages may call the server

    @classmethod
    def from_conf(cls, conf: dict) -> AppOptions:
        defaults = cls()
        known = {f.name for f in dataclasses.fields(cls)}
        # MONAI Label's own keys (server_mode, ...) pass through unchecked; ours must parse.
        values = {}
        for key, raw in (conf or {}).items():
            if key not in known:
                continue
            default = getattr(defaults, key)
            raw = str(raw).strip()
            try:
                if isinstance(default, bool):
                    if raw.lower() not in TRUE + FALSE:
                        raise ValueError(raw)
                    values[key] = raw.lower() in TRUE
                elif isinstance(default, int):
                    values[key] = int(raw)
                elif isinstance(default, float):
                    values[key] = float(raw)
                elif isinstance(default, Path):
                    values[key] = Path(raw).expanduser().resolve()
                elif isinstance(default, tuple):
                    values[key] = tuple(s.strip() for s in raw.split(",") if s.strip())
                else:
                    values[key] = raw
            except ValueError:
                raise LowdoseError(f"--conf {key} {raw}: expected {type(default).__name__}") from None
        options = cls(**values)
        if options.device not in ("auto", "cpu", "cuda") and not options.device.startswith("cuda:"):
            raise LowdoseError(f"--conf device {options.device}: use auto, cpu or cuda")
        if options.output_dtype not in ("int16", "float32"):
            raise LowdoseError(f"--conf output_dtype {options.output_dtype}: use int16 or float32")
        if options.batch_size < 0 or options.infer_concurrency < 1 or options.infer_queue < 0:
            raise LowdoseError(
                "--conf batch_size must be 0 (automatic) or more, infer_concurrency at least 1, "
                "infer_queue 0 or more"
            )
        if (
            min(
                options.max_unzipped_mb,
                options.max_voxels,
                options.max_compression_ratio,
                options.pacs_connect_timeout,
                options.pacs_read_timeout,
            )
            <= 0
        ):
            raise LowdoseError(
                "--conf max_unzipped_mb, max_voxels, max_compression_ratio and the PACS timeouts " "must be positive"
            )
        return options

    def input_limits(self):
        """The limits every CT a request brings is checked against before it is read."""
        return InputLimits(
            max_voxels=self.max_voxels,
            max_expanded_bytes=int(self.max_unzipped_mb * 2**20),
            max_compression_ratio=self.max_compression_ratio,
        )
