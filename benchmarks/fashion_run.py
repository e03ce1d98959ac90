"""The GPU steps of the vim_fashion benchmark (issue 13), called by benchmarks/device_fashion.sh.

    probe   --left S            time training steps (unmerged and merged at 0.7); print the
                                epoch count that fits the S seconds left, and per-epoch estimates
    choose  --checkpoint W      pick merge placement and MaMe's lam on the VALIDATION split
    sweep   --checkpoint W      the off-the-shelf sweep and MaMe's ablations on the TEST split,
                                with the choice made by `choose`; also the 1,000-image CI subset
    finetuned W...              test top-1 of fine-tuned weights at the merging they carry
                                (unmerged for weights that carry none: the control)
    replot  --sweep JSON        the plot of a sweep's records again

Everything runs through the library calls the CLI uses (mame_deploy.evaluate.sweep,
evaluate_setting, mame_deploy.train.train), on CUDA with mamba-ssm's scan in float32 for
evaluation (``--backend op`` uses the project's kernel instead; ``--device cpu`` the reference,
for a dry run with ``--limit``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

from mame_deploy import data
from mame_deploy.evaluate import Setting, evaluate, evaluate_setting, plot_sweep, sweep
from mame_deploy.finetuned import read_merge_record
from mame_deploy.models import create_model
from mame_deploy.train import _on, recipe_for, train

MODEL = "vim_fashion"
RATIOS = [0.0, 0.3, 0.5, 0.7, 0.8, 0.9]
CHOICE_RATIOS = [0.5, 0.7, 0.9]
LAMS = [0.0, 0.5, 1.0, 2.0]
# Merge placements tried on val (blocks after which tokens leave; vim_fashion has 8 blocks, the
# last never merges). Each keeps >= 4 merge layers so ratio 0.9 stays possible (<= half per step).
PLACEMENTS = {"every block (default)": None, "1-6": [1, 2, 3, 4, 5, 6], "0,2,4,6": [0, 2, 4, 6], "3-6": [3, 4, 5, 6]}
ABLATIONS = {"arrangement=concat": {"arrangement": "concat"}, "split=alternate": {"split": "alternate"},
             "weighting=size": {"weighting": "size"}}
CI_SUBSET = 1000  # test images evenly spaced (validate --samples 1000), what tests/test_fashion.py evaluates


def _setup(device: str):
    # Evaluation in plain float32 (no TF32), as on the CPU where the shipped figures are checked.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return device


def _model(checkpoint, device, backend):
    return create_model(MODEL, checkpoint=checkpoint, scan_backend=backend).to(device)


def _dataset(subset, device):
    return _on(data.fashion_dataset(subset), device)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def _env(args) -> dict:
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return {"device": gpu, "scan_backend": args.backend, "torch": torch.__version__, "commit": _commit(),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}


def probe(args) -> None:
    """Seconds per training step, unmerged and with MaMe at 0.7, and per val pass; the epoch
    count E of unmerged training such that E epochs + ``--finetune-epochs`` merged epochs per
    fine-tuning + ``--fixed`` seconds fit in the ``--left`` seconds that remain after the probe."""
    started_probe = time.perf_counter()
    recipe = recipe_for(MODEL)
    batch = args.train_batch or recipe.batch_size
    steps = args.steps
    out = {}
    warm = dataclasses.replace(recipe, epochs=1, batch_size=batch)  # CUDA context, cuBLAS, kernels: not timed
    train(MODEL, warm, merge=Setting("mame", 0.7), device=args.device, limit=min(steps, 3) * batch, eval_limit=batch)
    for label, merge in (("unmerged", None), ("mame_0.7", Setting("mame", 0.7))):
        short = dataclasses.replace(recipe, epochs=1, warmup_epochs=1.0, batch_size=batch)
        _, hist = train(MODEL, short, merge=merge, device=args.device, limit=steps * batch, eval_limit=batch)
        # per image, scaled to the recipe's batch
        out[f"{label}_step_s"] = hist[0].seconds / steps * recipe.batch_size / batch
    model = _model(None, args.device, args.backend)
    val = _dataset("val", args.device)
    evaluate(model, val, batch_size=recipe.eval_batch_size, limit=args.limit or recipe.eval_batch_size)  # warm-up
    started = time.perf_counter()
    evaluate(model, val, batch_size=recipe.eval_batch_size, limit=args.limit)
    val_s = time.perf_counter() - started
    steps_per_epoch = math.ceil(len(data.fashion_indices("train", 60000)) / recipe.batch_size)
    out["epoch_s"] = steps_per_epoch * out["unmerged_step_s"] + val_s
    out["finetune_epoch_s"] = steps_per_epoch * out["mame_0.7_step_s"] + val_s
    left = args.left - (time.perf_counter() - started_probe)
    # 10% margin: the estimate must not overrun the call's limit
    train_budget = 0.9 * (left - args.fixed - args.finetunes * args.finetune_epochs * out["finetune_epoch_s"])
    out.update(left_after_probe=round(left, 1), train_budget_s=round(train_budget, 1))
    out["epochs"] = max(args.min_epochs, min(args.max_epochs, int(train_budget // out["epoch_s"])))
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


def choose(args) -> None:
    """Placement (mean val top-1 of mame/tome/prune at CHOICE_RATIOS), then MaMe's lam at that
    placement; records every val run."""
    model = _model(args.checkpoint, args.device, args.backend)
    val = _dataset("val", args.device)
    records, placement_score = [], {}
    for name, layers in PLACEMENTS.items():
        accs = []
        for method in ("mame", "tome", "prune"):
            for ratio in CHOICE_RATIOS:
                r = evaluate_setting(model, val, Setting(method, ratio, layers=layers), args.batch_size, args.limit)
                r["placement"] = name
                records.append(r)
                accs.append(r["accuracy"])
        placement_score[name] = sum(accs) / len(accs)
        print(f"placement {name}: mean val top-1 {100 * placement_score[name]:.2f}", flush=True)
    best_place = max(placement_score, key=lambda k: (placement_score[k], k == "every block (default)"))
    layers = PLACEMENTS[best_place]
    lam_score = {}
    for lam in LAMS:
        accs = []
        for ratio in CHOICE_RATIOS:
            r = evaluate_setting(model, val, Setting("mame", ratio, layers=layers, options={"lam": lam}),
                                 args.batch_size, args.limit)
            r["placement"] = best_place
            records.append(r)
            accs.append(r["accuracy"])
        lam_score[lam] = sum(accs) / len(accs)
        print(f"lam {lam}: mean val top-1 {100 * lam_score[lam]:.2f}", flush=True)
    best_lam = max(lam_score, key=lambda k: (lam_score[k], k == 1.0))
    choice = {"placement": best_place, "layers": layers, "lam": best_lam,
              "placement_score": placement_score, "lam_score": {str(k): v for k, v in lam_score.items()}}
    Path(args.out).write_text(json.dumps({**_env(args), "choice": choice, "records": records}, indent=1))
    print(json.dumps(choice))


def _choice(path):
    if path is None:
        return None, {}
    choice = json.loads(Path(path).read_text())["choice"]
    return choice["layers"], {"lam": choice["lam"]}


def run_sweep(args) -> None:
    model = _model(args.checkpoint, args.device, args.backend)
    test = _dataset("test", args.device)
    layers, options = _choice(args.choice)
    started = time.perf_counter()
    records = sweep(model, test, ["mame", "tome", "prune"], RATIOS, layers, options, args.batch_size, args.limit)
    for name, switch in ABLATIONS.items():
        for r in sweep(model, test, ["mame"], RATIOS[1:], layers, {**options, **switch}, args.batch_size, args.limit):
            r["ablation"] = name
            records.append(r)
    subset = {}
    keep = torch.from_numpy(data.spread_indices(len(test), CI_SUBSET)).to(test.images.device)
    ci = data.TensorImages(test.images[keep], test.labels[keep], f"{test.name}, {CI_SUBSET} evenly spaced")
    for method, ratio in (("mame", 0.0), ("mame", 0.5), ("tome", 0.5), ("prune", 0.5)):
        r = evaluate_setting(model, ci, Setting(method, ratio, layers=layers, options=options if method == "mame" else None),
                             args.batch_size, args.limit)
        subset[f"{method}@{ratio:g}"] = {"accuracy": r["accuracy"], "correct": r["correct"], "images": r["images"]}
    seconds = time.perf_counter() - started
    Path(args.out).write_text(json.dumps({**_env(args), "choice_file": args.choice, "layers": layers, "options": options,
                                          "seconds": round(seconds, 1), "records": records,
                                          "ci_subset_1000_spread": subset}, indent=1))
    if args.plot:
        plot(records, args.plot)
    for r in _lines(records):
        print(f"{r['method']:<32} {r['ratio']:>4g}  {100 * r['accuracy']:6.2f}  {r['relative_gflops']:.3f}")


def _lines(records: list[dict]) -> list[dict]:
    """The records as plot lines: an ablation is labelled by its switch and starts at the
    unmerged model's point."""
    lines = []
    base = next(b for b in records if b["method"] == "mame" and b["ratio"] == 0 and "ablation" not in b)
    for r in records:
        label = r["method"] + (f" {r['ablation']}" if "ablation" in r else "")
        if "ablation" in r and r["ratio"] == RATIOS[1]:
            lines.append(dict(base, method=label))
        lines.append(dict(r, method=label))
    return lines


