"""The ONNX face of mame::TokenMerge: one node carrying its function equals the reference for
every combination of attributes, in onnxruntime and onnx.reference, class token anywhere."""

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from mame_deploy.ops.token_merge.contract import INPUT_NAMES, OUTPUT_NAMES, MergeAttributes
from mame_deploy.ops.token_merge.onnx_function import MIN_OPSET, token_merge_function
from mame_deploy.ops.token_merge.reference import token_merge_ref

B, L, E, R = 3, 25, 8, 6
K = 11  # score parts: not a multiple of SCORE_LANES, so the last lanes hold fewer
K_B = 5  # score_b parts: concatenated after an odd count, so a lane takes parts of both


def one_node(attrs: MergeAttributes) -> onnx.ModelProto:
    node = helper.make_node("TokenMerge", list(INPUT_NAMES), list(OUTPUT_NAMES), domain="mame", **attrs.as_dict())
    types = {"hidden": TensorProto.FLOAT, "residual": TensorProto.FLOAT, "score": TensorProto.FLOAT,
             "score_b": TensorProto.FLOAT, "size": TensorProto.FLOAT, "origin": TensorProto.INT64,
             "cls": TensorProto.INT64}
    shapes = {"hidden": [B, L, E], "residual": [B, L, E], "score": [B, K, L], "score_b": [B, K_B, L], "cls": [B]}
    inputs = [helper.make_tensor_value_info(n, types[n], shapes.get(n, [B, L])) for n in INPUT_NAMES]
    outputs = [helper.make_value_info(n, onnx.TypeProto()) for n in OUTPUT_NAMES]
    return helper.make_model(helper.make_graph([node], "merge", inputs, outputs),
                             opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("mame", 1)],
                             functions=[token_merge_function(20)])


def inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = 1 + torch.randint(0, 3, (B, L), generator=g).float()
    origin = torch.sort(torch.randperm(3 * L, generator=g)[:L]).values.expand(B, L).clone()
    return dict(hidden=torch.randn(B, L, E, generator=g), residual=torch.randn(B, L, E, generator=g),
                score=torch.rand(B, K, L, generator=g) + 0.05, score_b=torch.rand(B, K_B, L, generator=g) + 0.05,
                size=size, origin=origin,
                cls=torch.tensor([L // 2, 0, L - 1]))    # the class token in the middle, first, last


def combinations():
    yield MergeAttributes(R, prune=1, score_scale=0.1)
    for split, arrangement, weighting, metric, lam in itertools.product((0, 1), (0, 1), (0, 1), (0, 1), (0.0, 1.0)):
        yield MergeAttributes(R, 0, split, arrangement, weighting, metric, lam, 1.0 if lam else 1 / 3)


@pytest.mark.parametrize("attrs", list(combinations()), ids=lambda a: "-".join(f"{v:g}" for v in a.as_dict().values()))
def test_function_equals_the_reference(attrs):
    args = inputs(seed=int(sum(attrs.as_dict().values())))
    want = token_merge_ref(*args.values(), attrs)
    model = one_node(attrs)
    feeds = {name: t.numpy() for name, t in args.items()}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for got in (session.run(None, feeds), ReferenceEvaluator(model).run(None, feeds)):
        for name, value, ref in zip(OUTPUT_NAMES, got, want):
            np.testing.assert_allclose(value, ref.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


def test_ties_are_broken_by_position_as_in_the_reference():
    """Equal scores and duplicate tokens: exact ties everywhere, resolved alike."""
    args = inputs(seed=3)
    args["score"], args["score_b"] = torch.full((B, K, L), 0.5), torch.full((B, K_B, L), 0.25)
    args["hidden"][:, 1::2] = args["hidden"][:, :1]            # many identical rows: tied similarities
    attrs = MergeAttributes(R, lam=1.0)
    want = token_merge_ref(*args.values(), attrs)
    session = ort.InferenceSession(one_node(attrs).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: t.numpy() for name, t in args.items()})
    for name, value, ref in zip(OUTPUT_NAMES, got, want):
        np.testing.assert_allclose(value, ref.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


def test_function_sums_the_score_parts_as_the_reference():
    """The informativeness the function computes from the parts has the reference's bits (so a
    runtime's score rounding cannot flip a decision): lanes summed in order, K not a multiple of
    the lanes, one part, and vim_s's 192."""
    from mame_deploy.ops.onnx_builder import Body
    from mame_deploy.ops.token_merge.onnx_function import _Ops
    from mame_deploy.ops.token_merge.reference import informativeness

    for parts in (1, 8, 11, 192):
        g = Body()
        ops = _Ops(g, "unused")
        g.op("Identity", [ops.informativeness("parts", ops.scalar(0.1, onnx.TensorProto.FLOAT))], "score")
        graph = helper.make_graph(g.nodes, "score",
                                  [helper.make_tensor_value_info("parts", TensorProto.FLOAT, [2, parts, L])],
                                  [helper.make_tensor_value_info("score", TensorProto.FLOAT, [2, L])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
        x = torch.exp(torch.randn(2, parts, L, generator=torch.Generator().manual_seed(parts)))
        want = informativeness(x, 0.1).numpy()
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {"parts": x.numpy()})[0]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ReferenceEvaluator(model).run(None, {"parts": x.numpy()})[0], want)


def test_function_needs_opset_18():
    with pytest.raises(ValueError, match="opset >= 18"):
        token_merge_function(MIN_OPSET - 1)


@pytest.mark.parametrize("attrs", [MergeAttributes(3, lam=1.0), MergeAttributes(3, prune=1)], ids=["mame", "prune"])
def test_op_passes_torch_library_checks(attrs):
    """Fake and real outputs agree in shape, dtype and strides, so torch.compile can trace the op."""
    from mame_deploy.ops.fixtures import merge_inputs
    from mame_deploy.ops.token_merge.contract import ATTRIBUTES

    inputs = merge_inputs(2, 17, 8, device="cpu")
    values = attrs.as_dict()
    torch.library.opcheck(torch.ops.mame.token_merge.default,
                          (*inputs.values(), *(values[a] for a in ATTRIBUTES)))
