"""Time the selective-scan CUDA kernel against mamba-ssm's ``selective_scan_fn`` and the PyTorch
reference on the same inputs, and against the memory floor (bytes moved / measured copy
bandwidth).

    python benchmarks/bench_kernel.py                       # the issue's table (B 1/64/256, L 197/99)
    python benchmarks/bench_kernel.py --tunings auto 4x32x32x4 16x8x32x1 --no-reference

Timing: triton.testing.do_bench, median, L2 flushed before every run (so inputs come from
device memory, as in a model), of the Python call and of its CUDA-graph replay (GPU time without
the launch cost). Each configuration is checked against the reference first (norm-wise relative
error, printed). Needs a CUDA GPU, cuda-python and triton; mamba-ssm optional.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from mame_deploy.ops.fixtures import relative_error, scan_inputs
from mame_deploy.ops.selective_scan.cuda import TORCH_DTYPES, selective_scan_cuda
from mame_deploy.ops.selective_scan import selective_scan_ref
from mame_deploy.ops.selective_scan.contract import dt_groups
from mame_deploy.plugins.launch import Tuning, tuning_for
from mame_deploy.runners import capture_cuda_graph

DTYPES = {name: dtype for dtype, name in TORCH_DTYPES.items()}


def do_bench(fn, rep_ms: float = 200) -> float:
    from triton.testing import do_bench as triton_bench

    return triton_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms, return_mode="median") * 1e3  # us


def do_bench_graph(fn, rep_ms: float = 200) -> float:
    """GPU time of ``fn`` alone: one call captured in a CUDA graph, the replay timed (no Python
    launch cost, which matters when the kernel takes a few microseconds)."""
    graph, _ = capture_cuda_graph(fn)
    return do_bench(graph.replay, rep_ms)


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(256 * 2**20, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    us = do_bench(lambda: dst.copy_(src))
    return 2 * src.nbytes / (us * 1e-6)


def scan_bytes(batch: int, dim: int, length: int, dstate: int, elem: int) -> int:
    """Fewest bytes a scan moves: u, delta, z read and out written once; B, C read once; A, D, bias."""
    return 4 * batch * dim * length * elem + 2 * batch * dstate * length * elem + 4 * (dim * dstate + 2 * dim)


def mamba_fn():
    try:
        from mame_deploy.ops.mamba_ssm_backend import selective_scan_fn

        return selective_scan_fn()
    except Exception as exc:  # missing, or built without this GPU's architecture
        print(f"mamba-ssm unavailable: {exc}", file=sys.stderr)
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--length", type=int, nargs="+", default=[197, 99])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--dtype", nargs="+", default=["float32", "float16"], choices=list(DTYPES))
    ap.add_argument("--tunings", nargs="+", default=["auto"],
                    help="work splits LANESxCHANNELSxCHUNKxMIN_BLOCKS[xSEGMENTS], or 'auto' (launch.tuning_for: "
                         "what the PyTorch op uses); the first fills the main table")
    ap.add_argument("--reverse", action="store_true", help="time the reverse scan")
    ap.add_argument("--no-mamba", action="store_true", help="skip mamba-ssm")
    ap.add_argument("--no-reference", action="store_true", help="skip timing the PyTorch reference")
    ap.add_argument("--rep-ms", type=float, default=200)
    ap.add_argument("--once", action="store_true", help="run each kernel once, no timing (for ncu)")
    ap.add_argument("--json", help="write every number here")
    opts = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    tunings = [t if t == "auto" else Tuning.parse(t) for t in opts.tunings]
    fn_mamba = None if opts.no_mamba else mamba_fn()
    device = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"# {device}, torch {torch.__version__}, {datetime.date.today()}; copy bandwidth {bw / 1e12:.2f} TB/s")

    rows = []
    for dtype_name in opts.dtype:
        for length in opts.length:
            for batch in opts.batch:
                dtype = DTYPES[dtype_name]
                args = scan_inputs(batch, opts.dim, length, opts.dstate, dtype)
                out = torch.empty_like(args["u"])
                dt_sums = torch.empty(batch, dt_groups(opts.dim), length, device=out.device)
                row = dict(dtype=dtype_name, batch=batch, dim=opts.dim, length=length, dstate=opts.dstate)
                ref = selective_scan_ref(**{k: v.float() for k, v in args.items()}, delta_softplus=True, reverse=opts.reverse)
                for tuning in tunings:
                    def ours(tuning=None if tuning == "auto" else tuning):
                        return selective_scan_cuda(**args, delta_softplus=True, reverse=opts.reverse, out=out, dt_sums=dt_sums, tuning=tuning)

                    out.fill_(float("nan"))
                    ours()
                    row[f"err {tuning}"] = relative_error(out, ref)
                    if not opts.once:
                        row[f"us {tuning}"] = do_bench(ours, opts.rep_ms)
                        row[f"graph us {tuning}"] = do_bench_graph(ours, opts.rep_ms)
                if fn_mamba is not None and not opts.reverse:
                    def theirs():
                        return fn_mamba(args["u"], args["delta"], args["A"], args["B"], args["C"], args["D"],
                                        args["z"], args["delta_bias"], delta_softplus=True)

                    row["err mamba"] = relative_error(theirs(), ref)
                    if not opts.once:
                        row["us mamba"] = do_bench(theirs, opts.rep_ms)
                        row["graph us mamba"] = do_bench_graph(theirs, opts.rep_ms)
                if not opts.no_reference and not opts.once:
                    row["us reference"] = do_bench(
                        lambda: selective_scan_ref(**args, delta_softplus=True, reverse=opts.reverse), opts.rep_ms
                    )
                row["us floor"] = scan_bytes(batch, opts.dim, length, opts.dstate, dtype.itemsize) / bw * 1e6
                rows.append(row)
                del ref, args, out
                torch.cuda.empty_cache()
                print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      file=sys.stderr, flush=True)

    if opts.json:
        with open(opts.json + ".tmp", "w") as f:
            json.dump(dict(device=device, torch=torch.__version__, date=str(datetime.date.today()),
                           copy_bandwidth=bw, reverse=opts.reverse, rows=rows), f, indent=1)
        os.replace(opts.json + ".tmp", opts.json)
    if opts.once:
        return 0

    main_t = tunings[0]
    direction = "reverse" if opts.reverse else "forward"
    if main_t == "auto":
        chosen = {str(tuning_for(b, opts.dim, n)) for b in opts.batch for n in opts.length}
    else:
        chosen = {str(main_t)}
    print(f"\n## {direction} scan, D={opts.dim}, N={opts.dstate}, kernel tuning {main_t} "
          f"({', '.join(sorted(chosen))}) on {device}\n")
    print("Times in us: 'call' = the Python call (do_bench median), 'graph' = its CUDA-graph replay.\n")
    print("| dtype | B | L | ours call | ours graph | mamba-ssm call | mamba-ssm graph | ours / mamba (call) "
          "| ours / mamba (graph) | PyTorch ref | memory floor | ours graph / floor | rel. err ours | rel. err mamba |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    for r in rows:
        ours, ours_g = r[f"us {main_t}"], r[f"graph us {main_t}"]
        mamba, mamba_g = r.get("us mamba"), r.get("graph us mamba")
        print(f"| {r['dtype']} | {r['batch']} | {r['length']} | {ours:.1f} | {ours_g:.1f} | {fmt(mamba)} | "
              f"{fmt(mamba_g)} | {fmt(mamba and ours / mamba, '.3f')} | {fmt(mamba_g and ours_g / mamba_g, '.3f')} | "
              f"{fmt(r.get('us reference'), '.0f')} | {r['us floor']:.1f} | {ours_g / r['us floor']:.2f} | "
              f"{r[f'err {main_t}']:.1e} | {fmt(r.get('err mamba'), '.1e')} |")
    if len(tunings) > 1:
        print("\n## CUDA-graph kernel time (us) per tuning LANESxCHANNELSxCHUNKxMIN_BLOCKS[xSEGMENTS]\n")
        print("| dtype | B | L | " + " | ".join(map(str, tunings)) + " |")
        print("|---|---|---|" + "---|" * len(tunings))
        for r in rows:
            print(f"| {r['dtype']} | {r['batch']} | {r['length']} | "
                  + " | ".join(f"{r[f'graph us {t}']:.1f}" for t in tunings) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