def plot(records: list[dict], path) -> None:
    plot_sweep(_lines(records), path, title=f"{MODEL} (196 patches), Fashion-MNIST test split")


def replot(args) -> None:
    plot(json.loads(Path(args.sweep).read_text())["records"], args.out)


def finetuned(args) -> None:
    test = _dataset("test", args.device)
    rows = []
    for path in args.weights:
        record = read_merge_record(path)
        if record is None:  # fine-tuned with no merging (the control): evaluated unmerged
            setting = Setting("mame", 0.0)
        else:
            options = dict(record["options"])
            layers = options.pop("layers", None)
            setting = Setting(record["method"], record["ratio"], record["schedule_spec"], layers, options)
        model = _model(path, args.device, args.backend)
        r = evaluate_setting(model, test, setting, args.batch_size, args.limit)
        r["checkpoint"] = Path(path).name
        r["training"] = torch.load(path, map_location="cpu", weights_only=True).get("training")
        rows.append(r)
        print(f"{r['checkpoint']}: {r['method']} @ {r['ratio']:g}: test top-1 {100 * r['accuracy']:.2f}", flush=True)
    Path(args.out).write_text(json.dumps({**_env(args), "records": rows}, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("replot")
    p.add_argument("--sweep", required=True)
    p.add_argument("--out", required=True)
    for name in ("probe", "choose", "sweep", "finetuned"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda")
        p.add_argument("--backend", default="mamba_ssm", help="scan backend for evaluation: mamba_ssm or op")
        p.add_argument("--batch-size", type=int, default=1000)
        p.add_argument("--limit", type=int, default=None, help="first N images of each split (dry runs)")
        p.add_argument("--out", required=True, help="JSON file to write")
        if name == "probe":
            p.add_argument("--left", type=float, required=True, help="seconds left for everything")
            p.add_argument("--fixed", type=float, default=90, help="seconds of the steps that are not training")
            p.add_argument("--finetunes", type=int, default=1, help="fine-tunings that must fit")
            p.add_argument("--finetune-epochs", type=int, default=5)
            p.add_argument("--steps", type=int, default=40)
            p.add_argument("--train-batch", type=int, default=None, help="smaller batch for a CPU dry run")
            p.add_argument("--min-epochs", type=int, default=4)
            p.add_argument("--max-epochs", type=int, default=60)
        if name in ("choose", "sweep"):
            p.add_argument("--checkpoint", required=True)
        if name == "sweep":
            p.add_argument("--choice", default=None, help="JSON written by `choose`")
            p.add_argument("--plot", default=None)
        if name == "finetuned":
            p.add_argument("weights", nargs="+")
    args = parser.parse_args(argv)
    if args.step == "replot":
        return replot(args)
    _setup(args.device)
    {"probe": probe, "choose": choose, "sweep": run_sweep, "finetuned": finetuned}[args.step](args)


if __name__ == "__main__":
    main()
