"""The TensorRT face of the selective scan: ``mame::SelectiveScan`` as a ``tensorrt.plugin``.

TensorRT's Python plugin API (TensorRT >= 10.9) lets a plugin hand the builder a kernel ahead of
time: ``aot_impl`` returns PTX, a kernel name, launch parameters and the kernel's scalar
arguments, all as functions of the (symbolic) input shapes. The builder embeds the PTX in the
engine, so the engine later runs without Python. The PTX is the one kernel source
(``selective_scan.cu``) compiled by NVRTC through ``launch.compile_ptx``, and the launch
parameters come from ``launch.launch_params`` -- the very functions the PyTorch path and the GPU
tests use, so what TensorRT launches is what was tested.

TensorRT's AOT convention for kernel arguments is: input tensors in the order the plugin declares
them, then the scalar ``extra_args``, then the output tensors (``out``, ``dt_sums``). ``launch.KERNEL_ARGS`` spells
the kernel's signature; ``kernel_scalars`` checks it against that convention. Names, inputs,
attributes, dtypes and version come from the operator's contract
(``mame_deploy/ops/selective_scan/contract.py``).

:func:`aot_kernel` is the plugin's whole computation with plain Python values; it needs neither
TensorRT nor a GPU, so tests call it with ints exactly as the plugin calls it with shape
expressions. :func:`register_plugin` binds it (and a debugging JIT implementation) to TensorRT.

No ``from __future__ import annotations`` here: ``tensorrt.plugin`` inspects the decorated
functions' annotations as classes, and postponed (string) annotations would fail its checks.
"""

from typing import Any, List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

from mame_deploy.errors import UserError
from mame_deploy.ops.selective_scan.contract import (
    ATTRIBUTES, DTYPES as KERNEL_DTYPES, FLOAT32_INPUTS, INPUT_NAMES, ONNX_DOMAIN as PLUGIN_NAMESPACE,
    ONNX_OP_TYPE as PLUGIN_NAME, DT_SUMS_NAME, OUTPUT_NAMES, PLUGIN_ID, PLUGIN_VERSION, RANKS, dt_groups,
)
from mame_deploy.plugins import launch
from mame_deploy.plugins.trt_aot import AotKernel, Registration, aot_result, constant_dim, static_dim

# The node's attributes (contract.ATTRIBUTES, in that order: TensorRT passes them so) are declared
# as one-element int32 arrays, not ``int``: TensorRT hands attributes over as 1-D arrays and
# ``int(array)`` of a 1-D array is an error in NumPy 2; the ONNX parser turns an INT attribute
# into exactly such an int32 field.
Flag = npt.NDArray[np.int32]


def kernel_scalars(batch, dim, length, dstate) -> Tuple[Any, ...]:
    """The int32 arguments between the input tensors and the outputs, in kernel order.

    Reads ``launch.KERNEL_ARGS`` and checks it follows TensorRT's AOT convention (the plugin's
    inputs, then scalars, then the outputs), so a change of the kernel signature fails here with
    a message rather than as a wrong launch inside an engine.
    """
    kernel_args = tuple(launch.KERNEL_ARGS)
    n_in, n_out = len(INPUT_NAMES), len(OUTPUT_NAMES)
    if kernel_args[:n_in] != INPUT_NAMES or kernel_args[-n_out:] != OUTPUT_NAMES:
        raise RuntimeError(
            f"launch.KERNEL_ARGS {kernel_args} does not follow TensorRT's AOT order "
            f"{INPUT_NAMES} + scalars + {OUTPUT_NAMES}"
        )
    values = {"batch": batch, "dim": dim, "length": length, "dstate": dstate}
    unknown = [name for name in kernel_args[n_in:-n_out] if name not in values]
    if unknown:
        raise RuntimeError(f"launch.KERNEL_ARGS has scalars the plugin cannot supply: {unknown}")
    return tuple(values[name] for name in kernel_args[n_in:-n_out])


def _triple(value) -> Tuple[Any, Any, Any]:
    if isinstance(value, (tuple, list)):
        padded = tuple(value) + (1,) * (3 - len(value))
        return padded[:3]
    return (value, 1, 1)


def aot_kernel(
    dtype: str,
    batch,
    dim,
    length,
    dstate: int,
    delta_softplus: bool,
    reverse: bool,
    arch: Optional[str] = None,
    tactic: int = 0,
) -> AotKernel:
    """PTX, kernel name, launch configuration and scalar arguments for one scan node.

    ``batch``, ``dim`` and ``length`` may be ints or TensorRT shape expressions (only +, -, *
    and // are applied to them); ``dstate`` must be an int because it selects the compiled
    variant. The kernel's work split (``launch.tuning_for``) depends on the channel count when
    it is known: a static engine gets the split for its batch and length, a dynamic-batch engine the
    default one; PTX and launch parameters always come from the same split. ``tactic`` k >= 1
    picks ``SCAN_TACTICS[k - 1]`` instead (the splits TensorRT times, see ``_formats``).
    """
    if dtype not in KERNEL_DTYPES:
        raise UserError(f"the selective-scan kernel has no {dtype} variant; use one of {KERNEL_DTYPES}")
    tuning = launch.tuning_for(batch, dim, length) if tactic == 0 else scan_tactics()[tactic - 1]
    ptx, name = launch.compile_ptx(dtype, int(dstate), bool(delta_softplus), bool(reverse), arch, tuning)
    params = launch.launch_params(batch, dim, length, int(dstate), dtype, tuning)
    return AotKernel(
        name=name,
        ptx=ptx,
        grid=_triple(params.grid),
        block=_triple(params.block),
        shared_mem=params.shared_mem,
        scalars=kernel_scalars(batch, dim, length, int(dstate)),
    )


