"""The contract of ``mame::SelectiveScan``: the one operator that ONNX and TensorRT lack.

Every face reads this file and nothing restates it: the PyTorch op
(``torch.ops.mame.selective_scan``), the ONNX node and its function body, the CUDA kernel's
launcher, the TensorRT graph preparation and the TensorRT plugin.

Inputs, in order (Vim's layout, as in mamba-ssm):
    u, delta, z   (batch, dim, length)   T: float32 / float16 / bfloat16
    A             (dim, dstate)          float32
    B, C          (batch, dstate, length) T
    D, delta_bias (dim,)                 float32
Outputs:
    out           (batch, dim, length)   T
    dt_sums       (batch, ceil(dim / 8), length) float32: the step size dt summed over each
                  group of DT_GROUP = 8 consecutive channels (a last, partial group sums the
                  channels it has): what MaMe's informativeness is made of, so a merge block
                  needs no second pass over delta (mean over channels = sum of groups / dim).
D and delta_bias may be absent in PyTorch (zeros in the ONNX node, which always has all eight);
the ONNX node needs the gate z.

Why fixed groups of 8 channels and not one (batch, length) sum: a kernel's block holds 8, 16 or
32 channels (or a part of one group at batch 1), so every work split writes whole groups without
atomics or a workspace (a TensorRT AOT plugin has neither), in one order of additions: the
kernel's values are the same bits whatever split PyTorch or a TensorRT tactic picks.

Attributes (integers 0 / 1): ``delta_softplus`` (dt = softplus(delta + delta_bias), else
delta + delta_bias) and ``reverse`` (the recurrence runs from the last token to the first).

Recurrence, per batch b, channel d, state n, step t:
    h = exp(dt * A) * h + dt * B * u,    y = sum_n h * C + D * u,    out = y * silu(z)
"""

from __future__ import annotations

TORCH_NAME = "mame::selective_scan"
ONNX_DOMAIN = "mame"
ONNX_OP_TYPE = "SelectiveScan"
PLUGIN_ID = f"{ONNX_DOMAIN}::{ONNX_OP_TYPE}"
PLUGIN_VERSION = "1"
FUNCTION_VERSION = 1  # the "mame" opset version the node and its function are declared under

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
OUTPUT_NAME = "out"
DT_SUMS_NAME = "dt_sums"
OUTPUT_NAMES = (OUTPUT_NAME, DT_SUMS_NAME)
DT_GROUP = 8  # channels per dt_sums group
# Inputs that stay float32 whatever the model's precision (the kernel reads them as float).
FLOAT32_INPUTS = ("A", "D", "delta_bias")
# Element types of u, delta, B, C, z and out that every face runs (dt_sums is always float32).
DTYPES = ("float32", "float16", "bfloat16")
# Attributes and their defaults (the ONNX function's defaults too).
ATTRIBUTES = {"delta_softplus": 0, "reverse": 0}
# Rank of each input.
RANKS = {"u": 3, "delta": 3, "A": 2, "B": 3, "C": 3, "D": 1, "z": 3, "delta_bias": 1}
LAYOUT = "u, delta, z: batch x dim x length; A: dim x dstate; B, C: batch x dstate x length; D, delta_bias: dim"


def input_shapes(batch, dim, length, dstate) -> dict:
    """Each input's shape in terms of the four sizes (any of them may be unknown)."""
    return {
        "u": (batch, dim, length), "delta": (batch, dim, length), "A": (dim, dstate),
        "B": (batch, dstate, length), "C": (batch, dstate, length), "D": (dim,),
        "z": (batch, dim, length), "delta_bias": (dim,),
    }


def dt_groups(dim):
    """Rows of ``dt_sums``: ceil(dim / DT_GROUP) (ints or shape expressions: + and // only)."""
    return (dim + (DT_GROUP - 1)) // DT_GROUP


def output_shapes(batch, dim, length) -> dict:
    """Each output's shape in terms of the sizes."""
    return {OUTPUT_NAME: (batch, dim, length), DT_SUMS_NAME: (batch, dt_groups(dim), length)}


def is_node(node) -> bool:
    """Whether an ONNX ``NodeProto`` is a ``mame::SelectiveScan`` node."""
    return node.domain == ONNX_DOMAIN and node.op_type == ONNX_OP_TYPE
