"""Command-line shells around training: ``sonocase train | evaluate | export | compare``
(also ``python -m training ...``). Each command parses options, builds the configs
and calls the pure functions in train / evaluate / export / compare."""

from __future__ import annotations

import functools
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from service.cli import settings_from

if TYPE_CHECKING:  # imported when a command runs: `sonocase --help` must not load torch
    from training.models import ModelConfig
    from training.train import DataSource, TrainConfig

_DATA_HELP = "Data: exactly one of --synthetic N, --busi DIR, --dicom DIR (with --labels CSV)."


def _data_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--synthetic", type=click.IntRange(min=2), help="Generate N synthetic images per class."),
        click.option(
            "--busi",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="A BUSI-layout folder (Dataset_BUSI_with_GT or its parent).",
        ),
        click.option(
            "--dicom",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="A folder of DICOM files, labelled by --labels.",
        ),
        click.option(
            "--labels",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="CSV of labels for --dicom (by SOP or Study Instance UID).",
        ),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed for data generation, splitting, initialisation and augmentation.",
        ),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def _model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--width",
            type=float,
            default=1.0,
            show_default=True,
            help="Channel width multiplier (1.0 = full VGG16 / MobileNetV2 width).",
        ),
        click.option(
            "--size", type=int, default=224, show_default=True, help="Input height and width (multiple of 32)."
        ),
        click.option("--embedding-dim", type=int, default=256, show_default=True, help="Retrieval embedding size."),
        click.option("--rnn", "rnn_type", type=click.Choice(["lstm", "gru"]), default="lstm", show_default=True),
        click.option("--rnn-hidden", type=int, default=256, show_default=True),
        click.option("--bidirectional/--unidirectional", default=False, show_default=True),
        click.option("--batch-norm/--no-batch-norm", default=True, show_default=True),
        click.option(
            "--cam-layer",
            default="conv5_3",
            show_default=True,
            help="hybrid: the VGG16 layer Grad-CAM explains: conv5_3 (an H/16 map), conv4_3 (H/8) or conv3_3 (H/4).",
        ),
        click.option(
            "--cam-method",
            default="gradcam",
            show_default=True,
            help="The class activation map in the exported graph: gradcam or gradcam++.",
        ),
        click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True),
        click.option("--lr", type=float, default=1e-3, show_default=True, help="Adam learning rate."),
        click.option(
            "--patience",
            type=click.IntRange(min=1),
            default=6,
            show_default=True,
            help="Early stopping: epochs without a better validation loss.",
        ),
        click.option(
            "--class-weights/--no-class-weights",
            default=False,
            show_default=True,
            help="Weight the cross-entropy by inverse class frequency.",
        ),
        click.option(
            "--augment/--no-augment",
            default=True,
            show_default=True,
            help="Rotation, flip, scale, contrast on the training split only.",
        ),
        click.option(
            "--localisation-weight",
            type=click.FloatRange(min=0),
            default=0.0,
            show_default=True,
            help="Weight of the loss that moves the Grad-CAM heat of the true class into the lesion mask "
            "(images with masks only: BUSI, synthetic); 0 trains on the labels alone.",
        ),
        click.option(
            "--segmentation-weight",
            type=click.FloatRange(min=0),
            default=2.0,
            show_default=True,
            help="hybrid: weight of the Dice + BCE loss of a lesion segmentation head trained on the lesion "
            "masks (normal images: no lesion) and exported as the lesion_mask output; 0: no head. "
            "Other architectures have no head.",
        ),
        click.option(
            "--initial-weights",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="State dict to start from (ours, or torchvision VGG16 for hybrid). Nothing is downloaded.",
        ),
        click.option("--test-fraction", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True),
        click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm progress bars."),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            help="CPU threads for PyTorch (default: its own choice). On a busy shared machine 1 is "
            "often faster than oversubscribed cores.",
        ),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def _source(synthetic: int | None, busi: Path | None, dicom: Path | None, labels: Path | None, seed: int) -> DataSource:
    from training.train import DataSource

    chosen = [name for name, value in (("--synthetic", synthetic), ("--busi", busi), ("--dicom", dicom)) if value]
    if len(chosen) != 1:
        raise click.UsageError(f"{_DATA_HELP} Got: {', '.join(chosen) or 'none'}.")
    if labels and not dicom:
        raise click.UsageError("--labels goes with --dicom")
    if dicom and not labels:
        raise click.UsageError("--dicom needs --labels CSV")
    if synthetic:
        return DataSource(kind="synthetic", synthetic_per_class=synthetic, seed=seed)
    if busi:
        return DataSource(kind="busi", path=str(busi.resolve()), seed=seed)
    return DataSource(
        kind="dicom", path=str(Path(str(dicom)).resolve()), labels=str(Path(str(labels)).resolve()), seed=seed
    )


