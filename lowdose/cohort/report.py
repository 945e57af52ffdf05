"""The cohort report, ``OUTPUT/report.html``, self-contained (figures embedded as PNG): each structure's Dice and HU
shift over the cohort as box plots, the studies the verdict flagged with a thumbnail each (original | denoised |
difference), failed studies with their errors, every study in a sortable table, and the command and versions
that produced it. ``write_thumbnail`` draws a study's thumbnail where the study runs."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from ..atomic import write_bytes_atomically, write_text_atomically
from ..windows import ABDOMEN
from .results import DONE, FAILED, StudyResult

VERDICT_COLOURS = {"changed": "#c0392b", "check": "#e67e22", "kept": "#27ae60", "failed": "#7f8c8d"}
MAX_THUMBNAILS = 200  # flagged studies shown with a picture; the rest are listed
DIFFERENCE_HU = 50.0  # the difference panel spans -50..+50 HU (the noise removed is tens of HU)


def _figure(width: float, height: float, ncols: int = 1, **kwargs):
    from matplotlib.figure import Figure  # 0.5 s to import: the CLI imports this package for --help

    fig = Figure(figsize=(width, height), dpi=80)
    return fig, fig.subplots(1, ncols, squeeze=False, **kwargs)[0]


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight")
    return buffer.getvalue()


def thumbnail_slice(labels: np.ndarray | None, flagged_labels: list[int], depth: int) -> int:
    """The axial slice to show: where the flagged structures have most voxels, else the most labelled one."""
    if labels is None or not labels.any():
        return depth // 2
    mask = np.isin(labels, flagged_labels) if flagged_labels else labels > 0
    if not mask.any():
        mask = labels > 0
    return int(np.argmax(mask.reshape(depth, -1).sum(axis=1)))


def write_thumbnail(path: Path, original, denoised, labels: np.ndarray | None, report) -> Path:
    """original | denoised | difference of one slice (abdomen window; difference -50..+50 HU) as a PNG."""
    flagged = [s.label for s in report.structures if s.name in set(report.study.flagged)]
    k = thumbnail_slice(labels, flagged, original.shape[0])
    flip_x, flip_y = original.direction[0, 0] < 0, original.direction[1, 1] < 0

    def view(a: np.ndarray) -> np.ndarray:
        return a[:: -1 if flip_y else 1, :: -1 if flip_x else 1]

    centre, width = ABDOMEN
    aspect = original.spacing_mm[1] / original.spacing_mm[0]
    fig, axes = _figure(7.5, 2.8, ncols=3)
    panels = (
        ("original", original.hu[k], dict(cmap="gray", vmin=centre - width / 2, vmax=centre + width / 2)),
        ("denoised", denoised.hu[k], dict(cmap="gray", vmin=centre - width / 2, vmax=centre + width / 2)),
        ("difference", denoised.hu[k] - original.hu[k], dict(cmap="RdBu_r", vmin=-DIFFERENCE_HU, vmax=DIFFERENCE_HU)),
    )
    for ax, (title, image, style) in zip(axes, panels):
        ax.imshow(view(image), aspect=aspect, interpolation="none", **style)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"slice {k + 1}/{original.shape[0]}  [C{centre:g}/W{width:g}; difference ±{DIFFERENCE_HU:g} HU]", fontsize=8
    )
    return write_bytes_atomically(path, _png_bytes(fig))


def distributions(results: list[StudyResult]) -> dict[str, dict[str, list[float]]]:
    """Per structure present in some study: its Dice and HU shift in each done study where it is defined."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in results:
        if r.status != DONE:
            continue
        for s in r.structures:
            if s.verdict == "absent":
                continue
            entry = values.setdefault(s.name, {"dice": [], "hu_shift": []})
            if s.dice is not None:
                entry["dice"].append(s.dice)
            if s.hu_shift is not None:
                entry["hu_shift"].append(s.hu_shift)
    return values


