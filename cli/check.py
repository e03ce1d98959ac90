"""``mame-deploy validate`` and ``bench``: thin over mame_deploy.validate and mame_deploy.bench.
Both take ONNX files and TensorRT engines alike (``runners.Artifact``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mame_deploy.cli.common import (LAYERS_HELP, MERGE_HELP, OPTION_HELP, OVERRIDE_HELP, RATIO_HELP, SCHEDULE_HELP,
                                    add_decision_rows, add_parity_rows, merge_settings, parse_batch_sizes,
                                    progress_bar, source_from_flags, write_report)
from mame_deploy.errors import UserError

console = Console()


# ---------------------------------------------------------------------------------------------
# validate


def validate_cmd(
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="ONNX file written by `mame-deploy export`."),
    engine: Optional[Path] = typer.Option(None, "--engine", help="TensorRT engine (.plan) instead: run on the GPU."),
    data: Optional[Path] = typer.Option(None, help="Labelled image folder (one sub-folder per class)."),
    samples: Optional[int] = typer.Option(None, help="Number of images (default 16 random ones, or all of --data)."),
    batch: Optional[int] = typer.Option(None, help="Batch size for --dynamic-batch files (default min(samples, 8))."),
    device: str = typer.Option("cpu", help="cpu or cuda (onnxruntime-gpu for the ONNX side)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for onnxruntime and PyTorch."),
    seed: int = typer.Option(0, help="Seed of the random images."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --json file."),
):
    """Compare an ONNX file (onnxruntime) or an engine (TensorRT) with the PyTorch source its manifest describes."""
    from mame_deploy.runners import check_threads
    from mame_deploy.validate import REL_TOLERANCE, validate

    if (onnx is None) == (engine is None):
        raise UserError("pass one of --onnx PATH.onnx or --engine PATH.plan")
    check_threads(threads)
    path = onnx or engine
    if engine is not None:
        from mame_deploy.plugins.trt_aot import require_tensorrt

        require_tensorrt("--engine")
    if json_path is not None:
        from mame_deploy import artifacts

        artifacts.check_writable([json_path], force)
    runtime = "TensorRT" if engine is not None else "onnxruntime"
    with progress_bar(console) as bar:
        task = bar.add_task(f"{runtime} + torch", total=None)
        report = validate(path, data, samples, batch, device, threads, seed, progress=lambda n: bar.advance(task, n))
    table = Table(title=f"validate {escape(str(path))}", show_header=False)
    if report["runtime"] == "tensorrt":
        table.add_row("engine", f"{report['precision']}, TensorRT {report['tensorrt']}, {escape(report['gpu'])}")
    elif report["precision"] != "fp32":
        table.add_row("file", f"exported in {report['precision']}; PyTorch runs in {report['precision']} too")
    table.add_row("PyTorch source", f"{report['model']}, {merge_settings(report)}")
    table.add_row("inputs", f"{report['samples']} x {escape(report['data'])}, batch {report['batch']}, "
                            f"{report['device']}")
    add_parity_rows(table, report, report["runtime"] if engine is None else runtime, "of max |logit|, all samples")
    add_decision_rows(table, report, REL_TOLERANCE)
    if report["precision"] != "fp32":
        table.add_row("tolerance", ", ".join(f"{k} {v:g}" for k, v in report["tolerance"].items()))
    table.add_row("result", "[green]PASS[/]" if report["passed"] else "[red]FAIL[/]")
    console.print(table)
    write_report(console, json_path, report)
    if not report["passed"]:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------
# bench


def bench_cmd(
    onnx: list[Path] = typer.Option([], "--onnx", help="ONNX file(s) to time in onnxruntime (repeatable)."),
    engine: list[Path] = typer.Option([], "--engine", help="TensorRT engine(s) to time (repeatable; implies --device cuda)."),
    torch_model: Optional[str] = typer.Option(None, "--torch", help="Model name to time in PyTorch."),
    ratio: float = typer.Option(0.0, help="With --torch: " + RATIO_HELP),
    schedule: Optional[str] = typer.Option(None, help="With --torch: " + SCHEDULE_HELP),
    layers: Optional[str] = typer.Option(None, help="With --torch: " + LAYERS_HELP),
    method: str = typer.Option("mame", help="With --torch: " + MERGE_HELP),
    option: list[str] = typer.Option([], "--option", help="With --torch: " + OPTION_HELP),
    checkpoint: Optional[Path] = typer.Option(None, help="With --torch: weights to load."),
    seed: int = typer.Option(0, help="With --torch: seed of the random initialisation."),
    override: list[str] = typer.Option([], "--override", help="With --torch: " + OVERRIDE_HELP),
    batch_sizes: str = typer.Option("1,8", help="Batch sizes, comma-separated (static-batch files run their own)."),
    warmup: int = typer.Option(3, help="Untimed calls before timing."),
    iters: int = typer.Option(20, help="Timed calls per batch size."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for onnxruntime and PyTorch."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph",
                                    help="With --torch --device cuda: replay a captured CUDA graph (no launch overhead)."),
    dtype: str = typer.Option("fp32", help="With --torch: the model's precision, fp32, fp16 or bf16."),
    compile_anchor: bool = typer.Option(False, "--compile",
                                        help="With --torch: also time torch.compile of both models (reduce-overhead "
                                             "mode on cuda), the anchor."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline",
                                  help="Also time the unmerged model (exported to a temporary folder for --onnx)."),
    compare_torch: bool = typer.Option(True, "--compare-torch/--no-compare-torch",
                                       help="With --onnx: also time the PyTorch source from the manifest."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write rows and environment as JSON."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --json file."),
):
    """Latency (p50/p90/p99) and throughput per batch size, side by side with the unmerged model."""
    from mame_deploy import bench
    from mame_deploy.runners import check_device, check_threads

    load = bench.load_average()  # before this command loads the CPU itself
    check_threads(threads)
    if not onnx and not engine and torch_model is None:
        raise UserError("nothing to time: pass --onnx PATH.onnx, --engine PATH.plan and/or --torch MODEL")
    if engine:
        from mame_deploy.plugins.trt_aot import require_tensorrt

        require_tensorrt("--engine")
        device = "cuda"  # engines, and the PyTorch they are compared with, run on the GPU
    check_device(device)
    if cuda_graph and (torch_model is None or device != "cuda"):
        raise UserError("--cuda-graph times PyTorch as a CUDA graph: pass it with --torch MODEL --device cuda")
    if (compile_anchor or dtype != "fp32") and torch_model is None:
        raise UserError("--compile and --dtype apply to PyTorch models: pass them with --torch MODEL")
    from mame_deploy.source import check_dtype

    check_dtype(dtype)
    sizes = parse_batch_sizes(batch_sizes)
    if json_path is not None:
        from mame_deploy import artifacts

        artifacts.check_writable([json_path], force)

    with bench.temporary_folder() as scratch:
        # ONNX files and engines alike: each is opened once and run by its runtime's runner.
        targets = bench.artifact_targets(list(onnx) + list(engine), device, threads, scratch, baseline,
                                         compare_torch, status=lambda message: console.print(escape(message) + " ..."),
                                         batch_sizes=sizes)
        if torch_model is not None:
            source = source_from_flags(torch_model, ratio, schedule, method, option, checkpoint, seed, override, layers)
            targets += bench.torch_targets(source, device, threads, baseline, cuda_graph=cuda_graph, dtype=dtype,
                                           compiled=compile_anchor)
        targets = bench.unique(targets)

        with progress_bar(console) as bar:
            def progress(label, total):
                task = bar.add_task(escape(label), total=total)
                return lambda: bar.advance(task)

            rows = bench.bench(targets, sizes, warmup, iters, progress=progress)

    env = bench.environment(device, threads, load)
    used = sorted({r["threads"] for r in rows if r.get("threads")})
    asked = f"--threads {threads}" if threads else "default threads"
    ran = f"{used[0]} thread{'s' if used[0] > 1 else ''}" if len(used) == 1 else asked
    table = Table(title=f"latency in ms on {device} ({escape(env['processor'])}, {env['usable_cpus']} CPUs, {ran}; "
                        f"{warmup} warm-up + {iters} timed calls)")
    columns = ("what", "batch", *(("threads",) if len(used) > 1 else ()), "p50", "p90", "p99", "img/s",
               "speedup", "ideal")
    names = [f"{_RUNTIME_NAMES.get(r['backend'], r['backend'])} {r['target']}" for r in rows]
    # Wide latencies narrow the first column; it may wrap between words, never inside one
    # ("torch.compile" folded to "torch.compil/e" when a busy machine's numbers grew a digit).
    longest_word = max((len(word) for name in names for word in name.split()), default=4)
    for col in columns:
        if col == "what":
            table.add_column(col, justify="left", overflow="fold", min_width=longest_word)
        else:
            table.add_column(col, justify="right", no_wrap=True)
    for r, what in zip(rows, names):
        table.add_row(escape(what), str(r["batch"]), *((str(r["threads"] or "-"),) if len(used) > 1 else ()),
                      f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['throughput']:.1f}", f"{r['speedup']:.2f}x" if r["speedup"] else "-",
                      f"{r['ideal_speedup']:.2f}x")
    warning = bench.load_warning(max(used) if used else None, load, env["usable_cpus"])
    table.caption = ("speed-up = unmerged p50 / p50, same backend, dtype and batch; ideal = the speed-up the "
                     "GFLOPs allow (unmerged / merged); "
                     f"threads: CPU threads the runtime computed with; 1-minute load average before timing "
                     f"{_load_text(load)}")
    console.print(table)
    if warning:
        env["warning"] = warning
        console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    write_report(console, json_path, {"environment": env, "warmup": warmup, "iters": iters, "rows": rows})


def _load_text(load) -> str:
    return f"{load:.2f}" if load is not None else "unknown"


_RUNTIME_NAMES = {"onnxruntime": "ORT", "torch": "torch", "tensorrt": "TRT", "torch-graph": "torch (CUDA graph)",
                  "torch-compile": "torch.compile"}


def register(app: typer.Typer) -> None:
    app.command("validate")(validate_cmd)
    app.command("bench")(bench_cmd)
