"""Building ONNX function bodies by hand: a node list with short helpers (shared by the
operators' ONNX faces). Every value name is local to the function or subgraph being built."""

from __future__ import annotations

import itertools
from typing import Iterable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Body:
    """Collects nodes; ``op`` returns the output name so calls nest like expressions."""

    def __init__(self, prefix: str = "", parent: Optional["Body"] = None):
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        # One counter for a body and its subgraphs: every name is unique in the whole function.
        self._names = parent._names if parent is not None else itertools.count()

    def child(self, prefix: str) -> "Body":
        """A Body for a subgraph (an If branch) whose names cannot clash with this one's."""
        return Body(prefix, self)

    def fresh(self, hint: str) -> str:
        return f"{self.prefix}{hint}_{next(self._names)}"

    def op(self, op_type: str, inputs: Iterable[str], output: Optional[str] = None, **attrs) -> str:
        output = output or self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attrs))
        return output

    def ops(self, op_type: str, inputs: Iterable[str], outputs: Iterable[str], **attrs) -> list[str]:
        outputs = list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, **attrs))
        return outputs

    def const(self, value, dtype, name: Optional[str] = None) -> str:
        name = name or self.fresh("const")
        return self.op("Constant", [], name, value=numpy_helper.from_array(np.asarray(value, dtype=dtype), name))

    def const_from_attribute(self, attribute: str, kind: str = "int", name: Optional[str] = None) -> str:
        """A scalar holding the function's attribute (Constant's value_int / value_float, referenced)."""
        name = name or self.fresh(attribute)
        node = helper.make_node("Constant", [], [name])
        attr_type = onnx.AttributeProto.INT if kind == "int" else onnx.AttributeProto.FLOAT
        node.attribute.append(helper.make_attribute_ref(f"value_{kind}", attr_type, ref_attr_name=attribute))
        self.nodes.append(node)
        return name

    def graph(self, name: str, outputs: Iterable[str]) -> onnx.GraphProto:
        """These nodes as an If branch: no inputs (outer values are visible), untyped outputs
        (the runtime infers them when it inlines the function)."""
        return helper.make_graph(self.nodes, name, [], [helper.make_value_info(o, onnx.TypeProto()) for o in outputs])


FLOAT, INT64, BOOL, FLOAT16 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT16
