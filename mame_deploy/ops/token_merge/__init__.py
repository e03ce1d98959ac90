"""``mame::TokenMerge``: one whole token-merge step as one operator (contract.py says what it is).

One file per face: ``reference.py`` (the definition), ``op.py`` (the torch.library op and its
ONNX node), ``onnx_function.py`` (the ONNX function body), ``cuda.py`` (the kernel on PyTorch
tensors); the kernel source, its launch contract and the TensorRT plugin are in ``plugins/``.
"""

from .contract import MergeAttributes
from .reference import token_merge_ref
from .op import token_merge  # defines torch.ops.mame.token_merge
from .cuda import register_cuda

register_cuda()  # the kernel serves CUDA tensors; touches no GPU until one arrives

__all__ = ["MergeAttributes", "token_merge", "token_merge_ref"]
