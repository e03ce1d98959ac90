"""Where one token-merge step spends its time, by source line and by phase, from Nsight Compute.

    # on the GPU machine (benchmarks/device_merge.sh profile does both steps):
    ncu --clock-control none -k regex:mame_token_merge --launch-skip 2 --launch-count 1 --set full \\
        --import-source yes --warp-sampling-interval 0 -o R python benchmarks/profile_merge.py run --batch 1
    ncu -i R.ncu-rep --page source --csv --print-source cuda,sass > lines.csv
    python benchmarks/profile_merge.py summarize lines.csv

(run ncu from ``plugins/``: NVRTC names the program ``token_merge.cu``, and ncu finds the source
file by that name.)

``run`` launches a few vim_s-shaped mame steps (r = 6 of 197) with the kernel compiled with
``-lineinfo``, so ncu maps SASS to ``plugins/token_merge.cu``. ``summarize`` sums the per-SASS
stall samples and executed instructions by source line and by phase (the kernel's helpers and
its numbered steps, found in the source by name), and prints two tables.
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import sys
from pathlib import Path

KERNEL = Path(__file__).resolve().parents[1] / "plugins" / "token_merge.cu"
# Phases by the first source line that opens them, in file order.
PHASE_STARTS = [
    ("element and cluster helpers", r"^namespace mame_merge"),
    ("prefix sums", r"^__device__ int block_prefix"),
    ("score parts: loads and lane sums", r"^// acc \+= parts"),
    ("ranks", r"^// Stable ranks through integers"),
    ("matching: staging", r"^template <int PER>"),
    ("matching: tile, keys, best match", r"^__device__ __forceinline__ void keep_better"),
    ("output copies", r"^struct FlatIndex"),
    ("destination folds", r"^__device__ __forceinline__ void fma4"),
    ("kernel: start, score parts, exchange", r"^extern \"C\" __global__"),
    ("kernel: keys, ranks, split", r"^    // Decision keys"),
    ("kernel: matching and exchange", r"^    // 2\. Matching"),
    ("kernel: layout", r"^    // 3\. "),
    ("kernel: rows and state", r"^    // 4\. "),
]


def phase_bounds(source: str) -> list[tuple[str, int]]:
    """(phase, first line) in line order, from the kernel source."""
    lines = source.splitlines()
    bounds = []
    for name, pattern in PHASE_STARTS:
        hit = next((i + 1 for i, text in enumerate(lines) if re.match(pattern, text)), None)
        if hit is None:
            raise SystemExit(f"error: no line of the kernel source opens phase {name!r} ({pattern}); "
                             "update PHASE_STARTS")
        bounds.append((name, hit))
    return sorted(bounds, key=lambda b: b[1])


def per_line(csv_path: str) -> tuple[dict[int, list[float]], dict[int, str]]:
    """Stall samples and instructions executed per CUDA line of ncu's cuda,sass source page."""
    rows = list(csv.reader(open(csv_path, newline="")))
    try:
        head_at = next(i for i, r in enumerate(rows) if "Warp Stall Sampling (All Samples)" in r)
    except StopIteration:
        raise SystemExit(f"error: {csv_path} has no stall-sampling column; print it with "
                         "ncu -i R --page source --csv --print-source cuda,sass")
    head = rows[head_at]
    samples, executed = head.index("Warp Stall Sampling (All Samples)"), head.index("Instructions Executed")

    def number(text: str) -> float:
        try:
            return float(text.replace(",", ""))
        except ValueError:
            return 0.0

    totals: dict[int, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    text: dict[int, str] = {}
    line = 0
    for r in rows[head_at + 1:]:
        if len(r) <= executed:
            continue
        if r[0].isdigit():  # a CUDA line; the SASS rows under it carry the metrics
            line = int(r[0])
            text[line] = r[1].strip()
        if r[2].startswith("0x"):
            totals[line][0] += number(r[samples])
            totals[line][1] += number(r[executed])
    return totals, text


def summarize(csv_path: str, top: int, source: Path = KERNEL) -> None:
    totals, text = per_line(csv_path)
    s_all = sum(v[0] for v in totals.values()) or 1.0
    i_all = sum(v[1] for v in totals.values()) or 1.0
    bounds = phase_bounds(source.read_text())
    print(f"\n## by phase ({s_all:.0f} stall samples, {i_all:.0f} warp instructions)\n")
    print("| phase | stall samples | instructions |\n|---|---|---|")
    for k, (name, start) in enumerate(bounds):
        end = bounds[k + 1][1] if k + 1 < len(bounds) else 1 << 30
        s = sum(v[0] for line, v in totals.items() if start <= line < end)
        n = sum(v[1] for line, v in totals.items() if start <= line < end)
        print(f"| {name} | {s / s_all:.1%} | {n / i_all:.1%} |")
    print(f"\n## the {top} heaviest lines\n")
    print("| line | stall samples | instructions | source |\n|---|---|---|---|")
    heavy = sorted(totals.items(), key=lambda kv: -(kv[1][0] / s_all + kv[1][1] / i_all))[:top]
    for line, (s, n) in sorted(heavy):
        print(f"| {line} | {s / s_all:.1%} | {n / i_all:.1%} | `{text.get(line, '')[:80]}` |")


def run(batch: int, dtype_name: str, steps: int) -> None:
    import torch

    from mame_deploy.ops.fixtures import merge_inputs
    from mame_deploy.ops.token_merge.contract import MergeAttributes
    from mame_deploy.ops.token_merge.cuda import token_merge_cuda
    from mame_deploy.plugins import merge_launch

    plain = merge_launch.compile_options
    # Line information for ncu's source view; compile_ptx looks the function up at call time.
    merge_launch.compile_options = lambda variant, tuning=merge_launch.DEFAULT_TUNING: plain(variant, tuning) + [
        "-lineinfo"]
    dtype = getattr(torch, dtype_name)
    args = merge_inputs(batch, 197, 384, dtype, torch.float32, seed=1)
    for _ in range(steps):
        token_merge_cuda(**args, attrs=MergeAttributes(6, lam=1.0))
    torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="launch the steps ncu profiles")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    r.add_argument("--steps", type=int, default=4)
    s = sub.add_parser("summarize", help="tables from ncu's source-page CSV")
    s.add_argument("csv")
    s.add_argument("--top", type=int, default=30)
    s.add_argument("--source", type=Path, default=KERNEL,
                   help="the token_merge.cu the profile was taken from (default: this tree's)")
    opts = ap.parse_args(argv)
    if opts.what == "run":
        run(opts.batch, opts.dtype, opts.steps)
    else:
        summarize(opts.csv, opts.top, opts.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
