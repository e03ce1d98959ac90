"""Latency and throughput of runners, side by side with the unmerged model.

Each target (a runner factory plus what it runs) is timed per batch size: ``warmup`` untimed
calls, then ``iters`` timed ones on the same input; the runner's own inference time is used
(wall clock around onnxruntime's run, CUDA events around a PyTorch forward on the GPU). Rows
report p50/p90/p99 latency, throughput (images per second at the mean latency) and the
speed-up of the p50 over the unmerged model of the same backend at the same batch size.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np

from mame_deploy import manifest as manifests, memory
from mame_deploy import source as sources
from mame_deploy.errors import UserError
from mame_deploy.flops import relative_gflops
from mame_deploy.manifest import Source
from mame_deploy.manifest import INPUT_NAME
from mame_deploy.runners import Artifact, TorchGraphRunner, TorchRunner, check_threads, open_artifact

DEFAULT_BATCH_SIZES = (1, 8)
DEFAULT_WARMUP = 3
DEFAULT_ITERS = 20


@dataclass
class Target:
    """One thing to time: ``make_runner()`` builds its polygraphy runner."""

    label: str
    backend: str                 # "onnxruntime", "torch", "torch-graph" or "tensorrt"
    model: str
    ratio: float
    merged: bool                 # False for the unmerged baseline
    tokens_per_layer: list
    relative_gflops: float
    fixed_batch: Optional[int]   # a static-batch file runs only this batch size
    input_shape: tuple           # (channels, height, width)
    make_runner: Callable
    config: object = None        # the model's config: what the memory check reads (None: unchecked)
    device: str = "cpu"
    threads: Optional[int] = None  # CPU threads asked for (None: the runtime's default)
    dtype: str = "fp32"          # precision the target computes in (speed-ups compare like with like)

    def batch_sizes(self, requested: Sequence[int]) -> list[int]:
        return [self.fixed_batch] if self.fixed_batch is not None else list(requested)


# ---------------------------------------------------------------------------------------------
# Targets


def is_merged(source: Source) -> bool:
    return source.ratio > 0 or source.schedule_spec is not None


def unmerged(source: Source) -> Source:
    return replace(source, ratio=0.0, schedule_spec=None, method="mame", options={})


def compile_mode(device: str) -> str:
    """torch.compile's mode for a compiled anchor: reduce-overhead (its own CUDA graphs) on the
    GPU, where launches dominate small batches; the default mode on the CPU."""
    return "reduce-overhead" if device == "cuda" else "default"


def torch_target(source: Source, device: str, threads: Optional[int],
                 expected_schedule: Optional[list] = None, fixed_batch: Optional[int] = None,
                 cuda_graph: bool = False, dtype: str = "fp32", compiled: bool = False) -> Target:
    """PyTorch on ``source``; ``fixed_batch`` pins it to the batch of the file it is compared with.
    ``cuda_graph``: replay a captured CUDA graph (``device`` must be cuda), the fair comparison
    with an engine at small batch, where eager PyTorch is bound by kernel launches. ``dtype``:
    the model's precision (fp32, fp16, bf16). ``compiled``: run ``torch.compile`` of the model
    (``compile_mode``), the anchor a user would otherwise reach for."""
    if cuda_graph and device != "cuda":
        raise UserError("CUDA graphs need `device` cuda")
    if cuda_graph and compiled:
        raise UserError("`compiled` and `cuda_graph` exclude each other (reduce-overhead captures its own graphs)")
    check_threads(threads)
    model = sources.build_model(source, expected_schedule, dtype=dtype)
    tokens = sources.tokens_per_layer(model)
    cfg = model.config
    if compiled:
        backend, make_runner = "torch-compile", lambda: TorchRunner(model, device, threads, compile_mode=compile_mode(device))
    elif cuda_graph:
        backend, make_runner = "torch-graph", lambda: TorchGraphRunner(model)
    else:
        backend, make_runner = "torch", lambda: TorchRunner(model, device, threads)
    return Target(
        label=source.model + _merge_label(source) + (f" {dtype}" if dtype != "fp32" else ""),
        backend=backend, model=source.model, ratio=source.ratio,
        merged=is_merged(source), tokens_per_layer=tokens, relative_gflops=relative_gflops(cfg, tokens),
        fixed_batch=fixed_batch, input_shape=(cfg.in_chans, cfg.img_size, cfg.img_size),
        make_runner=make_runner, config=cfg, device=device, threads=threads, dtype=dtype,
    )


def _merge_label(source: Source) -> str:
    if not is_merged(source):
        return " (unmerged)"
    what = f"schedule {source.schedule_spec}" if source.schedule_spec else f"ratio {source.ratio:g}"
    return f" ({source.method}, {what})"


def artifact_target(artifact: Union[Artifact, str, Path], device: str = "cpu", threads: Optional[int] = None,
                    baseline: bool = False) -> Target:
    """The bench target of an exported file or engine (``artifact``, or its path to open)."""
    if not isinstance(artifact, Artifact):
        artifact = open_artifact(artifact, device, threads)
    record, source = artifact.record, artifact.source
    channels, height, width = record["input_shape"][1:]
    label = artifact.path.name + (f" ({artifact.precision})" if artifact.engine else "")
    return Target(
        label=label + (" (unmerged)" if baseline else ""),
        backend=artifact.runtime, model=source.model, ratio=source.ratio, merged=is_merged(source),
        tokens_per_layer=record["tokens_per_layer"], relative_gflops=float(record["relative_gflops"]),
        fixed_batch=artifact.fixed_batch, input_shape=(channels, height, width), make_runner=artifact.runner,
        config=sources.model_config(source), device=artifact.device, threads=artifact.threads,
        dtype=artifact.precision,
    )


def torch_targets(source: Source, device: str, threads: Optional[int], baseline: bool = True,
                  cuda_graph: bool = False, dtype: str = "fp32", compiled: bool = False) -> list[Target]:
    """``source`` (and its unmerged model with ``baseline``) in PyTorch; with ``compiled`` also
    both under torch.compile, as the anchor."""
    timed = [source] + ([unmerged(source)] if baseline and is_merged(source) else [])
    targets = [torch_target(s, device, threads, cuda_graph=cuda_graph, dtype=dtype) for s in timed]
    if compiled:
        targets += [torch_target(s, device, threads, dtype=dtype, compiled=True) for s in timed]
    return targets


def _baseline_key(record: dict) -> tuple:
    """Files with equal keys differ at most in merging: one's unmerged form is the other's baseline."""
    engine = record.get("engine") or {}
    return (record["model"], record["checkpoint_sha256"], record["seed"], json.dumps(record.get("overrides") or {},
            sort_keys=True), record["batch"], record["opset"], record["scan"],
            engine.get("precision"), json.dumps(engine.get("batch")))


def artifact_targets(paths: Sequence[Union[str, Path]], device: str, threads: Optional[int],
                     scratch: Union[str, Path], baseline: bool = True, compare_torch: bool = True,
                     status: Callable[[str], object] = lambda message: None,
                     batch_sizes: Optional[Sequence[int]] = None) -> list[Target]:
    """Each file (ONNX or engine) in its runtime; with ``baseline`` the unmerged counterpart of
    merged ones (one of ``paths`` if it is that, else exported -- and for an engine built -- into
    ``scratch`` with the same settings); with ``compare_torch`` the PyTorch source(s) the manifests
    describe, on the artifact's device (eager and CUDA graph for engines). With ``batch_sizes``
    each file's memory need is checked before any baseline is made. Each file is read once."""
    opened = [open_artifact(p, device, threads) for p in paths]
    unmerged_files = {_baseline_key(a.record): a for a in opened if not is_merged(a.source)}
    targets = []
    for artifact in opened:
        target = artifact_target(artifact)
        if batch_sizes is not None:
            check_memory([target], batch_sizes)
        targets.append(target)
        merged = baseline and target.merged
        if merged:
            base = unmerged_files.get(_baseline_key(artifact.record))
            if base is None:
                status(f"exporting{' and building' if artifact.engine else ''} the unmerged baseline of "
                       f"{artifact.path}")
                base = open_artifact(make_unmerged_baseline(artifact, scratch), device, threads)
                unmerged_files[_baseline_key(artifact.record)] = base
            targets.append(artifact_target(base, baseline=bool(artifact.engine)))
        if compare_torch:
            source, fixed = artifact.source, artifact.fixed_batch
            graphs = (False, True) if artifact.engine else (False,)
            for cuda_graph in graphs:
                targets.append(torch_target(source, artifact.device, artifact.threads, artifact.record["schedule"],
                                            fixed, cuda_graph=cuda_graph))
            if merged:
                for cuda_graph in graphs:
                    targets.append(torch_target(unmerged(source), artifact.device, artifact.threads,
                                                fixed_batch=fixed, cuda_graph=cuda_graph))
    return unique(targets)


