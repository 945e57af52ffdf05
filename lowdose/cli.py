"""`lowdose <command>`: argument parsing only, then one call into the library.

Outputs are checked before any compute. Any error prints one line, ``lowdose <command>: error: ...``, on
stderr and exits with status 1 (the traceback only with ``--debug``); Ctrl-C exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import traceback
from pathlib import Path

import yaml

from .bundle import DEFAULT_MODEL, Bundle, available_models
from .cohort.command import add_parser as add_cohort_parser
from .dose import parse_dose
from .ensemble import ENSEMBLE_SIZES
from .errors import LowdoseError
from .fidelity.command import add_parser as add_fidelity_parser
from .figures import body_zoom, side_by_side_png
from .io import check_output_folder, check_output_path, load_ct, save_ct
from .metrics import compare
from .resources import sample_ct_path
from .server import add_parser as add_serve_parser
from .strength import DEFAULT_STRENGTH, parse_strength, strength_label


def _parse_dose(text: str) -> float | str:
    """A dose fraction as 0.25, 1/4 or 25% (argparse type); an empty text gives parse_dose's "auto"."""
    if text.strip().lower() == "auto":
        raise argparse.ArgumentTypeError("a dose fraction is needed here (0.25, 1/4 or 25%), not auto")
    try:
        return parse_dose(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _print_figures(title: str, figures: dict[str, float]) -> None:
    print(title)
    for name, value in figures.items():
        print(f"  {name:<28} {value:10.3f}")


def cmd_simulate(args) -> None:
    from .simulate import simulate_low_dose  # torch (4 s): only the commands that compute load it

    check_output_path(args.output, inputs=(args.input,))
    volume = load_ct(args.input, series_uid=args.series)
    low = simulate_low_dose(volume, args.dose, seed=args.seed, progress=not args.quiet)
    save_ct(low, args.output, description=low.metadata["lowdose_description"])
    if not args.quiet:
        print(f"wrote {args.output}: {low.describe()}")


def cmd_metrics(args) -> None:
    reference = load_ct(args.reference)
    test = load_ct(args.test)
    if reference.shape != test.shape:
        raise LowdoseError(f"{args.test}: shape {test.shape} differs from the reference {reference.shape}")
    figures = compare(reference, test)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        _print_figures(f"{args.test} against {args.reference}", figures)


def cmd_demo(args) -> None:
    """Simulate a low-dose scan of the bundled sample, denoise it, print before/after, write a PNG."""
    from .denoise import get_denoiser  # torch (4 s): only the commands that compute load it
    from .simulate import simulate_low_dose  # torch, as above

    out = check_output_folder(args.out, inputs=(sample_ct_path(),))
    normal = load_ct(sample_ct_path())
    print(f"sample CT: {sample_ct_path()} ({normal.describe()})")
    denoiser = get_denoiser(args.model, args.device)  # before the slow part: a missing model fails at once
    low = simulate_low_dose(normal, args.dose, seed=args.seed, progress=True)
    denoised = denoiser(low, dose="auto", progress=True, strength=args.strength)
    folders = {
        "low": out / f"simulated_{round(args.dose * 100)}pct_dose",
        "denoised": out / f"denoised_{denoiser.name}",
    }
    outputs = {"low": (low, low.metadata["lowdose_description"]), "denoised": (denoised.volume, denoised.description)}
    for key, (volume, description) in outputs.items():
        if folders[key].exists():
            shutil.rmtree(folders[key])  # the demo's own output folder from an earlier run
        save_ct(volume, folders[key], description=description)
        print(f"wrote {folders[key]} (DICOM series)")
    if denoised.dose_fraction is not None:
        print(f"dose: simulated {args.dose:g}, estimated from the image {denoised.dose_fraction:.3g}")
    before, after = compare(normal, low), compare(normal, denoised.volume)
    print(f"{'against the normal-dose sample':<30} {'low dose':>10} {'denoised':>10}")
    for name in before:
        print(f"  {name:<28} {before[name]:10.3f} {after.get(name, float('nan')):10.3f}")
    k = normal.shape[0] // 2
    row_mm, col_mm = normal.spacing_mm[1], normal.spacing_mm[0]  # spacing is (x, y, z)
    png = side_by_side_png(
        out / "side_by_side.png",
        {
            f"low dose ({args.dose:g}, simulated)": low.hu[k],
            f"denoised ({denoiser.name}, {strength_label(denoised.strength)})": denoised.volume.hu[k],
            "normal dose": normal.hu[k],
        },
        window="abdomen",
        title=f"bundled sample, slice {k + 1}/{normal.shape[0]}",
        spacing_mm=(row_mm, col_mm),
        zoom=body_zoom(normal.hu[k]),
    )
    print(f"wrote {png} (low dose | denoised | normal dose, abdomen window)")


def _add_strength_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strength",
        type=_parse_strength,
        default=DEFAULT_STRENGTH,
        help="how much noise to remove: low, medium (default: a natural texture, about a normal-dose noise level "
        "at 1/4 dose), high (all the network removes) or a number in [0, 1]",
    )


