"""The fidelity report: ``fidelity.json`` (machine-readable) and ``fidelity.html`` (self-contained, for people).

The HTML embeds its figures as base64 PNG (Dice per structure, HU mean and noise before/after, slices
with the segmentations over the scans in an abdomen window) and a table that sorts on any column.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from ..atomic import write_bytes_atomically
from ..windows import ABDOMEN
from .compare import REFERENCE_VERDICT_ORDER, VERDICT_ORDER, nsd_key, pair_name

VERDICT_COLOURS = {
    "changed": "#c0392b",
    "check": "#e67e22",
    "kept": "#27ae60",
    "absent": "#95a5a6",
    "further": "#c0392b",
    "as close": "#7f8c8d",
    "closer": "#27ae60",
}
ROLE_COLOURS = {
    pair_name("denoised", "original"): "#2c7fb8",
    pair_name("denoised", "reference"): "#41ab5d",
    pair_name("original", "reference"): "#bdbdbd",
}


# ------------------------------------------------------------------------------------------ files


def json_safe(value):
    """The report with NaN/infinity as null and numpy scalars as plain numbers (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(report: dict, path: Path) -> Path:
    text = json.dumps(json_safe(report), indent=2, allow_nan=False)
    return write_bytes_atomically(path, (text + "\n").encode())


# ---------------------------------------------------------------------------------------- figures


def _subplots(nrows: int = 1, ncols: int = 1, figsize=(6, 4), **kwargs):
    """A figure without pyplot (no global state, no GUI backend): ``(figure, axes)``."""
    from matplotlib.figure import Figure  # 0.5 s to import: `lowdose --help` loads this module

    fig = Figure(figsize=figsize, dpi=90)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _present(structures: list[dict]) -> list[dict]:
    return [s for s in structures if s["verdict"] != "absent"]


def figure_dice(structures: list[dict], pairs: list[str], dice_kept: float) -> str | None:
    """Horizontal bars: Dice of each present structure for each compared pair, worst first."""
    present = _present(structures)
    if not present:
        return None
    first = pairs[0]
    present.sort(key=lambda s: (s["pairs"][first]["dice"] or 0.0, s["name"]))
    n, k = len(present), len(pairs)
    fig, ax = _subplots(figsize=(7.5, 1.2 + 0.24 * n * (1 + 0.35 * (k - 1))))
    height = 0.8 / k
    y = np.arange(n)
    for j, pair in enumerate(pairs):
        values = [s["pairs"][pair]["dice"] or 0.0 for s in present]
        ax.barh(
            y - 0.4 + height * (j + 0.5),
            values,
            height=height,
            color=ROLE_COLOURS.get(pair, "#555"),
            label=pair.replace("_", " "),
        )
    ax.axvline(dice_kept, color="#c0392b", linestyle="--", linewidth=1, label=f"kept limit {dice_kept:g}")
    ax.set_yticks(y)
    ax.set_yticklabels([s["name"] for s in present], fontsize=8)
    for tick, s in zip(ax.get_yticklabels(), present):
        tick.set_color(VERDICT_COLOURS[s["verdict"]] if s["verdict"] != "kept" else "#222")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, n - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("Dice")
    ax.set_title("Dice per structure (worst first; red/orange names: changed/check)", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def figure_hu(structures: list[dict], hu_shift_kept: float) -> str | None:
    """Mean HU and HU standard deviation of each structure, original (x) against denoised (y)."""
    pairs = [
        s
        for s in _present(structures)
        if s["images"]["original"]["hu_mean"] is not None and s["images"]["denoised"]["hu_mean"] is not None
    ]
    if not pairs:
        return None
    fig, axes = _subplots(1, 2, figsize=(11, 4.8))
    colours = [VERDICT_COLOURS[s["verdict"]] for s in pairs]
    for ax, key, title in ((axes[0], "hu_mean", "mean HU"), (axes[1], "hu_std", "HU standard deviation")):
        x = np.array([s["images"]["original"][key] for s in pairs])
        y = np.array([s["images"]["denoised"][key] for s in pairs])
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        pad = 0.05 * (hi - lo) + 1.0
        line = np.array([lo - pad, hi + pad])
        ax.plot(line, line, color="#555", linewidth=1, label="unchanged")
        if key == "hu_mean":
            ax.fill_between(
                line,
                line - hu_shift_kept,
                line + hu_shift_kept,
                color="#27ae60",
                alpha=0.12,
                label=f"±{hu_shift_kept:g} HU",
            )
        else:
            ax.fill_between(line, line * 0, line, color="#27ae60", alpha=0.08, label="noise lowered")
        ax.scatter(x, y, c=colours, s=22, edgecolors="white", linewidths=0.5, zorder=3)
        # Name the structures that moved most.
        moved = np.argsort(-np.abs(y - x))[:6]
        for i in moved:
            ax.annotate(pairs[i]["name"], (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlim(line)
        ax.set_ylim(line)
        ax.set_xlabel(f"original: {title}")
        ax.set_ylabel(f"denoised: {title}")
        ax.set_title(f"{title} inside each structure", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _png(fig)


def _label_colours(n: int = 256) -> np.ndarray:
    """A fixed colour per label value (RGBA), background transparent."""
    import matplotlib  # 0.5 s to import: `lowdose --help` loads this module

    base = np.concatenate([matplotlib.colormaps[name](np.linspace(0, 1, 20)) for name in ("tab20", "tab20b", "tab20c")])
    colours = base[np.arange(n) * 7 % len(base)].copy()
    colours[0] = (0, 0, 0, 0)
    return colours


def _display_orientation(direction: np.ndarray):
    """Flips that show an axial slice radiologically (patient's right on the left, anterior up)."""
    flip_x = direction[0, 0] < 0
    flip_y = direction[1, 1] < 0
    return flip_x, flip_y


def choose_slices(labels: np.ndarray, count: int = 3) -> list[int]:
    """Up to ``count`` axial slices spread over the labelled range, each the most labelled of its part."""
    per_slice = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
    labelled = np.flatnonzero(per_slice)
    if len(labelled) == 0:
        return sorted({labels.shape[0] // 2})
    chunks = np.array_split(labelled, min(count, len(labelled)))
    return [int(chunk[np.argmax(per_slice[chunk])]) for chunk in chunks if len(chunk)]


def figure_slices(
    hu: dict[str, np.ndarray], labels: dict[str, np.ndarray], spacing_mm, direction, count: int = 3
) -> str:
    """Slices with each scan's segmentation over it, side by side, plus where original and denoised disagree."""
    roles = [r for r in ("original", "denoised", "reference") if r in hu]
    slices = choose_slices(labels["original"], count)
    colours = _label_colours(int(max(label_map.max() for label_map in labels.values())) + 1)
    centre, width = ABDOMEN
    flip_x, flip_y = _display_orientation(np.asarray(direction))
    aspect = spacing_mm[1] / spacing_mm[0]
    ncols = len(roles) + 1
    fig, axes = _subplots(
        len(slices),
        ncols,
        squeeze=False,
        figsize=(3.6 * ncols, 3.6 * len(slices) * aspect * hu["original"].shape[1] / hu["original"].shape[2]),
    )

    def view(a):
        if flip_y:
            a = a[::-1]
        if flip_x:
            a = a[:, ::-1]
        return a

    for row, z in enumerate(slices):
        for col, role in enumerate(roles):
            ax = axes[row, col]
            ax.imshow(
                view(hu[role][z]),
                cmap="gray",
                vmin=centre - width / 2,
                vmax=centre + width / 2,
                aspect=aspect,
                interpolation="nearest",
            )
            ax.imshow(view(colours[labels[role][z]]), alpha=0.45, aspect=aspect, interpolation="nearest")
            ax.set_title(f"{role}, slice {z + 1}" if row == 0 else f"slice {z + 1}", fontsize=9)
        ax = axes[row, len(roles)]
        differ = labels["original"][z] != labels["denoised"][z]
        overlay = np.zeros(differ.shape + (4,))
        overlay[differ] = (1.0, 0.1, 0.1, 0.85)
        ax.imshow(
            view(hu["denoised"][z]),
            cmap="gray",
            vmin=centre - width / 2,
            vmax=centre + width / 2,
            aspect=aspect,
            interpolation="nearest",
        )
        ax.imshow(view(overlay), aspect=aspect, interpolation="nearest")
        ax.set_title(f"labels differ ({100 * differ.mean():.1f}% of slice)", fontsize=9)
        for ax in axes[row]:
            ax.set_axis_off()
    fig.suptitle(f"abdomen window C{centre:g}/W{width:g}; image left = patient right", fontsize=9, y=1.0)
    fig.tight_layout()
    return _png(fig)


# ------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1500px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.5em;margin-bottom:4px} h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
.badge{display:inline-block;padding:3px 10px;border-radius:4px;color:#fff;font-weight:600}
.small{color:#666;font-size:.85em}
table{border-collapse:collapse;font-size:.82em}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
td.l,th.l{text-align:left} td.r{white-space:normal;text-align:left;min-width:200px;max-width:300px;color:#444;font-size:.95em}
.scroll{overflow-x:auto;max-width:100%}
table.sortable th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}
table.sortable th:hover{background:#e8e8e8}
th[data-dir=asc]::after{content:" \\25B2"} th[data-dir=desc]::after{content:" \\25BC"}
tr.changed td:first-child{border-left:4px solid #c0392b} tr.check td:first-child{border-left:4px solid #e67e22}
tr.kept td:first-child{border-left:4px solid #27ae60}
img{max-width:100%;height:auto;border:1px solid #eee}
.kv td{text-align:left}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, i) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var asc = th.dataset.dir !== 'asc';
      table.querySelectorAll('th').forEach(function (h) { delete h.dataset.dir; });
      th.dataset.dir = asc ? 'asc' : 'desc';
      function key(r) { var c = r.cells[i], v = c.dataset.v;
        if (v === undefined) return c.textContent.trim().toLowerCase();
        return v === '' ? null : parseFloat(v); }
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        if (x === null && y === null) return 0; if (x === null) return 1; if (y === null) return -1;
        var d = (typeof x === 'number') ? x - y : x.localeCompare(y); return asc ? d : -d; });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _num(value, digits: int = 2, signed: bool = False) -> str:
    """A table cell with the number shown and its raw value for sorting (blank when undefined)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<td data-v="">–</td>'
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return f'<td data-v="{float(value):.6g}">{text}</td>'


def _badge(verdict: str) -> str:
    return (
        f'<span class="badge" style="background:{VERDICT_COLOURS.get(verdict, "#555")}">{html.escape(verdict)}</span>'
    )


def render_html(report: dict, figures: dict[str, str | None]) -> str:
    """``fidelity.html`` of a report as ``FidelityReport.to_json()`` gives it, with the figures (base64 PNG)."""
    e = html.escape
    study = report["study"]
    structures = report["structures"]
    head, rows = _structure_table(report)
    absent = [s["name"] for s in structures if not _anywhere(s)]

    def fig(key, alt):
        data = figures.get(key)
        return (
            f'<p><img alt="{e(alt)}" src="data:image/png;base64,{data}"></p>'
            if data
            else f"<p class='small'>({e(alt)}: nothing to show)</p>"
        )

    flagged = ", ".join(study["flagged"][:30]) + (" …" if len(study["flagged"]) > 30 else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lowdose fidelity check: {e(study['verdict'])}</title>
<style>{_CSS}</style></head><body>
<h1>Anatomical fidelity check {_badge(study['verdict'])}</h1>
<p>{e(study['summary'])}. Flagged: {e(flagged or 'none')}.</p>
{_reference_block(report)}
<p class="small">Did denoising keep the anatomy? Each scan was segmented into {len(structures)} structures and the
denoised scan compared with the low-dose original structure by structure: overlap (Dice), surfaces
(normalised surface Dice within 1 and 2 mm, 95th-percentile Hausdorff distance), volume, and the HU under
each structure (mean shift on the voxels both segmentations agree on; noise as standard deviation, which
denoising should lower). <b>kept</b>: within every limit; <b>check</b>: past a 'kept' limit;
<b>changed</b>: past a 'changed' limit or found in one scan only. Created {e(report['created'])} by
lowdose {e(report['lowdose_version'])}; schema {e(report['schema_version'])}.</p>
<h2>Structures</h2>
<p class="small">Click a column title to sort; flagged structures come first.</p>
<div class="scroll"><table class="sortable"><thead><tr>{''.join(head)}</tr></thead><tbody>
{''.join(rows)}
</tbody></table></div>
<details><summary class="small">{len(absent)} structures found in no scan (not counted)</summary>
<p class="small">{e(', '.join(absent))}</p></details>
<h2>Dice per structure</h2>
{fig('dice', 'Dice per structure')}
<h2>HU before and after</h2>
{fig('hu', 'mean HU and HU noise, original against denoised')}
<h2>Slices</h2>
{fig('slices', 'slices with segmentations')}
<h2>Inputs and settings</h2>
{_settings(report)}
<script>{_JS}</script>
</body></html>
"""


def _anywhere(structure: dict) -> bool:
    return any(image["present"] for image in structure["images"].values())


def _structure_table(report: dict) -> tuple[list[str], list[str]]:
    """The structure table's column titles and one row per structure found in any scan."""
    th = report["thresholds"]
    with_reference = "reference" in report["inputs"]
    head = ["<th class='l'>structure</th>", "<th class='l'>verdict</th>", "<th class='l'>why</th>", "<th>Dice</th>"]
    head += [f"<th>NSD@{t:g}mm</th>" for t in th["surface_tolerances_mm"]]
    head += [
        "<th>HD95 mm</th>",
        "<th>volume Δ%</th>",
        "<th>volume ml (orig)</th>",
        "<th>HU orig</th>",
        "<th>HU den</th>",
        "<th>HU shift</th>",
        "<th>HU SD orig</th>",
        "<th>HU SD den</th>",
    ]
    if with_reference:
        head += [
            "<th>Dice den–ref</th>",
            "<th>Dice orig–ref</th>",
            "<th>HU shift den–ref</th>",
            "<th>HU shift orig–ref</th>",
            "<th class='l'>vs reference</th>",
        ]
    nsd_keys = [nsd_key(t) for t in th["surface_tolerances_mm"]]
    rows = [_structure_row(s, nsd_keys, th, with_reference) for s in report["structures"] if _anywhere(s)]
    return head, rows


def _structure_row(s: dict, nsd_keys: list[str], th: dict, with_reference: bool) -> str:
    p = s["pairs"][pair_name("denoised", "original")]
    o, d = s["images"]["original"], s["images"]["denoised"]
    cells = [
        f"<td class='l'>{html.escape(s['name'])}</td>",
        f"<td class='l' data-v='{VERDICT_ORDER[s['verdict']]}'>{_badge(s['verdict'])}</td>",
        "<td class='r'>{reasons}</td>",
        _num(p["dice"], 3),
    ]
    cells += [_num(p[k], 3) for k in nsd_keys]
    cells += [
        _num(p["hd95_mm"], 1),
        _num(p["volume_change_pct"], 1, signed=True),
        _num(o["volume_ml"], 2),
        _num(o["hu_mean"], 1),
        _num(d["hu_mean"], 1),
        _num(p["hu_shift"], 1, signed=True),
        _num(o["hu_std"], 1),
        _num(d["hu_std"], 1),
    ]
    reasons = list(s["reasons"])
    if with_reference:
        dr, orr = s["pairs"][pair_name("denoised", "reference")], s["pairs"][pair_name("original", "reference")]
        ref = s["reference"]
        cells += [
            _num(dr["dice"], 3),
            _num(orr["dice"], 3),
            _num(dr["hu_shift"], 1, signed=True),
            _num(orr["hu_shift"], 1, signed=True),
            f"<td class='l' data-v='{REFERENCE_VERDICT_ORDER[ref['verdict']]}'>{_badge(ref['verdict'])}</td>",
        ]
        reasons += [f"reference: {r}" for r in ref["reasons"]]
    if s["small"] and s["verdict"] != "absent":
        reasons.append(f"small (< {th['small_structure_ml']:g} ml): judged by surface Dice and HU only")
    if s["verdict"] == "absent":
        reasons.insert(0, "only in the reference")
    cells[2] = cells[2].format(reasons=html.escape("; ".join(reasons)))
    return f"<tr class='{s['verdict']}'>{''.join(cells)}</tr>"


def _reference_block(report: dict) -> str:
    if "reference" not in report["inputs"]:
        return ""
    ref = report["study"]["reference"]
    further = ", ".join(ref["further"]) or "none"
    return (
        f"<p><b>Against the reference:</b> {html.escape(ref['summary'])}. Further from the reference than the "
        f"low-dose scan: {html.escape(further)}.</p>"
    )


def _settings(report: dict) -> str:
    """The inputs table, the segmenter, the thresholds and the timings."""
    e = html.escape
    inputs = "".join(
        f"<tr><td>{e(role)}</td><td>{e(str(info.get('path') or 'in memory'))}</td><td>{e(info['grid'])}</td>"
        f"<td>{e(info['labels'])}</td></tr>"
        for role, info in report["inputs"].items()
    )
    seg = report["segmenter"]
    seg_text = (
        ", ".join(f"{k}: {v}" for k, v in seg.items() if k not in ("models",)) if seg else "none (label maps given)"
    )
    thresholds = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in report["thresholds"].items())
    timing_parts = []
    for k, v in report["timings_s"].items():
        if isinstance(v, dict):
            timing_parts += [f"segmenting {e(role)} {t:.1f} s" for role, t in v.items()]
        else:
            timing_parts.append(f"{e(k)} {v:.1f} s")
    timings = ", ".join(timing_parts)
    return f"""<table class="kv"><tr><th class='l'>scan</th><th class='l'>file</th><th class='l'>grid</th><th class='l'>labels</th></tr>{inputs}</table>
<p><b>Segmenter:</b> {e(seg_text)}</p>
<details><summary>Thresholds</summary><table class="kv">{thresholds}</table></details>
<p class="small">Timings: {timings}.</p>"""


def write_html(report: dict, figures: dict[str, str | None], path: Path) -> Path:
    return write_bytes_atomically(path, render_html(report, figures).encode("utf-8"))


def make_figures(
    report: dict, hu: dict[str, np.ndarray], labels: dict[str, np.ndarray], spacing_mm, direction
) -> dict[str, str | None]:
    """All figures of the HTML report as base64 PNG strings."""
    structures = report["structures"]
    pairs = [
        p
        for p in (
            pair_name("denoised", "original"),
            pair_name("denoised", "reference"),
            pair_name("original", "reference"),
        )
        if p in (structures[0]["pairs"] if structures else {})
    ]
    th = report["thresholds"]
    return {
        "dice": figure_dice(structures, pairs, th["dice_kept"]),
        "hu": figure_hu(structures, th["hu_shift_kept"]),
        "slices": figure_slices(hu, labels, spacing_mm, direction),
    }
