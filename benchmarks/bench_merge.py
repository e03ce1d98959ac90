"""Cost of one merge step next to the cost of one Vision Mamba block: the fused
``mame::token_merge`` kernel against the reference decomposition (``token_merge_ref``), and how
often the kernel's decisions differ from the reference's on random inputs.

    python benchmarks/bench_merge.py --model vim_s --batch 1 64 256 --dtypes float32 bfloat16 --json m.json
    python benchmarks/bench_merge.py --flips 40 --no-timing        # decision-flip rate only
    python benchmarks/bench_merge.py --device cpu --batch 1 8       # reference on the CPU

A merge step saves (r / L) of every later block and costs a fixed amount itself, so whether a
schedule pays off in wall-clock time depends on this ratio. GPU times are medians of CUDA-graph
replays (CUDA events) after warm-up; CPU times medians of timed calls. The step removes the
first count of the default ratio-0.5 schedule (r = 6 of 197 tokens for vim_s). The hidden stream
is in the timed dtype, the residual in float32 (Vim's float32 residual).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time

import torch

from bench_e2e import graph_time_ms  # benchmarks/ is on sys.path when run as a script
from mame_deploy.merge import DEFAULT_OPTIONS
from mame_deploy.models import create_model
from mame_deploy.ops.fixtures import merge_inputs, same_bits
from mame_deploy.ops.selective_scan.contract import dt_groups
from mame_deploy.ops.token_merge.contract import MergeAttributes
from mame_deploy.ops.token_merge.reference import token_merge_ref
from mame_deploy.schedule import resolve_schedule

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cpu_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def attrs_for(method: str, r: int, score_scale: float) -> MergeAttributes:
    o = DEFAULT_OPTIONS[method]
    return MergeAttributes.from_options(r, method == "prune", o.split, o.arrangement, o.weighting, o.metric, o.lam,
                                        score_scale)


def flip_rate(batches: int, batch: int, L: int, E: int, r: int, dtype: torch.dtype, method: str,
              score_scale: float, parts: int) -> dict:
    """Samples whose decisions (origin_out / cls_out) differ between kernel and reference, over
    ``batches`` fresh random batches of vim_s-like inputs."""
    from mame_deploy.ops.token_merge.cuda import token_merge_cuda

    attrs = attrs_for(method, r, score_scale)
    flips = 0
    for seed in range(batches):
        args = merge_inputs(batch, L, E, dtype, torch.float32 if dtype != torch.float32 else dtype,
                            seed=10_000 + seed, merged_before=False, parts=parts)
        got = token_merge_cuda(**args, attrs=attrs)
        want = token_merge_ref(**args, attrs=attrs)
        flips += int(((got[3] != want[3]).any(dim=1) | (got[4] != want[4])).sum())
    samples = batches * batch
    return dict(method=method, dtype=str(dtype)[6:], samples=samples, flips=flips, rate=flips / samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vim_s")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--methods", nargs="+", default=["mame", "tome", "prune"])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (with --device cpu)")
    ap.add_argument("--tunings", nargs="*", default=None,
                    help="also time these kernel work splits (CLUSTERxTYxMYxMXxKTxMIN_BLOCKS, or 'all')")
    ap.add_argument("--flips", type=int, default=0, help="batches of 256 for the decision-flip rate (GPU)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--json", help="write the numbers here")
    opts = ap.parse_args(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here; use --device cpu", file=sys.stderr)
        return 2
    torch.set_num_threads(opts.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = opts.device
    gpu = dev == "cuda"
    timer = graph_time_ms if gpu else cpu_ms
    model = create_model(opts.model)
    cfg = model.config
    r = resolve_schedule(cfg, 0.5)[0]
    L, E = cfg.num_patches + 1, cfg.embed_dim
    where = torch.cuda.get_device_name() if gpu else f"CPU, {opts.threads} threads"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = dict(model=opts.model, device=where, date=str(datetime.date.today()), commit=commit, r=r, L=L, E=E,
                  iters=opts.iters, rows=[], tunings=[], flips=[])
    # The model's score: its parts (both scans' dt_sums) and scale, so decision keys round as in the model.
    mixer = model.layers[0].mixer
    score_scale, parts = mixer.score_scale, 2 * dt_groups(mixer.d_inner)
    if gpu:
        from mame_deploy.ops.token_merge.cuda import token_merge_cuda
        from mame_deploy.plugins import merge_launch
    tunings = []
    if opts.tunings is not None:
        tunings = list(merge_launch.TUNINGS) if opts.tunings in ([], ["all"]) else [
            merge_launch.Tuning.parse(t) for t in opts.tunings]

    if not opts.no_timing:
        print(f"\n## one merge step (r = {r} of {L} tokens) vs one block, {opts.model}, {where}, "
              f"{record['date']}, commit {commit}\n")
        head = "| dtype | batch | block (ms) | " + " | ".join(
            f"{m} ref (ms) | {m} fused (ms) | fused / block | speed-up" for m in opts.methods) + " |"
        print(head)
        print("|" + "---|" * (3 + 4 * len(opts.methods)))
        with torch.no_grad():
            for name in opts.dtypes:
                dtype = DTYPES[name]
                block = create_model(opts.model).to(dev, dtype).layers[0]
                res_dtype = torch.float32
                for batch in opts.batch:
                    args = merge_inputs(batch, L, E, dtype, res_dtype, seed=batch, device=dev,
                                        parts=parts)
                    block_ms = timer(lambda: block(args["hidden"], args["residual"], return_score=True), opts.iters)
                    cells = []
                    for method in opts.methods:
                        attrs = attrs_for(method, r, score_scale)
                        ref_ms = timer(lambda: token_merge_ref(**args, attrs=attrs), opts.iters)
                        fused_ms = timer(lambda: token_merge_cuda(**args, attrs=attrs), opts.iters) if gpu else None
                        row = dict(dtype=name, batch=batch, method=method, block_ms=block_ms, ref_ms=ref_ms,
                                   fused_ms=fused_ms, fused_over_block=fused_ms / block_ms if gpu else None,
                                   ref_over_block=ref_ms / block_ms)
                        record["rows"].append(row)
                        if gpu:
                            cells.append(f"{ref_ms:.4f} | {fused_ms:.4f} | {fused_ms / block_ms:.4f} | "
                                         f"{ref_ms / fused_ms:.1f}x")
                        else:
                            cells.append(f"{ref_ms:.3f} | - | - | -")
                        if tunings:  # every split must compute the default split's bits
                            default_out = token_merge_cuda(**args, attrs=attrs, tuning=merge_launch.DEFAULT_TUNING)
                        for tuning in tunings:
                            t_ms = timer(lambda: token_merge_cuda(**args, attrs=attrs, tuning=tuning), opts.iters)
                            same = same_bits(token_merge_cuda(**args, attrs=attrs, tuning=tuning), default_out)
                            record["tunings"].append(dict(dtype=name, batch=batch, method=method,
                                                          tuning=str(tuning), ms=t_ms, same_bits=same))
                    print(f"| {name} | {batch} | {block_ms:.3f} | " + " | ".join(cells) + " |", flush=True)
                del block
        if record["tunings"]:
            print("\n| dtype | batch | method | split | fused (ms) | bits as the default split |\n|---|---|---|---|---|---|")
            for t in record["tunings"]:
                print(f"| {t['dtype']} | {t['batch']} | {t['method']} | {t['tuning']} | {t['ms']:.4f} | "
                      f"{'same' if t['same_bits'] else 'DIFFERENT'} |")

    if opts.flips and gpu:
        print(f"\n## decision flips, kernel vs reference, {opts.flips} x 256 random {opts.model} samples per row\n")
        print("| method | dtype | sample-layers | flips | rate |\n|---|---|---|---|---|")
        for method in ("mame", "tome"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                f = flip_rate(opts.flips, 256, L, E, r, dtype, method, score_scale, parts)
                record["flips"].append(f)
                print(f"| {f['method']} | {f['dtype']} | {f['samples']} | {f['flips']} | {f['rate']:.2e} |",
                      flush=True)
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(record, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
