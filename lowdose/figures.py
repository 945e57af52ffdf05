"""Side-by-side pictures of CT slices in a display window, for the demo and the benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .metrics import apply_window
from .windows import window as window_of


def side_by_side_png(
    path: str | Path,
    panels: dict[str, np.ndarray],
    window: str = "abdomen",
    title: str = "",
    spacing_mm: tuple[float, float] = (1.0, 1.0),
    zoom: tuple[slice, slice] | None = None,
) -> Path:
    """Write ``panels`` (caption -> 2-D HU slice) in a row, all in the same display window.

    With ``zoom`` (rows, columns of the slice) a second row shows that region enlarged, where noise
    texture and small structures are judged. Pixels are drawn square in millimetres (``spacing_mm`` is
    row, column spacing). Written to a temporary file and renamed, so a reader never sees half a PNG.
    """
    import matplotlib  # 0.5 s to import, for pictures only: the CLI imports this module for --help

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the file-only backend (no display on a server)

    rows = 2 if zoom is not None else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(3.2 * len(panels), 3.4 * rows), squeeze=False)
    aspect = spacing_mm[0] / spacing_mm[1]
    centre, width = window_of(window)
    for column, (caption, image) in enumerate(panels.items()):
        shown = apply_window(image, window)
        axes[0, column].imshow(shown, cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="none")
        axes[0, column].set_title(caption, fontsize=9)
        if zoom is not None:
            rows_, cols_ = zoom
            axes[0, column].add_patch(
                matplotlib.patches.Rectangle(
                    (cols_.start, rows_.start),
                    cols_.stop - cols_.start,
                    rows_.stop - rows_.start,
                    fill=False,
                    edgecolor="#e0a000",
                    linewidth=0.8,
                )
            )
            axes[1, column].imshow(shown[zoom], cmap="gray", vmin=0, vmax=1, aspect=aspect, interpolation="none")
        for ax in axes[:, column]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{title}  [window C{centre:g}/W{width:g} HU]".strip(), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def body_zoom(hu: np.ndarray, size: int = 128) -> tuple[slice, slice]:
    """A ``size`` square centred on the body's centre of mass in a 2-D HU slice (for ``zoom``)."""
    body = hu > -500
    if not body.any():
        body = np.ones_like(hu, dtype=bool)
    r, c = (int(round(v)) for v in np.argwhere(body).mean(axis=0))
    size = min(size, *hu.shape)
    r0 = int(np.clip(r - size // 2, 0, hu.shape[0] - size))
    c0 = int(np.clip(c - size // 2, 0, hu.shape[1] - size))
    return slice(r0, r0 + size), slice(c0, c0 + size)
