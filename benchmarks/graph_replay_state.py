"""Batch-1 CUDA-graph replay time of one model before and after other work in the same process:
what made "the second model timed in a process" read slower (docs/perf-notes.md, "The batch-1
order effect, found").

    python benchmarks/graph_replay_state.py --model vim_s --iters 100
    python benchmarks/graph_replay_state.py --model vim_s --dtype bfloat16 --merged

One graph is captured first; its replays are timed (median of ``--iters``, CUDA events) after
each step: creating a stream, an eager forward on the default stream, an eager forward on that
stream, a second capture, emptying the allocator cache. Prints a table; GPU only.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench_e2e import _timed  # benchmarks/ is on sys.path when run as a script
from mame_deploy import patch
from mame_deploy.models import create_model
from mame_deploy.runners import capture_cuda_graph


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vim_s")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--merged", action="store_true", help="time the MaMe model (ratio 0.5) instead of the unmerged one")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=100)
    opts = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = getattr(torch, opts.dtype)
    model = create_model(opts.model).to("cuda", dtype)
    if opts.merged:
        patch(model, ratio=0.5)
    cfg = model.config
    images = torch.randn(opts.batch, cfg.in_chans, cfg.img_size, cfg.img_size, device="cuda", dtype=dtype)
    rows = []
    with torch.no_grad():
        graph, _ = capture_cuda_graph(lambda: model(images))
        graph.replay()
        torch.cuda.synchronize()

        def timed(step: str, other=None) -> None:
            rows.append((step, _timed(graph.replay, opts.iters), other))

        timed("right after the capture")
        timed("again")
        stream = torch.cuda.Stream()
        timed("after creating a stream")
        model(images)
        torch.cuda.synchronize()
        timed("after an eager forward on the default stream")
        with torch.cuda.stream(stream):
            model(images)
        torch.cuda.synchronize()
        timed("after an eager forward on the new stream")
        second, _ = capture_cuda_graph(lambda: model(images))
        second.replay()
        torch.cuda.synchronize()
        timed("after a second capture", _timed(second.replay, opts.iters))
        del second
        torch.cuda.empty_cache()
        timed("after freeing it and emptying the allocator cache")
    name = f"{opts.model} {'merged (ratio 0.5)' if opts.merged else 'unmerged'} {opts.dtype} batch {opts.batch}"
    print(f"\n## graph replay of {name}, {torch.cuda.get_device_name()}, median of {opts.iters}\n")
    print("| step | first graph ms | second graph ms |\n|---|---|---|")
    for step, ms, other in rows:
        print(f"| {step} | {ms:.3f} | {'' if other is None else f'{other:.3f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
