"""ONNX export of (MaMe-patched) Vision Mamba models, every scan one ``mame::SelectiveScan`` node.

``to_onnx`` turns a model into a checked ModelProto: ``torch.onnx.export(..., dynamo=True)``
(each operator emits its ``mame`` node while exporting, see ``mame_deploy/ops/*/op.py``), then
the operators' ONNX functions are attached (``scan="plugin"``) or inlined (``scan="inline"``) and
``onnx.checker`` runs with ``full_check``. ``export`` adds the files: NAME.onnx and the manifest
NAME.json, both written atomically. TensorRT engines are built from such a file by
``mame_deploy.engine``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import onnx
import torch

from mame_deploy import artifacts, manifest as manifests, memory, source as sources
from mame_deploy.errors import UserError
from mame_deploy.flops import gflops, relative_gflops
from mame_deploy.manifest import INPUT_NAME, OUTPUT_NAME, SCAN_MODES, Source
from mame_deploy.ops import onnx_functions
from mame_deploy.ops.onnx_functions import OPSETS

BATCH_DIM = "batch"
DEFAULT_OPSET = 20
# The scan function needs opset 18; torch's exporter and onnxruntime 1.2x/1.3x go up to 23.
# ONNX Conv takes bfloat16 from opset 22 on (Conv-22), so a bf16 export defaults to 22.
BF16_MIN_OPSET = 22


@dataclass(frozen=True)
class ExportResult:
    onnx_path: Path
    manifest_path: Path
    manifest: dict
    onnx_bytes: int
    engine_path: Optional[Path] = None


# ---------------------------------------------------------------------------------------------
# Model -> ModelProto


def resolve_opset(opset: Optional[int], dtype: str = "fp32") -> int:
    """The opset to export at: ``opset``, or the default for ``dtype`` (None)."""
    if opset is None:
        return BF16_MIN_OPSET if dtype == "bf16" else DEFAULT_OPSET
    return opset


def check_options(batch: Optional[int], opset: Optional[int], scan: str, dtype: str = "fp32") -> None:
    if batch is not None and batch < 1:
        raise UserError(f"`batch` must be at least 1, got {batch}")
    sources.check_dtype(dtype)
    opset = resolve_opset(opset, dtype)
    if opset not in OPSETS:
        raise UserError(f"`opset` {opset} is not supported; use {OPSETS.start}..{OPSETS.stop - 1} "
                        f"(default {DEFAULT_OPSET})")
    if scan not in SCAN_MODES:
        raise UserError(f"`scan` must be one of {', '.join(SCAN_MODES)}, got {scan!r}")
    if dtype == "bf16" and opset < BF16_MIN_OPSET:
        raise UserError(f"`dtype` bf16 needs `opset` {BF16_MIN_OPSET} or later (ONNX Conv takes bfloat16 from "
                        f"opset 22), got {opset}; drop `opset` or pass {BF16_MIN_OPSET}")


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter prints progress, deprecation warnings and notes about torchvision ops."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        registration.setLevel(level)


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node metadata (stack traces with this checkout's paths, module
    names): no runtime reads it, and without it the file depends only on the model."""
    graph = model.graph
    for node in graph.node:
        del node.metadata_props[:]
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del value.metadata_props[:]
    del graph.metadata_props[:]


def _tidy(model) -> None:
    """Fold constants (shape arithmetic, A = -exp(A_log)), drop dead nodes, merge duplicates.

    This is onnxscript's optimizer (what ``optimize=True`` runs) without its pattern-rewrite
    pass, which matched every node against every rule and took ~40% of a merged model's export
    time for node-count savings under 5% that onnxruntime and TensorRT make themselves anyway.
    """
    import onnx_ir
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    for _ in range(2):  # folding can expose more folding
        onnxscript.optimizer.fold_constants(model)
        onnxscript.optimizer.remove_unused_nodes(model)
    onnx_ir.passes.Sequential(
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.DeduplicateInitializersPass(),
        passes.CommonSubexpressionEliminationPass(),
        passes.RemoveUnusedNodesPass(),
        passes.RemoveUnusedOpsetsPass(),
        passes.NameFixPass(),
    )(model)


