"""How the token-merge kernel (``token_merge.cu`` beside this file) is built and launched.

The one launch contract of ``mame::TokenMerge``, shared unchanged by the PyTorch launcher
(``mame_deploy.ops.token_merge.cuda``) and the TensorRT plugin (``trt_token_merge``):

* :class:`Variant` -- what selects a compiled kernel: the two streams' dtypes and the decision
  arrays' capacity (:func:`n_cap`, from the sequence length). The node's attributes are int32
  arguments (:func:`attribute_scalars`; lam as its float32 bits), so one variant serves every
  method and option.
* :class:`Tuning` -- the work split: blocks per sample (a thread-block cluster) and the matching
  tile. :func:`tuning_for` picks one by batch; :data:`TUNINGS` are all of them, and
  :data:`PORTABLE_TUNINGS` those a plain ``cuLaunchKernel`` launches (the TensorRT plugin offers
  them as tactics; a 16-block cluster needs a function attribute TensorRT's AOT launch cannot set).
* :func:`compile_ptx` -- NVRTC (``plugins/nvrtc.py``) PTX of one (variant, tuning).
* :func:`launch_params` -- grid ``(cluster * batch, 1, 1)``, the tuning's block, no dynamic shared memory,
  computed with ``*`` alone on ``batch`` so TensorRT's symbolic batch works.
* :data:`KERNEL_ARGS` -- the kernel's parameters in TensorRT's AOT order: the six inputs, the
  int32 scalars, the five outputs; :data:`KERNEL_ARG_TYPES` gives each one's C type.

Layouts (contiguous): hidden, residual (batch, length, dim); score (batch, parts, length), score_b
(batch, parts_b, length) and size (batch, length) float32;
origin (batch, length) int64; cls (batch,) int64; the outputs likewise with length - r tokens.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

from mame_deploy.errors import UserError
from mame_deploy.ops.token_merge.contract import INPUT_NAMES, OUTPUT_NAMES, MergeAttributes
from mame_deploy.plugins import nvrtc

KERNEL_SOURCE = Path(__file__).with_name("token_merge.cu")
ATTRIBUTE_ARGS = ("r", "prune", "split", "arrangement", "weighting", "metric", "lam_bits", "score_scale_bits")
SCALAR_ARGS = ("batch", "length", "dim", "parts", "parts_b") + ATTRIBUTE_ARGS
KERNEL_ARGS = INPUT_NAMES + SCALAR_ARGS + OUTPUT_NAMES
KERNEL_ARG_TYPES = {
    "hidden": "const hidden_t*", "residual": "const residual_t*", "score": "const float*",
    "score_b": "const float*", "size": "const float*", "origin": "const int64*", "cls": "const int64*",
    **{name: "int32" for name in SCALAR_ARGS},
    "hidden_out": "hidden_t*", "residual_out": "residual_t*", "size_out": "float*",
    "origin_out": "int64*", "cls_out": "int64*",
}
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}  # TM_*_DTYPE codes in the source
N_CAPS = (64, 128, 256, 512)  # decision-array capacities (patches), one compiled variant each
MAX_LENGTH = N_CAPS[-1] + 1
MAX_DIM = 4096  # channels: the kernel's float32 row index over (row, 4-channel unit) pairs is exact up to here
# score + score_b parts: the kernel's offsets within a sample are 32-bit (parts x length and
# length x dim stay below 2^31 with MAX_LENGTH and MAX_DIM).
MAX_PARTS = 1 << 16
MAX_PORTABLE_CLUSTER = 8  # larger clusters need CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED


@dataclass(frozen=True)
class Variant:
    """What the compiled kernel depends on besides the work split."""

    hidden: str  # dtype of hidden and hidden_out
    residual: str  # dtype of residual and residual_out: float32 or the hidden's
    n_cap: int = 256

    def __post_init__(self):
        for what, dtype in (("hidden", self.hidden), ("residual", self.residual)):
            if dtype not in DTYPES:
                raise UserError(f"the token-merge kernel has no {dtype!r} {what}; use one of {', '.join(DTYPES)}")
        if self.residual not in ("float32", self.hidden):
            raise UserError(f"the token-merge kernel takes a float32 residual or one in hidden's type "
                            f"({self.hidden}), got {self.residual}")
        if self.n_cap not in N_CAPS:
            raise UserError(f"n_cap must be one of {N_CAPS}, got {self.n_cap}")

    @classmethod
    def of(cls, hidden: str, residual: str, length: int) -> "Variant":
        return cls(hidden, residual, n_cap(length))


def float_bits(value: float) -> int:
    """A float attribute as the kernel takes it: its float32 bits as a signed int32."""
    (bits,) = struct.unpack("<i", struct.pack("<f", value))
    return bits


def attribute_scalars(attrs: MergeAttributes) -> dict:
    """The node's attributes as the kernel's int32 arguments (the floats: their float32 bits)."""
    return dict(r=attrs.r, prune=attrs.prune, split=attrs.split, arrangement=attrs.arrangement,
                weighting=attrs.weighting, metric=attrs.metric, lam_bits=float_bits(attrs.lam),
                score_scale_bits=float_bits(attrs.score_scale))


@dataclass(frozen=True)
class Tuning:
    """Work split: ``cluster`` blocks per sample share the matching and the output rows; the
    cluster splits the destinations into ``dst_groups`` groups and the sources into
    ``cluster // dst_groups``, a pair per block; each block's matching pass covers ``ty * my``
    sources x ``(match_threads // ty) * mx`` destinations on its first ``match_threads`` threads
    (0: all), ``kt`` channels staged at a time; ``min_blocks`` per SM for the registers;
    ``threads`` per block."""

    cluster: int = 1
    ty: int = 16
    my: int = 7
    mx: int = 7
    kt: int = 8
    min_blocks: int = 2
    dst_groups: int = 1
    threads: int = 256
    match_threads: int = 0

    def __post_init__(self):
        problems = [
            self.cluster not in (1, 2, 4, 8, 16) and "cluster must be 1, 2, 4, 8 or 16",
            (self.threads % 32 or not 128 <= self.threads <= 1024) and "threads must be a multiple of 32 in 128..1024",
            (self.match_threads and (self.match_threads % 32 or not 0 < self.match_threads <= self.threads))
            and "match_threads must be 0 (all) or a multiple of 32 up to threads",
            (self.ty < 1 or self.matchers % self.ty or self.matchers // self.ty > 32)
            and "ty must divide match_threads, leaving at most 32 threads per source row",
            (self.my < 1 or self.mx < 1) and "my and mx must be positive",
            (self.tile_sources % 16 or self.tile_destinations % 8)
            and "the matching tile must be whole 16 x 8 tensor-core pieces: ty * my a multiple of 16, "
                "(match_threads / ty) * mx a multiple of 8",
            self.tile_sources + self.tile_destinations > self.threads
            and "ty * my + (match_threads / ty) * mx must be at most threads",
            (self.kt % 4 or self.kt < 4 or (self.kt // 4 + 1) % 2 != 1) and "kt must be a multiple of 8",
            self.min_blocks < 1 and "min_blocks must be at least 1",
            (self.dst_groups < 1 or self.cluster % self.dst_groups) and "dst_groups must divide cluster",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise UserError(f"bad token-merge tuning {self}: {'; '.join(problems)}")

    @property
    def matchers(self) -> int:
        """Threads that compute the matching tile."""
        return self.match_threads or self.threads

    @property
    def tile_sources(self) -> int:
        """Sources per matching pass (the kernel's TILE_S)."""
        return self.ty * self.my

    @property
    def tile_destinations(self) -> int:
        """Destinations per matching pass (TILE_D; ty < 1 is refused, not divided by)."""
        return self.matchers // max(self.ty, 1) * self.mx

    @property
    def portable(self) -> bool:
        """Launchable by a plain cuLaunchKernel (TensorRT's AOT launch): at most 8 blocks a cluster."""
        return self.cluster <= MAX_PORTABLE_CLUSTER

    @classmethod
    def parse(cls, text: str) -> "Tuning":
        """``CLUSTERxTYxMYxMXxKTxMIN_BLOCKS[xDST_GROUPS[xTHREADS[xMATCH_THREADS]]]``, e.g.
        ``1x16x7x7x8x2`` or ``16x8x4x4x64x1x4x256x64`` (benchmark option syntax; DST_GROUPS
        defaults to 1, THREADS to 256, MATCH_THREADS to all of them)."""
        try:
            values = [int(v) for v in text.lower().split("x")]
        except ValueError:
            values = []
        if len(values) not in (6, 7, 8, 9):
            raise UserError(f"bad token-merge tuning {text!r}; write "
                            "CLUSTERxTYxMYxMXxKTxMIN_BLOCKS[xDST_GROUPS[xTHREADS[xMATCH_THREADS]]], e.g. 1x16x7x7x8x2")
        return cls(*values)

    def __str__(self) -> str:
        text = f"{self.cluster}x{self.ty}x{self.my}x{self.mx}x{self.kt}x{self.min_blocks}"
        if self.match_threads:
            return f"{text}x{self.dst_groups}x{self.threads}x{self.match_threads}"
        if self.threads != 256:
            return f"{text}x{self.dst_groups}x{self.threads}"
        return text if self.dst_groups == 1 else f"{text}x{self.dst_groups}"


# Many samples: one block per sample, 112 x 112 matching tile (Vim's 98 x 98 in one pass), two
# blocks per SM. Few samples: a cluster of blocks per sample shares the matching, so batch 1
# spreads over 8 SMs instead of one, or over 16 where the launcher may allow a non-portable
# cluster (PyTorch; not TensorRT's AOT launch). Chosen on the H200 by benchmarks/bench_merge.py
# (docs/perf-notes.md: 16 blocks cut the batch-1 vim_s step from 30.7 to 26.1 us; an H200 GPC
# holds one 16-block cluster, so above a few samples the 8-block split keeps more of them resident).
DEFAULT_TUNING = Tuning()
# The few-sample splits match on half the block, 4 x 4 and 4 x 2 tiles a thread: their stages
# took 9.18 and 6.27 us at batch 1 against 11.90 and 8.93 for 4 x 2 and 4 x 1 on all 256
# threads (H200, docs/perf-notes.md, "Fewer threads match").
SMALL_BATCH_TUNING = Tuning(cluster=8, ty=8, my=4, mx=4, kt=64, min_blocks=1, dst_groups=2,
                            match_threads=128)  # 32 x 64 per block
MEDIUM_BATCH_TUNING = Tuning(cluster=2, ty=16, my=7, mx=4, kt=16, min_blocks=2, dst_groups=2)  # 112 x 64 per block
TINY_BATCH_TUNING = Tuning(cluster=16, ty=8, my=4, mx=2, kt=64, min_blocks=1, dst_groups=4,
                           match_threads=128)  # 32 x 32 per block
TUNINGS = (DEFAULT_TUNING, MEDIUM_BATCH_TUNING, SMALL_BATCH_TUNING, TINY_BATCH_TUNING)
PORTABLE_TUNINGS = tuple(t for t in TUNINGS if t.portable)
TINY_BATCH = 4  # batch sizes up to which TINY_BATCH_TUNING is used where non-portable clusters may be
SMALL_BATCH = 16  # batch sizes up to which SMALL_BATCH_TUNING is used
MEDIUM_BATCH = 64  # ... then MEDIUM_BATCH_TUNING


def tuning_for(batch, portable: bool = False) -> Tuning:
    """The split for ``batch`` samples; a symbolic (TensorRT) batch gets DEFAULT_TUNING;
    ``portable``: only splits a plain cuLaunchKernel launches (TensorRT's AOT plugin).
    Every split computes the same bits (see the source's header), so this is speed only."""
    if not isinstance(batch, int):
        return DEFAULT_TUNING
    if batch <= TINY_BATCH and not portable:
        return TINY_BATCH_TUNING
    if batch <= SMALL_BATCH:
        return SMALL_BATCH_TUNING
    if batch <= MEDIUM_BATCH:
        return MEDIUM_BATCH_TUNING
    return DEFAULT_TUNING


def n_cap(length: int) -> int:
    """The smallest decision-array capacity that holds ``length - 1`` patches."""
    if not isinstance(length, int):
        raise UserError("the token-merge kernel needs a static sequence length; only the batch may be dynamic")
    for cap in N_CAPS:
        if length - 1 <= cap:
            return cap
    raise UserError(f"the token-merge kernel handles at most {MAX_LENGTH} tokens, got {length}; "
                    "the PyTorch reference (token_merge_ref) runs longer sequences")


def check_shape(length: int, dim: int, r: int, parts: int = 1, parts_b: int = 1) -> None:
    """What the kernel needs of a node beyond the contract (``parts``, ``parts_b``: the two
    scores' second dimension): UserError otherwise."""
    n_cap(length)
    for what, count in (("score", parts), ("score_b", parts_b)):
        if not isinstance(count, int) or count < 1:
            raise UserError(f"the token-merge kernel needs a static, positive number of {what} parts, got {count}")
    if parts + parts_b > MAX_PARTS:
        raise UserError(f"the token-merge kernel sums at most {MAX_PARTS} score parts (score and score_b together), "
                        f"got {parts + parts_b}; the PyTorch reference (token_merge_ref) runs more")
    if not isinstance(dim, int) or dim % 4 or not 0 < dim <= MAX_DIM:
        raise UserError(f"the token-merge kernel needs a static channel count that is a multiple of 4, at most "
                        f"{MAX_DIM}, got {dim}; the PyTorch reference (token_merge_ref) runs wider streams")
    if not isinstance(r, int) or not 0 <= r <= (length - 1) // 2:
        raise UserError(f"r={r} must lie in 0..{(length - 1) // 2} for {length} tokens")


@dataclass(frozen=True)
class LaunchParams:
    """cuLaunchKernel's geometry: grid and block as (x, y, z), dynamic shared memory in bytes."""

    grid: Tuple[Any, Any, Any]
    block: Tuple[int, int, int]
    shared_mem: int


def launch_params(batch, tuning: Tuning = DEFAULT_TUNING) -> LaunchParams:
    """Grid (cluster * batch, 1, 1) of ``tuning.threads``-thread blocks; ``batch`` may be a
    TensorRT shape expression (only ``*`` with an int is applied to it). Shared memory is static:
    0 here."""
    return LaunchParams(grid=(batch * tuning.cluster, 1, 1), block=(tuning.threads, 1, 1), shared_mem=0)


def kernel_name(variant: Variant, tuning: Tuning) -> str:
    """The extern "C" name, e.g. ``mame_token_merge_bf16_f32_n256_c1``."""
    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    v = variant
    groups = f"g{tuning.dst_groups}" if tuning.dst_groups > 1 else ""
    return f"mame_token_merge_{short[v.hidden]}_{short[v.residual]}_n{v.n_cap}_c{tuning.cluster}{groups}"


def compile_options(variant: Variant, tuning: Tuning = DEFAULT_TUNING) -> list[str]:
    """The -D options that select one variant and split: the same for NVRTC and for nvcc."""
    v = variant
    defines = {
        "TM_KERNEL_NAME": kernel_name(v, tuning),
        "TM_HIDDEN_DTYPE": DTYPES[v.hidden],
        "TM_RESIDUAL_DTYPE": DTYPES[v.residual],
        "TM_CLUSTER": tuning.cluster,
        "TM_TY": tuning.ty,
        "TM_MY": tuning.my,
        "TM_MX": tuning.mx,
        "TM_KT": tuning.kt,
        "TM_N_CAP": v.n_cap,
        "TM_MIN_BLOCKS": tuning.min_blocks,
        "TM_DST_GROUPS": tuning.dst_groups,
        "TM_THREADS": tuning.threads,
        "TM_MATCH_THREADS": tuning.matchers,
    }
    return [f"-D{key}={value}" for key, value in defines.items()]


def compile_ptx(variant: Variant, tuning: Tuning = DEFAULT_TUNING, arch: Optional[str] = None) -> tuple[bytes, str]:
    """(PTX, kernel name) of one variant and split, compiled by NVRTC for ``arch`` (default:
    the current GPU; clusters need sm_90 or newer). Cached per process."""
    target = nvrtc.ptx_arch(arch)
    if int("".join(c for c in target.split("_")[1] if c.isdigit())) < 90 and tuning.cluster > 1:
        raise UserError(f"the token-merge split {tuning} uses thread-block clusters, which need sm_90 or newer")
    ptx = nvrtc.compile_ptx(KERNEL_SOURCE, tuple(compile_options(variant, tuning)), target)
    return ptx, kernel_name(variant, tuning)
