"""lowdose's DA-CLIP on held-out patients: dose regression at seen and unseen doses, region accuracy, and the
held-out region (issue 16, part 1).

    .venv/bin/python benchmarks/da_clip.py BUNDLE [--slices 6] [--name da_clip]

Test patients are dose_unet's (never trained on, never used to pick): lungpetctdx_A0002 (B70f and B40f of one
acquisition), lidc_idri_0314, COVID-19-NY-SBU A046441 and A098752. The held-out region's series (head and neck:
dcmqa_ge_head, hnpetct_HN-CHUS-052) are left out of training by models/da_clip/configs/train.yaml. Slices are
simulated at the training doses (1/2, 1/4, 1/6, 1/10, 1/20) and at doses never trained on (1/3, 1/8, 1/16),
with noise matched to each source as in training. Region truth: lowdose.anatomy.regions' table.
Writes benchmarks/results/<name>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lowdose.bundle import Bundle, load_checkpoint  # noqa: E402
from lowdose.networks import build_network  # noqa: E402
from lowdose.networks.da_clip import REGIONS  # noqa: E402
from lowdose.training.da_clip import evaluate_da_clip, region_indices, source_regions  # noqa: E402
from lowdose.training.data import load_sources, validation_set  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SHARED = REPO.parent / "shared" / "data" / "ct"
TEST_SERIES = [
    "lungpetctdx_A0002_siemens/B70f",
    "lungpetctdx_A0002_siemens/B40f",
    "lidc_idri_0314_philips",
    "covid19_ny_sbu_slices/A046441/19001111-045.dcm",
    "covid19_ny_sbu_slices/A046441/19010101-23.dcm",
    "covid19_ny_sbu_slices/A098752/19001231-32.dcm",
    "covid19_ny_sbu_slices/A098752/19010127-128.dcm",
]
HELD_OUT_REGION_SERIES = ["dcmqa_ge_head", "hnpetct_HN-CHUS-052_philips"]
SEEN_DOSES = [1 / 2, 1 / 4, 1 / 6, 1 / 10, 1 / 20]
UNSEEN_DOSES = [1 / 3, 1 / 8, 1 / 16]


def evaluate(network, series: list[str], doses: list[float], slices: int, normalisation: dict, held_out) -> dict:
    """Simulated whole slices of ``series`` at ``doses`` (fixed seeds), read by the encoder."""
    volumes = load_sources([str(SHARED / s) for s in series], "simulated").normal
    items = validation_set(volumes, doses, 1, slices, seed=4242, match_source=True)
    regions = [region_indices(source_regions(v)) for v in volumes]
    figures = evaluate_da_clip(network, items, regions, normalisation, "cpu", held_out)
    figures["slices"] = len(items)
    return figures


def _dose_rows(figures: dict) -> list[str]:
    rows = []
    for dose in sorted((float(d) for d in figures["dose_rel_error"]), reverse=True):
        seen = "seen" if any(abs(dose - d) < 1e-3 for d in SEEN_DOSES) else "**unseen**"
        rows.append(f"| 1/{1 / dose:.0f} | {seen} | {figures['dose_rel_error'][f'{dose:g}']:.3f} |")
    return rows


def markdown(bundle: Bundle, test: dict, held_out: dict, seconds: float) -> str:
    training = bundle.metadata.get("training", {})
    lines = [
        "# DA-CLIP (lowdose's dose and region encoder) on held-out patients",
        "",
        f"Bundle `{bundle.folder.name}`: trained {training.get('epochs')} epochs on doses "
        f"{', '.join(f'1/{1 / d:.0f}' for d in training.get('doses', []))}; held-out regions "
        f"{', '.join(training.get('held_out_regions', [])) or 'none'}. Produced by `benchmarks/da_clip.py` in "
        f"{seconds / 60:.1f} min, {test['slices'] // 8 + held_out['slices'] // 8} slices per dose. Dose error: "
        "median over slices of |estimated / true dose - 1|.",
        "",
        f"## Test patients ({', '.join(TEST_SERIES)}; {test['slices']} slices)",
        "",
        "| dose | in training | median relative error |",
        "|---|---|---|",
        *_dose_rows(test),
        "",
        f"Region accuracy: {test.get('region_accuracy', float('nan')):.3f} "
        f"(by region: {json.dumps(test.get('region_accuracy_by_region', {}))}); predicted regions by true region: "
        f"{json.dumps(test.get('region_predicted', {}))}.",
        "",
        f"## Held-out region: head and neck ({', '.join(HELD_OUT_REGION_SERIES)}; {held_out['slices']} slices)",
        "",
        "| dose | in training | median relative error |",
        "|---|---|---|",
        *_dose_rows(held_out),
        "",
        "Region: the classifier never saw head or neck and chooses among the trained regions only, so it cannot "
        "name them (accuracy 0 by construction); what it takes them for, by true region: "
        f"{json.dumps(held_out.get('region_predicted', {}))}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="a DA-CLIP bundle folder (lowdose train models/da_clip/configs/train.yaml)")
    parser.add_argument("--slices", type=int, default=6, help="slices per series (evenly spaced body slices)")
    parser.add_argument("--name", default="da_clip", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    started = time.time()
    bundle = Bundle.read(args.bundle)
    network = build_network(bundle.network_name, **bundle.network_kwargs)
    network.load_state_dict(load_checkpoint(bundle.weights)["network"])
    doses = sorted(SEEN_DOSES + UNSEEN_DOSES, reverse=True)
    excluded = [REGIONS.index(r) for r in bundle.metadata.get("training", {}).get("held_out_regions", [])]
    test = evaluate(network, TEST_SERIES, doses, args.slices, bundle.normalisation, excluded)
    held_out = evaluate(network, HELD_OUT_REGION_SERIES, doses, args.slices, bundle.normalisation, excluded)
    seconds = time.time() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(
        json.dumps({"bundle": str(bundle.folder), "test": test, "held_out_region": held_out}, indent=2)
    )
    (RESULTS / f"{args.name}.md").write_text(markdown(bundle, test, held_out, seconds))
    print(markdown(bundle, test, held_out, seconds))


if __name__ == "__main__":
    main()
