"""The TensorRT face of the token merge: ``mame::TokenMerge`` as a ``tensorrt.plugin``.

As for the scan (``trt_plugin.py``): ``aot_impl`` hands the builder the PTX NVRTC compiles from
the one kernel source (``token_merge.cu``) and the launch parameters of ``merge_launch``, so the
engine runs without Python. Arguments follow TensorRT's AOT order: the seven inputs as the plugin
declares them (the ONNX node's order), the int32 ``extra_args`` (batch, length, dim, the two
scores' parts and the node's attributes, the floats as their float32 bits), the five outputs
(``merge_launch.KERNEL_ARGS``).

Tactics: every work split of ``merge_launch.PORTABLE_TUNINGS`` is offered as a tactic (1, 2,
...), so TensorRT times them for the engine's shapes (a dynamic-batch engine at its profile's
optimum) and bakes the fastest into the engine; they compute the same bits. Tactic 0 (TensorRT's
default when it does not time) is the portable split ``merge_launch.tuning_for`` gives a static
batch. The 16-block split the PyTorch launcher uses at batch 1..4 is not offered: a cluster above
8 blocks needs a function attribute set before the launch, which TensorRT's AOT launch cannot do.

:func:`aot_kernel` is the plugin's whole computation with plain values: tests call it with ints
or shape stand-ins, as the plugin calls it with TensorRT's shape expressions.

No ``from __future__ import annotations``: ``tensorrt.plugin`` inspects the annotations as classes.
"""

from typing import Any, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

from mame_deploy.errors import UserError
from mame_deploy.ops.token_merge.contract import (
    DTYPES as KERNEL_DTYPES, INPUT_NAMES, INT_ATTRIBUTES, OUTPUT_NAMES, PLUGIN_ID, PLUGIN_VERSION, MergeAttributes,
)
from mame_deploy.plugins import merge_launch as launch
from mame_deploy.plugins.trt_aot import AotKernel, Registration, aot_result, constant_dim, static_dim

IntAttr = npt.NDArray[np.int32]  # TensorRT hands attributes over as 1-D arrays (see trt_plugin.py)
FloatAttr = npt.NDArray[np.float32]
FIXED_TRT_TYPES = {"score": "FP32", "score_b": "FP32", "size": "FP32", "origin": "INT64", "cls": "INT64",
                   "size_out": "FP32", "origin_out": "INT64", "cls_out": "INT64"}


def tactics() -> Tuple[int, ...]:
    """The custom tactics offered to TensorRT: one per work split."""
    return tuple(range(1, len(launch.PORTABLE_TUNINGS) + 1))


def tuning_of(tactic: int, batch):
    """The work split of ``tactic`` (0: the one ``tuning_for`` gives ``batch``)."""
    if tactic == 0:
        return launch.tuning_for(batch, portable=True)
    if not 1 <= tactic <= len(launch.PORTABLE_TUNINGS):
        raise ValueError(f"TokenMerge has no tactic {tactic}")
    return launch.PORTABLE_TUNINGS[tactic - 1]


def kernel_scalars(batch, length, dim, parts, parts_b, attrs: MergeAttributes) -> Tuple[Any, ...]:
    """The int32 arguments between the inputs and the outputs, in kernel order; checks that
    ``merge_launch.KERNEL_ARGS`` follows TensorRT's AOT convention."""
    args = tuple(launch.KERNEL_ARGS)
    n_in, n_out = len(INPUT_NAMES), len(OUTPUT_NAMES)
    if args[:n_in] != INPUT_NAMES or args[-n_out:] != OUTPUT_NAMES:
        raise RuntimeError(f"merge_launch.KERNEL_ARGS {args} does not follow TensorRT's AOT order "
                           f"{INPUT_NAMES} + scalars + {OUTPUT_NAMES}")
    values = {"batch": batch, "length": length, "dim": dim, "parts": parts, "parts_b": parts_b,
              **launch.attribute_scalars(attrs)}
    unknown = [name for name in args[n_in:-n_out] if name not in values]
    if unknown:
        raise RuntimeError(f"merge_launch.KERNEL_ARGS has scalars the plugin cannot supply: {unknown}")
    return tuple(values[name] for name in args[n_in:-n_out])


