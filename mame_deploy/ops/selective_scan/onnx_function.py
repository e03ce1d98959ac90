"""The ONNX face of ``mame::SelectiveScan``: its function body (contract.py says what it is).

An exported model keeps every scan as ONE node in the ``mame`` domain, so TensorRT's parser can
bind it to the plugin, and carries this ONNX function (standard operators only) so that
onnxruntime, ``onnx.reference`` or any other runtime executes the very same file.
``mame_deploy.ops.onnx_functions.inline_functions`` expands the nodes for runtimes that want no custom domain at all.

The body follows the reference (``reference.py``) step for step (float32 whatever the input type):

    dt    = softplus(delta + delta_bias)        (delta_softplus=1; else delta + delta_bias)
    a_t   = exp(dt_t * A),  b_t = dt_t * u_t * B_t         for all t at once, (L, batch, dim, N)
    h_t   = a_t * h_{t-1} + b_t,  y_t = h_t . C_t          one ONNX Scan over t
    out   = (y + D * u) * silu(z)
    dt_sums = dt summed over groups of 8 channels (a Conv with a kernel of ones, stride 8)

A reverse scan flips u, dt, B and C along the sequence, scans forward and flips y back; the
flip is a Slice whose step (+1 / -1) comes from the ``reverse`` attribute, so one body serves both
directions. Only the recurrence is sequential: the exponentials, the input terms and the state's
contraction with C are whole-tensor ops or tiny per-step ops. Measured against chunked
formulations of the recurrence (docs/export.md), this per-step Scan was the fastest in
onnxruntime on the CPU, so it is the one shipped.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .contract import ATTRIBUTES, DT_GROUP, DT_SUMS_NAME, INPUT_NAMES, ONNX_DOMAIN, ONNX_OP_TYPE, OUTPUT_NAME, OUTPUT_NAMES

MIN_OPSET = 18                # the body needs Shape(start, end), CastLike, axes-as-input Squeeze
_INT64_MAX = np.iinfo(np.int64).max


class _Body:
    """Collects nodes with short helpers; every value name is local to the function."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, inputs: Iterable[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attrs))
        return output

    def const(self, name: str, value, dtype) -> str:
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return self.op("Constant", [], name, value=tensor)

    def const_from_attribute(self, name: str, attribute: str) -> str:
        """An int64 scalar holding the node's attribute (Constant's value_int, referenced)."""
        node = helper.make_node("Constant", [], [name])
        node.attribute.append(helper.make_attribute_ref("value_int", onnx.AttributeProto.INT, ref_attr_name=attribute))
        self.nodes.append(node)
        return name


def _step_graph() -> onnx.GraphProto:
    """One step of the recurrence: h = a * h_prev + b, y = h @ c ((batch, dim, N) @ (batch, N, 1))."""
    g = _Body()
    g.op("Mul", ["step_decay", "step_h_prev"], "step_decayed")
    g.op("Add", ["step_decayed", "step_drive"], "step_h")
    g.op("MatMul", ["step_h", "step_c"], "step_y")
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    return helper.make_graph(
        g.nodes,
        "selective_scan_step",
        [value(n) for n in ("step_h_prev", "step_decay", "step_drive", "step_c")],
        [value("step_h"), value("step_y")],
    )


def _dt_group_sums(g: _Body, dt: str) -> str:
    """The ``dt_sums`` output: dt (batch, dim, L) summed over groups of DT_GROUP channels, as a
    Conv with a (DT_GROUP x 1) kernel of ones and stride DT_GROUP over (dim, L): its zero padding
    of the last, partial group has static shapes (an inlined file keeps every shape static)."""
    image = g.op("Unsqueeze", [dt, g.const("axis_channel", [1], np.int64)], "dt_image")
    ones = g.const("dt_group_ones", np.ones((1, 1, DT_GROUP, 1)), np.float32)
    sums = g.op("Conv", [image, ones], "dt_sums_image", kernel_shape=[DT_GROUP, 1], strides=[DT_GROUP, 1],
                pads=[0, 0, DT_GROUP - 1, 0])
    return g.op("Squeeze", [sums, "axis_channel"], DT_SUMS_NAME)