def make_unmerged_baseline(artifact: Artifact, folder: Union[str, Path]) -> Path:
    """Export the unmerged counterpart of ``artifact`` into ``folder`` (same model, weights, batch,
    opset, scan, dtype) and, for an engine, build it with the same precision, workspace and profile."""
    from mame_deploy.engine import build_engine
    from mame_deploy.onnx_export import export

    record = artifact.record
    output = Path(folder) / f"{artifact.path.stem}-unmerged.onnx"
    onnx_path = export(unmerged(artifact.source), output, batch=record["batch"], opset=record["opset"],
                       scan=record["scan"], dtype=record.get("dtype", "fp32")).onnx_path
    if not artifact.engine:
        return onnx_path
    engine = artifact.engine
    profile = engine["batch"]
    dynamic = {} if isinstance(profile, int) else {"max_batch": profile["max"], "opt_batch": profile["opt"]}
    return build_engine(onnx_path, precision=engine["precision"], workspace=engine["workspace_bytes"], force=True,
                        **dynamic)


def unique(targets: Iterable[Target]) -> list[Target]:
    """Drop repeats (e.g. the same unmerged PyTorch model asked for by two files)."""
    seen, out = set(), []
    for target in targets:
        if (target.backend, target.label) not in seen:
            seen.add((target.backend, target.label))
            out.append(target)
    return out


