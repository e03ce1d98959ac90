"""Both TensorRT plugins declare what their operator's contract says, without TensorRT: bound
against a stand-in ``tensorrt`` module, every registered function (shape, formats, AOT, Python)
takes the contract's inputs in order and then exactly its attributes in order. TensorRT passes
a node's attributes to these functions by name, so a parameter that drifts from the contract
(an attribute added to the node but not to the plugin) would only fail inside an engine build,
on a machine that has the builder."""

from __future__ import annotations

import inspect
import sys
import types

import pytest

from mame_deploy.ops.selective_scan import contract as scan_contract
from mame_deploy.ops.token_merge import contract as merge_contract
from mame_deploy.plugins import trt_plugin, trt_token_merge


@pytest.fixture
def stand_in_tensorrt(monkeypatch):
    """A ``tensorrt`` whose ``plugin`` decorators record the functions they are given."""
    registered = {}

    def recorder(kind):
        def for_id(plugin_id):
            def record(fn):
                registered[(plugin_id, kind)] = fn
                return fn
            return record
        return for_id

    trtp = types.ModuleType("tensorrt.plugin")
    for kind in ("register", "autotune", "aot_impl", "impl"):
        setattr(trtp, kind, recorder(kind))
    for name in ("TensorDesc", "Tensor", "AutoTuneCombination", "KernelLaunchParams", "SymIntExprs"):
        setattr(trtp, name, type(name, (), {}))
    trt = types.ModuleType("tensorrt")
    trt.float32, trt.float16, trt.bfloat16, trt.int64 = "FP32", "FP16", "BF16", "INT64"
    trt.plugin = trtp
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    return registered


PLUGINS = {
    "scan": (trt_plugin, scan_contract.PLUGIN_ID, scan_contract.INPUT_NAMES, tuple(scan_contract.ATTRIBUTES)),
    "merge": (trt_token_merge, merge_contract.PLUGIN_ID, merge_contract.INPUT_NAMES, merge_contract.ATTRIBUTES),
}


@pytest.mark.parametrize("plugin", list(PLUGINS))
def test_plugin_functions_take_the_contracts_inputs_then_its_attributes(stand_in_tensorrt, plugin):
    module, plugin_id, inputs, attributes = PLUGINS[plugin]
    module._bind_aot()
    module._bind_jit()
    for kind in ("register", "autotune", "aot_impl", "impl"):
        fn = stand_in_tensorrt[(plugin_id, kind)]
        params = tuple(inspect.signature(fn).parameters)
        assert params[: len(inputs)] == inputs, (kind, params)
        if kind == "autotune":  # formats see the tensors only
            assert params[len(inputs):] == ("outputs",), (kind, params)
            continue
        assert params[len(inputs): len(inputs) + len(attributes)] == attributes, (kind, params)
        rest = {"register": (), "aot_impl": ("outputs", "tactic"), "impl": ("outputs", "stream")}[kind]
        assert params[len(inputs) + len(attributes):] == rest, (kind, params)


def test_merge_attributes_of_takes_every_attribute_in_order():
    assert tuple(inspect.signature(trt_token_merge.attributes_of).parameters) == merge_contract.ATTRIBUTES
    attrs = trt_token_merge.attributes_of(*([6], [0], [1], [1], [1], [0]), [1.5], [0.25])
    assert attrs == merge_contract.MergeAttributes(6, 0, 1, 1, 1, 0, 1.5, 0.25)