def _parse_strength(text: str) -> float:
    try:
        return parse_strength(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_dose_or_auto(text: str):
    return "auto" if text == "auto" else _parse_dose(text)


def cmd_denoise(args) -> None:
    from .denoise import get_denoiser  # torch (4 s): only the commands that compute load it

    check_output_path(args.output, inputs=(args.input,))
    volume = load_ct(args.input, series_uid=args.series)
    denoiser = get_denoiser(args.model, args.device)
    result = denoiser(
        volume,
        dose=args.dose,
        progress=not args.quiet,
        strength=args.strength,
        steps=args.steps,
        ensemble=args.ensemble,
    )
    save_ct(result.volume, args.output, description=result.description)
    if not args.quiet:
        dose = "n/a" if result.dose_fraction is None else f"{result.dose_fraction:.3g} ({result.dose_detail})"
        ensemble = "" if result.ensemble == 1 else f", {result.ensemble}-fold self-ensemble"
        print(
            f"wrote {args.output}: model {result.model} {result.model_version}, dose {dose}, "
            f"strength {strength_label(result.strength)}{ensemble}, {result.seconds:.1f} s for {volume.shape[0]} slices"
        )


def cmd_train(args) -> None:
    import logging

    from .training import AnatomyEncoderConfig, TrainConfig, train, train_anatomy_encoder

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    command = " ".join(["lowdose", *sys.argv[1:]])
    if _config_task(args.config) == "anatomy_encoder":
        encoder_config = AnatomyEncoderConfig.from_yaml(args.config)
        if args.epochs:
            encoder_config.epochs = args.epochs
        _check_training_outputs(
            encoder_config.output_dir,
            args.bundle,
            [
                *encoder_config.images,
                *encoder_config.labels,
                *encoder_config.validation_images,
                *encoder_config.validation_labels,
            ],
        )
        train_anatomy_encoder(encoder_config, bundle_dir=args.bundle, progress=not args.quiet, command=command)
        return
    config = TrainConfig.from_yaml(args.config)
    if args.epochs:
        config.optim.epochs = args.epochs
    _check_training_outputs(config.output_dir, args.bundle, [*config.data.train, *config.data.validation])
    train(
        config,
        resume=args.resume,
        progress=not args.quiet,
        bundle_dir=args.bundle,
        command=command,
        estimator_only=args.estimator_only,
    )


def _check_training_outputs(output_dir, bundle, data: list) -> None:
    """The run folder and the bundle folder can be made and are not training data (before any data is read)."""
    check_output_folder(output_dir, inputs=tuple(data))
    if bundle:
        check_output_folder(bundle, inputs=tuple(data))


def _config_task(path: str) -> str:
    """``task`` of a training YAML: ``denoising`` (the default) or ``anatomy_encoder``."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise LowdoseError(f"{path}: no such training config") from None
    except yaml.YAMLError as exc:
        raise LowdoseError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    task = raw.get("task", "denoising") if isinstance(raw, dict) else "denoising"
    if task not in ("denoising", "anatomy_encoder"):
        raise LowdoseError(f"{path}: task must be denoising or anatomy_encoder, not {task!r}")
    return task


def cmd_models(args) -> None:
    """The shipped models: name, network, dose handling and validation figures."""
    names = available_models()
    if not names:
        raise LowdoseError(
            "no trained model found (in LOWDOSE_MODELS or the shipped models; train one: "
            "lowdose train CONFIG --bundle models/NAME)"
        )
    print(f"{'model':<22} {'version':<8} {'network':<14} {'dose':<22} validation PSNR abdomen (low-dose input)")
    for name in names:
        print(_denoiser_row(name, Bundle.find(name)))
    for name in available_models("anatomy_encoder"):
        bundle = Bundle.find(name)
        dice = bundle.validation.get("val_mean_dice")
        print(
            f"{name:<22} anatomy encoder (for anatomy-aware training), {len(bundle.groups)} groups"
            + (f", validation mean Dice {dice:.2f}" if dice is not None else "")
        )
    for name in available_models("damaged"):
        print(f"{name:<22} damaged bundle, not usable (unreadable configs/metadata.json or no models/model.pt)")


def _denoiser_row(name: str, bundle: Bundle) -> str:
    validation = bundle.validation
    figure = ""
    if "val_psnr_abdomen" in validation:
        figure = f"{validation.get('val_psnr_abdomen_auto', validation['val_psnr_abdomen']):.2f} dB"
        if "val_input_psnr_abdomen" in validation:
            figure += f" ({validation['val_input_psnr_abdomen']:.2f} dB)"
    if bundle.dose_conditioning:
        dose = "conditioned, estimated" if bundle.dose_estimator else "conditioned"
    else:
        dose = "one model, any dose"
    marker = " (default)" if name == DEFAULT_MODEL else ""
    anatomy = ", ".join(bundle.anatomy_aware_training)
    return f"{name + marker:<22} {bundle.version:<8} {bundle.network_name:<14} {dose:<22} {figure}" + (
        f"  [anatomy-aware: {anatomy}]" if anatomy else ""
    )


def _add_denoise_parser(sub) -> None:
    """``lowdose denoise``: input, output, model, dose, device, strength, steps, ensemble, series."""
    p = sub.add_parser("denoise", help="denoise a low-dose CT with a trained model")
    p.add_argument("input", help="low-dose CT: NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("output", help="output file (.nii.gz, .nii, .nrrd, .mha) or new folder (DICOM series)")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model name under models/ or a bundle folder (default {DEFAULT_MODEL})"
    )
    p.add_argument(
        "--dose",
        type=_parse_dose_or_auto,
        default="auto",
        help="dose fraction of the input (0.25, 1/4, 25%%) or auto to estimate it (default)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: GPU when there is one")
    _add_strength_argument(p)
    p.add_argument(
        "--steps",
        type=int,
        choices=[1, 2, 3, 4],
        help="sampling steps of a diffusion model (dose_diffusion; default: the model's own)",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        choices=ENSEMBLE_SIZES,
        default=1,
        help="average the network over this many in-plane flips and transposes (8: about +0.2 dB for 8x the time; "
        "default 1)",
    )
    p.add_argument("--series", help="SeriesInstanceUID when the folder holds several series")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_denoise)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowdose", description="Low-dose CT: simulate, denoise, measure, and check that the anatomy was kept."
    )
    parser.add_argument("--debug", action="store_true", help="on an error, print the full traceback (for a bug report)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="make a simulated low-dose CT from a normal-dose CT")
    p.add_argument("input", help="normal-dose CT: NIfTI/NRRD/MHA file or DICOM series folder")
    p.add_argument("output", help="output file (.nii.gz, .nii, .nrrd, .mha) or new folder (DICOM series)")
    p.add_argument("--dose", type=_parse_dose, default=0.25, help="dose fraction, e.g. 0.25, 1/4, 25%% (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--series", help="SeriesInstanceUID when the folder holds several series")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_simulate)

    _add_denoise_parser(sub)

    p = sub.add_parser("train", help="train a denoiser from a YAML config")
    p.add_argument("config", help="training config (YAML)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    p.add_argument(
        "--estimator-only",
        action="store_true",
        help="run only the dose estimator's whole-slice stage (optim.estimator_epochs) on a finished run",
    )
    p.add_argument("--bundle", help="write the best checkpoint as a MONAI bundle into this folder at the end")
    p.add_argument("--epochs", type=int, help="override optim.epochs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("models", help="list the installed models")
    p.set_defaults(func=cmd_models)
    add_fidelity_parser(sub)
    add_cohort_parser(sub)
    add_serve_parser(sub)

    p = sub.add_parser("metrics", help="image-quality figures of a CT against a reference on the same grid")
    p.add_argument("reference")
    p.add_argument("test")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("demo", help="the main job on the bundled sample CT")
    p.add_argument("--out", default="output/demo", help="output folder (default output/demo)")
    p.add_argument("--dose", type=_parse_dose, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"denoising model (default {DEFAULT_MODEL})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    _add_strength_argument(p)
    p.set_defaults(func=cmd_demo)
    for p in sub.choices.values():  # `lowdose denoise ... --debug` as well as `lowdose --debug denoise ...`
        try:
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        except argparse.ArgumentError:
            pass  # the command has a --debug of its own
    return parser


def _one_line(exc: BaseException, command: str) -> str:
    """What went wrong, in one line: a LowdoseError's own message; anything else named as an internal error."""
    if isinstance(exc, LowdoseError):
        text = " ".join(str(exc).split())
        return text or type(exc).__name__
    if isinstance(exc, MemoryError):
        return "out of memory (the input or the batch is too large for this machine)"
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    detail = " ".join(str(exc).split())
    detail = detail[:300] + ("..." if len(detail) > 300 else "")
    return (
        f"internal error ({type(exc).__name__}{': ' + detail if detail else ''}); "
        f"`lowdose --debug {command} ...` prints the traceback"
    )


def main(argv: list[str] | None = None) -> int:
    name, debug = None, False
    try:
        args = build_parser().parse_args(argv)
        name, debug = args.command, args.debug
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"lowdose{' ' + name if name else ''}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every error, expected or not, ends here as one line (the traceback with --debug)
        if debug:
            traceback.print_exc()
        print(f"lowdose{' ' + name if name else ''}: error: {_one_line(exc, name or '<command>')}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