def _configs(arch: str, seed: int, opts: dict[str, Any]) -> tuple[ModelConfig, TrainConfig, bool]:
    """The model and training configs from the shared options, and whether to show
    progress bars; applies --threads (process-wide)."""
    import torch

    from training.models import SEGMENTING_ARCHS, ModelConfig
    from training.train import TrainConfig

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    segmentation_weight = opts["segmentation_weight"] if arch in SEGMENTING_ARCHS else 0.0
    model = ModelConfig(
        arch=arch,
        width=opts["width"],
        size=opts["size"],
        embedding_dim=opts["embedding_dim"],
        rnn_type=opts["rnn_type"],
        rnn_hidden=opts["rnn_hidden"],
        bidirectional=opts["bidirectional"],
        batch_norm=opts["batch_norm"],
        cam_layer=opts["cam_layer"],
        cam_method=opts["cam_method"],
        segmentation=segmentation_weight > 0,
    )
    fit = TrainConfig(
        epochs=opts["epochs"],
        batch_size=opts["batch_size"],
        lr=opts["lr"],
        patience=opts["patience"],
        class_weights=opts["class_weights"],
        augment=opts["augment"],
        seed=seed,
        test_fraction=opts["test_fraction"],
        localisation_weight=opts["localisation_weight"],
        segmentation_weight=segmentation_weight,
        initial_weights=str(opts["initial_weights"]) if opts["initial_weights"] else None,
    )
    return model, fit, bool(opts["progress"])


def _invocation(ctx: click.Context) -> str:
    """The command line that reproduces this run (options that differ from their
    defaults, less those that only affect how it runs), for the model card."""
    parts: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if (
            not isinstance(param, click.Option)
            or param.name in ("resume", "progress", "threads")
            or value is None
            or value == param.get_default(ctx)
        ):
            continue
        if param.is_flag:
            parts.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            parts += [param.opts[0], str(value)]
    return f"{ctx.command_path} {shlex.join(parts)}".strip()