def scan_tactics():
    """The work splits offered to TensorRT as tactics 1, 2, ... (any batch; the segmented ones
    need a known small batch, which tactic 0 gives a static engine): TensorRT times them at the
    profile's optimum batch and bakes the fastest into the engine."""
    return (launch.DEFAULT_TUNING, launch.MEDIUM_BATCH_TUNING, launch.SMALL_BATCH_TUNING)


# ---------------------------------------------------------------------------------------------
# Binding to TensorRT. Everything below runs only where ``import tensorrt`` works.


def _dtype_names(trt):
    return {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}


def _flag(value) -> bool:
    return bool(np.asarray(value).reshape(-1)[0])


def register_plugin(jit: bool = False) -> None:
    """Register ``mame::SelectiveScan`` with TensorRT (idempotent within a process).

    ``jit=True`` also binds a Python implementation (the PyTorch reference on TensorRT's stream)
    for debugging a plugin engine against the AOT kernel; engines that use it need Python and a
    CUDA build of PyTorch at run time. Which implementation a parsed node uses is chosen per node
    by its ``aot`` attribute (see ``mame_deploy.engine.prepare_onnx``).
    """
    _registration.register(jit)


def _bind_aot() -> None:
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtype_names = _dtype_names(trt)
    Desc = trtp.TensorDesc

    @trtp.register(PLUGIN_ID)
    def _describe(
        u: Desc, delta: Desc, A: Desc, B: Desc, C: Desc, D: Desc, z: Desc, delta_bias: Desc,
        delta_softplus: Flag, reverse: Flag,
    ) -> Tuple[Desc, Desc]:
        descs = dict(zip(INPUT_NAMES, (u, delta, A, B, C, D, z, delta_bias)))
        for name, desc in descs.items():
            expected = trt.float32 if name in FLOAT32_INPUTS else u.dtype
            if desc.dtype != expected:
                raise ValueError(f"SelectiveScan input {name} is {desc.dtype}, expected {expected}")
        if u.dtype not in dtype_names:
            raise ValueError(f"SelectiveScan has no kernel for {u.dtype}")
        for name, rank in RANKS.items():
            if len(descs[name].shape_expr) != rank:
                raise ValueError(f"SelectiveScan input {name} must have rank {rank}")
        batch, dim, length = (u.shape_expr[i] for i in range(3))
        return u.like(), trtp.from_shape_expr((batch, dt_groups(dim), length), dtype=trt.float32)

    @trtp.autotune(PLUGIN_ID)
    def _formats(
        u: Desc, delta: Desc, A: Desc, B: Desc, C: Desc, D: Desc, z: Desc, delta_bias: Desc,
        outputs: Tuple[Desc],
    ) -> List[trtp.AutoTuneCombination]:
        # u, delta, B, C, z and out share one dtype ("|": chosen together); A, D, delta_bias
        # and dt_sums are always float32. Linear (contiguous) layouts only.
        shared = "FP32|FP16|BF16"
        float32 = FLOAT32_INPUTS + (DT_SUMS_NAME,)
        types = ", ".join("FP32" if n in float32 else shared for n in INPUT_NAMES + OUTPUT_NAMES)
        # Each work split is a tactic, so a dynamic-batch engine gets the fastest at its optimum.
        return [trtp.AutoTuneCombination(types, "LINEAR", list(range(1, len(scan_tactics()) + 1)))]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(
        u: Desc, delta: Desc, A: Desc, B: Desc, C: Desc, D: Desc, z: Desc, delta_bias: Desc,
        delta_softplus: Flag, reverse: Flag, outputs: Tuple[Desc], tactic: int,
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
        # Static sizes as ints: they pick the kernel's work split (see aot_kernel).
        batch, dim, length = (static_dim(u.shape_expr[i]) for i in range(3))
        dstate = constant_dim(A.shape_expr[1], "SelectiveScan", "d_state (A's second axis)")
        kernel = aot_kernel(
            dtype_names[u.dtype], batch, dim, length, dstate, _flag(delta_softplus), _flag(reverse),
            tactic=int(tactic),
        )
        return aot_result(trtp, kernel)


def _bind_jit() -> None:
    import tensorrt.plugin as trtp

    Tensor = trtp.Tensor

    @trtp.impl(PLUGIN_ID)
    def _run(
        u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
        delta_bias: Tensor, delta_softplus: Flag, reverse: Flag, outputs: Tuple[Tensor], stream: int,
    ) -> None:
        import torch

        from mame_deploy.ops.selective_scan.reference import scan_ref_outputs

        # TensorRT's buffers through __cuda_array_interface__ (it has no bfloat16: build --jit
        # refuses bf16), made and used on TensorRT's stream, as NVIDIA's sample does.
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in (u, delta, A, B, C, D, z, delta_bias)]
            for out, value in zip(outputs, scan_ref_outputs(*args, _flag(delta_softplus), _flag(reverse))):
                torch.as_tensor(out, device="cuda").copy_(value)


# Bound to TensorRT once per process, by register_plugin.
_registration = Registration(_bind_aot, _bind_jit)
