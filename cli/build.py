"""``mame-deploy build``: a TensorRT engine from an exported ONNX file (thin over
``mame_deploy.engine``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mame_deploy.cli.common import add_parity_rows, parse_size, progress_bar, stages

console = Console()


def build_cmd(
    onnx_path: Path = typer.Argument(..., metavar="PATH.onnx", help="ONNX file written by `mame-deploy export`."),
    precision: Optional[str] = typer.Option(
        None, help="fp32, fp16 or bf16 (default: the precision the model was exported in)."
    ),
    workspace: Optional[str] = typer.Option(None, help="Builder workspace limit, e.g. 4G or 512M (default: TensorRT's)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Engine file (default: PATH.plan)."),
    max_batch: Optional[int] = typer.Option(
        None, help="Largest batch of the optimisation profile (models exported with --dynamic-batch; default 64)."
    ),
    opt_batch: Optional[int] = typer.Option(None, help="Batch TensorRT tunes for (default: --max-batch)."),
    jit: bool = typer.Option(
        False, "--jit", help="Debugging: run the scan through the plugin's Python implementation, not the AOT kernel."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing engine and manifest."),
):
    """Build a TensorRT engine whose mame::SelectiveScan nodes run the CUDA kernel via the plugin."""
    from mame_deploy.engine import build_engine, read_engine_manifest
    from mame_deploy.manifest import manifest_path

    with stages(console) as stage:
        stage(f"building the TensorRT engine from {onnx_path}")
        path = build_engine(
            onnx_path, output, precision, parse_size(workspace), force, max_batch=max_batch, opt_batch=opt_batch,
            jit=jit,
        )
    record = read_engine_manifest(path)["engine"]
    table = Table(title=str(path), show_header=False)
    for key in ("precision", "batch", "tensorrt", "gpu", "compute_capability", "bytes"):
        table.add_row(key, str(record[key]))
    table.add_row("plugin", f"{record['plugin']['id']} ({record['plugin']['implementation']}) x {record['plugin']['nodes']}")
    table.add_row("manifest", str(manifest_path(path)))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("build")(build_cmd)


def validate_engine_report(
    plan: Path, data: Optional[Path], samples: Optional[int], batch: Optional[int], seed: int,
    json_path: Optional[Path], force: bool,
) -> None:
    """The --engine branch of `mame-deploy validate`: TensorRT vs the PyTorch source on CUDA."""
    from rich.markup import escape

    from mame_deploy import artifacts
    from mame_deploy.engine_checks import validate_engine

    if json_path is not None:
        artifacts.check_writable([json_path], force)
    with progress_bar(console) as bar:
        task = bar.add_task("tensorrt + torch", total=None)
        report = validate_engine(plan, data, samples, batch, seed, progress=lambda n: bar.advance(task, n))
    table = Table(title=f"validate {escape(str(plan))}", show_header=False)
    table.add_row("engine", f"{report['precision']}, TensorRT {report['tensorrt']}, {escape(report['gpu'])}")
    table.add_row("PyTorch source", f"{report['model']}, {report['method']} ratio {report['ratio']:g} (CUDA)")
    table.add_row("inputs", f"{report['samples']} x {escape(report['data'])}, batch {report['batch']}")
    add_parity_rows(table, report, "TensorRT", "of max |logit|")
    table.add_row("tolerance", ", ".join(f"{k} {v:g}" for k, v in report["tolerance"].items()))
    table.add_row("result", "[green]PASS[/]" if report["passed"] else "[red]FAIL[/]")
    console.print(table)
    if json_path is not None:
        artifacts.write_json(json_path, report)
    if not report["passed"]:
        raise typer.Exit(1)
