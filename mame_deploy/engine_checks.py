"""``validate --engine`` and ``bench --engine``: a TensorRT plan against the PyTorch source its
manifest describes, on the same GPU.

The parity metrics and the timing loop are the ONNX ones (``mame_deploy.validate`` and
``mame_deploy.bench``); this module supplies the engine's side: its batch sizes, its
pass/fail rule per precision, and the bench targets (the engine, the unmerged engine built from
the unmerged export, and PyTorch eager and as a CUDA graph, merged and unmerged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from mame_deploy import manifest as manifests
from mame_deploy import source as sources
from mame_deploy.engine import read_engine_manifest
from mame_deploy.errors import UserError

# Reduced-precision engines cannot meet the fp32 rule (max abs error <= 1e-4 * max |logit|);
# they pass on the direction of the logits and the predicted class.
REDUCED_PRECISION_TOLERANCE = {
    "fp16": {"mean_cosine": 0.999, "top1_agreement": 0.99},
    "bf16": {"mean_cosine": 0.995, "top1_agreement": 0.97},
}


def engine_batch(record: dict, requested: Optional[int], samples: int) -> int:
    """The batch to run: the engine's static batch, or one inside its optimisation profile."""
    batch = record["batch"]
    if isinstance(batch, int):
        if requested is not None and requested != batch:
            raise UserError(f"the engine was built for batch {batch}, not {requested}; drop `batch` or "
                            "build from a `dynamic_batch` export")
        return batch
    low, opt, high = batch["min"], batch["opt"], batch["max"]
    if requested is None:
        return max(low, min(samples, opt))
    if not low <= requested <= high:
        raise UserError(f"`batch` {requested} is outside the engine's profile ({low}..{high})")
    return requested


def passed(report: dict, precision: str) -> bool:
    """fp32 engines: the ONNX rule already in ``report``; fp16/bf16: cosine and top-1 agreement."""
    rule = REDUCED_PRECISION_TOLERANCE.get(precision)
    if rule is None:
        return bool(report["passed"])
    return all(report[key] >= floor for key, floor in rule.items())


def validate_engine(
    plan: Union[str, Path],
    data_dir: Union[str, Path, None] = None,
    samples: Optional[int] = None,
    batch: Optional[int] = None,
    seed: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> dict:
    """Run ``plan`` in TensorRT and its rebuilt PyTorch source on CUDA, on the same inputs."""
    from mame_deploy import validate as checks
    from mame_deploy.runners import TorchRunner
    from mame_deploy.trt_runner import TrtRunner

    plan = Path(plan)
    runner = TrtRunner(plan)  # fails first, in one line, where TensorRT is missing
    record = read_engine_manifest(plan)
    engine = record["engine"]
    source = manifests.source_from_manifest(record)
    model = sources.build_model(source, record["schedule"])
    cfg = model.config
    if data_dir is not None:
        batches = checks.folder_images(data_dir, source.model, cfg, samples)
    else:
        batches = checks.random_images(cfg, samples or checks.DEFAULT_SAMPLES, seed)
    size = engine_batch(engine, batch, len(batches))
    # Engines keep no decision outputs: every sample is held to the rule (see validate.compare).
    trt_logits = checks.run(runner, batches, size, progress)[checks.OUTPUT_NAME]
    torch_logits = checks.run(TorchRunner(model, "cuda"), batches, size, progress)[checks.OUTPUT_NAME]
    report = {
        "engine": str(plan),
        "precision": engine["precision"],
        "tensorrt": engine["tensorrt"],
        "gpu": engine["gpu"],
        "model": source.model,
        "method": source.method,
        "ratio": source.ratio,
        "tokens_per_layer": record["tokens_per_layer"],
        "batch": size,
        "data": str(data_dir) if data_dir is not None else f"random normal images, seed {seed}",
        **checks.compare(trt_logits, torch_logits, batches.labels),
    }
    report["passed"] = passed(report, engine["precision"])
    report["tolerance"] = REDUCED_PRECISION_TOLERANCE.get(engine["precision"], {"max_rel_err": checks.REL_TOLERANCE})
    return report


# ---------------------------------------------------------------------------------------------
# bench


def engine_target(plan: Union[str, Path], baseline: bool = False):
    """The bench target of one .plan file."""
    from mame_deploy.bench import Target, is_merged
    from mame_deploy.trt_runner import TrtRunner

    plan = Path(plan)
    record = read_engine_manifest(plan)
    source = manifests.source_from_manifest(record)
    engine = record["engine"]
    channels, height, width = record["input_shape"][1:]
    return Target(
        label=f"{plan.name} ({engine['precision']})" + (" (unmerged)" if baseline else ""),
        backend="tensorrt", model=source.model, ratio=source.ratio, merged=is_merged(source),
        tokens_per_layer=record["tokens_per_layer"], relative_gflops=float(record["relative_gflops"]),
        fixed_batch=engine["batch"] if isinstance(engine["batch"], int) else None,
        input_shape=(channels, height, width), make_runner=lambda: TrtRunner(plan),
    )




def engine_targets(
    plan: Union[str, Path],
    scratch: Union[str, Path],
    baseline: bool = True,
    compare_torch: bool = True,
    status: Callable[[str], object] = lambda message: None,
) -> list:
    """The engine; with ``baseline`` the unmerged engine (exported and built in ``scratch`` with
    the same settings); with ``compare_torch`` PyTorch eager and CUDA graph, merged and unmerged."""
    from mame_deploy.bench import export_unmerged_baseline, torch_target, unmerged
    from mame_deploy.engine import build_engine

    plan = Path(plan)
    target = engine_target(plan)
    record = read_engine_manifest(plan)
    engine = record["engine"]
    source = manifests.source_from_manifest(record)
    fixed = target.fixed_batch
    targets = [target]
    if baseline and target.merged:
        status(f"exporting and building the unmerged baseline of {plan}")
        base_onnx = export_unmerged_baseline(plan, scratch)  # reads the export settings from the plan's manifest
        profile = engine["batch"]
        dynamic = {} if isinstance(profile, int) else {"max_batch": profile["max"], "opt_batch": profile["opt"]}
        base_plan = build_engine(base_onnx, precision=engine["precision"], workspace=engine["workspace_bytes"],
                                 force=True, **dynamic)
        targets.append(engine_target(base_plan, baseline=True))
    if compare_torch:
        schedule = record["schedule"]
        for cuda_graph in (False, True):
            targets.append(torch_target(source, "cuda", None, schedule, fixed, cuda_graph=cuda_graph))
        if baseline and target.merged:
            for cuda_graph in (False, True):
                targets.append(torch_target(unmerged(source), "cuda", None, fixed_batch=fixed, cuda_graph=cuda_graph))
    return targets