def selective_scan_function(opset: int) -> onnx.FunctionProto:
    """``mame::SelectiveScan`` as an ONNX function over the default domain at ``opset``."""
    if opset < MIN_OPSET:
        raise ValueError(f"the SelectiveScan function needs opset >= {MIN_OPSET}, got {opset}")
    g = _Body()
    f32 = TensorProto.FLOAT
    u, delta, A, B, C, D, z, bias = (
        g.op("Cast", [name], f"{name}_f32", to=f32) for name in INPUT_NAMES
    )
    last = g.const("axis_last", [-1], np.int64)
    seq_axis = g.const("axis_seq", [2], np.int64)
    first = g.const("axis_first", [0], np.int64)

    # dt = softplus(delta + bias), written as relu(x) + log(1 + exp(-|x|)), which cannot overflow.
    x = g.op("Add", [delta, g.op("Unsqueeze", [bias, last], "bias_col")], "dt_raw")
    tail = g.op("Exp", [g.op("Neg", [g.op("Abs", [x], "dt_abs")], "dt_neg_abs")], "dt_exp")
    tail = g.op("Log", [g.op("Add", [g.const("one_f", 1.0, np.float32), tail], "dt_one_plus")], "dt_log")
    softplus = g.op("Add", [g.op("Relu", [x], "dt_relu"), tail], "dt_softplus")
    use_softplus = g.op("Cast", [g.const_from_attribute("softplus_flag", "delta_softplus")], "softplus_bool",
                        to=TensorProto.BOOL)
    dt = g.op("Where", [use_softplus, softplus, x], "dt")
    _dt_group_sums(g, dt)

    # Sequence order: Slice with step +1 (forward) or -1 (reverse) along L.
    rev = g.const_from_attribute("reverse_flag", "reverse")
    step = g.op("Sub", [g.const("one_i", 1, np.int64), g.op("Mul", [g.const("two_i", 2, np.int64), rev], "rev2")],
                "seq_step_scalar")
    starts = g.op("Unsqueeze", [g.op("Neg", [rev], "seq_start_scalar"), first], "seq_start")
    ends = g.op("Unsqueeze", [g.op("Mul", [step, g.const("int64_max", _INT64_MAX, np.int64)], "seq_end_scalar"),
                              first], "seq_end")
    steps = g.op("Unsqueeze", [step, first], "seq_step")

    def in_scan_order(name: str) -> str:
        return g.op("Slice", [name, starts, ends, seq_axis, steps], f"{name}_ordered")

    dt_o, u_o, B_o, C_o = (in_scan_order(name) for name in (dt, u, B, C))

    # All steps' decays and inputs at once, step-major: (L, batch, dim, N).
    dt_steps = g.op("Unsqueeze", [g.op("Transpose", [dt_o], "dt_lbd", perm=[2, 0, 1]), last], "dt_lbd1")
    decay = g.op("Exp", [g.op("Mul", [dt_steps, A], "dt_A")], "decay")
    du = g.op("Transpose", [g.op("Mul", [dt_o, u_o], "dt_u")], "dt_u_lbd", perm=[2, 0, 1])
    B_steps = g.op("Unsqueeze", [g.op("Transpose", [B_o], "B_lbn", perm=[2, 0, 1]), seq_axis], "B_lb1n")
    drive = g.op("Mul", [g.op("Unsqueeze", [du, last], "dt_u_lbd1"), B_steps], "drive")
    C_steps = g.op("Unsqueeze", [g.op("Transpose", [C_o], "C_lbn", perm=[2, 0, 1]), last], "C_lbn1")

    # h_0 = 0 of shape (batch, dim, N), then the recurrence.
    state_shape = g.op("Concat", [g.op("Shape", [u], "batch_dim", start=0, end=1), g.op("Shape", [A], "dim_n")],
                       "state_shape", axis=0)
    h0 = g.op("ConstantOfShape", [state_shape], "h0", value=numpy_helper.from_array(np.zeros(1, np.float32)))
    g.nodes.append(helper.make_node(
        "Scan", [h0, decay, drive, C_steps], ["h_last", "y_steps"], num_scan_inputs=3, body=_step_graph()
    ))
    y = g.op("Transpose", [g.op("Squeeze", ["y_steps", last], "y_lbd")], "y_bdl_ordered", perm=[1, 2, 0])
    y = g.op("Slice", [y, starts, ends, seq_axis, steps], "y_bdl")  # back to token order

    y = g.op("Add", [y, g.op("Mul", [g.op("Unsqueeze", [D, last], "D_col"), u], "D_u")], "y_skip")
    gate = g.op("Mul", [z, g.op("Sigmoid", [z], "z_sigmoid")], "z_silu")
    out = g.op("Mul", [y, gate], "out_f32")
    g.op("CastLike", [out, "u"], OUTPUT_NAME)

    return helper.make_function(
        ONNX_DOMAIN,
        ONNX_OP_TYPE,
        list(INPUT_NAMES),
        list(OUTPUT_NAMES),
        g.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attribute_protos=[helper.make_attribute(name, value) for name, value in ATTRIBUTES.items()],
        doc_string="Selective scan (Mamba), float32 state; see mame_deploy/ops/selective_scan.",
    )
