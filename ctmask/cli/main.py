"""``ctmask`` command line: thin commands, each calling one public function.

Heavy modules (torch) are imported inside the command bodies so ``ctmask --help`` and
the torch-free commands start fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ctmask import __version__
from ctmask.cli import deploy, export, pacs, precision, qat, serve, triton, trt
from ctmask.cli.common import (
    JsonOpt,
    PresetOpt,
    QuietOpt,
    check_paths,
    emit_json,
    human_echo,
    show_ctmask_warnings,
    split_images,
    user_errors,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="COVID-CT-Mask-Net toolchain: synthetic data, training, evaluation, export, inference.",
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs wrap to the terminal
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ctmask {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the ctmask version and exit."),
) -> None:
    """Options of every command; ctmask's warnings print as one ``warning:`` line."""
    show_ctmask_warnings()


@app.command()
@user_errors
def synth(
    out: Path = typer.Argument(..., help="Output folder (created)."),
    slices: int | None = typer.Option(None, "--slices", "-n", min=3,
                                      help="Total slices over train/val/test (default 2500; not with --dicom)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; same seed, same data."),
    workers: int | None = typer.Option(None, "--workers", help="Processes (default: all cores)."),
    dicom: bool = typer.Option(False, "--dicom", help="Write synthetic patients as CT DICOM series instead."),
    patients: int | None = typer.Option(None, "--patients", min=1, help="With --dicom: patients (default 12)."),
    slices_per_patient: int | None = typer.Option(None, "--slices-per-patient", min=1,
                                                  help="With --dicom: slices per series (default 24)."),
    nifti: bool = typer.Option(False, "--nifti", help="With --dicom: also write one NIfTI volume per patient."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Write a synthetic chest-CT benchmark in COVIDx-CT and CNCB formats, or with `--dicom`
    synthetic patients as DICOM series (one study per patient) plus a manifest.json."""
    from ctmask.core.errors import ConfigError
    from ctmask.core.progress import progress

    check_paths({}, {"--json": json_out}, {"OUT": out})
    if dicom:
        if slices is not None:
            raise ConfigError("--slices is for the PNG benchmark; with --dicom use --patients and "
                              "--slices-per-patient")
        from ctmask.data.synth_dicom import synthesize_dicom

        patients, slices_per_patient = patients or 12, slices_per_patient or 24
        with progress(patients, "synth --dicom", not quiet) as advance:
            summary = synthesize_dicom(out, patients, slices_per_patient, seed=seed, workers=workers, nifti=nifti,
                                       progress=lambda n_done, n_total: advance())
        echo = human_echo(json_out)
        folders = "  ".join(str(Path(out) / d) for d in ("dicom", "nifti")[: 1 + nifti])
        for name, n in summary["classes"].items():
            lesion = "" if name == "normal" else f", {summary['slice_classes'][name]} with lesions"
            echo(f"{name:<10}{n:>5} patients ({n * slices_per_patient} slices{lesion})  {folders}")
        echo(f"manifest  {Path(out) / 'manifest.json'}")
        typer.echo("SYNTHETIC data (not patient data): see synth.json and manifest.json for what it models", err=True)
        emit_json(summary, json_out)
        return
    given = [opt for opt, value in (("--patients", patients), ("--slices-per-patient", slices_per_patient),
                                    ("--nifti", nifti or None)) if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --dicom")
    from ctmask.data.synth import synthesize

    slices = 2500 if slices is None else slices
    with progress(slices, "synth", not quiet) as advance:
        done = [0]

        def on_progress(n_done: int, n_total: int) -> None:
            advance(n_done - done[0])
            done[0] = n_done

        summary = synthesize(out, slices, seed=seed, workers=workers, progress=on_progress)
    echo = human_echo(json_out)
    for split, info in summary["splits"].items():
        classes = ", ".join(f"{k} {v}" for k, v in info["classes"].items())
        echo(f"{split:<6}{info['n']:>6} slices ({classes})  {Path(out) / info['file']}")
    typer.echo("SYNTHETIC data (not patient data): see synth.json for what it models", err=True)
    emit_json(summary, json_out)


@app.command("model-info")
@user_errors
def model_info(
    preset: str = PresetOpt,
    json_out: Path | None = JsonOpt,
) -> None:
    """Parameter counts per part and trainable counts per classifier variant."""
    from ctmask.core.presets import get_preset
    from ctmask.training.model import parameter_report

    check_paths({}, {"--json": json_out})

    report = parameter_report(get_preset(preset))
    echo = human_echo(json_out)
    for name, n in report["parts"].items():
        echo(f"{name:<22}{n:>14,}")
    echo(f"{'mask_rcnn_total':<22}{report['mask_rcnn_total']:>14,}")
    echo(f"{'total (+S)':<22}{report['total']:>14,}")
    echo(f"{'bn_statistics':<22}{report['bn_statistics']:>14,}  running mean / var, num_batches_tracked")
    for what in ("segmentation_model", "classifier_model"):
        echo(f"{what:<22}{report[what]:>14,}  with BN statistics {report[what + '_with_bn_statistics']:,}")
    for name, h in report["heads"].items():
        mark = " (this preset's)" if name == report["head"] else ""
        echo(f"{'head ' + name:<22}{h['parameters']:>14,}  {h['what']}{mark}")
    for v, n in report["trainable_by_variant"].items():
        echo(f"trainable[{v}]{'':<{11 - len(v)}}{n:>14,}")
    emit_json(report, json_out)


@app.command("import-reference")
@user_errors
def import_reference_cmd(
    source: Path = typer.Argument(..., help="One of the authors' .pth files (segmentation or classifier)."),
    out: Path = typer.Option(..., "--out", "-o", help="ctmask checkpoint to write (.pt)."),
    backbone: str | None = typer.Option(None, help="resnet18, resnet34 or resnet50 (inferred; checked if given)."),
    truncation: int | None = typer.Option(None, help="0, 1 or 2 (inferred; checked if given)."),
    mask_type: str | None = typer.Option(None, help="both, ggo or merge: required for a 2-class file (ggo / merge "
                                                    "cannot be told apart); 3 classes are 'both'."),
    n_rois: int | None = typer.Option(None, help="N: a segmentation file has no S (default: the family's preset, "
                                                 "resnet18/34 128, resnet50 256); a classifier's is checked."),
    s_width: int | None = typer.Option(None, help="S width F (as --n-rois: 512 / 1024 by default)."),
    json_out: Path | None = JsonOpt,
) -> None:
    """Convert the authors' COVID-CT-Mask-Net checkpoint to a ctmask checkpoint, running nothing from it."""
    from ctmask.training.reference_import import ImportOptions, import_reference

    check_paths({"SOURCE": source}, {"--out": out, "--out's sidecar": out.with_name(out.name + ".json"),
                                     "--json": json_out})
    summary = import_reference(source, out, ImportOptions(backbone, truncation, mask_type, n_rois, s_width))
    echo = human_echo(json_out)
    echo(f"{summary['kind']} checkpoint, preset {summary['preset']['name']!r}: {summary['out']}")
    echo("inferred from the file: " + ", ".join(f"{k} {v}" for k, v in summary["inferred"].items()))
    if summary["given"]:
        echo("given or defaulted: " + ", ".join(f"{k} {v}" for k, v in summary["given"].items()))
    echo(f"mask branch: {summary['mask_branch']}; source sha256 {summary['source_sha256']}")
    emit_json(summary, json_out)


@app.command("train-seg")
@user_errors
def train_seg(
    train_dir: Path = typer.Argument(..., help="CNCB-layout folder with images/ and masks/."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (.pt)."),
    preset: str = PresetOpt,
    epochs: int = typer.Option(100, help="Epochs (paper: 100)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Images per step (paper: 1)."),
    lr: float = typer.Option(1e-5, help="Adam learning rate (paper: 1e-5)."),
    weight_decay: float = typer.Option(1e-3, help="Adam weight decay (paper: 1e-3)."),
    max_images: int | None = typer.Option(None, help="Use only the first N slices."),
    hflip: bool = typer.Option(True, help="Random left-right flips."),
    seed: int = typer.Option(0),
    resume: Path | None = typer.Option(None, help="Continue from this segmentation checkpoint."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Train the Mask R-CNN lesion detector (the five Mask R-CNN losses)."""
    from ctmask.core.presets import get_preset
    from ctmask.data.cncb import list_segmentation
    from ctmask.training.train_seg import SegTrainOptions, train_segmentation

    check_paths({"TRAIN_DIR": train_dir, "--resume": resume},
                {"--out": out, "--out's sidecar": out.with_name(out.name + ".json"), "--json": json_out})
    opts = SegTrainOptions(epochs, batch_size, lr, weight_decay, hflip, seed, max_images)
    summary = train_segmentation(get_preset(preset), list_segmentation(train_dir), out, opts, resume, not quiet)
    last = summary["history"][-1] if summary["history"] else {}
    losses = ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k != "epoch")
    human_echo(json_out)(f"trained on {summary['n_train']} slices in {summary['seconds']:.0f} s; last epoch losses: "
                         + losses)
    emit_json(summary, json_out)


@app.command("train-cls")
@user_errors
def train_cls(
    init: Path = typer.Argument(..., help="Segmentation checkpoint (or classifier checkpoint to resume)."),
    train_split: Path = typer.Option(..., "--train-split", help="COVIDx-CT split file for training."),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint to write (.pt)."),
    val_split: Path | None = typer.Option(None, "--val-split", help="Split file for per-epoch validation."),
    preset: str = PresetOpt,
    variant: str = typer.Option("heads+bn", help="heads | heads+bn | full (paper Table 1)."),
    epochs: int = typer.Option(50, help="Epochs (paper: 50)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Slices per step (paper: 8)."),
    lr: float = typer.Option(1e-5, help="Adam learning rate (paper: 1e-5)."),
    weight_decay: float = typer.Option(1e-3, help="Adam weight decay (paper: 1e-3)."),
    crop: bool = typer.Option(False, help="Crop slices to the split file's body box."),
    seed: int = typer.Option(0),
    perturb: str = typer.Option("", "--perturb", help="Comma-separated relative noise scales of the detector, e.g. "
                                                      "1e-3,3e-3,1e-2: S also trains on the RoIs of the detector "
                                                      "perturbed at each scale, so its calls survive FP16 / INT8."),
    consistency: float = typer.Option(0.0, "--consistency", help="With --perturb or --rois-from (heads variant): "
                                                                  "weight of the squared logit change between a "
                                                                  "slice's perturbed (or graph) and exact RoIs in "
                                                                  "the loss."),
    head: str | None = typer.Option(None, "--head", help="Classifier head: paper (the paper's S) | pooled (its "
                                                         "calls survive input noise, FP16 and INT8). Default: the "
                                                         "preset's, or the init classifier's."),
    roi_cache: Path | None = typer.Option(None, "--roi-cache", help="heads variant: folder caching the frozen "
                                                                     "detector's ranked RoIs, keyed by its weights, "
                                                                     "settings and the slices; a rerun with "
                                                                     "another head or seed skips the detector."),
    suppression: str | None = typer.Option(None, "--suppression", help="Overlap suppression of the ranked RoIs S "
                                                                        "reads: nms (the paper's hard NMS) | matrix "
                                                                        "(continuous Gaussian decay). Default: the "
                                                                        "preset's, or the init classifier's."),
    rois_from: list[Path] = typer.Option([], "--rois-from", help="heads variant, repeatable: an INT8 / FP16 graph "
                                                                 "exported from this detector; S also trains on "
                                                                 "its ranked RoIs (with --consistency: to call a "
                                                                 "slice the same from both)."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Train the classifier S on the detector's ranked RoIs."""
    from ctmask.core.errors import ConfigError
    from ctmask.data.covidx import read_split
    from ctmask.training.train_cls import ClsTrainOptions, preset_for_init, train_classifier

    try:
        scales = tuple(float(v) for v in perturb.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"--perturb takes comma-separated numbers, got {perturb!r}") from None
    check_paths({"INIT": init, "--train-split": train_split, "--val-split": val_split, "--rois-from": rois_from,
                 "their slices": [*split_images(train_split), *split_images(val_split)]},
                {"--out": out, "--out's sidecar": out.with_name(out.name + ".json"), "--json": json_out},
                {"--roi-cache": roi_cache})
    opts = ClsTrainOptions(variant, epochs, batch_size, lr, weight_decay, crop, seed, scales, consistency, head,
                           suppression, tuple(str(g) for g in rois_from))
    train = read_split(train_split)
    val = read_split(val_split) if val_split else None
    summary = train_classifier(preset_for_init(preset, init), init, train, val, out, opts, not quiet, roi_cache)
    last = summary["history"][-1] if summary["history"] else {}
    human_echo(json_out)(f"trained on {summary['n_train']} slices in {summary['seconds']:.0f} s; last epoch: {last}")
    emit_json(summary, json_out)


@app.command()
@user_errors
def evaluate(
    checkpoint: Path = typer.Argument(..., metavar="CKPT_OR_GRAPH",
                                      help="Classifier or segmentation checkpoint, or a ctmask ONNX graph (any "
                                           "precision, run by onnxruntime on the CPU)."),
    split: Path | None = typer.Option(None, "--split", help="COVIDx-CT split file (classifier, graph)."),
    seg_dir: Path | None = typer.Option(None, "--seg-dir", help="CNCB-layout folder (segmentation)."),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    crop: bool | None = typer.Option(None, "--crop/--no-crop",
                                     help="Crop slices to the split file's body box (default: as the classifier "
                                          "was trained)."),
    noise: bool = typer.Option(True, "--noise/--no-noise", help="Classifier: also count the calls that seeded "
                                                                  "input noise of +-0.25 and +-1 gray level changes "
                                                                  "(the noise floor; 3x the evaluation time)."),
    roi_cache: Path | None = typer.Option(None, "--roi-cache", help="Classifier: folder caching the detector's "
                                                                     "ranked RoIs of the split (and of its noisy "
                                                                     "copies): another head on the same detector "
                                                                     "is evaluated without running it again."),
    json_out: Path | None = JsonOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Paper Table 2 (classifier or graph) or mask AP / Dice (segmentation) on a test set; for a classifier
    or a graph also its noise floor, the calls that invisible input noise changes."""
    from ctmask.core.errors import ConfigError
    from ctmask.core.metrics import format_classification_table
    from ctmask.training.metrics import format_segmentation_table

    echo = human_echo(json_out)
    check_paths({"CHECKPOINT": checkpoint, "--split": split, "its slices": split_images(split), "--seg-dir": seg_dir},
                {"--json": json_out}, {"--roi-cache": roi_cache})
    if checkpoint.suffix.lower() == ".onnx":
        _evaluate_graph(checkpoint, split, batch_size, crop, noise, roi_cache, json_out, quiet)
        return
    from ctmask.training.checkpoint import load_checkpoint
    from ctmask.training.evaluate import evaluate_classifier, evaluate_segmentation

    ck = load_checkpoint(checkpoint)
    if ck.kind == "classifier":
        if split is None:
            raise ConfigError("a classifier checkpoint is evaluated on a split file: pass --split FILE")
        from ctmask.data.covidx import read_split

        trained_crop = ck.preprocessing.crop
        if crop is None:
            crop = trained_crop
        elif crop != trained_crop:
            typer.secho(f"warning: evaluating {'with' if crop else 'without'} the body crop, but {checkpoint} was "
                        f"trained {'with' if trained_crop else 'without'} it", fg=typer.colors.YELLOW, err=True)
        from ctmask.core.noise import NOISE_GRAY_LEVELS, describe_noise_floor

        report = evaluate_classifier(ck, read_split(split), batch_size, crop, not quiet,
                                     NOISE_GRAY_LEVELS if noise else (), roi_cache)
        report["crop"] = crop
        echo(format_classification_table(report))
        echo(f"head: {report['head']}")
        if "noise_floor" in report:
            echo(describe_noise_floor(report["noise_floor"]))
    else:
        if seg_dir is None:
            raise ConfigError("a segmentation checkpoint is evaluated on a CNCB folder: pass --seg-dir DIR")
        from ctmask.data.cncb import list_segmentation

        report = evaluate_segmentation(ck, list_segmentation(seg_dir), batch_size, not quiet)
        echo(format_segmentation_table(report["mask_ap"], report["dice"], ck.preset.lesion_names))
    report = {"checkpoint": str(checkpoint), "kind": ck.kind, "preset": ck.preset.name, **report}
    emit_json(report, json_out)


def _evaluate_graph(model: Path, split: Path | None, batch_size: int, crop: bool | None, noise: bool,
                    roi_cache: Path | None, json_out: Path | None, quiet: bool) -> None:
    """``evaluate GRAPH``: the graph on a split, torch-free (``ctmask.runtime.evaluate``)."""
    from ctmask.core.errors import ConfigError
    from ctmask.core.metrics import format_classification_table
    from ctmask.core.noise import NOISE_GRAY_LEVELS, describe_noise_floor
    from ctmask.core.progress import progress
    from ctmask.data.covidx import read_split
    from ctmask.runtime.evaluate import evaluate_graph
    from ctmask.runtime.runner import OnnxRuntimeRunner

    if split is None:
        raise ConfigError("a graph is evaluated on a split file: pass --split FILE")
    given = [n for n, v in (("--crop/--no-crop", crop), ("--roi-cache", roi_cache)) if v is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} applies to a checkpoint; a graph crops as its metadata says and has "
                          "no detector cache")
    entries = read_split(split)
    with OnnxRuntimeRunner(model) as runner, progress(len(entries), "evaluate", not quiet) as advance:
        report = evaluate_graph(runner, entries, split, batch_size, NOISE_GRAY_LEVELS if noise else (), advance)
    for s in report["skipped"]:
        typer.secho(f"skipped {s['file']}: {s['error']}", fg=typer.colors.YELLOW, err=True)
    echo = human_echo(json_out)
    echo(format_classification_table(report))
    echo(f"graph: {report['precision']}, head {report['head']}")
    if "noise_floor" in report:
        echo(describe_noise_floor(report["noise_floor"]))
    emit_json({"model": str(model), "kind": "graph", **report}, json_out)


for _name, _fn in {**deploy.COMMANDS, **export.COMMANDS, **precision.COMMANDS, **trt.COMMANDS, **serve.COMMANDS,
                  **triton.COMMANDS, **qat.COMMANDS, **pacs.COMMANDS}.items():
    app.command(_name)(_fn)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
