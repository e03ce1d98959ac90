"""The token-merge CUDA kernel on PyTorch tensors, and its registration as the CUDA
implementation of ``torch.ops.mame.token_merge``.

The kernel is ``plugins/token_merge.cu``, compiled by NVRTC through
``mame_deploy.plugins.merge_launch`` (the functions the TensorRT plugin calls too), loaded with
cuda-python (``mame_deploy.ops.cuda_driver``) and launched on PyTorch's current stream, so CUDA
graphs capture it. Importing this module touches neither CUDA nor cuda-python; nothing is
registered until :func:`register_cuda` is called.
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from mame_deploy.errors import UserError
from mame_deploy.ops import cuda_driver
from mame_deploy.plugins import merge_launch

from .contract import TORCH_NAME, MergeAttributes, check_length, output_length
from .reference import token_merge_ref

TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _kernel(device: torch.device, variant: merge_launch.Variant, tuning: merge_launch.Tuning):
    def compile_variant():
        major, minor = torch.cuda.get_device_capability(device)
        return merge_launch.compile_ptx(variant, tuning, f"sm_{major}{minor}")

    prepare = None if tuning.portable else cuda_driver.allow_large_clusters
    return cuda_driver.load(("token_merge", device.index, variant, tuning), device.index, compile_variant, prepare)


@functools.lru_cache(maxsize=None)
def _cluster_fits(device_index: int, variant: merge_launch.Variant, tuning: merge_launch.Tuning) -> bool:
    """Whether one cluster of ``tuning`` can be placed on the device at all."""
    kernel = _kernel(torch.device("cuda", device_index), variant, tuning)
    params = merge_launch.launch_params(1, tuning)
    return cuda_driver.max_active_clusters(kernel, tuning.cluster, params.block, params.shared_mem) > 0


def default_tuning(device: torch.device, variant: merge_launch.Variant, batch: int) -> merge_launch.Tuning:
    """``merge_launch.tuning_for(batch)``, or its portable choice where the device cannot place a
    cluster of more than 8 blocks."""
    tuning = merge_launch.tuning_for(batch)
    if tuning.portable or _cluster_fits(device.index, variant, tuning):
        return tuning
    return merge_launch.tuning_for(batch, portable=True)


def unsupported(hidden: Tensor, residual: Tensor, score: Tensor, score_b: Tensor,
                attrs: MergeAttributes) -> Optional[str]:
    """Why the kernel cannot run these inputs (the op then runs the reference), or None."""
    if hidden.dtype not in TORCH_DTYPES:
        return f"no kernel for hidden in {hidden.dtype}"
    if residual.dtype not in (torch.float32, hidden.dtype):
        return f"no kernel for a {residual.dtype} residual with {hidden.dtype} hidden"
    if hidden.dim() != 3 or score.dim() != 3 or score_b.dim() != 3:
        return "hidden must be (batch, length, dim), score and score_b (batch, parts, length)"
    _, length, dim = hidden.shape
    try:
        merge_launch.check_shape(length, dim, attrs.r, score.shape[1], score_b.shape[1])
    except UserError as exc:
        return str(exc)
    return None


def _check_inputs(hidden, residual, score, score_b, size, origin, cls) -> tuple[int, int, int]:
    if hidden.dim() != 3:
        raise UserError(f"token merge: hidden must be (batch, length, dim), got shape {tuple(hidden.shape)}")
    B, L, E = hidden.shape
    for name, t in (("score", score), ("score_b", score_b)):
        if t.dim() != 3:
            raise UserError(f"token merge: {name} must be (batch, parts, length), got shape {tuple(t.shape)}")
    expected = {"residual": (residual, (B, L, E)), "score": (score, (B, score.shape[1], L)),
                "score_b": (score_b, (B, score_b.shape[1], L)), "size": (size, (B, L)),
                "origin": (origin, (B, L)), "cls": (cls, (B,))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise UserError(f"token merge: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != hidden.device:
            raise UserError(f"token merge: {name} is on {t.device}, hidden on {hidden.device}; move them to one GPU")
    return B, L, E


def token_merge_cuda(hidden: Tensor, residual: Tensor, score: Tensor, score_b: Tensor, size: Tensor,
                     origin: Tensor, cls: Tensor, attrs: MergeAttributes, tuning: Optional[merge_launch.Tuning] = None,
                     out: Optional[tuple] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One merge step on the GPU; same arguments and results as ``token_merge_ref``.

    hidden in float32/float16/bfloat16, residual in float32 or hidden's type; the scores and size are
    used as float32, origin and cls as int64; non-contiguous inputs are copied. ``tuning`` (the
    work split) defaults to :func:`default_tuning`; every split gives the same bits.
    ``out``: the five output tensors to write (contiguous, the results' shapes and dtypes).
    """
    B, L, E = _check_inputs(hidden, residual, score, score_b, size, origin, cls)
    if not hidden.is_cuda:
        raise UserError("token_merge_cuda needs CUDA tensors; the CPU runs token_merge_ref")
    check_length(L, attrs.r)
    reason = unsupported(hidden, residual, score, score_b, attrs)
    if reason:
        raise UserError(f"the token-merge kernel cannot run this step: {reason}")
    variant = merge_launch.Variant.of(TORCH_DTYPES[hidden.dtype], TORCH_DTYPES[residual.dtype], L)
    tuning = tuning or default_tuning(hidden.device, variant, B)
    Q = output_length(L, attrs.r)
    hidden, residual = hidden.contiguous(), residual.contiguous()
    score, score_b, size = score.float().contiguous(), score_b.float().contiguous(), size.float().contiguous()
    origin, cls = origin.long().contiguous(), cls.long().contiguous()
    outs = {
        "hidden_out": hidden.new_empty(B, Q, E), "residual_out": residual.new_empty(B, Q, E),
        "size_out": size.new_empty(B, Q), "origin_out": origin.new_empty(B, Q), "cls_out": cls.new_empty(B),
    }
    if out is not None:
        given = dict(zip(outs, out))
        for name, want in outs.items():
            got = given.get(name)
            if (got is None or got.shape != want.shape or got.dtype != want.dtype or got.device != want.device
                    or not got.is_contiguous()):
                raise UserError(f"out: {name} must be a contiguous {want.dtype} tensor of shape "
                                f"{tuple(want.shape)} on {want.device}")
        outs = given
    if B == 0:
        return tuple(outs.values())
    kernel = _kernel(hidden.device, variant, tuning)
    params = merge_launch.launch_params(B, tuning)
    tensors = {"hidden": hidden, "residual": residual, "score": score, "score_b": score_b, "size": size,
               "origin": origin, "cls": cls}
    values = {name: t.data_ptr() for name, t in {**tensors, **outs}.items()}
    values.update(batch=B, length=L, dim=E, parts=score.shape[1], parts_b=score_b.shape[1],
                  **merge_launch.attribute_scalars(attrs))
    holders, array = cuda_driver.pack_args(values, merge_launch.KERNEL_ARGS, merge_launch.KERNEL_ARG_TYPES)
    stream = torch.cuda.current_stream(hidden.device).cuda_stream
    cuda_driver.launch(kernel, params.grid, params.block, params.shared_mem, stream, array,
                       "launching the token-merge kernel")
    return tuple(outs.values())


