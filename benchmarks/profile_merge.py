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

Stall samples say where warps wait, not how long a barrier-bound step takes from end to end.
``timeline`` does: it compiles the kernel with ``-DTM_TRACE`` (thread 0 of each block of the
first sample stamps ``%globaltimer`` and ``clock64`` at the source's ``TM_MARK`` points), launches
many steps back to back, and prints, per phase, the median time from the launch's first block
start to the phase's end in its last block, and the gap from one launch's end to the next one's
start (at batch 1 the cost of a launch that no kernel time shows; only the first sample's blocks
are traced, so at larger batches the gap also holds the other samples' tail)::

    python benchmarks/profile_merge.py timeline --batch 1 --dtype float32 [--tuning T] [--graph]

A benchmark of back-to-back steps keeps the step's code in the SM's instruction caches; inside a
model the other kernels evict it, and a batch-1 step runs most of its code once (Nsight Compute:
28% of its warp samples wait on instruction fetch, docs/perf-notes.md, ninth session). ``in-model``
times the merge kernels where they run: the model's forward captured as a CUDA graph, the
median of many replays (CUDA events) and each merge kernel's mean time inside the graph
(torch.profiler)::

    python benchmarks/profile_merge.py in-model --model vim_s --ratio 0.5 --batch 1 --dtype bf16

``--kernel-source F`` (run, timeline, in-model) compiles F instead of this tree's kernel, so a
change is timed against its parent in the same call, one process per source::

    git show HEAD~1:plugins/token_merge.cu > /tmp/parent.cu
    python benchmarks/profile_merge.py in-model --kernel-source /tmp/parent.cu

``bits --kernel-source F`` checks that a change keeps the outputs: every shipped split, three
type pairs, batch 1/5/64 and five attribute sets, run by F and by this tree's kernel in two
processes (a process keeps the kernel it compiled first), all five outputs compared bit for bit;
exit 1 when any case differs::

    python benchmarks/profile_merge.py bits --kernel-source /tmp/parent.cu

``same-code --kernel-source F`` needs no GPU, only nvcc: it compiles F and this tree's kernel for
every shipped split, those three type pairs and capacities 256 / 512 (vim_s's and the spill
test's) and compares the cubins byte for byte. A change meant to keep the machine code (a
rename, a simpler expression of the same thing) is then checked on any machine; exit 1 when a
variant's code differs::

    python benchmarks/profile_merge.py same-code --kernel-source /tmp/parent.cu
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import ctypes
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

KERNEL = Path(__file__).resolve().parents[1] / "plugins" / "token_merge.cu"
# Phases by the first source line that opens them, in file order.
PHASE_STARTS = [
    ("element and cluster helpers", r"^namespace mame_merge"),
    ("prefix sums", r"^__device__ int block_prefix"),
    ("score parts: loads and lane sums", r"^// One token's score parts"),
    ("ranks", r"^// Stable ranks through integers"),
    ("matching: staging", r"^// The next stage's elements in flight"),
    ("matching: tile, keys, best match", r"^// One 4-channel unit of a staged row's norm"),
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


@contextlib.contextmanager
def extra_compile_option(option: str):
    """Kernels compiled inside the block get ``option`` too (compile_ptx looks
    ``merge_launch.compile_options`` up at call time). The launcher caches a kernel under its
    variant and split alone, so a kernel first compiled here stays the one the process runs."""
    from mame_deploy.plugins import merge_launch

    plain = merge_launch.compile_options
    merge_launch.compile_options = lambda variant, tuning=merge_launch.DEFAULT_TUNING: plain(variant, tuning) + [
        option]
    try:
        yield
    finally:
        merge_launch.compile_options = plain


@contextlib.contextmanager
def kernel_source(path: Optional[Path]):
    """Kernels compiled inside the block come from ``path`` (None: this tree's token_merge.cu);
    compile_ptx looks ``merge_launch.KERNEL_SOURCE`` up at call time. As with
    extra_compile_option, a kernel the launcher compiled first stays the one the process runs."""
    from mame_deploy.plugins import merge_launch

    plain = merge_launch.KERNEL_SOURCE
    if path is not None:
        merge_launch.KERNEL_SOURCE = path.resolve()
    try:
        yield
    finally:
        merge_launch.KERNEL_SOURCE = plain


def in_model(model_name: str, ratio: float, batch: int, dtype: str, replays: int, profiled: int,
             json_path: Optional[str] = None) -> dict:
    """The merged model's forward as a CUDA graph: the median replay (CUDA events) and the mean
    time of each merge kernel inside the graph (torch.profiler over ``profiled`` replays)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_e2e import _timed  # benchmarks/ is on sys.path when run as a script
    from mame_deploy import patch
    from mame_deploy.models import create_model
    from mame_deploy.runners import capture_cuda_graph
    from mame_deploy.source import in_dtype

    model = create_model(model_name).eval()
    if ratio > 0:
        patch(model, ratio=ratio)
    model = in_dtype(model, dtype).to("cuda")  # source.build_model's order: patch, then the dtype
    cfg = model.config
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device="cuda")
    with torch.no_grad():
        graph, _ = capture_cuda_graph(lambda: model(images))
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        replay_ms = _timed(graph.replay, replays)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(profiled):
                graph.replay()
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [{"kernel": e.key, "launches_per_forward": e.count / profiled, "mean_us": e.device_time_total / e.count}
               for e in events if e.key.startswith("mame_token_merge")]
    launches = sum(k["launches_per_forward"] for k in kernels)
    merge_us = sum(k["launches_per_forward"] * k["mean_us"] for k in kernels)
    result = {"device": torch.cuda.get_device_name(), "model": model_name, "ratio": ratio, "batch": batch,
              "dtype": dtype, "replay_ms": replay_ms, "replays": replays,
              "kernel_us_per_forward": sum(e.device_time_total for e in events) / profiled,
              "merge_kernels": kernels, "merge_us_per_forward": merge_us,
              "merge_mean_us": merge_us / launches if launches else None}
    print(f"## {model_name} ratio {ratio:g}, {dtype}, batch {batch}, CUDA graph, {result['device']}\n")
    print(f"replay median {result['replay_ms']:.4f} ms ({replays} replays); kernels "
          f"{result['kernel_us_per_forward']:.1f} us a forward")
    print("\n| merge kernel | launches a forward | mean us |\n|---|---|---|")
    for k in kernels:
        print(f"| {k['kernel']} | {k['launches_per_forward']:g} | {k['mean_us']:.2f} |")
    if launches:
        print(f"\n{launches:g} merge steps, {merge_us:.1f} us a forward, {merge_us / launches:.2f} us a step")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    return result


def run(batch: int, dtype_name: str, steps: int) -> None:
    import torch

    from mame_deploy.ops.fixtures import merge_inputs
    from mame_deploy.ops.token_merge.contract import MergeAttributes
    from mame_deploy.ops.token_merge.cuda import token_merge_cuda

    dtype = getattr(torch, dtype_name)
    args = merge_inputs(batch, 197, 384, dtype, torch.float32, seed=1)
    with extra_compile_option("-lineinfo"):  # line information for ncu's source view
        for _ in range(steps):
            token_merge_cuda(**args, attrs=MergeAttributes(6, lam=1.0))
    torch.cuda.synchronize()


# The attribute sets a bits check runs: mame's default and lam, every option at once with the
# stream metric, a larger r, prune.
BITS_ATTRIBUTES = (dict(r=6), dict(r=6, lam=1.0), dict(r=6, split=1, arrangement=1, weighting=1, metric=1),
                   dict(r=12, lam=0.5, metric=1), dict(r=6, prune=1))
BITS_TYPES = (("float32", "float32"), ("bfloat16", "float32"), ("float16", "float16"))
BITS_BATCHES = (1, 5, 64)


def save_outputs(path: str) -> None:
    """Every case's five outputs from the kernel this process compiles, saved to ``path``."""
    import torch

    from mame_deploy.ops.fixtures import merge_inputs
    from mame_deploy.ops.token_merge.contract import MergeAttributes
    from mame_deploy.ops.token_merge.cuda import token_merge_cuda
    from mame_deploy.plugins import merge_launch

    results = {}
    for tuning in merge_launch.TUNINGS:
        for hidden, residual in BITS_TYPES:
            for batch in BITS_BATCHES:
                for a, attrs in enumerate(BITS_ATTRIBUTES):
                    args = merge_inputs(batch, 197, 384, getattr(torch, hidden), getattr(torch, residual), seed=batch + a)
                    outs = token_merge_cuda(**args, attrs=MergeAttributes(**attrs), tuning=tuning)
                    results[f"{tuning} {hidden}/{residual} batch {batch} {attrs}"] = [o.cpu() for o in outs]
    torch.save(results, path)


def differing(first: dict, second: dict) -> list[str]:
    """The cases whose outputs are not bit-equal (or present in one only)."""
    from mame_deploy.ops.fixtures import same_bits

    cases = sorted(set(first) | set(second))
    return [c for c in cases if c not in first or c not in second or not same_bits(first[c], second[c])]


def bits(parent: Path) -> int:
    """Compare ``parent``'s outputs with this tree's kernel's; 0 when every case is bit-equal."""
    import torch

    outputs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in (("parent", parent), ("tree", None)):
            path = str(Path(tmp) / f"{name}.pt")
            swap = ["--kernel-source", str(source)] if source is not None else []
            if subprocess.run([sys.executable, __file__, "save-outputs", path, *swap]).returncode != 0:
                print(f"error: the {name} kernel's run failed (its output is above)", file=sys.stderr)
                return 1
            outputs.append(torch.load(path))
    diff = differing(*outputs)
    print(f"{len(outputs[0])} cases ({len(outputs[0]) // len(BITS_ATTRIBUTES)} splits x types x batches, "
          f"{len(BITS_ATTRIBUTES)} attribute sets): {len(diff)} differ")
    for case in diff:
        print("  differs:", case)
    return 1 if diff else 0


# The kernel's TM_MARK points, in order: (mark, the phase that ends there).
MARKS = [
    (0, "block start"),
    (1, "score parts summed (this block's tokens)"),
    (2, "scores exchanged (cluster barrier)"),
    (3, "decision keys and ranks"),
    (4, "split into sources and destinations"),
    (14, "matching: first channels staged"),
    (15, "matching: every channel stage"),
    (5, "matching: norms, keys, best per source"),
    (6, "best matches exchanged (cluster barrier)"),
    (7, "best over destination groups"),
    (8, "lam keys, top r chosen"),
    (9, "output order"),
    (10, "merge weights"),
    (11, "destination folds (thread 0)"),
    (12, "row copies (thread 0)"),
    (13, "state written, block end"),
]


# The capacities a same-code check compiles: vim_s's (197 tokens) and the spill test's.
SAME_CODE_CAPACITIES = (256, 512)


class NvccError(RuntimeError):
    """A kernel source nvcc does not compile."""


def cubin(source: Path, variant, tuning, out: Path) -> bytes:
    """``source`` compiled by nvcc for sm_90 with the launcher's options for ``variant`` and ``tuning``."""
    from mame_deploy.plugins import merge_launch

    cmd = ["nvcc", "-arch=sm_90", "-cubin", "-o", str(out), *merge_launch.compile_options(variant, tuning), str(source)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        first = next((line for line in result.stderr.splitlines() if "error" in line), result.stderr.strip()[:200])
        raise NvccError(f"error: nvcc does not compile {source} (split {tuning}): {first.strip()}")
    return out.read_bytes()


def same_code(parent: Path, tunings=None, types=BITS_TYPES, capacities=SAME_CODE_CAPACITIES, jobs: int = 8) -> int:
    """Compare ``parent``'s cubins with this tree's kernel's; 0 when every variant is identical."""
    from concurrent.futures import ThreadPoolExecutor

    from mame_deploy.plugins import merge_launch

    variants = [(t, merge_launch.Variant(h, r, n_cap=c)) for t in (tunings or merge_launch.TUNINGS)
                for h, r in types for c in capacities]
    with tempfile.TemporaryDirectory() as tmp:
        def both(i: int) -> bool:
            tuning, variant = variants[i]
            return (cubin(parent, variant, tuning, Path(tmp) / f"parent{i}.cubin")
                    == cubin(KERNEL, variant, tuning, Path(tmp) / f"tree{i}.cubin"))

        with ThreadPoolExecutor(jobs) as pool:  # nvcc processes: threads only wait on them
            same = list(pool.map(both, range(len(variants))))
    differ = [v for v, equal in zip(variants, same) if not equal]
    print(f"{len(variants)} variants (splits x types x capacities): {len(differ)} compile to different code")
    for tuning, variant in differ:
        print(f"  differs: {tuning} {variant}")
    return 1 if differ else 0


def _read_global(kernel, name: str, nbytes: int) -> bytes:
    from mame_deploy.ops import cuda_driver

    drv = cuda_driver.driver()
    with cuda_driver.current(kernel.context):
        ptr, size = cuda_driver.check(drv.cuModuleGetGlobal(kernel.module, name.encode()), "cuModuleGetGlobal")
        if size != nbytes:
            raise SystemExit(f"error: {name} is {size} bytes, expected {nbytes}: TRACE_MARKS/TRACE_LAUNCHES changed?")
        buf = bytearray(nbytes)
        host = (ctypes.c_char * nbytes).from_buffer(buf)
        cuda_driver.check(drv.cuMemcpyDtoH(ctypes.addressof(host), ptr, nbytes), "cuMemcpyDtoH")
    return bytes(buf)


TRACE_MARKS, TRACE_LAUNCHES = 16, 8  # token_merge.cu's, under -DTM_TRACE
END_MARK = 13


def read_ring(times, clocks, count: int, cluster: int) -> list[dict]:
    """The traced launches in a ring read back (``times``/``clocks`` flattened
    [TRACE_LAUNCHES][cluster][TRACE_MARKS]; ``count`` launches so far), oldest first, each as
    {"start": first block's start, "at": {mark: ns from start to the mark in the last block that
    reached it}, "cycles": {mark: block 0's clock64 from its start}, "end": last block's end}.
    A mark no block reached in a launch (its path skips it) still holds an older launch's stamp
    and is left out."""
    def at(values, slot, blk, m):
        return values[(slot * cluster + blk) * TRACE_MARKS + m]

    out = []
    for launch in range(max(count - TRACE_LAUNCHES, 0), count):
        slot = launch % TRACE_LAUNCHES
        start = min(at(times, slot, blk, 0) for blk in range(cluster))
        row = {"start": start, "at": {}, "cycles": {}}
        for m, _ in MARKS:
            stamped = [at(times, slot, blk, m) for blk in range(cluster) if at(times, slot, blk, m) >= start]
            if stamped:
                row["at"][m] = max(stamped) - start
            if at(times, slot, 0, m) >= start:
                row["cycles"][m] = at(clocks, slot, 0, m) - at(clocks, slot, 0, 0)
        row["end"] = start + row["at"].get(END_MARK, 0)
        out.append(row)
    return out


def summarize_launches(rounds: list[list[dict]]) -> dict:
    """Medians over the launches of ``rounds`` (each as read_ring returns them): per mark, ns
    from start and block 0's cycles (None: never reached), and the gap from one launch's end to
    the next one's start, within a round (rounds are apart by a host synchronisation)."""
    import statistics

    def med(values):
        return statistics.median(values) if values else None

    gaps = [b["start"] - a["end"] for r in rounds for a, b in zip(r, r[1:])]
    launches = [row for r in rounds for row in r]
    return {
        "at": {m: med([r["at"][m] for r in launches if m in r["at"]]) for m, _ in MARKS},
        "cycles": {m: med([r["cycles"][m] for r in launches if m in r["cycles"]]) for m, _ in MARKS},
        "gap": med(gaps),
    }


def timeline(batch: int, dtype_name: str, tuning_text: Optional[str], rounds: int, graph: bool,
             method: str, json_path: Optional[str] = None) -> dict:
    """Trace ``rounds`` x 8 vim_s-shaped steps; print the table and return its numbers."""
    import torch

    from mame_deploy.ops.fixtures import merge_inputs
    from mame_deploy.ops.token_merge import cuda as merge_cuda
    from mame_deploy.ops.token_merge.contract import MergeAttributes
    from mame_deploy.plugins import merge_launch

    dtype = getattr(torch, dtype_name)
    args = merge_inputs(batch, 197, 384, dtype, torch.float32, seed=1)
    attrs = MergeAttributes(6, lam=1.0) if method == "mame" else MergeAttributes(6, prune=1)
    variant = merge_launch.Variant.of(dtype_name, "float32", 197)
    device = args["hidden"].device
    # The traced build stays in the launcher's cache: a process that traces must not also time
    # plain steps.
    with extra_compile_option("-DTM_TRACE"):
        tuning = (merge_launch.Tuning.parse(tuning_text) if tuning_text
                  else merge_cuda.default_tuning(device, variant, batch))
        kernel = merge_cuda._kernel(device, variant, tuning)
    cluster = tuning.cluster

    def eight():
        for _ in range(TRACE_LAUNCHES):
            merge_cuda.token_merge_cuda(**args, attrs=attrs, tuning=tuning)

    for _ in range(3):
        eight()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            eight()
        eight = g.replay
    n = TRACE_LAUNCHES * cluster * TRACE_MARKS
    launches = []
    for _ in range(rounds):
        eight()
        torch.cuda.synchronize()
        t = struct.unpack(f"{n}Q", _read_global(kernel, "tm_trace_time", 8 * n))
        c = struct.unpack(f"{n}Q", _read_global(kernel, "tm_trace_clock", 8 * n))
        (count,) = struct.unpack("I", _read_global(kernel, "tm_trace_count", 4))
        launches.append(read_ring(t, c, count, cluster))
    summary = summarize_launches(launches)
    where = "a CUDA graph" if graph else "eager back-to-back launches"
    print(f"## token-merge step timeline: {torch.cuda.get_device_name(device)}, {dtype_name}, batch {batch}, "
          f"{method}, r = 6 of 197, split {tuning} ({cluster} blocks), {where}, {rounds * TRACE_LAUNCHES} launches\n")
    print("| mark | phase ends | us from start (all blocks) | phase us | block 0 cycles |\n|---|---|---|---|---|")
    prev = 0.0
    for m, name in MARKS:
        ns = summary["at"][m]
        if ns is None:
            print(f"| {m} | {name} | not reached | | |")
            continue
        cycles = summary["cycles"][m]
        print(f"| {m} | {name} | {ns / 1e3:.2f} | {ns / 1e3 - prev:.2f} | {'' if cycles is None else f'{cycles:.0f}'} |")
        prev = ns / 1e3
    end, gap = summary["at"][END_MARK], summary["gap"]
    ghz = summary["cycles"][END_MARK] / end if end else float("nan")
    gap_us = float("nan") if gap is None else gap / 1e3
    # Only the first sample's blocks are traced: beyond one sample the gap also holds the others' tail.
    what = "step as seen from the stream" if batch == 1 else "first sample's end to end, with the others' tail"
    print(f"\ngap from the first sample's last block end to the next launch's first block start: "
          f"median {gap_us:.2f} us; {what}: {end / 1e3 + gap_us:.2f} us; block 0 clock {ghz:.2f} GHz\n")
    result = {"device": torch.cuda.get_device_name(device), "dtype": dtype_name, "batch": batch, "method": method,
              "tuning": str(tuning), "graph": graph, "launches": rounds * TRACE_LAUNCHES,
              "marks": [{"mark": m, "phase": name,
                         "us_from_start": None if summary["at"][m] is None else summary["at"][m] / 1e3,
                         "block0_cycles": summary["cycles"][m]} for m, name in MARKS],
              "gap_us": gap_us}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run", help="launch the steps ncu profiles")
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    r.add_argument("--steps", type=int, default=4)
    t = sub.add_parser("timeline", help="per-phase times of a step from the kernel's own clocks (-DTM_TRACE)")
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    t.add_argument("--method", default="mame", choices=["mame", "prune"])
    t.add_argument("--tuning", help="a split (merge_launch.Tuning.parse syntax); default: the launcher's choice")
    t.add_argument("--rounds", type=int, default=40, help="rounds of 8 launches")
    t.add_argument("--graph", action="store_true", help="replay the 8 launches as a CUDA graph")
    t.add_argument("--json", help="also write the table as JSON here")
    m = sub.add_parser("in-model", help="the merge kernels' times inside a merged model's CUDA graph")
    m.add_argument("--model", default="vim_s")
    m.add_argument("--ratio", type=float, default=0.5)
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    m.add_argument("--replays", type=int, default=200, help="timed replays (CUDA events)")
    m.add_argument("--profiled", type=int, default=10, help="replays under torch.profiler")
    m.add_argument("--json", help="also write the numbers as JSON here")
    b = sub.add_parser("bits", help="this tree's kernel against --kernel-source's, bit for bit")
    o = sub.add_parser("save-outputs", help="save every case's outputs to PATH (bits runs it once per source)")
    o.add_argument("path")
    c = sub.add_parser("same-code", help="this tree's kernel against --kernel-source's, cubin for cubin (nvcc, no GPU)")
    c.add_argument("--jobs", type=int, default=8, help="nvcc processes at a time")
    for p in (r, t, m, b, o, c):
        p.add_argument("--kernel-source", type=Path,
                       help="compile this token_merge.cu instead of the tree's (to time a change against its parent)")
    s = sub.add_parser("summarize", help="tables from ncu's source-page CSV")
    s.add_argument("csv")
    s.add_argument("--top", type=int, default=30)
    s.add_argument("--source", type=Path, default=KERNEL,
                   help="the token_merge.cu the profile was taken from (default: this tree's)")
    opts = ap.parse_args(argv)
    source = getattr(opts, "kernel_source", None)
    if source is not None and not source.is_file():
        print(f"error: --kernel-source {source}: no such file; give a token_merge.cu", file=sys.stderr)
        return 2
    if opts.what in ("bits", "same-code") and source is None:
        print(f"error: {opts.what} needs --kernel-source F, the token_merge.cu to compare against", file=sys.stderr)
        return 2
    if opts.what == "same-code":
        if shutil.which("nvcc") is None:
            print("error: same-code needs nvcc on PATH (the CUDA toolkit); no GPU is needed", file=sys.stderr)
            return 2
        if opts.jobs < 1:
            print(f"error: --jobs {opts.jobs}: give at least 1", file=sys.stderr)
            return 2
        try:
            return same_code(source, jobs=opts.jobs)
        except NvccError as error:
            print(error, file=sys.stderr)
            return 2
    if opts.what in ("run", "timeline", "in-model", "bits", "save-outputs"):
        import torch

        if not torch.cuda.is_available():
            print(f"error: profile_merge.py {opts.what} needs a CUDA GPU", file=sys.stderr)
            return 2
    if opts.what == "bits":
        return bits(source)
    with kernel_source(source):
        if opts.what == "run":
            run(opts.batch, opts.dtype, opts.steps)
        elif opts.what == "timeline":
            timeline(opts.batch, opts.dtype, opts.tuning, opts.rounds, opts.graph, opts.method, opts.json)
        elif opts.what == "in-model":
            in_model(opts.model, opts.ratio, opts.batch, opts.dtype, opts.replays, opts.profiled, opts.json)
        elif opts.what == "save-outputs":
            save_outputs(opts.path)
        else:
            summarize(opts.csv, opts.top, opts.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
