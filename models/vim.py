"""Vision Mamba (Vim, hustvl/Vim) as released: middle class token, bidirectional "v2" mixer.

Parameter names and shapes equal the official checkpoints (see docs/vim.md), so
``load_state_dict(official, strict=True)`` works. Every scan goes through
``mame_deploy.ops.selective_scan``; the backward branch scans in reverse instead of flipping.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mame_deploy.errors import UserError
from mame_deploy.ops.selective_scan import scan_dt_sums, selective_scan
from mame_deploy.ops.selective_scan.contract import FLOAT32_INPUTS as SCAN_FLOAT32_INPUTS


@dataclass(frozen=True)
class VimConfig:
    embed_dim: int = 192
    depth: int = 24
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    norm_eps: float = 1e-5

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.embed_dim / 16)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def cls_position(self) -> int:
        """Index of the class token in the unmerged sequence: the middle of the patches."""
        return self.num_patches // 2

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise UserError(
                f"expected images of shape (B, {self.proj.in_channels}, {self.img_size}, "
                f"{self.img_size}), got {tuple(x.shape)}; resize the input to "
                f"{self.img_size}x{self.img_size}"
            )
        # Images arrive in any float type (float32 from every runner); the model runs in its own.
        return self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)  # (B, patches, E), row-major


class BiMambaMixer(nn.Module):
    """Mamba with bimamba "v2": separate backward parameters, outputs averaged."""

    # The parameters behind the scan's float32 inputs (its contract's FLOAT32_INPUTS), per input:
    # they stay float32 when the model runs in a half type (``VisionMamba.to_dtype``).
    SCAN_FLOAT32_PARAMETERS = {"A": ("A_log", "A_b_log"), "D": ("D", "D_b"),
                               "delta_bias": ("dt_proj.bias", "dt_proj_b.bias")}
    assert tuple(SCAN_FLOAT32_PARAMETERS) == SCAN_FLOAT32_INPUTS

    def __init__(self, cfg: VimConfig):
        super().__init__()
        E, Di, N, R, K = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
        self.d_inner, self.d_state, self.dt_rank = Di, N, R
        self.in_proj = nn.Linear(E, 2 * Di, bias=False)
        self.out_proj = nn.Linear(Di, E, bias=False)
        for suffix in ("", "_b"):
            self.add_module("conv1d" + suffix, nn.Conv1d(Di, Di, K, groups=Di, padding=K - 1))
            self.add_module("x_proj" + suffix, nn.Linear(Di, R + 2 * N, bias=False))
            self.add_module("dt_proj" + suffix, nn.Linear(R, Di, bias=True))
        self.A_log = nn.Parameter(torch.empty(Di, N))
        self.D = nn.Parameter(torch.empty(Di))
        self.A_b_log = nn.Parameter(torch.empty(Di, N))
        self.D_b = nn.Parameter(torch.empty(Di))
        # "op": mame::selective_scan (reference on CPU, our kernel on CUDA);
        # "mamba_ssm": the official CUDA kernel, for comparisons on a GPU machine.
        self.scan_backend = "op"

    def _branch(self, x: Tensor, z: Tensor, reverse: bool, want_dt_sums: bool):
        """One direction: the scan output and its step sizes summed over channel groups
        (the scan's ``dt_sums``, for the informativeness; None where not wanted and not free)."""
        sfx = "_b" if reverse else ""
        conv: nn.Conv1d = getattr(self, "conv1d" + sfx)
        x_proj: nn.Linear = getattr(self, "x_proj" + sfx)
        dt_proj: nn.Linear = getattr(self, "dt_proj" + sfx)
        A = -torch.exp(getattr(self, "A_b_log" if reverse else "A_log").float())
        D = getattr(self, "D" + sfx).float()
        L = x.shape[-1]
        if reverse:  # anti-causal conv == causal conv of the flipped sequence, flipped back
            k = conv.kernel_size[0]
            x = F.conv1d(F.pad(x, (0, k - 1)), conv.weight.flip(-1), conv.bias, groups=self.d_inner)
        else:
            x = conv(x)[..., :L]
        x = F.silu(x)
        x_dbl = x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt_low, Bm, Cm = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt_low @ dt_proj.weight.t()).transpose(1, 2)  # bias goes to the scan
        Bm, Cm = Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous()
        delta_bias = dt_proj.bias.float()
        return self._scan(x, delta, A, Bm, Cm, D, z, delta_bias, reverse, want_dt_sums)

    def _scan(self, x, delta, A, Bm, Cm, D, z, delta_bias, reverse, want_dt_sums):
        if self.scan_backend == "mamba_ssm":
            from mame_deploy.ops.mamba_ssm_backend import mamba_ssm_scan

            # mamba-ssm has no such output: computed apart, and only where a merge needs it,
            # so unmerged blocks time mamba-ssm's kernel alone.
            y = mamba_ssm_scan(x, delta, A, Bm, Cm, D, z, delta_bias, reverse)
            return y, scan_dt_sums(delta, delta_bias, True) if want_dt_sums else None
        return selective_scan(x, delta, A, Bm, Cm, D, z, delta_bias, True, reverse)

    @property
    def score_scale(self) -> float:
        """What the sum of the score's parts is multiplied by: a mean over both branches' channels."""
        return 0.5 / self.d_inner

    def forward(self, h: Tensor, return_score: bool = False):
        """h: (B, L, E) -> (B, L, E); with ``return_score`` also MaMe's informativeness as two
        sets of parts, each (B, K, L), the two scans' dt_sums: ``score_scale`` x the sum of all
        2K parts is the mean over channels of the two branches' step sizes, each at its own
        token (``mame::TokenMerge`` adds them up)."""
        xz = self.in_proj(h).transpose(1, 2)  # (B, 2*Di, L)
        x, z = xz.chunk(2, dim=1)
        y_f, dt_sums_f = self._branch(x, z, reverse=False, want_dt_sums=return_score)
        y_b, dt_sums_b = self._branch(x, z, reverse=True, want_dt_sums=return_score)
        if not return_score:
            return self.out_proj(((y_f + y_b) / 2).transpose(1, 2))
        # The scans already summed dt over channel groups; the merge operator sums the groups of
        # both (one launch instead of an add, a strided reduction and a scale here, and no copy
        # to concatenate them).
        return self.out_proj(((y_f + y_b) / 2).transpose(1, 2)), (dt_sums_f, dt_sums_b)


