"""How the selective-scan kernel (``selective_scan.cu`` beside this file) is built and launched.

The one launch contract, shared unchanged by the PyTorch launcher (``mame_deploy.ops.selective_scan.cuda``) and
the TensorRT plugin (``mame_deploy.plugins.trt_plugin``):

* :func:`compile_ptx` -- NVRTC (cuda-python) turns the source into PTX for one variant
  (dtype, state size, softplus, direction); cached per process.
* :func:`launch_params` -- grid, block and dynamic shared memory, computed with nothing but
  ``+``, ``-``, ``*`` and ``//`` on the shape arguments, so the same function serves Python ints
  and TensorRT's symbolic shape expressions. The block size and shared memory are constants.
* :class:`Tuning` -- the compile-time work split. Both functions take one (default
  :data:`DEFAULT_TUNING`); a caller that picks another (e.g. :func:`tuning_for` a known small
  batch) must pass the same one to both.
* :data:`KERNEL_ARGS` -- the kernel's parameters in order (TensorRT's AOT convention: input
  tensors, then int32 scalars, then the outputs); :data:`KERNEL_ARG_TYPES` gives each one's C type.

Layouts (contiguous): u, delta, z, out (batch, dim, length); B, C (batch, dstate, length);
A (dim, dstate) float32; D, delta_bias (dim,) float32; dt_sums (batch, ceil(dim / 8), length)
float32. D, z and delta_bias may be null pointers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

from mame_deploy.errors import UserError
from mame_deploy.ops.selective_scan.contract import (
    DT_GROUP, DT_SUMS_NAME, FLOAT32_INPUTS, INPUT_NAMES, OUTPUT_NAME, OUTPUT_NAMES,
)
from mame_deploy.plugins import nvrtc

KERNEL_SOURCE = Path(__file__).with_name("selective_scan.cu")

# Kernel parameters, in order, and their C types ("elem" is the variant's dtype).
SCALAR_ARGS = ("batch", "dim", "length")
KERNEL_ARGS = INPUT_NAMES + SCALAR_ARGS + OUTPUT_NAMES  # TensorRT's AOT order
KERNEL_ARG_TYPES = {
    **{name: "const float*" if name in FLOAT32_INPUTS else "const elem*" for name in INPUT_NAMES},
    **{name: "int32" for name in SCALAR_ARGS}, OUTPUT_NAME: "elem*", DT_SUMS_NAME: "float*",
}
MAX_SHARED_BYTES = 48 * 1024  # static shared memory: no opt-in attribute, which TensorRT cannot set

# dtype of u, delta, B, C, z and out -> SCAN_DTYPE code in the source. A, D, delta_bias: float32.
DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
DSTATES = (8, 16, 32)


@dataclass(frozen=True)
class Tuning:
    """Compile-time work split (see the source's header). Chosen by benchmarks/bench_kernel.py
    on an H100; docs/perf-notes.md has the measurements behind it."""

    lanes: int = 4  # threads per channel, each holding dstate / lanes states
    channels: int = 32  # channels per block
    chunk: int = 32  # time steps staged in shared memory at a time
    min_blocks: int = 4  # blocks per SM the register allocation must allow
    segments: int = 1  # stretches of time scanned in parallel (two passes) when channels are few

    def __post_init__(self):
        threads = self.lanes * self.channels * self.segments
        problems = [
            self.lanes not in (1, 2, 4, 8, 16, 32) and "lanes must be a power of two up to 32",
            not 1 <= self.segments <= 16 and "segments must be 1..16",
            (threads % 32 or threads > 1024) and "lanes * channels * segments must be a multiple of 32, at most 1024",
            (self.chunk % 4 or self.chunk % self.lanes or (self.lanes * self.channels) % self.chunk)
            and "chunk must be a multiple of 4 and of lanes, and divide lanes * channels",
            self.min_blocks < 1 and "min_blocks must be at least 1",
            # dt_sums: each group of DT_GROUP channels must lie in one block, or start one.
            (self.channels % DT_GROUP and DT_GROUP % self.channels)
            and f"channels must be a multiple or a divisor of {DT_GROUP} (the dt_sums groups)",
        ]
        problems = [p for p in problems if p]
        if problems:
            raise UserError(f"bad kernel tuning {self}: {'; '.join(problems)}")

    @property
    def threads(self) -> int:
        return self.lanes * self.channels * self.segments

    @property
    def covered_length(self) -> int:
        """Longest sequence a segmented split scans from one staging (each segment one chunk)."""
        return self.segments * self.chunk

    def shared_bytes(self, dstate: int) -> int:
        """Static shared memory of the kernel (the source's static_assert, same formula): tiles
        of dt, dt*u (per channel) and B, C (per state) for each segment, partial sums (one row per
        scan thread, or per channel when segmented), bias and D, the segments' carries."""
        row = self.chunk + (4 if (self.chunk // 4) % 2 == 0 else 0)
        segmented = self.segments > 1
        part_rows = 1 if segmented else self.lanes * self.channels
        y_rows = self.segments * self.channels if segmented else 1
        carry_rows = self.threads if segmented else 1
        tiles = self.segments * (2 * self.channels + 2 * dstate) + part_rows + y_rows
        return 4 * row * tiles + 8 * self.channels + 4 * carry_rows * (dstate // self.lanes + 1)

    def for_dstate(self, dstate: int) -> "Tuning":
        """The split actually compiled for ``dstate``: at most one state per lane (the block keeps
        its size: fewer lanes, proportionally more channels), and for a large ``dstate`` fewer
        segments where their tiles would not fit in shared memory."""
        tuning = self
        if tuning.lanes > dstate:
            tuning = dataclasses.replace(tuning, lanes=dstate, channels=tuning.channels * tuning.lanes // dstate)
        while tuning.segments > 1 and tuning.shared_bytes(dstate) > MAX_SHARED_BYTES:
            tuning = dataclasses.replace(tuning, segments=tuning.segments // 2)
        if tuning.shared_bytes(dstate) > MAX_SHARED_BYTES:
            raise UserError(
                f"kernel tuning {self} needs {tuning.shared_bytes(dstate)} bytes of shared memory for d_state "
                f"{dstate} (at most {MAX_SHARED_BYTES}); use fewer channels or a shorter chunk"
            )
        return tuning

    @classmethod
    def parse(cls, text: str) -> "Tuning":
        """``LANESxCHANNELSxCHUNK[xMIN_BLOCKS[xSEGMENTS]]``, e.g. ``4x32x32x4`` or ``16x4x16x2x4``
        (benchmark option syntax)."""
        try:
            values = [int(v) for v in text.lower().split("x")]
        except ValueError:
            values = []
        if len(values) not in (3, 4, 5):
            raise UserError(
                f"bad kernel tuning {text!r}; write LANESxCHANNELSxCHUNK[xMIN_BLOCKS[xSEGMENTS]], e.g. 4x32x32x4"
            )
        return cls(*values)

    def __str__(self) -> str:
        text = f"{self.lanes}x{self.channels}x{self.chunk}x{self.min_blocks}"
        return text + (f"x{self.segments}" if self.segments > 1 else "")


# Work splits by how many channels (batch * dim) one launch scans. Many channels: few threads
# per channel with several states each, the fewest instructions per state-step. Few channels
# (batch 1..4 at Vim-S's 768): each scheduler holds at most one warp, so the time is one warp's
# chain of dependent steps; one state per thread spreads a channel over 16 threads and shortens
# it. In between, 8 threads per channel. The thresholds come from the H100 measurements in
# docs/perf-notes.md (batch 1..256 at dim 768).
DEFAULT_TUNING = Tuning()
SMALL_BATCH_TUNING = Tuning(lanes=16, channels=8, chunk=32, min_blocks=1)
MEDIUM_BATCH_TUNING = Tuning(lanes=8, channels=16, chunk=32, min_blocks=2)
# Fewest channels (batch 1 at Vim-S): time segments, the first whose covered_length (segments *
# chunk) holds the sequence, so each segment is staged once and scanned twice.
SEGMENTED_TUNINGS = (
    Tuning(lanes=16, channels=2, chunk=32, min_blocks=4, segments=4),  # L <= 128
    Tuning(lanes=8, channels=4, chunk=32, min_blocks=2, segments=7),  # L <= 224 (Vim: 197)
)
SEGMENTED_CHANNELS = 768  # batch * dim up to which SEGMENTED_TUNINGS are used
SMALL_BATCH_CHANNELS = 4096  # ... then SMALL_BATCH_TUNING
MEDIUM_BATCH_CHANNELS = 8192  # ... and then MEDIUM_BATCH_TUNING


def tuning_for(batch, dim, length=None) -> Tuning:
    """The split for a launch over ``batch * dim`` channels of ``length`` steps. Symbolic
    (TensorRT) shapes get DEFAULT_TUNING; an unknown length never gets a segmented split.
    Whatever is chosen must be passed to both compile_ptx and launch_params."""
    if not (isinstance(batch, int) and isinstance(dim, int)):
        return DEFAULT_TUNING
    channels = batch * dim
    if channels <= SEGMENTED_CHANNELS and isinstance(length, int):
        for tuning in SEGMENTED_TUNINGS:
            if length <= tuning.covered_length:
                return tuning
    if channels <= SMALL_BATCH_CHANNELS:
        return SMALL_BATCH_TUNING
    if channels <= MEDIUM_BATCH_CHANNELS:
        return MEDIUM_BATCH_TUNING
    return DEFAULT_TUNING


@dataclass(frozen=True)
class LaunchParams:
    """cuLaunchKernel's geometry: grid and block as (x, y, z), dynamic shared memory in bytes."""

    grid: Tuple[Any, Any, Any]
    block: Tuple[int, int, int]
    shared_mem: int


def _check_variant(dtype: str, dstate: int) -> None:
    if dtype not in DTYPES:
        raise UserError(f"the selective-scan kernel has no {dtype!r} variant; use one of {', '.join(DTYPES)}")
    if dstate not in DSTATES:
        raise UserError(
            f"the selective-scan kernel supports d_state {', '.join(map(str, DSTATES))}, got {dstate}; "
            "use the PyTorch reference (mame_deploy.ops.selective_scan_ref) for other sizes"
        )


def launch_params(batch, dim, length, dstate, dtype: str, tuning: Tuning = DEFAULT_TUNING) -> LaunchParams:
    """Grid (batch, ceil(dim / channels), 1) of blocks of ``channels * lanes * segments`` threads.

    ``batch``, ``dim`` and ``length`` may be TensorRT shape expressions: only ``+``, ``-``,
    ``*``, ``//`` with ints are applied to them. ``dstate`` must be an int (it selects the
    compiled variant). ``length`` does not enter the geometry (the kernel loops over time); the
    shared memory is static, so 0 here.
    """
    _check_variant(dtype, dstate)
    tuning = tuning.for_dstate(dstate)
    channel_groups = (dim + (tuning.channels - 1)) // tuning.channels
    return LaunchParams(grid=(batch, channel_groups, 1), block=(tuning.threads, 1, 1), shared_mem=0)


def kernel_name(dtype: str, dstate: int, delta_softplus: bool, reverse: bool) -> str:
    """The extern "C" name of one variant, e.g. ``mame_selective_scan_float16_n16_softplus_fwd``."""
    act = "softplus" if delta_softplus else "linear"
    return f"mame_selective_scan_{dtype}_n{dstate}_{act}_{'rev' if reverse else 'fwd'}"


def compile_options(
    dtype: str, dstate: int, delta_softplus: bool, reverse: bool, tuning: Tuning = DEFAULT_TUNING
) -> list[str]:
    """The -D options that select one variant: the same for NVRTC and for nvcc."""
    _check_variant(dtype, dstate)
    tuning = tuning.for_dstate(dstate)
    defines = {
        "SCAN_KERNEL_NAME": kernel_name(dtype, dstate, delta_softplus, reverse),
        "SCAN_DTYPE": DTYPES[dtype],
        "SCAN_DSTATE": dstate,
        "SCAN_DELTA_SOFTPLUS": int(bool(delta_softplus)),
        "SCAN_REVERSE": int(bool(reverse)),
        "SCAN_LANES": tuning.lanes,
        "SCAN_CHANNELS": tuning.channels,
        "SCAN_CHUNK": tuning.chunk,
        "SCAN_MIN_BLOCKS": tuning.min_blocks,
        "SCAN_SEGMENTS": tuning.segments,
    }
    return [f"-D{key}={value}" for key, value in defines.items()]


def _nvrtc():
    return nvrtc.nvrtc_module()


current_arch = nvrtc.current_arch
_ptx_arch = nvrtc.ptx_arch


def compile_ptx(
    dtype: str, dstate: int, delta_softplus: bool, reverse: bool, arch: Optional[str] = None,
    tuning: Tuning = DEFAULT_TUNING,
) -> tuple[bytes, str]:
    """(PTX, kernel name) of one variant, compiled by NVRTC for ``arch`` (default: the current
    GPU). Cached: each variant is compiled once per process."""
    return _compile_ptx(dtype, int(dstate), bool(delta_softplus), bool(reverse), _ptx_arch(arch), tuning)


def _compile_ptx(dtype, dstate, delta_softplus, reverse, arch, tuning) -> tuple[bytes, str]:
    options = tuple(compile_options(dtype, dstate, delta_softplus, reverse, tuning))
    return nvrtc.compile_ptx(KERNEL_SOURCE, options, arch), kernel_name(dtype, dstate, delta_softplus, reverse)