def to_onnx(model: torch.nn.Module, batch: Optional[int] = 1, opset: Optional[int] = None,
            scan: str = "plugin", dtype: str = "fp32") -> onnx.ModelProto:
    """Export ``model`` for ``batch`` images (None: a symbolic batch axis, nothing else dynamic).

    ``dtype`` fp16 / bf16: the model is converted in place (``source.in_dtype``) and the file
    runs in that type, taking float32 images and giving float32 logits (Casts at both ends).
    """
    check_options(batch, opset, scan, dtype)
    opset = resolve_opset(opset, dtype)
    model = sources.in_dtype(model, dtype)
    cfg = model.config
    # torch.export specialises size-1 dims, so a dynamic batch is traced with 2 images. The
    # example is float32 whatever ``dtype``: the model casts it (PatchEmbed), so the graph's
    # input stays float32 (a half example into a float32 graph input would be refused too).
    example = torch.zeros(batch or 2, cfg.in_chans, cfg.img_size, cfg.img_size)
    dynamic = None if batch else {INPUT_NAME: {0: torch.export.Dim(BATCH_DIM)}}
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            model.eval(), (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamic_shapes=dynamic, optimize=False, verbose=False,
        )
    _tidy(program.model)
    proto = program.model_proto
    _strip_metadata(proto)
    onnx_functions.attach_functions(proto)
    if scan == "inline":
        proto = onnx_functions.inline_functions(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def serialize(proto: onnx.ModelProto) -> bytes:
    return proto.SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------------------------
# Files


def default_output(model_name: str) -> Path:
    return Path(f"{model_name}.onnx")


def output_paths(model_name: str, output: Union[str, Path, None] = None) -> tuple[Path, Path]:
    """The ONNX file (``output``, default ./MODEL.onnx) and its manifest beside it."""
    onnx_path = Path(output) if output is not None else default_output(model_name)
    if onnx_path.suffix != ".onnx":
        raise UserError(f"`output` {onnx_path} must end in .onnx (the manifest is written beside it as .json)")
    return onnx_path, manifests.manifest_path(onnx_path)


def export(
    source: Source,
    output: Union[str, Path, None] = None,
    batch: Optional[int] = 1,
    opset: Optional[int] = None,  # default: DEFAULT_OPSET, BF16_MIN_OPSET for bf16
    scan: str = "plugin",
    dtype: str = "fp32",          # the precision the model runs in inside the file (manifest "dtype")
    tuned: Optional[dict] = None,  # mame_deploy.tune.apply_tuned's record, kept as "tuned"
    force: bool = False,
    status: Callable[[str], object] = lambda message: None,
) -> ExportResult:
    """Export ``source`` to ``output`` (default ./MODEL.onnx) and write the manifest beside it.

    Everything that can be refused (options, existing or unwritable outputs, the checkpoint, a
    batch whose example input does not fit in memory) is checked before the export starts;
    ``status`` hears each stage. The pair is published together (``artifacts.write_files``):
    without ``force`` an output that appeared meanwhile is an error, never replaced.
    """
    check_options(batch, opset, scan, dtype)
    opset = resolve_opset(opset, dtype)
    onnx_path, json_path = output_paths(source.model, output)
    artifacts.check_writable([onnx_path, json_path], force)
    memory.check_export(sources.model_config(source), batch, source.model)

    source = sources.resolve_checkpoint(source)
    status(f"building the PyTorch model ({source.model}, "
           f"{'seeded random weights' if source.checkpoint is None else Path(source.checkpoint).name})")
    model = sources.build_model(source)
    # Record the merge switches as resolved (defaults included), so a later default change
    # cannot alter what validate/bench rebuild.
    source = replace(source, options=dict(getattr(model, "mame_options", None) or source.options))
    status(f"exporting {source.model} to ONNX in {dtype} (torch.onnx.export with dynamo, then folding and checking "
           "the graph)")
    data = serialize(to_onnx(model, batch, opset, scan, dtype))
    schedule = sources.model_schedule(model)
    tokens = sources.tokens_per_layer(model)
    cfg = model.config
    record = {
        "manifest_version": manifests.MANIFEST_VERSION,
        **source.as_dict(),
        "schedule": schedule,
        "tokens_per_layer": tokens,
        "gflops": round(gflops(cfg, tokens), 6),
        "relative_gflops": round(relative_gflops(cfg, tokens), 6),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": [batch or BATCH_DIM, cfg.in_chans, cfg.img_size, cfg.img_size],
        "batch": batch,
        "dynamic_batch": batch is None,
        "num_classes": cfg.num_classes,
        "opset": opset,
        "dtype": dtype,
        "scan": scan,
        "scan_nodes": 2 * cfg.depth if scan == "plugin" else 0,
        "onnx_file": onnx_path.name,
        "onnx_sha256": artifacts.sha256_bytes(data),
        "versions": manifests.tool_versions(),
        **({"tuned": tuned} if tuned else {}),
    }
    status(f"writing {onnx_path} and {json_path}")
    artifacts.write_files([(onnx_path, data), (json_path, artifacts.json_bytes(record))], force)
    return ExportResult(onnx_path, json_path, record, len(data))