class Block(nn.Module):
    """Pre-norm residual block with "fused add + norm" semantics, residual kept in float32."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.mixer = BiMambaMixer(cfg)

    def forward(self, hidden: Tensor, residual: Optional[Tensor], return_score: bool = False):
        residual = hidden.float() if residual is None else residual + hidden.float()
        out = self.mixer(self.norm(residual.to(self.norm.weight.dtype)), return_score)
        if return_score:
            return out[0], residual, out[1]
        return out, residual


class VisionMamba(nn.Module):
    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.config = cfg
        E = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, E))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_f = RMSNorm(E, cfg.norm_eps)
        self.head = nn.Linear(E, cfg.num_classes)

    @property
    def num_tokens(self) -> int:
        return self.config.num_patches + 1

    def embed(self, images: Tensor) -> Tensor:
        """Patch tokens with the class token inserted in the middle, plus position embedding."""
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        p = self.config.cls_position
        x = torch.cat([x[:, :p], cls, x[:, p:]], dim=1)
        return x + self.pos_embed

    def forward_features(self, images: Tensor) -> Tensor:
        hidden, residual = self.embed(images), None
        # Token merging between blocks, installed by mame_deploy.patch() (a plain object, so
        # state_dict keys stay as released); None runs the model exactly as released.
        merge = getattr(self, "token_merge", None)
        tokens = merge.start(hidden, self.config.cls_position) if merge is not None else None
        for i, layer in enumerate(self.layers):
            if merge is not None and merge.schedule[i] > 0:
                hidden, residual, score = layer(hidden, residual, return_score=True)
                hidden, residual, tokens = merge(i, hidden, residual, score, tokens, layer.mixer.score_scale)
            else:
                hidden, residual = layer(hidden, residual)
        residual = residual + hidden.float()
        out = self.norm_f(residual.to(self.norm_f.weight.dtype))
        if tokens is None:
            return out[:, self.config.cls_position]
        return merge.class_token(out, tokens)  # the class token moves when tokens merge

    def forward(self, images: Tensor) -> Tensor:
        """float32 logits whatever the model's own precision (a no-op for a float32 model)."""
        return self.head(self.forward_features(images)).float()

    def to_dtype(self, dtype: torch.dtype) -> "VisionMamba":
        """The model in ``dtype`` (in place): weights and streams in ``dtype``, except what the
        design keeps float32: the scan's A, D and delta_bias parameters (SCAN_FLOAT32_PARAMETERS)
        here; the residual stream, the norms' arithmetic, the merge scores and sizes by the code."""
        kept = [(param, param.detach().float().clone()) for layer in self.layers
                for names in BiMambaMixer.SCAN_FLOAT32_PARAMETERS.values()
                for param in map(layer.mixer.get_parameter, names)]
        self.to(dtype)
        for param, value in kept:  # the values as they were, not rounded to dtype and back
            param.data = value
        return self

    def set_scan_backend(self, backend: str) -> "VisionMamba":
        if backend not in ("op", "mamba_ssm"):
            raise UserError(f"unknown scan backend {backend!r}; use 'op' or 'mamba_ssm'")
        for layer in self.layers:
            layer.mixer.scan_backend = backend
        return self