# ---------------------------------------------------------------------------------------------
# Timing


def measure(runner, images: np.ndarray, warmup: int, iters: int,
            progress: Optional[Callable[[], None]] = None) -> np.ndarray:
    """Per-call inference times in seconds (``runner`` active)."""
    feed = {INPUT_NAME: images}
    for _ in range(warmup):
        runner.infer(feed, check_inputs=False)
    times = np.empty(iters)
    for i in range(iters):
        runner.infer(feed, check_inputs=False)
        times[i] = runner.last_inference_time()
        if progress:
            progress()
    return times


def summarize(times: np.ndarray, batch: int) -> dict:
    p50, p90, p99 = np.percentile(times, [50, 90, 99]) * 1e3
    return {
        "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
        "mean_ms": float(times.mean() * 1e3), "iters": int(len(times)),
        "throughput": float(batch / times.mean()),
    }


def bench(
    targets: Iterable[Target],
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    warmup: int = DEFAULT_WARMUP,
    iters: int = DEFAULT_ITERS,
    seed: int = 0,
    progress: Optional[Callable[[str, int], Callable[[], None]]] = None,
) -> list[dict]:
    """Time every target at every batch size it accepts; one row per (target, batch)."""
    if warmup < 0 or iters < 1:
        raise UserError(f"need `warmup` >= 0 and `iters` >= 1, got {warmup} and {iters}")
    targets = list(targets)
    check_memory(targets, batch_sizes)
    rows = []
    rng = np.random.default_rng(seed)
    for target in targets:
        with target.make_runner() as runner:  # one session or model per target, reused over batches
            threads = threads_used(target)
            for batch in target.batch_sizes(batch_sizes):
                images = rng.standard_normal((batch, *target.input_shape), dtype=np.float32)
                tick = progress(f"{target.label} batch {batch}", iters) if progress else None
                times = measure(runner, images, warmup, iters, tick)
                rows.append({
                    "target": target.label, "backend": target.backend, "model": target.model,
                    "ratio": target.ratio, "merged": target.merged, "batch": batch,
                    "dtype": target.dtype, "relative_gflops": round(target.relative_gflops, 4),
                    "ideal_speedup": round(1 / target.relative_gflops, 3),
                    "tokens_last_layer": target.tokens_per_layer[-1], "threads": threads,
                    **summarize(times, batch),
                })
    _add_speedups(rows)
    return rows


