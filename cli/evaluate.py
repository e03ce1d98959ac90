"""``mame-deploy eval``, ``sweep`` and ``train``: thin over mame_deploy.evaluate and mame_deploy.train."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mame_deploy.cli.common import LAYERS_HELP, SCHEDULE_HELP, compact_runs, merge_layers, merge_options, progress_bar
from mame_deploy.schedule import MAX_RATIO
from mame_deploy.errors import UserError

console = Console()

_DATA_HELP = "ImageFolder root (ROOT/CLASS/IMAGE); default: the model's bundled data (vim_digits: its test split)."
_SUBSET_HELP = "Part of the bundled digits data: test (default) or val (for choosing options)."
_OPTION_HELP = "Merge option KEY=VALUE for mame (repeatable): split, arrangement, weighting, lam, metric."


def _progress() -> Progress:
    return progress_bar(console, TimeRemainingColumn())


def _check_outputs(paths: list[Optional[Path]], force: bool) -> None:
    from mame_deploy import artifacts

    artifacts.check_writable([p for p in paths if p is not None], force)


def _load(model: str, checkpoint: Optional[Path], data: Optional[Path], subset: Optional[str]):
    from mame_deploy.data import dataset_for
    from mame_deploy.models import create_model

    net = create_model(model, checkpoint=checkpoint)
    return net, dataset_for(model, net.config, data, subset)


def _schedule_table(net) -> Table:
    from mame_deploy.schedule import summary

    rows = summary(net.config, net.mame_schedule)
    table = Table(title=f"{net.model_name}: {net.mame_method} schedule")
    for col in ("block", "tokens", "removed after", "GFLOPs share"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(row["block"], str(row["tokens"]), str(row["removed"]), f"{row['relative_gflops']:.3f}")
    return table


def eval_cmd(
    model: str = typer.Argument(..., help="Model name (see `mame-deploy models`)."),
    ratio: float = typer.Option(0.0, help=f"Fraction of patch tokens removed in total, in [0, {MAX_RATIO}]."),
    method: str = typer.Option("mame", help="Merge method: mame, tome or prune."),
    schedule: Optional[str] = typer.Option(None, help=SCHEDULE_HELP),
    layers: Optional[str] = typer.Option(None, help=LAYERS_HELP),
    option: list[str] = typer.Option([], "--option", help=_OPTION_HELP),
    data: Optional[Path] = typer.Option(None, help=_DATA_HELP),
    subset: Optional[str] = typer.Option(None, help=_SUBSET_HELP),
    checkpoint: Optional[Path] = typer.Option(None, help="Weights to load (default: the model's bundled ones)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result record here (JSON)."),
    batch_size: int = typer.Option(128, help="Images per forward pass."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N images."),
    force: bool = typer.Option(False, help="Overwrite an existing --json file."),
):
    """Top-1 accuracy of MODEL merged at one setting, with its schedule and relative GFLOPs."""
    from mame_deploy import artifacts
    from mame_deploy.evaluate import Setting, check_limit, evaluate_setting

    check_limit(limit)
    _check_outputs([json_path], force)
    setting = Setting(method, ratio, schedule, merge_layers(layers), merge_options(option))
    net, dataset = _load(model, checkpoint, data, subset)
    total = min(len(dataset), limit) if limit is not None else len(dataset)
    with _progress() as bar:
        task = bar.add_task(f"{model} {method} @ {ratio}", total=total)
        record = evaluate_setting(net, dataset, setting, batch_size, limit, lambda k: bar.advance(task, k))
    console.print(_schedule_table(net))
    console.print(f"{escape(model)} on {escape(record['data'])}: top-1 [bold]{100 * record['accuracy']:.2f}%[/] "
                  f"({record['correct']}/{record['images']}), {record['relative_gflops']:.3f}x GFLOPs, "
                  f"tokens per block {compact_runs(record['tokens_per_layer'])}", highlight=False)
    _random_weights_note(record)
    if json_path is not None:
        artifacts.write_json(json_path, record, force=force)
        console.print(f"wrote {escape(str(json_path))}")


def sweep_cmd(
    model: str = typer.Argument(..., help="Model name (see `mame-deploy models`)."),
    ratios: str = typer.Option("0,0.3,0.5,0.7", help=f"Comma-separated ratios in [0, {MAX_RATIO}]."),
    methods: str = typer.Option("mame,tome,prune", help="Comma-separated methods."),
    layers: Optional[str] = typer.Option(None, help=LAYERS_HELP),
    option: list[str] = typer.Option([], "--option", help=_OPTION_HELP + " Baselines keep their own."),
    data: Optional[Path] = typer.Option(None, help=_DATA_HELP),
    subset: Optional[str] = typer.Option(None, help=_SUBSET_HELP),
    checkpoint: Optional[Path] = typer.Option(None, help="Weights to load (default: the model's bundled ones)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write all records here (a JSON list)."),
    plot: Optional[Path] = typer.Option(None, help="Write accuracy vs ratio per method here (PNG)."),
    batch_size: int = typer.Option(128, help="Images per forward pass."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N images."),
    force: bool = typer.Option(False, help="Overwrite existing --json / --plot files."),
):
    """Accuracy of every (method, ratio) pair in one run: a table, and optionally JSON and a plot."""
    from mame_deploy import artifacts
    from mame_deploy.evaluate import check_limit, parse_methods, parse_ratios, plot_sweep, sweep

    if plot is not None and plot.suffix.lower() != ".png":
        raise UserError(f"--plot {plot} must end in .png")
    check_limit(limit)
    _check_outputs([json_path, plot], force)
    ratio_list, method_list = parse_ratios(ratios), parse_methods(methods)
    layer_list, options = merge_layers(layers), merge_options(option)
    net, dataset = _load(model, checkpoint, data, subset)
    per_run = min(len(dataset), limit) if limit is not None else len(dataset)
    with _progress() as bar:
        task = bar.add_task(f"sweep {model}", total=per_run * len(ratio_list) * len(method_list))
        records = sweep(net, dataset, method_list, ratio_list, layer_list, options, batch_size, limit,
                        lambda k: bar.advance(task, k))
    console.print(sweep_table(records, f"{model} on {records[0]['data']} ({records[0]['images']} images)"))
    _random_weights_note(records[0])
    if json_path is not None:
        artifacts.write_json(json_path, records, force=force)
        console.print(f"wrote {escape(str(json_path))}")
    if plot is not None:
        plot_sweep(records, plot, title=f"{model}: top-1 vs tokens removed")
        console.print(f"wrote {escape(str(plot))}")


def _random_weights_note(record: dict) -> None:
    """Accuracy of seeded random weights measures nothing about the model: say so beside it."""
    if record.get("random_weights"):
        console.print(f"[yellow]note:[/] {escape(record['model'] or 'the model')} has seeded random weights (no "
                      "checkpoint given, none bundled), so this accuracy is chance level and says nothing about "
                      "the model; pass --checkpoint", soft_wrap=True, highlight=False)


def sweep_table(records: list[dict], title: str) -> Table:
    """method | ratio | top-1 | drop vs the same method at ratio 0 | GFLOPs | tokens per block."""
    table = Table(title=title)
    for col in ("method", "ratio", "top-1 %", "drop (pts)", "rel. GFLOPs", "tokens per block"):
        table.add_column(col, justify="left" if col in ("method", "tokens per block") else "right")
    base = {r["method"]: r["accuracy"] for r in records if r["ratio"] == 0}
    for r in records:
        drop = f"{100 * (base[r['method']] - r['accuracy']):.2f}" if r["method"] in base else "-"
        table.add_row(r["method"], f"{r['ratio']:g}", f"{100 * r['accuracy']:.2f}", drop,
                      f"{r['relative_gflops']:.3f}", compact_runs(r["tokens_per_layer"]))
    return table


def train_cmd(
    model: str = typer.Argument("vim_digits", help="Model to train: vim_digits or vim_fashion."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: the recipe's, or the fine-tuning recipe's with --init)."),
    seed: int = typer.Option(0, help="Seed of initialisation, shuffling and augmentation."),
    init: Optional[Path] = typer.Option(None, help="Start from these weights and use the fine-tuning recipe."),
    ratio: float = typer.Option(0.0, help="Train with merging active: fraction of patch tokens removed."),
    method: str = typer.Option("mame", help="Merge method while training: mame, tome or prune."),
    schedule: Optional[str] = typer.Option(None, help=SCHEDULE_HELP),
    layers: Optional[str] = typer.Option(None, help=LAYERS_HELP),
    option: list[str] = typer.Option([], "--option", help=_OPTION_HELP),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: the recipe's)."),
    device: str = typer.Option("cpu", help="cpu or cuda (vim_fashion trains on cuda, with mamba-ssm's scan)."),
    output: Optional[Path] = typer.Option(None, help="Weights file (default MODEL.pt; MODEL_METHOD_rRATIO.pt when merging)."),
    limit: Optional[int] = typer.Option(None, help="Train on the first N training images, validate and test on N (quick checks)."),
    threads: int = typer.Option(1, help="CPU threads; the weights are bit-reproducible for a given torch "
                                "version and thread count (the shipped vim_digits: 1)."),
    force: bool = typer.Option(False, help="Overwrite an existing --output file."),
):
    """Train a bundled model on its train split, or fine-tune it with merging active (--init, --ratio);
    with the defaults it reproduces the shipped weights. Prints val top-1 per epoch and test top-1."""
    import time

    import torch

    from mame_deploy import artifacts
    from mame_deploy.data import dataset_for
    from mame_deploy.evaluate import Setting, evaluate
    from mame_deploy.train import check_device, check_trainable, recipe_for, save_weights, train

    check_trainable(model)
    check_device(device)
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if lr is not None and not lr > 0:
        raise UserError(f"--lr must be positive, got {lr}")
    merging = ratio > 0 or schedule is not None
    options = merge_options(option)
    if not merging and (method != "mame" or options or layers is not None):
        raise UserError("--method, --option and --layers set the merging to train with; add --ratio R or --schedule")
    merge = Setting(method, ratio, schedule, merge_layers(layers), options) if merging else None
    if output is None:
        suffix = "" if merge is None else f"_{method}_" + (f"r{ratio:g}" if schedule is None else "schedule")
        output = Path(f"{model}{suffix}.pt")
    artifacts.check_writable([output], force)
    torch.set_num_threads(threads)
    recipe = recipe_for(model, finetune=init is not None, seed=seed, epochs=epochs, lr=lr)
    console.print(escape(f"recipe: {recipe}"), highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    started = time.perf_counter()
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(f"train {model}" + (f" ({method} @ {ratio:g})" if merge and not schedule else ""),
                            total=None, loss=float("nan"))

        def on_step(step: int, total: int, loss: float):
            bar.update(task, completed=step, total=total, loss=loss)

        def on_epoch(log):
            bar.console.print(f"epoch {log.epoch:>2}: loss {log.loss:.4f}, val top-1 {100 * log.val_accuracy:.2f}%, "
                              f"{log.seconds:.1f} s", highlight=False)

        net, history = train(model, recipe, init, merge, device, on_step=on_step, on_epoch=on_epoch,
                             limit=limit, eval_limit=limit)
    seconds = time.perf_counter() - started
    test = dataset_for(model, net.config, subset="test")
    test.images, test.labels = test.images.to(device), test.labels.to(device)
    correct, total = evaluate(net, test, batch_size=recipe.eval_batch_size, limit=limit)
    test_acc = correct / total
    save_weights(net, output, recipe, history, force, init=init, merge=merge, seconds=seconds, device=device)
    size = output.stat().st_size
    sha = artifacts.file_sha256(output)
    merged = f", merging {method} {compact_runs(net.mame_schedule)}" if merge else ""
    console.print(f"wrote {escape(str(output))} ({size / 1e6:.2f} MB, sha256 {sha[:16]}...): "
                  f"val {100 * history[-1].val_accuracy:.2f}%, test {100 * test_acc:.2f}% top-1 "
                  f"({correct}/{total}){escape(merged)}; trained in {seconds:.0f} s on {device}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("sweep")(sweep_cmd)
    app.command("train")(train_cmd)
