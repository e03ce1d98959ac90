"""``mame-deploy serve`` and ``mame-deploy loadtest``: thin over mame_deploy.serve and
mame_deploy.loadtest; plus the ``export --triton-repo`` output (mame_deploy.triton_repo)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mame_deploy.errors import UserError

console = Console()


# ---------------------------------------------------------------------------------------------
# serve


def _served_models(artifacts, names, with_baseline, scratch, device, threads, cuda_graph, max_batch, source_of):
    """ServedModel per ARTIFACT (file or model name), plus unmerged counterparts if asked."""
    from mame_deploy import bench, serve
    from mame_deploy.plugins.trt_aot import require_tensorrt
    from mame_deploy.runners import open_artifact

    if names and len(names) != len(artifacts):
        raise UserError(f"got {len(names)} --name for {len(artifacts)} artifacts; give one per artifact or none")
    for n in names:
        serve.check_name(n)
    models = []
    for i, artifact in enumerate(artifacts):
        name = names[i] if names else None
        path = Path(artifact)
        if path.suffix in (".onnx", ".plan"):
            if path.suffix == ".plan":
                require_tensorrt("serving an engine")
            opened = open_artifact(path, device, threads)
            model = serve.artifact_model(opened, device, threads, max_batch, name)
            if with_baseline and model.merged and opened.engine:
                raise UserError("--with-baseline builds no engines; pass the unmerged .plan as a second ARTIFACT")
            models.append(model)
            if with_baseline and model.merged:
                console.print(f"exporting the unmerged baseline of {escape(str(path))} ...")
                base = bench.make_unmerged_baseline(opened, scratch)
                models.append(serve.artifact_model(base, device, threads, max_batch))
        elif path.suffix or path.exists():
            raise UserError(f"{artifact}: serve takes an .onnx, a .plan or a model name (see `mame-deploy models`)")
        else:
            source = source_of(artifact)
            model = serve.torch_model(source, device, threads, cuda_graph, max_batch, name)
            models.append(model)
            if with_baseline and model.merged:
                models.append(serve.torch_model(bench.unmerged(source), device, threads, cuda_graph, max_batch))
    return models


def serve_cmd(
    artifacts: list[str] = typer.Argument(..., metavar="ARTIFACT...",
                                          help="Exported .onnx, built .plan, or a model name (PyTorch) with the merge options."),
    ratio: float = typer.Option(0.0, help="For a model name: merge ratio."),
    schedule: Optional[str] = typer.Option(None, help="For a model name: explicit merges LAYER:COUNT,..."),
    method: str = typer.Option("mame", help="For a model name: merge method (mame, tome, prune)."),
    option: list[str] = typer.Option([], "--option", help="For a model name: merge option KEY=VALUE (repeatable)."),
    checkpoint: Optional[Path] = typer.Option(None, help="For a model name: weights to load."),
    seed: int = typer.Option(0, help="For a model name: seed of the random initialisation."),
    override: list[str] = typer.Option([], "--override", help="For a model name: config field KEY=VALUE (repeatable)."),
    name: list[str] = typer.Option([], "--name", help="Served model name, one per ARTIFACT in order "
                                                       "(default: model + merge settings from the manifest)."),
    with_baseline: bool = typer.Option(False, "--with-baseline",
                                       help="Also serve the unmerged counterpart of each merged model (for loadtest)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    http_port: int = typer.Option(8000, help="HTTP port."),
    grpc_port: int = typer.Option(8001, help="gRPC port."),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port."),
    metrics: bool = typer.Option(True, "--metrics/--no-metrics", help="Serve Prometheus metrics."),
    max_batch: Optional[int] = typer.Option(None, help="Largest batch the dynamic batcher forms "
                                                       "(default 32; a static-batch file uses its own)."),
    max_queue_delay_us: int = typer.Option(2000, help="How long a request may wait for others to batch with (us)."),
    instances: int = typer.Option(1, help="Model instances (runners) per model, each running one batch at a time."),
    device: str = typer.Option("cpu", help="cpu or cuda (onnxruntime-gpu for .onnx; engines always use cuda)."),
    threads: Optional[int] = typer.Option(None, help="CPU threads per runner (onnxruntime / PyTorch)."),
    cuda_graph: bool = typer.Option(False, "--cuda-graph", help="For a model name with --device cuda: replay CUDA graphs."),
    drain_timeout: int = typer.Option(20, help="Seconds Triton waits for requests in flight when stopping (1..25)."),
    triton_log: Optional[Path] = typer.Option(None, help="Keep Triton's own log in this file."),
):
    """Serve models on Triton Inference Server (PyTriton): dynamic batching, HTTP, gRPC, metrics;
    Ctrl-C or SIGTERM drain the requests in flight and stop, leaving nothing behind."""
    from mame_deploy import bench, serve

    config = serve.ServerConfig(
        host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port if metrics else None,
        queue_delay_us=max_queue_delay_us, drain_s=drain_timeout, instances=instances, triton_log=triton_log,
    ).check()
    serve.require_pytriton()

    def source_of(model_name: str):
        from mame_deploy.cli.common import source_from_flags

        return source_from_flags(model_name, ratio, schedule, method, option, checkpoint, seed, override)

    with bench.temporary_folder() as scratch:
        with console.status("loading models ..."):
            models = _served_models(artifacts, name, with_baseline, scratch, device, threads, cuda_graph,
                                    max_batch, source_of)
        _print_models(models)
        console.print(f"starting Triton on {escape(config.http_url)} (gRPC {escape(config.grpc_url)}) ...")
        reason = serve.serve(models, config, on_ready=_ready)
    if reason == "triton-exited":
        raise UserError("Triton Inference Server stopped on its own; run again with --triton-log FILE to see why")
    console.print(f"stopped ({reason}): requests in flight finished, nothing left behind")


def _print_models(models) -> None:
    table = Table(title="models to serve")
    for col in ("name", "runtime", "input", "max batch", "batching", "merge"):
        table.add_column(col, overflow="fold")
    for m in models:
        merge = "none" if not m.merged else (
            f"{m.record['method']}, " + (f"schedule {m.record['schedule_spec']}" if m.record.get("schedule_spec")
                                          else f"ratio {m.record['ratio']:g}"))
        table.add_row(escape(m.name), m.backend, "x".join(map(str, m.input_shape)), str(m.max_batch),
                      m.parameters()["mame.batching"], merge)
    console.print(table)


def _ready(server) -> None:
    c = server.config
    console.print(f"[green]ready[/]: HTTP {escape(c.http_url)}, gRPC {escape(c.grpc_url)}"
                  + (f", metrics http://{escape(c.host)}:{c.metrics_port}/metrics" if c.metrics_port else "")
                  + f"; models {', '.join(escape(m.name) for m in server.models)}")
    console.print(f"health: {escape(c.http_url)}/v2/health/ready; Ctrl-C or SIGTERM stops (drains up to {c.drain_s} s)")


# ---------------------------------------------------------------------------------------------
# loadtest


def loadtest_cmd(
    url: str = typer.Argument("http://127.0.0.1:8000", help="Server: http://HOST:PORT or grpc://HOST:PORT."),
    model: list[str] = typer.Option([], "--model", help="Model to drive (repeatable; default: every ready model)."),
    concurrency: str = typer.Option("1,8,32", help="Concurrency levels: clients sending back to back."),
    duration: float = typer.Option(10.0, help="Seconds per level (each level also stops at --requests)."),
    requests: int = typer.Option(10_000, help="Most requests per level."),
    batch: Optional[int] = typer.Option(None, help="Images per request (default 1; a fixed-shape model sends its shape)."),
    timeout: float = typer.Option(60.0, help="Per-request timeout in seconds."),
    warmup: int = typer.Option(2, help="Untimed requests per model before each level."),
    baseline: Optional[str] = typer.Option(None, help="Unmerged model to compare with (default: found from the "
                                                      "models' mame.* parameters)."),
    seed: int = typer.Option(0, help="Seed of the random images."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --json file."),
):
    """Throughput and p50/p90/p99 latency under concurrent load, per level, merged vs unmerged."""
    from mame_deploy import artifacts
    from mame_deploy.loadtest import loadtest, parse_levels

    levels = parse_levels(concurrency)
    if json_path is not None:
        artifacts.check_writable([json_path], force)
    with console.status("load test ...") as status:
        report = loadtest(url, model, levels, duration, requests, batch, timeout, warmup, baseline, seed,
                          progress=lambda message: status.update(escape(message) + " ..."))
    _print_report(report)
    if json_path is not None:
        artifacts.write_json(json_path, report)
        console.print(f"wrote {escape(str(json_path))}")
    if report["failed"]:
        raise typer.Exit(1)


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _print_report(report: dict) -> None:
    table = Table(title=f"load test {escape(report['url'])} ({report['protocol']}; each level up to "
                        f"{report['duration_s']:g} s or {report['max_requests']} requests)")
    columns = ("model", "clients", "batch", "requests", "failed", "img/s", "p50 ms", "p90 ms", "p99 ms",
               "server batch", "batch ms", "queue ms", "vs unmerged")
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right", overflow="fold")
    for r in report["rows"]:
        table.add_row(escape(r["model"]), str(r["concurrency"]), str(r["batch"]), str(r["requests"]),
                      f"[red]{r['failed']}[/]" if r["failed"] else "0", f"{r['images_per_s']:.1f}",
                      _ms(r["p50_ms"]), _ms(r["p90_ms"]), _ms(r["p99_ms"]),
                      "-" if r["server_batch"] is None else f"{r['server_batch']:.2f}",
                      _ms(r["server_compute_ms"]), _ms(r["server_queue_ms"]),
                      f"{r['speedup']:.2f}x" if r.get("speedup") else "-")
    table.caption = ("from Triton's statistics: server batch = mean batch the dynamic batcher formed, batch ms = "
                     "mean time of one in the model, queue ms = mean wait of a request; vs unmerged = img/s "
                     "over the unmerged model's at the same level")
    console.print(table)
    for r in report["rows"]:
        for message, count in r["errors"].items():
            console.print(f"[red]{count} x[/] {escape(r['model'])} @ {r['concurrency']}: {escape(message)}",
                          soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# export --triton-repo


def check_triton_repo(repo: Optional[Path], source, force: bool) -> None:
    """Before exporting: the repository can take this model (its folder is free or --force)."""
    if repo is None:
        return
    from mame_deploy.triton_repo import check_repository, model_name

    record = source.as_dict()
    check_repository(repo, [model_name(record)], force)


def write_triton_repo(repo: Optional[Path], onnx_path: Path, force: bool) -> None:
    """After exporting (and building an engine): the Triton model repository and its summary."""
    if repo is None:
        return
    from mame_deploy.triton_repo import write_repository

    entries = write_repository(onnx_path, repo, force=force)
    for e in entries:
        batching = f"max batch {e.max_batch}, dynamic batching" if e.max_batch else f"fixed input {list(e.dims)}"
        console.print(f"wrote Triton model {escape(str(Path(repo) / e.name))} ({e.platform}, {batching}; "
                      "config checked with tritonclient's model_config)", soft_wrap=True)
        for note in e.notes:
            console.print(f"  note: {escape(note)}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("loadtest")(loadtest_cmd)