def aot_kernel(hidden_dtype: str, residual_dtype: str, batch, length: int, dim: int, parts: int, parts_b: int,
               attrs: MergeAttributes, tactic: int = 0, arch: Optional[str] = None) -> AotKernel:
    """PTX, kernel name, launch configuration and scalars for one TokenMerge node.

    ``batch`` may be an int or a TensorRT shape expression (only ``*`` with an int is applied
    to it); ``length``, ``dim``, ``parts`` and ``parts_b`` (the scores' second dimension) must be ints (the
    decision arrays' capacity is compiled in, and the contract's shapes are static but for the
    batch). ``tactic`` picks the work split.
    """
    if hidden_dtype not in KERNEL_DTYPES:
        raise UserError(f"the token-merge kernel has no {hidden_dtype} variant; use one of {KERNEL_DTYPES}")
    launch.check_shape(length, dim, attrs.r, parts, parts_b)
    tuning = tuning_of(tactic, batch)
    variant = launch.Variant.of(hidden_dtype, residual_dtype, length)
    ptx, name = launch.compile_ptx(variant, tuning, arch)
    params = launch.launch_params(batch, tuning)
    return AotKernel(name=name, ptx=ptx, grid=tuple(params.grid), block=tuple(params.block),
                     shared_mem=params.shared_mem, scalars=kernel_scalars(batch, length, dim, parts, parts_b, attrs))


def attributes_of(r, prune, split, arrangement, weighting, metric, lam, score_scale) -> MergeAttributes:
    """The node's attributes as TensorRT passes them (one-element arrays) -> MergeAttributes."""
    def one(v):
        return np.asarray(v).reshape(-1)[0]

    ints = [int(one(v)) for v in (r, prune, split, arrangement, weighting, metric)]
    return MergeAttributes(*ints, float(np.float32(one(lam))), float(np.float32(one(score_scale))))


def io_type_combinations() -> List[str]:
    """The I/O type strings of ``autotune``: hidden and hidden_out share one type; residual and
    residual_out are that type too, or float32 with a half-precision hidden."""
    def row(hidden: str, residual: str) -> str:
        types = {"hidden": hidden, "hidden_out": hidden, "residual": residual, "residual_out": residual,
                 **FIXED_TRT_TYPES}
        return ", ".join(types[name] for name in INPUT_NAMES + OUTPUT_NAMES)

    return [row("FP32|FP16|BF16", "FP32|FP16|BF16"), row("FP16|BF16", "FP32")]


# ---------------------------------------------------------------------------------------------
# Binding to TensorRT. Everything below runs only where ``import tensorrt`` works.


def register_plugin(jit: bool = False) -> None:
    """Register ``mame::TokenMerge`` with TensorRT (idempotent within a process); ``jit=True``
    also binds the Python implementation (the reference, for debugging; needs PyTorch)."""
    _registration.register(jit)


