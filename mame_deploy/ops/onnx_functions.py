"""The ONNX functions an export carries: one per custom operator of the ``mame`` domain.

An exported model keeps each custom operator (``SelectiveScan``, ``TokenMerge``) as nodes in the
``mame`` domain, so TensorRT's parser can bind them to plugins, and carries each operator's ONNX
function (standard operators only), so onnxruntime, ``onnx.reference`` or any other runtime
executes the very same file. ``inline_functions`` expands the nodes for runtimes that want no
custom domain at all.
"""

from __future__ import annotations

from typing import Callable

import onnx
import onnx.inliner
import onnxscript.optimizer
from onnx import helper

from mame_deploy.ops.selective_scan import contract as scan_contract
from mame_deploy.ops.selective_scan.onnx_function import MIN_OPSET as SCAN_MIN_OPSET
from mame_deploy.ops.selective_scan.onnx_function import selective_scan_function
from mame_deploy.ops.token_merge import contract as merge_contract
from mame_deploy.ops.token_merge.onnx_function import MIN_OPSET as MERGE_MIN_OPSET
from mame_deploy.ops.token_merge.onnx_function import token_merge_function

# Both operators live in one domain at one version (each contract says so).
DOMAIN, DOMAIN_VERSION = scan_contract.ONNX_DOMAIN, scan_contract.FUNCTION_VERSION
if (merge_contract.ONNX_DOMAIN, merge_contract.FUNCTION_VERSION) != (DOMAIN, DOMAIN_VERSION):
    raise RuntimeError("the operator contracts disagree on the ONNX domain or its version")
# op_type -> builder of its function at a default-domain opset. A new operator adds one line.
FUNCTIONS: dict[str, Callable[[int], onnx.FunctionProto]] = {
    scan_contract.ONNX_OP_TYPE: selective_scan_function,
    merge_contract.ONNX_OP_TYPE: token_merge_function,
}
MIN_OPSET = max(SCAN_MIN_OPSET, MERGE_MIN_OPSET)  # the lowest default-domain opset every body runs on
OPSETS = range(MIN_OPSET, 24)  # the default-domain opsets an export may target


def custom_nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    """The main graph's ``mame::op_type`` nodes."""
    return [node for node in model.graph.node if node.domain == DOMAIN and node.op_type == op_type]


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("the model imports no default-domain opset")


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give ``model`` (in place) the function of every custom operator it uses, replacing any
    earlier copy, and declare the ``mame`` opset. A model without such nodes is left alone."""
    used = [op for op in FUNCTIONS if custom_nodes(model, op)]
    if not used:
        return model
    opset = default_opset(model)
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in used)]
    del model.functions[:]
    model.functions.extend(kept + [FUNCTIONS[op](opset) for op in used])
    if not any(entry.domain == DOMAIN for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    return model


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every custom node replaced by its function body: no custom
    domain remains, neither in nodes nor in functions nor in the opset imports.

    Once inlined, each node's attributes are constants, so folding them (onnxscript's constant
    folding) turns attribute-driven Slices and Ifs into plain ops and every tensor gets a static
    shape again, as in the file with the custom nodes."""
    model = attach_functions(onnx.ModelProto.FromString(model.SerializeToString()))
    inlined = onnx.inliner.inline_local_functions(model)
    onnxscript.optimizer.fold_constants(inlined)
    onnxscript.optimizer.remove_unused_nodes(inlined)
    del inlined.functions[:]
    kept = [entry for entry in inlined.opset_import if entry.domain != DOMAIN]
    del inlined.opset_import[:]
    inlined.opset_import.extend(kept)
    return inlined
