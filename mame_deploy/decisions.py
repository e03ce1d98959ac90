"""Merge decisions across runtimes: which tokens every merge step kept, traced in PyTorch and in
an exported file, and the samples on which two runs decided differently.

A merge step makes discrete choices from float values (see ops/token_merge/contract.py), so
two runtimes whose float32 results differ by rounding may, at a near-tie, merge different
tokens; from there on the two runs compute different (equally valid) models for that sample.
``validate`` therefore compares the decisions first and holds each sample to the parity rule
only where they agree, reporting the rest. The decision of a step is the ``origin`` of its
surviving tokens (B, L - r) and their ``size`` (patches each stands for): equal origins say the
same tokens survived in the same order, equal sizes that the removed ones went to the same
destinations (sizes are sums of whole patch counts, exact in float32).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from mame_deploy.ops.onnx_functions import custom_nodes
from mame_deploy.ops.token_merge.contract import ONNX_OP_TYPE, OUTPUT_NAMES

TRACE_PREFIX = "merge_decision_after_block_"
TRACED = ("origin_out", "size_out")     # the outputs of a step that make up its decision


def trace_name(layer: int, output: str = "origin_out") -> str:
    return f"{TRACE_PREFIX}{layer}_{output}"


def with_decision_outputs(model: onnx.ModelProto, layers: Sequence[int]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs each TokenMerge node's ``origin`` and ``size`` (graph
    order is merge order, so node i follows block ``layers[i]``); the file itself stays as it is."""
    nodes = custom_nodes(model, ONNX_OP_TYPE)
    if len(nodes) != len(layers):
        raise ValueError(f"the model has {len(nodes)} {ONNX_OP_TYPE} nodes, the schedule {len(layers)} merge steps")
    traced = onnx.ModelProto()
    traced.CopyFrom(model)
    types = {"origin_out": TensorProto.INT64, "size_out": TensorProto.FLOAT}
    for node, layer in zip(nodes, layers):
        for output in TRACED:
            name = trace_name(layer, output)
            traced.graph.node.append(helper.make_node("Identity", [node.output[OUTPUT_NAMES.index(output)]], [name]))
            traced.graph.output.append(helper.make_tensor_value_info(name, types[output], None))
    return traced


def compare_decisions(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                      layers: Sequence[int]) -> dict:
    """Per merge step, the samples whose decisions differ from the reference's.

    Returns ``layers``; ``differing``: per step, how many samples kept other tokens there;
    ``first_flips``: per step, how many samples differ there for the first time (a flip
    changes what every later step sees); ``flipped``: per sample, whether any step differs;
    ``first_step``: per sample, the index of its first differing step (-1: none).
    """
    if not layers:
        return {"layers": [], "differing": [], "first_flips": [], "flipped": None, "first_step": None}
    steps = [np.any([np.any(outputs[trace_name(layer, o)] != reference[trace_name(layer, o)], axis=1)
                     for o in TRACED], axis=0) for layer in layers]
    differs = np.stack(steps)                                   # (steps, samples)
    flipped = differs.any(axis=0)
    first = np.where(flipped, differs.argmax(axis=0), -1)
    return {
        "layers": [int(layer) for layer in layers],
        "differing": [int(d.sum()) for d in differs],
        "first_flips": [int((first == i).sum()) for i in range(len(layers))],
        "flipped": flipped,
        "first_step": first,
    }


# Near-tie test: a flip is explained when PyTorch itself decides that step differently once the
# step's inputs carry relative noise of NEAR_TIE_NOISE -- the parity tolerance itself, so such a
# decision is a tie by the standard the logits are held to -- in one of NEAR_TIE_TRIALS tries.
NEAR_TIE_NOISE = 1e-4
NEAR_TIE_TRIALS = 32


def near_tie(model, image: np.ndarray, step: int, trials: int = NEAR_TIE_TRIALS, noise: float = NEAR_TIE_NOISE,
             seed: int = 0) -> bool:
    """Whether merge step ``step`` (an index into the model's merge layers) of ``image`` (C, H, W)
    is a near-tie for PyTorch: with small noise on that step's inputs alone, its decision there
    changes. The copies run as one batch (samples are batch-independent)."""
    import torch

    merge = model.token_merge
    layers = merge.layers
    x = torch.from_numpy(np.ascontiguousarray(image))[None].float()
    torch.manual_seed(seed)
    with torch.inference_mode():
        merge.trace = {}
        try:
            model(x)
            clean = dict(merge.trace)
            merge.trace, merge.perturb = {}, (layers[step], noise)
            model(x.expand(trials, *x.shape[1:]).contiguous())
            noisy = dict(merge.trace)
        finally:
            merge.trace, merge.perturb = None, None
    layer = layers[step]
    return bool(any(np.any(noisy[layer][i].numpy() != clean[layer][i].numpy()) for i in range(len(TRACED))))
