"""Cost of one merge step next to the cost of one Vision Mamba block (GPU or CPU).

    python benchmarks/bench_merge.py --model vim_s --batch 1 64 256
    python benchmarks/bench_merge.py --device cpu --batch 1 8

A merge step saves (r / L) of every later block and costs a fixed amount itself, so whether a
schedule pays off in wall-clock time depends on this ratio, not on FLOPs alone. Times are medians
of CUDA-graph replays (CUDA events) after warm-up on the GPU, of timed calls on the CPU; the step
removes the first step's count of the default ratio-0.5 schedule.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import torch

from bench_e2e import graph_time_ms  # benchmarks/ is on sys.path when run as a script
from mame_deploy.merge import merge_options, merge_step, start_state
from mame_deploy.models import create_model
from mame_deploy.schedule import resolve_schedule


def cpu_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vim_s")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--methods", nargs="+", default=["mame", "tome", "prune"])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (with --device cpu)")
    opts = ap.parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; use --device cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(opts.threads)
    dev = opts.device
    timer = graph_time_ms if dev == "cuda" else cpu_ms
    model = create_model(opts.model).to(dev)
    cfg, block = model.config, model.layers[0]
    r = resolve_schedule(cfg, 0.5)[0]
    L = cfg.num_patches + 1
    where = torch.cuda.get_device_name() if dev == "cuda" else f"CPU, {opts.threads} threads"
    print(f"\n## one merge step (r = {r} of {L} tokens) vs one block, {opts.model}, "
          f"{where}, {datetime.date.today()}\n")
    print("| batch | block (ms) | " + " | ".join(f"{m} step (ms) | {m} / block" for m in opts.methods) + " |")
    print("|---|---|" + "---|---|" * len(opts.methods))
    with torch.no_grad():
        for batch in opts.batch:
            g = torch.Generator(device=dev).manual_seed(batch)
            hidden = torch.randn(batch, L, cfg.embed_dim, device=dev, generator=g)
            residual = torch.randn(batch, L, cfg.embed_dim, device=dev, generator=g)
            score = torch.rand(batch, L, device=dev, generator=g) + 0.01
            state = start_state(hidden, cfg.cls_position)
            block_ms = timer(lambda: block(hidden, residual, return_score=True), opts.iters)
            cells = []
            for method in opts.methods:
                mopts = merge_options(method)
                step_ms = timer(lambda: merge_step(hidden, residual, score, state, r, method, mopts), opts.iters)
                cells.append(f"{step_ms:.3f} | {step_ms / block_ms:.2f}")
            print(f"| {batch} | {block_ms:.3f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
