"""The operators models call, one folder each: ``selective_scan`` (mame::SelectiveScan) and
``token_merge`` (mame::TokenMerge). Importing this package defines both torch.library ops and
registers their CUDA kernels, in this order; import the functions from the folders."""

from . import selective_scan, token_merge  # noqa: F401  (defines and registers, in this order)

__all__ = ["selective_scan", "token_merge"]