def _fail_clearly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Bad inputs (missing files, wrong data, mismatched checkpoints) end the command
    with their message instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (ValueError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def _print_report(report: dict[str, Any], where: Path) -> None:
    retrieval = report["retrieval"]
    pointing = ""
    if "localisation" in report:
        lesions = report["localisation"]["all"]
        pointing = (
            f", heatmap pointing game {lesions['pointing_game']:.3f} (random point "
            f"{lesions['random_pointing_game']:.3f}), heat share {lesions['heat_share']:.3f}"
        )
    if "segmentation" in report:
        masks = report["segmentation"]
        dice = " / ".join(f"{name} {m['dice']:.3f}" for name, m in masks["per_class"].items())
        pointing += (
            f", lesion mask Dice {dice} (IoU {masks['all']['iou']:.3f}), normal images outlined "
            f"{masks['no_lesion']['false_positive_rate']:.3f}"
        )
    click.echo(
        f"balanced accuracy {report['balanced_accuracy']:.3f}, accuracy {report['accuracy']:.3f}, "
        f"macro F1 {report['macro_f1']:.3f}, mAP@5 {retrieval['map@5']:.3f}, "
        f"ACC@1 {retrieval['acc@1']:.3f}{pointing} (n={report['n_test']}); report in {where}"
    )
    if "sources" in report.get("ood", {}):
        _print_guard_and_calibration(report["ood"], report["calibration"])


def _print_guard_and_calibration(ood: dict[str, Any], calibration: dict[str, Any]) -> None:
    """The domain guard per out-of-domain source and the ECE before and after calibration."""
    click.echo(
        f"domain guard: threshold {ood['threshold']:.2f}, held-out split flagged "
        f"{ood['test_flagged_fraction']:.3f}, AUROC against held-out sources {ood['auroc_held_out']:.4f}"
    )
    for s in ood["sources"]:
        click.echo(
            f"  {s['source']:<24} {'held out' if s['held_out'] else 'tuning  '} flagged {s['flagged']:.2f} "
            f"of {s['images']}, AUROC {s['auroc']:.4f}"
        )
    from training.evaluate import calibration_map

    click.echo(f"calibration: {calibration['method']}, {calibration_map(calibration)} ({calibration['fitted_on']})")
    for c in calibration.get("candidates") or []:
        click.echo(f"  candidate {c['method']:<30} out-of-fold ECE {c['ece']:.3f}, NLL {c['nll']:.3f}")
    for name, v in calibration["sets"].items():
        click.echo(
            f"  ECE on {name} (n={v['images']}): {v['ece_before']:.3f} -> {v['ece_after']:.3f} "
            f"(noise floor {v['ece_noise_floor']:.3f}); balanced accuracy "
            f"{v['balanced_accuracy_before']:.3f} -> {v['balanced_accuracy_after']:.3f}"
        )


@click.command("train", epilog=_DATA_HELP)
@_data_options
@click.option("--arch", type=click.Choice(["hybrid", "cnn", "rnn", "mobilenetv2"]), default="hybrid", show_default=True)
@_model_options
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/model"),
    show_default=True,
    help="Output folder for checkpoint.pt and model.pt.",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt after an interruption.")
@click.option(
    "--folds", type=click.IntRange(min=2), help="Stratified group k-fold cross-validation instead of one split."
)
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Then evaluate on the held-out split and export ONNX + card + report to this .onnx path.",
)
@click.pass_context
@_fail_clearly
def train(
    ctx: click.Context,
    synthetic: int | None,
    busi: Path | None,
    dicom: Path | None,
    labels: Path | None,
    seed: int,
    arch: str,
    out: Path,
    resume: bool,
    folds: int | None,
    export_path: Path | None,
    **opts: Any,
) -> None:
    """Train a model; with --export also evaluate it and ship it as ONNX."""
    settings_from(ctx)
    from training import evaluate as ev
    from training.train import make_split
    from training.train import train as run_training

    if folds and export_path:
        raise click.UsageError("--folds makes k models for their scores; train once without --folds to --export")
    source = _source(synthetic, busi, dicom, labels, seed)
    model_config, train_config, progress = _configs(arch, seed, opts)
    command = _invocation(ctx)
    records = source.load()
    if folds:
        from training.evaluate import cross_validate

        summary = cross_validate(
            records, source, model_config, train_config, folds, out, progress=progress, command=command
        )
        click.echo(
            f"{folds}-fold balanced accuracy {summary['balanced_accuracy']['mean']:.3f} "
            f"± {summary['balanced_accuracy']['std']:.3f}; report in {out / 'cv.md'}"
        )
        return
    split = make_split(records, train_config.test_fraction, train_config.val_fraction, seed)
    trained = run_training(
        records, split, model_config, train_config, source, out, resume=resume, progress=progress, command=command
    )
    click.echo(f"trained {arch} for {len(trained.history)} epochs: {out / 'model.pt'}")
    if export_path:
        from training.export import ship

        report = ev.evaluate(trained, records, export_path.parent, prefix=export_path.stem)
        _print_report(report, export_path.with_suffix(".report.md"))
        ship(trained, export_path, report=report)
        click.echo(f"exported {export_path} and {export_path.with_suffix('.card.json')}")


