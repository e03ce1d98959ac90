"""``mame-deploy export``: thin over mame_deploy.onnx_export (and mame_deploy.engine for --engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mame_deploy.artifacts import format_bytes
from mame_deploy.cli.common import (LAYERS_HELP, MERGE_HELP, OPTION_HELP, OVERRIDE_HELP, RATIO_HELP, SCHEDULE_HELP,
                                    compact_runs, merge_settings, source_from_flags, stages)
from mame_deploy.errors import UserError

console = Console()


# ---------------------------------------------------------------------------------------------
# export


def export_cmd(
    model: str = typer.Argument(..., help="Model name (see `mame-deploy models`)."),
    ratio: float = typer.Option(0.0, help=RATIO_HELP),
    schedule: Optional[str] = typer.Option(None, help=SCHEDULE_HELP),
    layers: Optional[str] = typer.Option(None, help=LAYERS_HELP),
    method: str = typer.Option("mame", help=MERGE_HELP),
    option: list[str] = typer.Option([], "--option", help=OPTION_HELP),
    checkpoint: Optional[Path] = typer.Option(None, help="Weights to load (default: bundled, else random)."),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
    override: list[str] = typer.Option([], "--override", help=OVERRIDE_HELP),
    batch: Optional[int] = typer.Option(None, help="Static batch size of the graph (default 1)."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Leave the batch axis symbolic."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset of the default domain (18..23; default 20, "
                                                    "22 for --dtype bf16)."),
    dtype: str = typer.Option("fp32", "--dtype", help="Precision the model runs in inside the file: fp32, fp16 or "
                                                      "bf16 (a half file is what TensorRT builds half engines from; "
                                                      "images in and logits out stay float32)."),
    scan: str = typer.Option("plugin", help="plugin: one mame::SelectiveScan node per scan, carrying its "
                                            "function; inline: the function body inlined, no custom domain."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="ONNX file (default ./MODEL.onnx)."),
    engine: Optional[bool] = typer.Option(None, "--engine/--no-engine",
                                          help="Also build a TensorRT engine (default: when TensorRT is installed)."),
    tuned: Optional[Path] = typer.Option(None, "--tuned", help="Merge as `mame-deploy tune --json` chose; "
                                                               "the manifest records that result."),
    triton_repo: Optional[Path] = typer.Option(None, "--triton-repo", help="Also write a Triton model repository "
                                               "there: the ONNX file (onnxruntime) and any engine (tensorrt)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
):
    """Export a (merged) model to ONNX with every selective scan as one custom node, plus its manifest."""
    from mame_deploy import artifacts, onnx_export
    from mame_deploy.engine import build_engine

    if batch is not None and dynamic_batch:
        raise UserError("--batch and --dynamic-batch exclude each other; pass one")
    batch = None if dynamic_batch else (batch if batch is not None else 1)
    onnx_export.check_options(batch, opset, scan, dtype)
    want_engine = _engine_requested(engine, scan)
    target, manifest = onnx_export.output_paths(model, output)
    # Every output is checked (exists? folder writable?) before anything is hashed or built.
    artifacts.check_writable([target, manifest] + ([target.with_suffix(".plan")] if want_engine else []), force)
    source = source_from_flags(model, ratio, schedule, method, option, checkpoint, seed, override, layers)
    tuned_record = None
    if tuned is not None:
        from mame_deploy.tune import apply_tuned

        source, tuned_record = apply_tuned(source, tuned)
    from mame_deploy.cli import serve as serve_cli  # --triton-repo

    serve_cli.check_triton_repo(triton_repo, source, force)

    with stages(console) as stage:
        result = onnx_export.export(source, target, batch=batch, opset=opset, scan=scan, dtype=dtype, tuned=tuned_record,
                                    force=force, status=stage)
    _print_export_summary(result)

    if want_engine:
        with stages(console) as stage:
            stage(f"building the TensorRT engine from {result.onnx_path}")
            plan = build_engine(result.onnx_path, force=force)
        console.print(f"wrote {escape(str(plan))}")
    elif engine is False:
        console.print("wrote ONNX only (--no-engine)", soft_wrap=True)
    elif scan != "plugin":
        console.print("wrote ONNX only: --scan inline files have no plugin nodes to build an engine from",
                      soft_wrap=True)
    else:
        console.print(escape(f"TensorRT is not installed: wrote ONNX only (pip install 'mame-deploy[trt]', then "
                             f"`mame-deploy build {result.onnx_path}`)"), soft_wrap=True)
    serve_cli.write_triton_repo(triton_repo, result.onnx_path, force)


def _engine_requested(engine: Optional[bool], scan: str) -> bool:
    """Whether to build an engine after the export: ``engine`` is True (--engine: required),
    False (--no-engine) or None (when TensorRT is installed). Fails before any export work."""
    from mame_deploy.plugins.trt_aot import require_tensorrt, tensorrt_available

    if engine is False:
        return False
    if scan != "plugin":
        if engine:
            raise UserError("engines are built from --scan plugin exports (the plugin runs the scan nodes); "
                            "drop --scan inline or pass --no-engine")
        return False
    if engine:
        require_tensorrt("--engine")
        return True
    return tensorrt_available()


def _print_export_summary(result) -> None:
    m = result.manifest
    table = Table(title=f"{m['model']} -> {escape(str(result.onnx_path))}", show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    weights = m["checkpoint"] or f"random (seed {m['seed']})"
    table.add_row("weights", escape(str(weights)))
    merges = ", ".join(f"{i}:{r}" for i, r in enumerate(m["schedule"]) if r)
    table.add_row("merging", f"{merge_settings(m)}; after block:removed {merges}" if merges else "none")
    if m.get("tuned"):
        t, lat = m["tuned"], m["tuned"]["latency"]
        table.add_row("tuned", escape(f"{t['file']}: {lat['runtime']} batch {lat['batch']} p50 {lat['p50_ms']:.3g} ms "
                                      f"({lat['speedup']:.2f}x), calibration drop {t['calibration']['drop_points']:.2f} pts"))
    table.add_row("tokens per layer", compact_runs(m["tokens_per_layer"]))
    table.add_row("GFLOPs / image", f"{m['gflops']:.3f} ({m['relative_gflops']:.3f} of unmerged)")
    table.add_row("input", f"{m['input_name']} {tuple(m['input_shape'])} float32 -> {m['output_name']}")
    scan = f"{m['scan_nodes']} mame::SelectiveScan nodes + function" if m["scan"] == "plugin" else "inlined"
    table.add_row("graph", f"opset {m['opset']}, {m['dtype']}, scan {m['scan']} ({scan})")
    table.add_row("ONNX", f"{escape(str(result.onnx_path))} ({format_bytes(result.onnx_bytes)})")
    table.add_row("manifest", f"{escape(str(result.manifest_path))} ({format_bytes(result.manifest_path.stat().st_size)})")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
