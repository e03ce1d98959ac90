"""The ONNX function of mame::SelectiveScan against the PyTorch reference, in onnxruntime and
onnx.reference, through the node (function) and inlined."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from mame_deploy.ops.selective_scan.contract import INPUT_NAMES, OUTPUT_NAMES, dt_groups
from mame_deploy.ops.selective_scan.reference import scan_ref_outputs
from mame_deploy.ops.onnx_functions import attach_functions, inline_functions
from mame_deploy.ops.onnx_functions import custom_nodes
from mame_deploy.ops.selective_scan.onnx_function import MIN_OPSET, selective_scan_function


def scan_model(batch, dim, dstate, length, delta_softplus, reverse, opset=20, output_shape=True):
    shapes = {
        "u": [batch, dim, length], "delta": [batch, dim, length], "A": [dim, dstate],
        "B": [batch, dstate, length], "C": [batch, dstate, length], "D": [dim],
        "z": [batch, dim, length], "delta_bias": [dim],
    }
    node = helper.make_node("SelectiveScan", list(INPUT_NAMES), ["y", "dt_sums"], domain="mame",
                            delta_softplus=delta_softplus, reverse=reverse)
    out_shape = [batch, dim, length] if output_shape else None
    sums_shape = [batch, dt_groups(dim), length] if output_shape else None
    graph = helper.make_graph(
        [node], "scan",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in INPUT_NAMES],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape),
         helper.make_tensor_value_info("dt_sums", TensorProto.FLOAT, sums_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return attach_functions(model)


def scan_inputs(batch, dim, dstate, length, seed, delta_scale=1.0, softplus=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    delta = delta_scale * r(batch, dim, length)
    if not softplus:  # without softplus the step must be positive, as a real dt is
        delta = delta.abs() * 0.2
    return dict(
        u=r(batch, dim, length), delta=delta, A=-torch.exp(r(dim, dstate).clamp(-2, 2.5)),
        B=r(batch, dstate, length), C=r(batch, dstate, length), D=r(dim),
        z=r(batch, dim, length), delta_bias=r(dim) - 1 if softplus else torch.zeros(dim),
    )


def expected(inputs, softplus, reverse):
    """(out, dt_sums) of the reference, as arrays."""
    outputs = scan_ref_outputs(*inputs.values(), delta_softplus=bool(softplus), reverse=bool(reverse))
    return tuple(t.numpy() for t in outputs)


def run_ort(model, inputs):
    """(out, dt_sums) from onnxruntime."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return tuple(session.run(None, {k: v.numpy() for k, v in inputs.items()}))


def assert_outputs_close(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("softplus", [0, 1])
@pytest.mark.parametrize("shape", [(1, 4, 1, 1), (2, 8, 16, 13), (3, 6, 4, 37)])
def test_function_matches_reference_in_onnxruntime(shape, softplus, reverse):
    inputs = scan_inputs(*shape, seed=sum(shape), softplus=bool(softplus))
    model = scan_model(*shape, softplus, reverse)
    assert_outputs_close(run_ort(model, inputs), expected(inputs, softplus, reverse))


@pytest.mark.parametrize("reverse", [0, 1])
def test_function_runs_in_onnx_reference(reverse):
    inputs = scan_inputs(2, 5, 4, 9, seed=3)
    model = scan_model(2, 5, 4, 9, 1, reverse)
    outputs = ReferenceEvaluator(model).run(None, {k: v.numpy() for k, v in inputs.items()})
    assert_outputs_close(outputs, expected(inputs, 1, reverse))


def test_softplus_is_stable_for_large_steps():
    # |delta| up to ~100: a naive log(1 + exp(x)) overflows to inf in float32.
    inputs = scan_inputs(1, 8, 4, 12, seed=5, delta_scale=40.0)
    model = scan_model(1, 8, 4, 12, 1, 0)
    ref = expected(inputs, 1, 0)
    for outputs in (run_ort(model, inputs),
                    ReferenceEvaluator(model).run(None, {k: v.numpy() for k, v in inputs.items()})):
        assert all(np.isfinite(out).all() for out in outputs)
        assert_outputs_close(outputs, ref)


def test_checker_and_static_output_shape_through_the_function():
    onnx.checker.check_model(scan_model(2, 8, 4, 13, 1, 1), full_check=True)
    model = scan_model(2, 8, 4, 13, 1, 1, output_shape=False)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = [[d.dim_value for d in out.type.tensor_type.shape.dim] for out in inferred.graph.output]
    assert dims == [[2, 8, 13], [2, 1, 13]]


@pytest.mark.parametrize("reverse", [0, 1])
def test_inlined_equals_node_and_has_no_custom_domain(reverse):
    model = scan_model(2, 6, 4, 11, 1, reverse)
    inlined = inline_functions(model)
    onnx.checker.check_model(inlined, full_check=True)
    assert not inlined.functions and not custom_nodes(inlined, "SelectiveScan")
    assert {entry.domain for entry in inlined.opset_import} == {""}
    assert all(node.domain == "" for node in inlined.graph.node)
    inputs = scan_inputs(2, 6, 4, 11, seed=7)
    for got, want in zip(run_ort(inlined, inputs), run_ort(model, inputs), strict=True):
        np.testing.assert_array_equal(got, want)
    # After inlining, the direction is a constant: every tensor has a static shape again.
    inferred = onnx.shape_inference.infer_shapes(inlined, strict_mode=True, data_prop=True)
    for value in inferred.graph.value_info:
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value.name


def test_attach_is_idempotent_and_declares_the_domain():
    model = scan_model(1, 4, 2, 3, 1, 0)
    attach_functions(model)
    assert [(f.domain, f.name) for f in model.functions] == [("mame", "SelectiveScan")]
    assert sorted((o.domain, o.version) for o in model.opset_import) == [("", 20), ("mame", 1)]
    fn = model.functions[0]
    assert list(fn.input) == list(INPUT_NAMES)
    assert list(fn.output) == list(OUTPUT_NAMES)
    assert {a.name for a in fn.attribute_proto} == {"delta_softplus", "reverse"}
    assert "NonZero" not in {n.op_type for n in fn.node}


def test_function_needs_opset_18():
    with pytest.raises(ValueError, match="opset >= 18"):
        selective_scan_function(MIN_OPSET - 1)