_warned: set = set()


def _fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"mame::token_merge runs the PyTorch reference on the GPU: {reason}", stacklevel=3)


def _reference(hidden, residual, score, score_b, size, origin, cls, attrs):
    outs = token_merge_ref(hidden, residual, score, score_b, size, origin, cls, attrs)
    # A custom op's outputs must not alias its inputs.
    return tuple(t.clone() if t is x else t for t, x in zip(outs, (hidden, residual, size, origin, cls)))


def _token_merge_cuda_op(hidden, residual, score, score_b, size, origin, cls, r, prune, split, arrangement,
                         weighting, metric, lam, score_scale):
    attrs = MergeAttributes(r, prune, split, arrangement, weighting, metric, lam, score_scale)
    reason = unsupported(hidden, residual, score, score_b, attrs)
    if reason is None:
        try:
            cuda_driver.driver()
        except UserError as exc:
            reason = str(exc)
    if reason is not None:
        _fallback(reason)
        return _reference(hidden, residual, score, score_b, size, origin, cls, attrs)
    return token_merge_cuda(hidden, residual, score, score_b, size, origin, cls, attrs)


_lock = threading.Lock()
_registered = False


def register_cuda() -> None:
    """Make the kernel the CUDA implementation of ``torch.ops.mame.token_merge`` (idempotent).
    The op (``op.py``) must be defined first (the package's ``__init__`` does); inputs the kernel cannot run fall back to
    the reference with a one-time warning."""
    global _registered
    with _lock:
        if not _registered:
            torch.library.register_kernel(TORCH_NAME, "cuda")(_token_merge_cuda_op)
            _registered = True
