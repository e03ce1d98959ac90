"""``mame::SelectiveScan``: the selective scan as one operator (contract.py says what it is).

One file per face: ``reference.py`` (the definition), ``op.py`` (the torch.library op and its
ONNX node), ``onnx_function.py`` (the ONNX function body), ``cuda.py`` (the kernel on PyTorch
tensors); the kernel source, its launch contract and the TensorRT plugin are in ``plugins/``.
"""

from .contract import INPUT_NAMES
from .reference import discretize, dt_group_sums, scan_dt_sums, selective_scan_ref
from .op import selective_scan  # defines torch.ops.mame.selective_scan
from .cuda import register_cuda

register_cuda()  # the kernel serves CUDA tensors; touches no GPU until one arrives

__all__ = ["INPUT_NAMES", "discretize", "dt_group_sums", "scan_dt_sums", "selective_scan", "selective_scan_ref"]