# ---------------------------------------------------------------------------------------------
# Deterministic initialisation following the released training code (see docs/vim.md).

def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


@torch.no_grad()
def init_weights(model: VisionMamba, seed: int = 0) -> VisionMamba:
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)

    def trunc_normal(t: Tensor, std: float = 0.02):
        t.copy_(torch.randn(t.shape, generator=gen).mul_(std).clamp_(-2 * std, 2 * std))

    def uniform(t: Tensor, bound: float):
        t.copy_(torch.rand(t.shape, generator=gen).mul_(2 * bound).sub_(bound))

    trunc_normal(model.pos_embed)
    trunc_normal(model.cls_token)
    pe = model.patch_embed.proj  # lecun normal, as timm's jax-style init for patch embeds
    fan_in = pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1]
    trunc_normal(pe.weight, std=math.sqrt(1.0 / fan_in))
    pe.bias.zero_()
    trunc_normal(model.head.weight)
    model.head.bias.zero_()
    A_log = torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(cfg.d_inner, 1)
    dt_std = cfg.dt_rank ** -0.5
    for layer in model.layers:
        m: BiMambaMixer = layer.mixer
        trunc_normal(m.in_proj.weight)
        # out_proj is rescaled by 1/sqrt(n_layer) as in mamba's prenorm-residual init.
        uniform(m.out_proj.weight, 1.0 / math.sqrt(cfg.d_inner))
        m.out_proj.weight.div_(math.sqrt(cfg.depth))
        for sfx in ("", "_b"):
            conv = getattr(m, "conv1d" + sfx)
            uniform(conv.weight, 1.0 / math.sqrt(conv.kernel_size[0]))
            uniform(conv.bias, 1.0 / math.sqrt(conv.kernel_size[0]))
            trunc_normal(getattr(m, "x_proj" + sfx).weight)
            dt_proj = getattr(m, "dt_proj" + sfx)
            uniform(dt_proj.weight, dt_std)
            log_dt = torch.rand(cfg.d_inner, generator=gen) * (math.log(0.1) - math.log(1e-3))
            dt = torch.exp(log_dt + math.log(1e-3)).clamp(min=1e-4)
            dt_proj.bias.copy_(_inverse_softplus(dt))
        m.A_log.copy_(A_log)
        m.A_b_log.copy_(A_log)
        m.D.fill_(1.0)
        m.D_b.fill_(1.0)
        layer.norm.weight.fill_(1.0)
    model.norm_f.weight.fill_(1.0)
    return model
