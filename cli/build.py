"""``mame-deploy build``: a TensorRT engine from an exported ONNX file (thin over
``mame_deploy.engine``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mame_deploy.cli.common import parse_size, stages

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
