"""Peak memory of one CPU forward pass, against mame_deploy.memory's estimate.

Each (model, batch) runs in a fresh process (peak RSS only grows), which reports its peak RSS
before and after one forward pass. The growth between two batch sizes, divided by the size of a
(batch, length, d_inner, d_state) float32 tensor, is how many such tensors the reference scan
holds at its peak: what ``memory.SCAN_COPIES`` stands for.

    python benchmarks/forward_memory.py --model vim_t --depth 2 --batches 16,32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, torch
from mame_deploy import patch
from mame_deploy.models import create_model
from mame_deploy.memory import forward_bytes
name, depth, ratio, batch = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
model = patch(create_model(name, depth=depth), ratio=ratio)
images = torch.randn(batch, model.config.in_chans, model.config.img_size, model.config.img_size)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
with torch.inference_mode():
    model(images)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"batch": batch, "rss_before": before, "rss_peak": after,
                  "estimate": forward_bytes(model.config, batch)}))
"""


def measure(model: str, depth: int, ratio: float, batch: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, model, str(depth), str(ratio), str(batch)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vim_t")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=0.0)
    parser.add_argument("--batches", default="16,32")
    args = parser.parse_args()

    from mame_deploy.models import model_config

    cfg = model_config(args.model, depth=args.depth)
    unit = (cfg.num_patches + 1) * cfg.d_inner * cfg.d_state * 4
    rows = [measure(args.model, args.depth, args.ratio, int(b)) for b in args.batches.split(",")]
    print("| batch | peak RSS growth in the forward (MB) | estimate (MB) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {(r['rss_peak'] - r['rss_before']) / 1e6:.1f} | {r['estimate'] / 1e6:.1f} |")
    for a, b in zip(rows, rows[1:]):
        per_image = (b["rss_peak"] - a["rss_peak"]) / (b["batch"] - a["batch"])
        print(f"\nbatch {a['batch']} -> {b['batch']}: {per_image / 1e6:.2f} MB per image = "
              f"{per_image / unit:.2f} (batch, {cfg.num_patches + 1}, {cfg.d_inner}, {cfg.d_state}) float32 tensors "
              f"per image")


if __name__ == "__main__":
    main()