def _bind_aot() -> None:
    import tensorrt as trt
    import tensorrt.plugin as trtp

    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
    Desc = trtp.TensorDesc

    @trtp.register(PLUGIN_ID)
    def _describe(hidden: Desc, residual: Desc, score: Desc, score_b: Desc, size: Desc, origin: Desc, cls: Desc,
                  r: IntAttr, prune: IntAttr, split: IntAttr, arrangement: IntAttr, weighting: IntAttr,
                  metric: IntAttr, lam: FloatAttr, score_scale: FloatAttr) -> Tuple[Desc, Desc, Desc, Desc, Desc]:
        attrs = attributes_of(r, prune, split, arrangement, weighting, metric, lam, score_scale)
        if hidden.dtype not in names or residual.dtype not in (trt.float32, hidden.dtype):
            raise ValueError(f"TokenMerge has no kernel for hidden {hidden.dtype} with residual {residual.dtype}")
        for name, desc, want in (("score", score, trt.float32), ("score_b", score_b, trt.float32),
                                 ("size", size, trt.float32),
                                 ("origin", origin, trt.int64), ("cls", cls, trt.int64)):
            if desc.dtype != want:
                raise ValueError(f"TokenMerge input {name} is {desc.dtype}, expected {want}")
        B, L, E = hidden.shape_expr[0], hidden.shape_expr[1], hidden.shape_expr[2]
        out = L - attrs.r
        return (trtp.from_shape_expr((B, out, E), dtype=hidden.dtype),
                trtp.from_shape_expr((B, out, E), dtype=residual.dtype),
                trtp.from_shape_expr((B, out), dtype=trt.float32),
                trtp.from_shape_expr((B, out), dtype=trt.int64),
                trtp.from_shape_expr((B,), dtype=trt.int64))

    @trtp.autotune(PLUGIN_ID)
    def _formats(hidden: Desc, residual: Desc, score: Desc, score_b: Desc, size: Desc, origin: Desc, cls: Desc,
                 outputs: Tuple[Desc]) -> List[trtp.AutoTuneCombination]:
        # Linear layouts only; each work split is a tactic TensorRT times.
        return [trtp.AutoTuneCombination(types, "LINEAR", list(tactics())) for types in io_type_combinations()]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(hidden: Desc, residual: Desc, score: Desc, score_b: Desc, size: Desc, origin: Desc, cls: Desc,
             r: IntAttr, prune: IntAttr, split: IntAttr, arrangement: IntAttr, weighting: IntAttr,
             metric: IntAttr, lam: FloatAttr, score_scale: FloatAttr, outputs: Tuple[Desc], tactic: int,
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        attrs = attributes_of(r, prune, split, arrangement, weighting, metric, lam, score_scale)
        batch = static_dim(hidden.shape_expr[0])
        length = constant_dim(hidden.shape_expr[1], "TokenMerge", "sequence length")
        dim = constant_dim(hidden.shape_expr[2], "TokenMerge", "channel count")
        parts = constant_dim(score.shape_expr[1], "TokenMerge", "score parts")
        parts_b = constant_dim(score_b.shape_expr[1], "TokenMerge", "score_b parts")
        kernel = aot_kernel(names[hidden.dtype], names[residual.dtype], batch, length, dim, parts, parts_b, attrs,
                            int(tactic))
        return aot_result(trtp, kernel)


def _bind_jit() -> None:
    import tensorrt.plugin as trtp

    Tensor = trtp.Tensor

    @trtp.impl(PLUGIN_ID)
    def _run(hidden: Tensor, residual: Tensor, score: Tensor, score_b: Tensor, size: Tensor, origin: Tensor,
             cls: Tensor, r: IntAttr, prune: IntAttr, split: IntAttr, arrangement: IntAttr, weighting: IntAttr,
             metric: IntAttr, lam: FloatAttr, score_scale: FloatAttr, outputs: Tuple[Tensor], stream: int) -> None:
        import torch

        from mame_deploy.ops.token_merge.reference import token_merge_ref

        attrs = attributes_of(r, prune, split, arrangement, weighting, metric, lam, score_scale)
        # TensorRT's buffers through __cuda_array_interface__ (no bfloat16 there: build --jit
        # refuses bf16), made and used on TensorRT's stream, as NVIDIA's sample does.
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in (hidden, residual, score, score_b, size, origin, cls)]
            for out, value in zip(outputs, token_merge_ref(*args, attrs)):
                torch.as_tensor(out, device="cuda").copy_(value)


PLUGIN_NAMESPACE, PLUGIN_NAME = PLUGIN_ID.split("::")


# Bound to TensorRT once per process, by register_plugin.
_registration = Registration(_bind_aot, _bind_jit)

__all__ = ["AotKernel", "INT_ATTRIBUTES", "PLUGIN_VERSION", "aot_kernel", "register_plugin", "tactics"]
