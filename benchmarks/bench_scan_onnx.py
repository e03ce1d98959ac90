"""ONNX formulations of the selective scan in onnxruntime (CPU): why ops/selective_scan/onnx_function.py uses a
per-step Scan.

    python benchmarks/bench_scan_onnx.py --threads 2 --batch 1 8 [--dim 768 --length 197]

"shipped" is the function of ops/selective_scan/onnx_function.py (one mame::SelectiveScan node). The others
are alternatives for the recurrence h_t = a_t * h_{t-1} + b_t, forward direction, softplus on,
built here only to be timed: the input term or the decay computed inside the step, and two
chunked forms (a Scan over chunks of T steps unrolled in the body; a doubling parallel scan
within chunks with a Scan across chunks). Each is checked against selective_scan_ref, then timed
(interleaved, min and median of --iters calls) beside the PyTorch reference loop.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from mame_deploy.ops.selective_scan import selective_scan_ref
from mame_deploy.ops.selective_scan.contract import INPUT_NAMES
from mame_deploy.ops.onnx_functions import attach_functions

F = TensorProto.FLOAT


class Graph:
    def __init__(self):
        self.nodes = []

    def __call__(self, op, inputs, output, **attrs):
        self.nodes.append(helper.make_node(op, list(inputs), [output], **attrs))
        return output

    def const(self, name, value, dtype=np.int64):
        return self(op="Constant", inputs=[], output=name, value=numpy_helper.from_array(np.asarray(value, dtype), name))


def _value(name):
    return helper.make_tensor_value_info(name, F, None)


def _preamble(g: Graph) -> None:
    """dt, step-major decays/inputs/C and the zero state, as the shipped body computes them."""
    last, two = g.const("last", [-1]), g.const("two", [2])
    g("Softplus", [g("Add", ["delta", g("Unsqueeze", ["delta_bias", last], "bias_col")], "x")], "dt")
    g("Unsqueeze", [g("Transpose", ["dt"], "dt_l", perm=[2, 0, 1]), last], "dt4")
    g("Unsqueeze", [g("Transpose", [g("Mul", ["dt", "u"], "du")], "du_l", perm=[2, 0, 1]), last], "du4")
    g("Unsqueeze", [g("Transpose", ["B"], "B_l", perm=[2, 0, 1]), two], "B4")
    g("Unsqueeze", [g("Transpose", ["C"], "C_l", perm=[2, 0, 1]), last], "C4")
    shape = g("Concat", [g("Shape", ["u"], "b_", start=0, end=1), g("Shape", ["A"], "dn")], "hshape", axis=0)
    g("ConstantOfShape", [shape], "h0", value=numpy_helper.from_array(np.zeros(1, np.float32)))


def _epilogue(g: Graph, y_steps: str) -> None:
    """(L, B, D, 1) scan outputs -> (y + D u) silu(z), (B, D, L)."""
    last = "last"
    y = g("Transpose", [g("Squeeze", [y_steps, last], "y_l")], "y", perm=[1, 2, 0])
    y = g("Add", [y, g("Mul", [g("Unsqueeze", ["D", last], "D_col"), "u"], "Du")], "yD")
    g("Mul", [y, g("Mul", ["z", g("Sigmoid", ["z"], "sz")], "gate")], "out")


def _step_body(nodes, inputs, outputs):
    return helper.make_graph(nodes, "step", [_value(n) for n in inputs], [_value(n) for n in outputs])


def precomputed_both(g: Graph, drive_in_step: bool = False, decay_in_step: bool = False) -> None:
    _preamble(g)
    body = [helper.make_node("Mul", ["s_a", "s_h"], ["s_ah"]), helper.make_node("Add", ["s_ah", "s_b"], ["s_hn"]),
            helper.make_node("MatMul", ["s_hn", "s_c"], ["s_y"])]
    scanned = []
    if decay_in_step:
        body[:0] = [helper.make_node("Mul", ["s_dt", "A"], ["s_dA"]), helper.make_node("Exp", ["s_dA"], ["s_a"])]
        scanned.append(("dt4", "s_dt"))
    else:
        g("Exp", [g("Mul", ["dt4", "A"], "dA")], "decay")
        scanned.append(("decay", "s_a"))
    if drive_in_step:
        body.insert(0, helper.make_node("MatMul", ["s_du", "s_B"], ["s_b"]))  # (B,D,1) @ (B,1,N)
        scanned += [("du4", "s_du"), ("B4", "s_B")]
    else:
        g("Mul", ["du4", "B4"], "drive")
        scanned.append(("drive", "s_b"))
    scanned.append(("C4", "s_c"))
    graph = _step_body(body, ["s_h"] + [inner for _, inner in scanned], ["s_hn", "s_y"])
    g.nodes.append(helper.make_node("Scan", ["h0"] + [outer for outer, _ in scanned], ["hL", "ys"],
                                    num_scan_inputs=len(scanned), body=graph))
    _epilogue(g, "ys")


def _chunked_inputs(g: Graph, T: int) -> None:
    """decay/drive padded to a multiple of T steps (decay 1, drive 0: padding changes nothing
    before it) and reshaped to (L / T, T, B, D, N)."""
    g("Exp", [g("Mul", ["dt4", "A"], "dA")], "decay")
    g("Mul", ["du4", "B4"], "drive")
    zero, axis0 = g.const("zero", [0]), g.const("axis0", [0])
    steps = g("Shape", ["decay"], "L", start=0, end=1)
    pad = g("Mod", [g("Sub", [g.const("T", [T]), steps], "T_minus_L"), "T"], "pad")
    pads = g("Concat", [zero, pad], "pads", axis=0)
    one = g.const("one_f", 1.0, np.float32)
    shape = g("Concat", [g.const("m1T", [-1, T]), g("Shape", ["decay"], "BDN", start=1)], "chunk_shape", axis=0)
    g("Reshape", [g("Pad", ["decay", pads, one, axis0], "decay_p"), shape], "decay5")
    g("Reshape", [g("Pad", ["drive", pads, "", axis0], "drive_p"), shape], "drive5")
    cshape = g("Concat", ["m1T", g("Shape", ["C4"], "BN1", start=1)], "c_shape", axis=0)
    g("Reshape", [g("Pad", ["C4", pads, "", axis0], "C_p"), cshape], "C5")


def _unchunk(g: Graph, name: str, out: str) -> None:
    """(L / T, T, ...) -> (L, ...), padding dropped."""
    shape = g("Concat", [g.const(f"{name}_m1", [-1]), g("Shape", [name], f"{name}_tail", start=2)], f"{name}_s", axis=0)
    g("Slice", [g("Reshape", [name, shape], f"{name}_flat"), "zero", "L", "zero"], out)


def chunk_unrolled(g: Graph, T: int) -> None:
    _preamble(g)
    _chunked_inputs(g, T)
    body = [helper.make_node("Constant", [], ["s_ax0"], value=numpy_helper.from_array(np.array([0]), "s_ax0")),
            helper.make_node("Split", ["s_a"], [f"s_a{t}" for t in range(T)], axis=0, num_outputs=T),
            helper.make_node("Split", ["s_b"], [f"s_b{t}" for t in range(T)], axis=0, num_outputs=T),
            helper.make_node("Unsqueeze", ["s_h", "s_ax0"], ["s_h_"])]
    prev = "s_h_"
    for t in range(T):
        body += [helper.make_node("Mul", [f"s_a{t}", prev], [f"s_m{t}"]),
                 helper.make_node("Add", [f"s_m{t}", f"s_b{t}"], [f"s_h{t}"])]
        prev = f"s_h{t}"
    body += [helper.make_node("Concat", [f"s_h{t}" for t in range(T)], ["s_hs"], axis=0),
             helper.make_node("MatMul", ["s_hs", "s_c"], ["s_y"]),
             helper.make_node("Squeeze", [prev, "s_ax0"], ["s_hn"])]
    graph = _step_body(body, ["s_h", "s_a", "s_b", "s_c"], ["s_hn", "s_y"])
    g.nodes.append(helper.make_node("Scan", ["h0", "decay5", "drive5", "C5"], ["hL", "ys5"], num_scan_inputs=3,
                                    body=graph))
    _unchunk(g, "ys5", "ys")
    _epilogue(g, "ys")


def chunk_doubling(g: Graph, T: int) -> None:
    """Within each chunk, log2(T) doubling steps (a_t *= a_{t-k}; b_t += a_t b_{t-k}) give the
    chunk-local states and decay products; a Scan over chunks carries the state across."""
    _preamble(g)
    _chunked_inputs(g, T)
    big, axis1 = g.const("big", [2 ** 62]), g.const("axis1", [1])
    a, b, k, i = "decay5", "drive5", 1, 0
    while k < T:
        head, tail = g.const(f"k{i}", [k]), g.const(f"rest{i}", [T - k])
        prev_a, prev_b = g("Slice", [a, "zero", tail, axis1], f"pa{i}"), g("Slice", [b, "zero", tail, axis1], f"pb{i}")
        cur_a, cur_b = g("Slice", [a, head, big, axis1], f"ca{i}"), g("Slice", [b, head, big, axis1], f"cb{i}")
        new_b = g("Add", [cur_b, g("Mul", [cur_a, prev_b], f"ab{i}")], f"nb{i}")
        new_a = g("Mul", [cur_a, prev_a], f"na{i}")
        a = g("Concat", [g("Slice", [a, "zero", head, axis1], f"ha{i}"), new_a], f"a{i}", axis=1)
        b = g("Concat", [g("Slice", [b, "zero", head, axis1], f"hb{i}"), new_b], f"b{i}", axis=1)
        k, i = 2 * k, i + 1
    end = g.const("last_step", [T - 1])
    g("Squeeze", [g("Slice", [a, end, big, axis1], "a_end"), axis1], "a_end4")
    g("Squeeze", [g("Slice", [b, end, big, axis1], "b_end"), axis1], "b_end4")
    body = [helper.make_node("Identity", ["s_h"], ["s_in"]), helper.make_node("Mul", ["s_a", "s_h"], ["s_ah"]),
            helper.make_node("Add", ["s_ah", "s_b"], ["s_hn"])]
    graph = _step_body(body, ["s_h", "s_a", "s_b"], ["s_hn", "s_in"])
    g.nodes.append(helper.make_node("Scan", ["h0", "a_end4", "b_end4"], ["hL", "carry"], num_scan_inputs=2,
                                    body=graph))
    states = g("Add", [b, g("Mul", [a, g("Unsqueeze", ["carry", axis1], "carry5")], "carried")], "h5")
    _unchunk(g, states, "hs")
    g("MatMul", ["hs", "C4"], "ys")
    _epilogue(g, "ys")


def _model(build, shapes) -> onnx.ModelProto:
    g = Graph()
    build(g)
    graph = helper.make_graph(g.nodes, "scan", [helper.make_tensor_value_info(n, F, shapes[n]) for n in INPUT_NAMES],
                              [helper.make_tensor_value_info("out", F, shapes["u"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def shipped(shapes) -> onnx.ModelProto:
    node = helper.make_node("SelectiveScan", list(INPUT_NAMES), ["out"], domain="mame", delta_softplus=1, reverse=0)
    graph = helper.make_graph([node], "scan", [helper.make_tensor_value_info(n, F, shapes[n]) for n in INPUT_NAMES],
                              [helper.make_tensor_value_info("out", F, shapes["u"])])
    return attach_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10))


VARIANTS = {
    "shipped: per-step Scan, decays and inputs precomputed": shipped,
    "per-step Scan, exp(dt A) inside the step": lambda s: _model(lambda g: precomputed_both(g, decay_in_step=True), s),
    "per-step Scan, input term inside the step (MatMul)": lambda s: _model(lambda g: precomputed_both(g, drive_in_step=True), s),
    "chunks of 8 steps unrolled in a Scan body": lambda s: _model(lambda g: chunk_unrolled(g, 8), s),
    "chunks of 16 steps unrolled in a Scan body": lambda s: _model(lambda g: chunk_unrolled(g, 16), s),
    "doubling scan in chunks of 16, Scan across chunks": lambda s: _model(lambda g: chunk_doubling(g, 16), s),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dstate", type=int, default=16)
    parser.add_argument("--length", type=int, default=197)
    parser.add_argument("--iters", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    for batch in args.batch:
        D, N, L = args.dim, args.dstate, args.length
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        inputs = dict(u=r(batch, D, L), delta=0.5 * r(batch, D, L), A=-torch.exp(r(D, N).clamp(-2, 2.5)),
                      B=r(batch, N, L), C=r(batch, N, L), D=r(D), z=r(batch, D, L), delta_bias=r(D) - 2)
        shapes = {name: list(t.shape) for name, t in inputs.items()}
        feeds = {name: t.numpy() for name, t in inputs.items()}
        ref = selective_scan_ref(*inputs.values(), delta_softplus=True).numpy()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        runs = {}
        for name, build in VARIANTS.items():
            session = ort.InferenceSession(build(shapes).SerializeToString(), options, providers=["CPUExecutionProvider"])
            err = float(np.abs(session.run(None, feeds)[0] - ref).max() / np.abs(ref).max())
            runs[name] = (lambda s=session: s.run(None, feeds), err)
        runs["PyTorch reference loop (selective_scan_ref)"] = (
            lambda: selective_scan_ref(*inputs.values(), delta_softplus=True), 0.0)
        times = {name: [] for name in runs}
        for _ in range(args.iters):  # interleaved, so load changes hit every variant alike
            for name, (call, _) in runs.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        table = Table(title=f"one scan, batch {batch}, dim {D}, dstate {N}, length {L}, {args.threads} threads "
                            f"(onnxruntime {ort.__version__}, {args.iters} calls)")
        for col in ("formulation", "min ms", "median ms", "max rel err"):
            table.add_column(col, justify="left" if col == "formulation" else "right")
        for name, (_, err) in runs.items():
            t = np.array(times[name]) * 1e3
            table.add_row(name, f"{t.min():.2f}", f"{np.median(t):.2f}", f"{err:.1e}")
        console.print(table)


if __name__ == "__main__":
    main()
