"""Bounds on what an input may make lowdose allocate, checked from headers before any voxel is read.

A hospital network hands lowdose files it did not make: a 1 kB header can claim gigabytes, a compressed
file can expand a thousandfold (CT compresses about 3:1, zeros about 1000:1). ``InputLimits`` says how
much an input may claim; ``load_ct`` and the server's zip reader refuse anything beyond it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from .errors import CTInputError, LowdoseError

ENV_MAX_VOXELS = "LOWDOSE_MAX_VOXELS"
ENV_MAX_EXPANDED_MB = "LOWDOSE_MAX_EXPANDED_MB"
ENV_MAX_COMPRESSION_RATIO = "LOWDOSE_MAX_COMPRESSION_RATIO"


@dataclasses.dataclass(frozen=True)
class InputLimits:
    """How much one input may claim: voxels, bytes once decompressed, and expansion over its stored size.

    ``max_voxels`` bounds every volume (3000 slices of 1024x1024 by default); ``max_expanded_bytes`` and
    ``max_compression_ratio`` bound compressed inputs (.nii.gz, gzip-encoded NRRD/MHA, zip uploads).
    """

    max_voxels: int = 1024 * 1024 * 3000
    max_expanded_bytes: int = 2 * 2**30
    max_compression_ratio: float = 100.0

    def __post_init__(self):
        for name in ("max_voxels", "max_expanded_bytes", "max_compression_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise LowdoseError(f"InputLimits.{name} must be a positive number, not {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InputLimits:
        """The defaults, overridden by LOWDOSE_MAX_VOXELS, LOWDOSE_MAX_EXPANDED_MB (MiB) and
        LOWDOSE_MAX_COMPRESSION_RATIO when set; a value that is not a positive number is refused by name."""
        environ = os.environ if environ is None else environ
        defaults = cls()
        voxels = _positive(environ, ENV_MAX_VOXELS, integer=True)
        megabytes = _positive(environ, ENV_MAX_EXPANDED_MB)
        ratio = _positive(environ, ENV_MAX_COMPRESSION_RATIO)
        return cls(
            max_voxels=defaults.max_voxels if voxels is None else int(voxels),
            max_expanded_bytes=defaults.max_expanded_bytes if megabytes is None else int(megabytes * 2**20),
            max_compression_ratio=defaults.max_compression_ratio if ratio is None else float(ratio),
        )

    def check_voxels(self, path: str | os.PathLike, voxels: int, shape_text: str) -> None:
        """Refuse a volume of more than ``max_voxels`` voxels (``shape_text`` as the header gives it)."""
        if voxels > self.max_voxels:
            raise CTInputError(
                path,
                f"the header describes {shape_text} = {voxels:,} voxels, more than the limit of "
                f"{self.max_voxels:,} ({ENV_MAX_VOXELS})",
            )

    def check_expansion(
        self, path: str | os.PathLike, expanded_bytes: int, compressed_bytes: int, what: str = "the compressed data"
    ) -> None:
        """Refuse compressed data that would expand beyond ``max_expanded_bytes`` or by more than
        ``max_compression_ratio`` times its stored size."""
        if expanded_bytes > self.max_expanded_bytes:
            raise CTInputError(
                path,
                f"{what} would expand to {_size(expanded_bytes)}, more than the limit of "
                f"{_size(self.max_expanded_bytes)} ({ENV_MAX_EXPANDED_MB})",
            )
        ratio = expanded_bytes / max(compressed_bytes, 1)
        if ratio > self.max_compression_ratio:
            raise CTInputError(
                path,
                f"{what} would expand {ratio:,.0f} times ({_size(compressed_bytes)} to "
                f"{_size(expanded_bytes)}), more than the limit of {self.max_compression_ratio:g} "
                f"({ENV_MAX_COMPRESSION_RATIO}; CT compresses about 3:1): a decompression "
                "bomb or a damaged file",
            )


def _positive(environ: Mapping[str, str], name: str, integer: bool = False) -> float | None:
    text = environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise LowdoseError(f"{name}={text!r}: must be {kind} greater than 0") from None
    if not value > 0 or value != value or value == float("inf"):
        raise LowdoseError(f"{name}={text!r}: must be greater than 0 and finite")
    return value


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"