@click.command("evaluate")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Report folder (default: the model's).")
@click.option("--prefix", default="evaluation", show_default=True, help="File name prefix of the report files.")
@click.pass_context
@_fail_clearly
def evaluate(ctx: click.Context, model: Path, out: Path | None, prefix: str) -> None:
    """Score MODEL (a train output folder or its model.pt) on its held-out split:
    JSON + Markdown report with confusion matrix, ROC, learning curves, Grad-CAM."""
    settings_from(ctx)
    from training import evaluate as ev
    from training.train import load_trained

    trained = load_trained(model)
    folder = out or (model if model.is_dir() else model.parent)
    report = ev.evaluate(trained, trained.source.load(), folder, prefix=prefix)
    _print_report(report, folder / f"{prefix}.report.md")


@click.command("export")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The .onnx file to write.")
@click.option("--name", help="Model name for the card (default: the file name).")
@click.option("--version", "version", default="0.1.0", show_default=True)
@click.option(
    "--report",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Evaluation report JSON whose metrics go into the card (default: MODEL's evaluation.report.json).",
)
@click.option(
    "--quantize",
    is_flag=True,
    help="Also write an int8 (static, QDQ) model and report its change in accuracy, mAP@5 and Grad-CAM.",
)
@click.pass_context
@_fail_clearly
def export(
    ctx: click.Context, model: Path, out: Path, name: str | None, version: str, report: Path | None, quantize: bool
) -> None:
    """Export MODEL to ONNX (probabilities, embedding, Grad-CAM in one graph) with its model card."""
    settings_from(ctx)
    from training.export import quantize_and_compare, ship
    from training.train import load_trained

    trained = load_trained(model)
    folder = model if model.is_dir() else model.parent
    report_path = report or folder / "evaluation.report.json"
    metrics = json.loads(report_path.read_text()) if report_path.is_file() else None
    if metrics is None:
        click.echo(f"no evaluation report at {report_path}: the card will carry no metrics", err=True)
    ship(trained, out, report=metrics, name=name, version=version)
    click.echo(f"exported {out} and {out.with_suffix('.card.json')}")
    if quantize:
        summary = quantize_and_compare(trained, trained.source.load(), out)
        click.echo(json.dumps(summary, indent=2))


@click.command("calibrate", epilog=_DATA_HELP)
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_data_options
@click.pass_context
@_fail_clearly
def calibrate(
    ctx: click.Context,
    model: Path,
    synthetic: int | None,
    busi: Path | None,
    dicom: Path | None,
    labels: Path | None,
    seed: int,
) -> None:
    """Refit the domain guard and the probability calibration of an exported MODEL
    (.onnx) on the data it was trained with, into its card; print the guard per
    source, the calibration candidates and the ECE before and after."""
    settings_from(ctx)
    from training.export import calibrate as run

    sections = run(model, _source(synthetic, busi, dicom, labels, seed))
    _print_guard_and_calibration(sections["ood"], sections["calibration"])


@click.command("compare", epilog=_DATA_HELP)
@_data_options
@_model_options
@click.option("--archs", default="hybrid,cnn,rnn,mobilenetv2", show_default=True, help="Comma-separated architectures.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/compare"), show_default=True
)
@click.pass_context
@_fail_clearly
def compare(
    ctx: click.Context,
    synthetic: int | None,
    busi: Path | None,
    dicom: Path | None,
    labels: Path | None,
    seed: int,
    archs: str,
    out: Path,
    **opts: Any,
) -> None:
    """Train and evaluate the architectures on the same split; table beside the seed paper's."""
    settings_from(ctx)
    from training.evaluate import compare_architectures

    source = _source(synthetic, busi, dicom, labels, seed)
    names = [a.strip() for a in archs.split(",") if a.strip()]
    model_config, train_config, progress = _configs(names[0] if names else "hybrid", seed, opts)
    compare_architectures(
        source.load(), source, names, model_config, train_config, out, progress=progress, command=_invocation(ctx)
    )
    click.echo((out / "compare.md").read_text())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.pass_context
def main(ctx: click.Context) -> None:
    """Sonocase training: train, evaluate, export, compare (python -m training ...)."""
    ctx.obj = {"config": None}


for _command in (train, evaluate, export, calibrate, compare):
    main.add_command(_command)
