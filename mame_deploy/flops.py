"""Analytic cost of a Vision Mamba forward, as multiply-accumulates (the "FLOPs" that fvcore
and the Vim paper report: Vim-S about 5.1 G at 224 px). Merging changes only the token count
each block sees, so the cost is a sum over blocks of a per-block function of that count."""

from __future__ import annotations

from typing import Optional, Sequence


def block_macs(cfg, tokens: int) -> int:
    """One bidirectional block over ``tokens`` tokens."""
    E, Di, N, R, K = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    L = tokens
    proj = L * E * 2 * Di + L * Di * E            # in_proj, out_proj
    per_branch = (
        L * Di * K                                # depthwise conv
        + L * Di * (R + 2 * N)                    # x_proj
        + L * R * Di                              # dt_proj
        + 3 * L * Di * N                          # scan: dA*h + dB*u, then C.h
        + 2 * L * Di                              # D skip, z gate
    )
    return proj + 2 * per_branch + L * E          # + RMSNorm


def model_macs(cfg, tokens_per_layer: Optional[Sequence[int]] = None) -> int:
    """Whole model; ``tokens_per_layer[i]`` is the sequence length block i sees (default:
    every block sees all patches plus the class token)."""
    full = cfg.num_patches + 1
    tokens = list(tokens_per_layer) if tokens_per_layer is not None else [full] * cfg.depth
    if len(tokens) != cfg.depth:
        raise ValueError(f"need {cfg.depth} token counts, got {len(tokens)}")
    patch = cfg.num_patches * cfg.in_chans * cfg.patch_size ** 2 * cfg.embed_dim
    head = cfg.embed_dim * cfg.num_classes + tokens[-1] * cfg.embed_dim  # + final norm
    return patch + sum(block_macs(cfg, t) for t in tokens) + head


def gflops(cfg, tokens_per_layer: Optional[Sequence[int]] = None) -> float:
    return model_macs(cfg, tokens_per_layer) / 1e9


def relative_gflops(cfg, tokens_per_layer: Sequence[int]) -> float:
    """Cost of a merged model relative to the unmerged one (1.0 = no saving)."""
    return model_macs(cfg, tokens_per_layer) / model_macs(cfg)
