"""How often merge decisions differ between runtimes: PyTorch on the CPU (the reference) against
onnxruntime at batch 1 and 8 and against PyTorch on CUDA (the fused kernel), per model and
method, with how many of the flipped samples are near-ties (decisions.near_tie).

    python benchmarks/decision_flips.py --models vim_t vim_digits --methods mame tome prune \
        --samples 256 --json flips.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from mame_deploy import decisions, manifest as manifests
from mame_deploy import source as sources
from mame_deploy.manifest import Source
from mame_deploy.manifest import OUTPUT_NAME
from mame_deploy.onnx_export import export
from mame_deploy.runners import TorchRunner, onnxruntime_session
from mame_deploy.validate import folder_images, has_bundled_data, random_images, run
from polygraphy.backend.onnxrt import OnnxrtRunner


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["vim_t", "vim_digits"])
    ap.add_argument("--methods", nargs="+", default=["mame", "tome", "prune"])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json")
    opts = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in opts.models:
            for method in opts.methods:
                source = Source(model=name, ratio=opts.ratio, method=method)
                path = Path(folder) / f"{name}-{method}.onnx"
                result = export(source, path, batch=None, force=True)
                record = result.manifest
                model = sources.build_model(manifests.source_from_manifest(record), record["schedule"])
                layers = model.token_merge.layers
                cfg = model.config
                batches = (folder_images(None, name, cfg, opts.samples) if has_bundled_data(name)
                           else random_images(cfg, opts.samples, 0))
                reference = run(TorchRunner(model, trace_merges=True), batches, 8)
                traced = decisions.with_decision_outputs(onnx.load(str(path)), layers).SerializeToString()
                others = {f"onnxruntime batch {b}": (OnnxrtRunner(lambda: onnxruntime_session(traced)), b)
                          for b in opts.batches}
                if torch.cuda.is_available():
                    others["torch cuda (fused kernel)"] = (TorchRunner(model, "cuda", trace_merges=True), 8)
                for label, (runner, b) in others.items():
                    out = run(runner, batches, b)
                    model.cpu()
                    flips = decisions.compare_decisions(out, reference, layers)
                    flipped = np.flatnonzero(flips["flipped"])
                    ties = sum(decisions.near_tie(model, batches.read(i, i + 1)[0], int(flips["first_step"][i]))
                               for i in flipped)
                    changed = int(np.sum(out[OUTPUT_NAME][flipped].argmax(1) != reference[OUTPUT_NAME][flipped].argmax(1)))
                    rows.append(dict(model=name, method=method, against=label, samples=len(batches),
                                     sample_layers=len(batches) * len(layers), flipped_samples=int(len(flipped)),
                                     first_flips=int(sum(flips["first_flips"])), near_ties=int(ties),
                                     top1_changed=changed))
                    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    print(f"\n## merge decisions vs PyTorch CPU, ratio {opts.ratio:g} ({datetime.date.today()})\n")
    print("| model | method | against | samples | flipped samples | rate per sample-layer | near-ties | top-1 changed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['against']} | {r['samples']} | {r['flipped_samples']} | "
              f"{r['first_flips'] / r['sample_layers']:.1e} | {r['near_ties']} | {r['top1_changed']} |")
    if opts.json:
        Path(opts.json).write_text(json.dumps(dict(date=str(datetime.date.today()), ratio=opts.ratio, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
