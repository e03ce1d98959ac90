"""End-to-end latency of a Vision Mamba forward on the GPU as a CUDA graph, merged vs unmerged,
next to the speed-up the GFLOPs would allow, per batch size and dtype; torch.compile (default
mode, or reduce-overhead with its CUDA graphs) rows as the anchor, optionally mamba-ssm's scan
kernel, and a per-kernel profile of one eager forward (--profile).

    python benchmarks/bench_e2e.py --model vim_s --ratio 0.5 --batches 1 64 256 \
        --dtypes float32 bfloat16 --compile-batches 1 --json e2e.json

Each configuration: random weights (seed 0), warm-up on a side stream, one graph capture, then
the median of --iters timed replays (CUDA events). torch.compile rows time the compiled
callable directly (median of --iters calls after warm-up, CUDA events), no graph.

Caveat at batch 1 (H200, 2026-12-01): whichever model is timed second in a process reads
0.35-0.45 ms slow (here the merged one; cause not found). Quote batch 1 from each model alone,
e.g. ``mame-deploy bench --torch vim_s --ratio R --no-baseline --device cuda --cuda-graph
--batch-sizes 1`` in separate processes (docs/measurements/e2e/batch1_order_effect_h200.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

from mame_deploy import patch
from mame_deploy.flops import relative_gflops
from mame_deploy.models import create_model
from mame_deploy.runners import capture_cuda_graph
from mame_deploy.schedule import tokens_per_layer


def _timed(call, iters: int) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn, iters: int) -> float:
    """Median of ``iters`` CUDA-graph replays of ``fn()`` (CUDA events), after warm-up on a side
    stream and one capture."""
    with torch.no_grad():
        graph, _ = capture_cuda_graph(fn)
        graph.replay()
        torch.cuda.synchronize()
        ms = _timed(graph.replay, iters)
        del graph
    return ms


def compiled_time_ms(model, images, iters: int, mode: str) -> tuple[float, float, object]:
    """(median ms of ``iters`` calls of ``torch.compile(model, mode)``, max |compiled - eager|
    of the logits, the compiled callable): an anchor is only one if it computes the same function."""
    compiled = torch.compile(model, mode=mode)
    with torch.no_grad():
        for _ in range(3):
            compiled(images)
        torch.cuda.synchronize()
        ms = _timed(lambda: compiled(images), iters)
        diff = (compiled(images).float() - model(images).float()).abs().max().item()
    return ms, diff, compiled


def kernel_profile(model, images) -> str:
    """GPU time per kernel of one forward of ``model`` (torch.profiler, after warm-up): where a merged
    model's time goes, by kernel, beside its launch count."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(3):
            model(images)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(images)
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)


def append_profile(path: str, title: str, model, images) -> None:
    with open(path, "a") as f:
        f.write(f"\n## {title}\n{kernel_profile(model, images)}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vim_s")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--layers", type=int, nargs="+", help="merge only after these blocks (default placement otherwise)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--backends", nargs="+", default=["op"], choices=["op", "mamba_ssm"])
    ap.add_argument("--compile-batches", type=int, nargs="*", default=[1], help="batches with torch.compile rows (fp32)")
    ap.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead"],
                    help="torch.compile mode of the compile rows (reduce-overhead: CUDA graphs)")
    ap.add_argument("--profile", help="write a per-kernel GPU-time table of one eager forward, unmerged and merged, "
                                      "for each batch and dtype, to this file")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json", help="write the numbers here")
    opts = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2

    device = torch.cuda.get_device_name()
    rows = []

    def record(**row):
        rows.append(row)
        print(f"  {row}", file=sys.stderr, flush=True)

    for dtype_name in opts.dtypes:
        dtype = getattr(torch, dtype_name)
        for backend in opts.backends:
            models = {}
            for merged in (False, True):
                model = create_model(opts.model, scan_backend=backend).to("cuda", dtype)
                if merged:
                    patch(model, ratio=opts.ratio, layers=opts.layers)
                models[merged] = model
            cfg = models[True].config
            ideal = 1 / relative_gflops(cfg, tokens_per_layer(cfg, models[True].mame_schedule))
            for batch in opts.batches:
                images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device="cuda", dtype=dtype)

                def title(merged: bool) -> str:
                    return f"{opts.model} {'merged' if merged else 'unmerged'} {dtype_name} batch {batch}"

                ms = {m: graph_time_ms(lambda m=m: models[m](images), opts.iters) for m in (False, True)}
                record(model=opts.model, runtime=f"{backend} CUDA graph", dtype=dtype_name, batch=batch,
                       unmerged_ms=ms[False], merged_ms=ms[True], speedup=ms[False] / ms[True], ideal=ideal)
                if dtype_name == "float32" and backend == "op" and batch in opts.compile_batches:
                    cms, diffs = {}, {}
                    for m in (False, True):
                        cms[m], diffs[m], compiled = compiled_time_ms(models[m], images, opts.iters, opts.compile_mode)
                        if opts.profile:
                            append_profile(opts.profile, f"{title(m)} torch.compile ({opts.compile_mode})", compiled,
                                           images)
                    record(model=opts.model, runtime=f"torch.compile ({opts.compile_mode})", dtype=dtype_name,
                           batch=batch, unmerged_ms=cms[False], merged_ms=cms[True], speedup=cms[False] / cms[True],
                           ideal=ideal, max_abs_diff_vs_eager=max(diffs.values()))
                if opts.profile:
                    for m in (False, True):
                        append_profile(opts.profile, title(m), models[m], images)
            del models
            torch.cuda.empty_cache()

    where = f"merge layers {opts.layers}" if opts.layers else "default merge layers"
    print(f"\n## {opts.model} forward, ratio {opts.ratio:g} ({where}) vs unmerged ({device}, {datetime.date.today()})\n")
    print("| runtime | dtype | batch | unmerged ms | merged ms | speed-up | ideal (GFLOPs) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['runtime']} | {r['dtype']} | {r['batch']} | {r['unmerged_ms']:.3f} | {r['merged_ms']:.3f} | "
              f"{r['speedup']:.2f}x | {r['ideal']:.2f}x |")
    if opts.json:
        with open(opts.json + ".tmp", "w") as f:
            json.dump(dict(device=device, date=str(datetime.date.today()), ratio=opts.ratio, layers=opts.layers,
                           rows=rows), f, indent=1)
        os.replace(opts.json + ".tmp", opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
