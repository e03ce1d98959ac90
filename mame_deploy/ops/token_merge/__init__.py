"""``mame::TokenMerge``: one whole token-merge step as one operator (contract.py says what it is)."""

from .contract import MergeAttributes
from .op import token_merge
from .reference import token_merge_ref
from .cuda import register_cuda

register_cuda()  # the fused kernel serves CUDA tensors; touches no GPU until one arrives

__all__ = ["MergeAttributes", "token_merge", "token_merge_ref"]
