"""Will it fit? Memory a batch needs, against what the machine has, checked before the work.

The PyTorch reference scan (ops/selective_scan.py) materialises its step terms, states and their
stack as (batch, length, d_inner, d_state) float32 tensors, and onnxruntime's scan function does
likewise for its step terms, so one forward pass peaks at a few such tensors per block: peak RSS
of vim_t forwards on the CPU grew by 4.8 of them per image (batch 16 -> 32, torch 2.13); we
count ``SCAN_COPIES``. The fused CUDA kernel keeps the state on chip, so on a GPU with the
kernel only activations count. ``export`` needs its example input (torch.onnx.export traces
with a real tensor of the exported batch) and little else: the trace uses fake tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from mame_deploy.artifacts import format_bytes
from mame_deploy.errors import UserError

SCAN_COPIES = 5        # (batch, length, d_inner, d_state) float32 tensors alive at the peak
ACTIVATIONS = 16       # (batch, length, d_inner) float32 tensors a block holds besides them
INPUT_COPIES = 3       # the input batch: the caller's array, its padding, the runtime's copy
_FLOAT = 4


def parameter_bytes(config) -> int:
    """float32 weights of a Vision Mamba with ``config`` (models/vim.py's layout)."""
    E, Di, N, R, K = config.embed_dim, config.d_inner, config.d_state, config.dt_rank, config.d_conv
    branch = Di * K + Di + Di * (R + 2 * N) + R * Di + Di       # conv1d, x_proj, dt_proj
    block = E * 2 * Di + Di * E + 2 * branch + 2 * (Di * N + Di) + E
    embed = config.in_chans * config.patch_size ** 2 * E + E + (config.num_patches + 2) * E
    return _FLOAT * (config.depth * block + embed + E + E * config.num_classes + config.num_classes)


def _fused_scan_on(device: str, config) -> bool:
    """Whether the CUDA kernel (no state tensors in memory) serves the scan on ``device``."""
    if device != "cuda":
        return False
    import importlib.util

    from mame_deploy.ops.selective_scan.cuda import kernel_supports

    try:
        has_driver = importlib.util.find_spec("cuda.bindings") is not None
    except (ImportError, ValueError):
        has_driver = False
    return has_driver and kernel_supports(config.d_state)


def forward_bytes(config, batch: int, device: str = "cpu") -> int:
    """Peak memory of one forward pass at ``batch`` (the first block sees every token)."""
    length = config.num_patches + 1
    scan = 0 if _fused_scan_on(device, config) else SCAN_COPIES * length * config.d_inner * config.d_state
    per_image = scan + ACTIVATIONS * length * config.d_inner + INPUT_COPIES * config.in_chans * config.img_size ** 2
    return _FLOAT * batch * per_image + parameter_bytes(config)


def export_bytes(config, batch: int) -> int:
    """Memory of ``torch.onnx.export`` at a static ``batch``: the example input, the weights and
    their serialised copy."""
    return _FLOAT * batch * config.in_chans * config.img_size ** 2 + 3 * parameter_bytes(config)


# ---------------------------------------------------------------------------------------------
# What the machine has


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None   # cgroup v2 writes "max" for no limit


def _cgroup_room() -> Optional[int]:
    """Bytes the process's cgroup may still allocate, where a limit is set (containers)."""
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap, used = _read_int(limit), _read_int(usage)
        if cap is not None and used is not None and cap < 1 << 60:
            return max(cap - used, 0)
    return None


def _ram_available() -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device: str = "cpu") -> Optional[int]:
    """Free memory on ``device`` (RAM, within the cgroup's limit; or the current GPU's free
    memory), or None where it cannot be told."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info()[0])
    known = [n for n in (_ram_available(), _cgroup_room()) if n is not None]
    return min(known) if known else None


def require(needed: int, device: str, what: str, advice: str) -> None:
    """A UserError when ``needed`` bytes exceed what ``device`` has free."""
    free = available_bytes(device)
    if free is not None and needed > free:
        where = "on the GPU" if device == "cuda" else "on this machine"
        raise UserError(f"{what} needs about {format_bytes(needed)} of memory, more than the "
                        f"{format_bytes(free)} available {where}; {advice}")


def check_forward(config, batch: int, device: str, flag: str, model: str = "the model",
                  advice: Optional[str] = None) -> None:
    """Refuse a batch whose forward pass cannot fit, naming the flag that chose it."""
    length = config.num_patches + 1
    require(forward_bytes(config, batch, device), device,
            f"{flag} {batch}: a {model} forward pass at batch {batch} (the scan holds ({batch}, {length}, "
            f"{config.d_inner}, {config.d_state}) float32 tensors)",
            advice or f"use a smaller {flag}")


def check_export(config, batch: Optional[int], model: str = "the model") -> None:
    """Refuse a static export batch whose example input cannot even be allocated."""
    if batch is None:
        return
    require(export_bytes(config, batch), "cpu",
            f"exporting {model} at --batch {batch} (torch.onnx.export traces a real input of that batch)",
            "export with a smaller --batch, or with --dynamic-batch (traced with 2 images)")