def figure_distributions(results: list[StudyResult], dice_kept: float, hu_shift_kept: float) -> str | None:
    """Box plots of each structure's Dice and HU shift over the cohort, worst median Dice first."""
    values = {k: v for k, v in distributions(results).items() if v["dice"] or v["hu_shift"]}
    if not values:
        return None
    names = sorted(values, key=lambda n: (np.median(values[n]["dice"]) if values[n]["dice"] else 2.0, n))
    height = 1.2 + 0.2 * len(names)
    fig, (ax_dice, ax_hu) = _figure(11, height, ncols=2, sharey=True)
    positions = np.arange(len(names))[::-1]
    for ax, key, line, label in (
        (ax_dice, "dice", dice_kept, "Dice, denoised vs original"),
        (ax_hu, "hu_shift", hu_shift_kept, "mean HU shift inside the structure (HU)"),
    ):
        data = [values[n][key] or [math.nan] for n in names]
        ax.boxplot(
            data,
            positions=positions,
            orientation="horizontal",
            widths=0.6,
            showfliers=True,
            flierprops={"markersize": 2},
        )
        for y, points in zip(positions, data):
            ax.plot(points, np.full(len(points), y), ".", color="#2c7fb8", markersize=2, alpha=0.5)
        for x in (line, -line) if key == "hu_shift" else (line,):
            ax.axvline(x, color="#e67e22", linestyle="--", linewidth=0.8)
        ax.set_xlabel(label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    ax_dice.set_yticks(positions)
    ax_dice.set_yticklabels(names, fontsize=7)
    ax_dice.set_xlim(min(0.0, ax_dice.get_xlim()[0]), 1.02)
    fig.suptitle(f"{len(names)} structures over {sum(r.status == DONE for r in results)} studies", fontsize=10)
    return base64.b64encode(_png_bytes(fig)).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1400px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
.badge{display:inline-block;padding:2px 8px;border-radius:4px;color:#fff;font-weight:600}
table{border-collapse:collapse;font-size:.82em} th,td{border:1px solid #ddd;padding:3px 6px;text-align:left}
table.sortable th{cursor:pointer;background:#f4f4f4} .flag{margin:12px 0;padding:8px;border:1px solid #eee}
img{max-width:100%;height:auto} code,pre{background:#f6f6f6;padding:2px 4px;white-space:pre-wrap}
"""
_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, i) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows), asc = th.dataset.dir !== 'asc';
      th.dataset.dir = asc ? 'asc' : 'desc';
      function key(r) { var t = r.cells[i].textContent.trim(), n = parseFloat(t); return isNaN(n) ? t : n; }
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        var d = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
        return asc ? d : -d; });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _badge(verdict: str | None) -> str:
    verdict = verdict or "-"
    return (
        f'<span class="badge" style="background:{VERDICT_COLOURS.get(verdict, "#999")}">{html.escape(verdict)}</span>'
    )


def _flagged_section(results: list[StudyResult], out: Path) -> str:
    order = {"changed": 0, "check": 1}
    flagged = sorted(
        (r for r in results if r.status == DONE and r.verdict in order),
        key=lambda r: (order[r.verdict or ""], min((s.dice for s in r.structures if s.dice is not None), default=1.0)),
    )
    if not flagged:
        return "<p>No study was flagged: every structure was kept in every study.</p>"
    parts = [f"<p>{len(flagged)} studies flagged (changed first).</p>"]
    for k, r in enumerate(flagged):
        picture = ""
        thumbnail = out / "studies" / r.study / (r.thumbnail or "")
        if k < MAX_THUMBNAILS and r.thumbnail and thumbnail.is_file():
            data = base64.b64encode(thumbnail.read_bytes()).decode("ascii")
            alt = f"{html.escape(r.study)}: original, denoised, difference"
            picture = f'<br><img alt="{alt}" src="data:image/png;base64,{data}">'
        link = f"studies/{r.study}/{r.report}" if r.report else ""
        parts.append(
            f'<div class="flag"><b>{html.escape(r.study)}</b> {_badge(r.verdict)} {html.escape(r.summary or "")}'
            f"<br>flagged: {html.escape(', '.join(r.flagged) or '-')}"
            + (f' &middot; <a href="{html.escape(link)}">study report</a>' if link else "")
            + f"{picture}</div>"
        )
    return "\n".join(parts)


def _study_rows(results: list[StudyResult]) -> str:
    rows = []
    for r in results:
        dose = "" if r.dose_fraction is None else f"{r.dose_fraction:.3g} ({r.dose_source})"
        seconds = r.timings_s.get("total")
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    r.study,
                    r.status,
                    r.verdict or "",
                    ", ".join(r.flagged),
                    dose,
                    "" if seconds is None else f"{seconds:.1f}",
                    r.error,
                )
            )
            + "</tr>"
        )
    return "\n".join(rows)


def _runs_table(runs: list[dict]) -> str:
    """The runs that computed studies into this folder: when, the command, how many, where."""
    if not runs:
        return ""
    rows = []
    for run in runs:
        where = run.get("scheduler") or {}
        place = ", ".join(
            f"{k} {where[k]}" for k in ("scheduler", "ray_address", "nodes", "workers", "transfer") if k in where
        )
        cells = (run.get("created", ""), run.get("command", ""), run.get("studies_run", ""), place)
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "<tr><th>when (UTC)</th><th>command</th><th>studies run</th><th>where</th></tr>"
    return f"<p>Runs that computed studies here:</p><table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def render_html(results: list[StudyResult], out: Path, context: dict, figure: str | None) -> str:
    """The report's HTML; ``context`` has title, command, versions, settings, scheduler and counts."""
    counts = {s: sum(r.status == s for r in results) for s in (DONE, FAILED)}
    verdicts = {v: sum(r.verdict == v for r in results if r.status == DONE) for v in ("kept", "check", "changed")}
    failed = [r for r in results if r.status == FAILED]
    failed_rows = "".join(f"<tr><td>{html.escape(r.study)}</td><td>{html.escape(r.error)}</td></tr>" for r in failed)
    failed_table = (
        f"<table><thead><tr><th>study</th><th>error</th></tr></thead><tbody>{failed_rows}</tbody></table>"
        if failed
        else "<p>None.</p>"
    )
    kv = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td><code>{html.escape(str(v))}</code></td></tr>"
        for k, v in {
            **context.get("settings", {}),
            **context.get("versions", {}),
            **context.get("scheduler", {}),
        }.items()
    )
    picture = (
        f'<img alt="Dice and HU shift per structure over the cohort" src="data:image/png;base64,{figure}">'
        if figure
        else "<p>No study finished: no distributions yet.</p>"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lowdose cohort report</title><style>{_CSS}</style></head><body>
<h1>Cohort: did denoising keep the anatomy?</h1>
<p>{len(results)} studies: <b>{counts[DONE]}</b> done, <b>{counts[FAILED]}</b> failed,
{len(results) - counts[DONE] - counts[FAILED]} not run. Verdicts of the done studies:
{_badge("kept")} {verdicts["kept"]} {_badge("check")} {verdicts["check"]} {_badge("changed")} {verdicts["changed"]}</p>
<h2>Each structure over the cohort</h2>
<p>Dice and mean HU shift of every structure, denoised against the original (one point per study; dashed: the
"kept" limits). Structures are sorted by their median Dice, worst first.</p>
{picture}
<h2>Flagged studies</h2>
{_flagged_section(results, out)}
<h2>Failed studies</h2>
{failed_table}
<h2>All studies</h2>
<table class="sortable"><thead><tr><th>study</th><th>status</th><th>verdict</th><th>flagged</th><th>dose</th>
<th>seconds</th><th>error</th></tr></thead><tbody>
{_study_rows(results)}
</tbody></table>
<h2>How this was made</h2>
<p>Command: <code>{html.escape(context.get("command", ""))}</code><br>Written {html.escape(context.get("created", ""))}.
Tables: <code>cohort.parquet</code>, <code>cohort.csv</code>.</p>
{_runs_table(context.get("runs", []))}
<p>Settings and versions:</p>
<table class="kv"><tbody>{kv}</tbody></table>
<script>{_JS}</script>
</body></html>
"""


def write_report(path: Path, results: list[StudyResult], out: Path, context: dict, thresholds) -> Path:
    """Write ``report.html`` atomically."""
    figure = figure_distributions(results, thresholds.dice_kept, thresholds.hu_shift_kept)
    return write_text_atomically(path, render_html(results, out, context, figure))