def check_memory(targets: Iterable[Target], batch_sizes: Sequence[int]) -> None:
    """Refuse, before anything is timed, a batch size some target cannot hold in memory."""
    for target in targets:
        if target.config is None:
            continue
        for batch in target.batch_sizes(batch_sizes):
            if target.fixed_batch is None:
                memory.check_forward(target.config, batch, target.device, "`batch_sizes`", target.model)
            else:
                memory.check_forward(target.config, batch, target.device, "`batch`", target.model,
                                     advice=f"{target.label} was exported for batch {batch}: re-export it "
                                            "with a smaller --batch or --dynamic-batch")


def threads_used(target: Target) -> Optional[int]:
    """CPU threads the target's runtime computes with (None off the CPU); call it while the
    runner is active, after it applied its thread count."""
    if target.device != "cpu":
        return None
    if target.backend == "torch":
        import torch

        return torch.get_num_threads()
    if target.backend == "onnxruntime":
        return target.threads or physical_cores()  # onnxruntime's default: one per physical core
    return target.threads


def physical_cores() -> int:
    """Physical cores (hyper-threads counted once), from /proc/cpuinfo where it says."""
    cores = set()
    try:
        physical = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                physical = value.strip()
            elif key == "core id":
                core = value.strip()
            elif not line.strip():
                if core is not None:
                    cores.add((physical, core))
                physical = core = None
    except OSError:
        pass
    return len(cores) or (os.cpu_count() or 1)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the system does not tell)."""
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return None


def load_warning(threads: Optional[int], load: Optional[float], cpus: int) -> Optional[str]:
    """A warning when other work (``load``, sampled before timing) competes for the cores the
    timed runtime uses: threads spinning against a busy core can make latency many times worse."""
    if threads is None or load is None or load + threads <= cpus + 0.5:
        return None
    suggestion = max(1, int(cpus - load))
    return (f"the machine is busy (1-minute load average {load:.2f} on {cpus} CPUs) while timing uses {threads} "
            f"thread(s): latencies may be inflated and noisy; time on an idle machine"
            + (f" or pass --threads {suggestion}" if suggestion < threads else ""))


def _add_speedups(rows: list[dict]) -> None:
    """speedup = p50 of the unmerged model / p50 of this one (same backend, model, dtype and batch)."""
    def key(r):
        return r["backend"], r["model"], r["dtype"], r["batch"]

    baselines = {key(r): r["p50_ms"] for r in rows if not r["merged"]}
    for row in rows:
        base = baselines.get(key(row))
        row["speedup"] = round(base / row["p50_ms"], 3) if base else None


def environment(device: str, threads: Optional[int], load: Optional[float] = None) -> dict:
    """Where the rows were measured; ``load``: the 1-minute load average before timing."""
    info = {"device": device, "threads": threads, "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(),
            "physical_cores": physical_cores(), "load_average_1min": load, "machine": platform.machine(),
            "processor": _cpu_name(), "versions": manifests.tool_versions()}
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def temporary_folder():
    return tempfile.TemporaryDirectory(prefix="mame-deploy-bench-")
