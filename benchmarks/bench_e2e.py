"""End-to-end throughput of a Vision Mamba forward on the GPU as a CUDA graph: the model with
our kernel (scan_backend="op") next to the same model with mamba-ssm's kernel, unmerged and
MaMe-merged.

    python benchmarks/bench_e2e.py --model vim_s --batch 256 --ratios 0 0.5

Each configuration: random weights (seed 0), warm-up on a side stream, one graph capture, then
the median of --iters timed replays (CUDA events). Prints images/s and the speed-up.
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
from mame_deploy.models import create_model
from mame_deploy.runners import capture_cuda_graph


def graph_time_ms(fn, iters: int) -> float:
    """Median of ``iters`` CUDA-graph replays of ``fn()`` (CUDA events), after warm-up on a side
    stream and one capture."""
    with torch.no_grad():
        graph, _ = capture_cuda_graph(fn)
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        del graph
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vim_s")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5])
    ap.add_argument("--backends", nargs="+", default=["op", "mamba_ssm"], choices=["op", "mamba_ssm"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--layers", type=int, nargs="+", help="merge only after these blocks (default placement otherwise)")
    ap.add_argument("--json", help="write the numbers here")
    opts = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2

    dtype = getattr(torch, opts.dtype)
    device = torch.cuda.get_device_name()
    images = torch.randn(opts.batch, 3, 224, 224, device="cuda", dtype=dtype)
    rows = []
    for ratio in opts.ratios:
        for backend in opts.backends:
            try:
                model = create_model(opts.model, scan_backend=backend).to("cuda", dtype)
                if ratio:
                    patch(model, ratio=ratio, layers=opts.layers)
                ms = graph_time_ms(lambda: model(images), opts.iters)
            except Exception as exc:  # e.g. mamba-ssm missing: report and go on
                print(f"{backend} ratio {ratio}: failed: {exc}", file=sys.stderr)
                continue
            rows.append(dict(model=opts.model, ratio=ratio, backend=backend, batch=opts.batch, ms=ms,
                             images_per_s=opts.batch / ms * 1e3))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
            del model
            torch.cuda.empty_cache()

    where = f"merge layers {opts.layers}" if opts.layers else "default merge layers"
    print(f"\n## {opts.model} forward, CUDA graph, batch {opts.batch}, {opts.dtype}, {where} ({device}, {datetime.date.today()})\n")
    print("| MaMe ratio | scan | ms / batch | images/s | vs mamba-ssm |")
    print("|---|---|---|---|---|")
    for r in rows:
        base = next((b for b in rows if b["ratio"] == r["ratio"] and b["backend"] == "mamba_ssm"), None)
        speedup = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
        name = "ours (mame::selective_scan)" if r["backend"] == "op" else "mamba-ssm selective_scan_fn"
        print(f"| {r['ratio']:g} | {name} | {r['ms']:.1f} | {r['images_per_s']:.0f} | {speedup} |")
    if opts.json:
        with open(opts.json + ".tmp", "w") as f:
            json.dump(dict(device=device, date=str(datetime.date.today()), dtype=opts.dtype, rows=rows), f, indent=1)
        os.replace(opts.json + ".tmp", opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
