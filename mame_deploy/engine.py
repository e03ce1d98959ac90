"""TensorRT engines from exported ONNX files.

Three steps, each its own function:

1. :func:`prepare_onnx` -- the ONNX preparation TensorRT needs: every ``mame::SelectiveScan``
   and ``mame::TokenMerge`` node is checked against what its plugin expects (inputs, attributes,
   dtypes, shapes) and the model's ONNX function for it is removed, so the parser binds each node to the plugin
   instead of expanding the function body into standard layers. Each node is also tagged with
   the plugin's namespace (parsers before TensorRT 10.10 do not read the node's domain) and
   ``aot=1`` (the node must use the ahead-of-time kernel, never a Python callback).
2. :func:`build_engine` -- parse and build with polygraphy's TensorRT loaders: fp32 / fp16 /
   bf16, a workspace limit, static shapes or one optimisation profile over the batch axis.
3. The ``.plan`` and the manifest's ``engine`` record (TensorRT version, precision, GPU) are
   written atomically.

Precision follows TensorRT's typing rules. A network is built strongly typed when the requested
precision is the ONNX file's own float type (TensorRT then runs every tensor in the type the
graph gives it, on every TensorRT version). An fp32 file built as fp16/bf16 uses the builder's
precision flags ("weak typing"), deprecated since TensorRT 10.12 and removed in TensorRT 11;
there, export the model in the reduced precision instead (``export --dtype fp16|bf16``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import onnx

from mame_deploy import artifacts
from mame_deploy import manifest as manifests
from mame_deploy import source as sources
from mame_deploy.errors import UserError
from mame_deploy.ops.selective_scan import contract as scan_contract
from mame_deploy.ops.token_merge import contract as merge_contract
from mame_deploy.plugins import merge_launch
from mame_deploy.plugins.trt_aot import require_tensorrt

# Precision names of the CLI -> the float type of the scan's activations.
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_ONNX_FLOATS = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
}
# Attributes the preparation adds for TensorRT's ONNX parser (not the plugin's own fields).
PARSER_ATTRIBUTES = ("plugin_namespace", "plugin_version", "aot")
# The operators that become plugin layers, by (domain, op_type): their contracts.
PLUGIN_CONTRACTS = {(c.ONNX_DOMAIN, c.ONNX_OP_TYPE): c for c in (scan_contract, merge_contract)}
DEFAULT_MAX_BATCH = 64

Dim = Union[int, str, None]  # static size, symbolic name, or unknown


# ---------------------------------------------------------------------------------------------
# ONNX preparation


@dataclass(frozen=True)
class ScanNode:
    """One ``mame::SelectiveScan`` node as the plugin will see it."""

    name: str
    delta_softplus: bool
    reverse: bool
    dtype: Optional[str]  # float type of u/delta/B/C/z; None where the file does not say
    batch: Dim
    dim: Dim
    length: Dim
    dstate: Dim


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[Optional[str], Optional[tuple[Dim, ...]]]]:
    """Element type and shape of every main-graph value shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an uninferable graph still gets the structural checks
        inferred = model
    graph = inferred.graph
    types = {}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor = info.type.tensor_type
        elem = _ONNX_FLOATS.get(tensor.elem_type) if tensor.elem_type else None
        if tensor.elem_type and elem is None:
            elem = onnx.TensorProto.DataType.Name(tensor.elem_type).lower()
        shape = None
        if tensor.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
            )
        types[info.name] = (elem, shape)
    for init in graph.initializer:
        elem = _ONNX_FLOATS.get(init.data_type) or onnx.TensorProto.DataType.Name(init.data_type).lower()
        types[init.name] = (elem, tuple(init.dims))
    return types


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"SelectiveScan node {node.name or index!r}"


def _check_attributes(node: onnx.NodeProto, label: str) -> dict[str, bool]:
    attrs = {a.name: a for a in node.attribute}
    unknown = sorted(set(attrs) - set(scan_contract.ATTRIBUTES) - set(PARSER_ATTRIBUTES))
    if unknown:
        raise UserError(f"{label} has attributes the plugin does not know: {unknown}; re-export the model")
    values = {}
    for name in scan_contract.ATTRIBUTES:
        attr = attrs.get(name)
        if attr is None:
            raise UserError(f"{label} lacks the attribute {name!r}; re-export the model with mame-deploy export")
        if attr.type != onnx.AttributeProto.INT or attr.i not in (0, 1):
            raise UserError(f"{label}: attribute {name!r} must be the integer 0 or 1; re-export the model")
        values[name] = bool(attr.i)
    return values


def _same(a: Dim, b: Dim) -> bool:
    return a is None or b is None or a == b


def _check_shapes(label: str, shapes: dict[str, Optional[tuple[Dim, ...]]]) -> tuple[Dim, Dim, Dim, Dim]:
    """(batch, dim, length, dstate) from the input shapes, checked against the scan's layout."""
    for name, rank in scan_contract.RANKS.items():
        shape = shapes[name]
        if shape is not None and len(shape) != rank:
            raise UserError(f"{label}: input {name} has rank {len(shape)}, the plugin expects {rank}")
    batch, dim, length = shapes["u"] or (None, None, None)
    dstate = (shapes["A"] or (None, None))[1]
    for name, want in scan_contract.input_shapes(batch, dim, length, dstate).items():
        got = shapes[name]
        if got is not None and not all(_same(g, w) for g, w in zip(got, want)):
            raise UserError(f"{label}: input {name} has shape {list(got)}, expected {list(want)} "
                            f"({scan_contract.LAYOUT})")
    for what, value in (("dim", dim), ("length", length), ("dstate", dstate)):
        if isinstance(value, str):
            raise UserError(f"{label}: {what} is symbolic ({value!r}); only the batch axis may be dynamic")
    return batch, dim, length, dstate


def _check_types(label: str, types: dict[str, Optional[str]]) -> Optional[str]:
    dtype = types["u"]
    if dtype is not None and dtype not in scan_contract.DTYPES:
        raise UserError(f"{label}: u is {dtype}; the kernel supports {', '.join(scan_contract.DTYPES)}")
    for name in scan_contract.INPUT_NAMES:
        want = "float32" if name in scan_contract.FLOAT32_INPUTS else dtype
        if types[name] is not None and want is not None and types[name] != want:
            raise UserError(f"{label}: input {name} is {types[name]}, the plugin expects {want}")
    return dtype


def scan_nodes(model: onnx.ModelProto) -> list[ScanNode]:
    """Check every ``mame::SelectiveScan`` node of the main graph against the plugin's contract.

    Raises UserError naming the node on the first mismatch, and when there is no such node.
    """
    imports = {op.domain: op.version for op in model.opset_import}
    nodes = [n for n in model.graph.node if scan_contract.is_node(n)]
    if not nodes:
        raise UserError(
            f"the model has no {scan_contract.PLUGIN_ID} node for the TensorRT plugin "
            "(was it exported with `scan` inline?); export it with `scan` plugin"
        )
    if imports.get(scan_contract.ONNX_DOMAIN) != scan_contract.FUNCTION_VERSION:
        raise UserError(f"the model does not import the {scan_contract.ONNX_DOMAIN!r} domain at version "
                        f"{scan_contract.FUNCTION_VERSION}; re-export it")
    values = _value_types(model)
    found = []
    for index, node in enumerate(nodes):
        label = _node_label(node, index)
        names = scan_contract.INPUT_NAMES
        if len(node.input) != len(names) or not all(node.input):
            raise UserError(f"{label} has inputs {list(node.input)}; the plugin takes all of {', '.join(names)}")
        outputs = scan_contract.OUTPUT_NAMES
        if len(node.output) != len(outputs) or not all(node.output):
            raise UserError(f"{label} has outputs {list(node.output)}; the plugin writes {', '.join(outputs)}: "
                            "re-export the model with this version of mame-deploy")
        attrs = _check_attributes(node, label)
        named = dict(zip(names, node.input))
        dtype = _check_types(label, {k: values.get(v, (None, None))[0] for k, v in named.items()})
        dims = _check_shapes(label, {k: values.get(v, (None, None))[1] for k, v in named.items()})
        found.append(ScanNode(node.name, attrs["delta_softplus"], attrs["reverse"], dtype, *dims))
    dtypes = {n.dtype for n in found if n.dtype is not None}
    if len(dtypes) > 1:
        raise UserError(f"the scan nodes mix float types {sorted(dtypes)}; export the model in one precision")
    return found


# ---------------------------------------------------------------------------------------------
# TokenMerge nodes (mame::TokenMerge, mame_deploy/ops/token_merge/contract.py)


@dataclass(frozen=True)
class MergeNode:
    """One ``mame::TokenMerge`` node as its plugin will see it."""

    name: str
    attrs: merge_contract.MergeAttributes
    hidden: Optional[str]  # float type of hidden; None where the file does not say
    residual: Optional[str]
    batch: Dim
    length: Dim
    dim: Dim
    parts: Dim  # the score's second dimension (parts summed into the informativeness)
    parts_b: Dim  # ... and score_b's


def _merge_attributes(node: onnx.NodeProto, label: str) -> merge_contract.MergeAttributes:
    attrs = {a.name: a for a in node.attribute}
    unknown = sorted(set(attrs) - set(merge_contract.ATTRIBUTES) - set(PARSER_ATTRIBUTES))
    if unknown:
        raise UserError(f"{label} has attributes the plugin does not know: {unknown}; re-export the model")
    values = {}
    for name in merge_contract.ATTRIBUTES:
        attr = attrs.get(name)
        if attr is None:
            raise UserError(f"{label} lacks the attribute {name!r}; re-export the model with mame-deploy export")
        want = onnx.AttributeProto.FLOAT if name in merge_contract.FLOAT_ATTRIBUTES else onnx.AttributeProto.INT
        if attr.type != want:
            kind = "a float" if want == onnx.AttributeProto.FLOAT else "an integer"
            raise UserError(f"{label}: attribute {name!r} must be {kind}; re-export the model")
        values[name] = attr.f if want == onnx.AttributeProto.FLOAT else attr.i
    try:
        return merge_contract.MergeAttributes(**values)
    except ValueError as exc:
        raise UserError(f"{label}: {exc}; re-export the model") from None


def _check_merge_node(label: str, attrs, types: dict, shapes: dict) -> tuple:
    hidden, residual = types["hidden"], types["residual"]
    if hidden is not None and hidden not in merge_contract.DTYPES:
        raise UserError(f"{label}: hidden is {hidden}; the kernel supports {', '.join(merge_contract.DTYPES)}")
    if residual is not None and hidden is not None and residual not in ("float32", hidden):
        raise UserError(f"{label}: residual is {residual}; the plugin takes float32 or hidden's type ({hidden})")
    for name, want in merge_contract.FIXED_TYPES.items():
        if types[name] is not None and types[name] != want:
            raise UserError(f"{label}: input {name} is {types[name]}, the plugin expects {want}")
    for name, rank in merge_contract.RANKS.items():
        if shapes[name] is not None and len(shapes[name]) != rank:
            raise UserError(f"{label}: input {name} has rank {len(shapes[name])}, the plugin expects {rank}")
    batch, length, dim = shapes["hidden"] or (None, None, None)
    parts, parts_b = (shapes[name][1] if shapes[name] is not None else None for name in ("score", "score_b"))
    for name, want in merge_contract.input_shapes(batch, length, dim, parts, parts_b).items():
        got = shapes[name]
        if got is not None and not all(_same(g, w) for g, w in zip(got, want)):
            raise UserError(f"{label}: input {name} has shape {list(got)}, expected {list(want)} "
                            f"({merge_contract.LAYOUT})")
    for what, value in (("length", length), ("dim", dim), ("score's parts", parts), ("score_b's parts", parts_b)):
        if isinstance(value, str):
            raise UserError(f"{label}: {what} is symbolic ({value!r}); only the batch axis may be dynamic")
    if all(isinstance(v, int) for v in (length, dim, parts, parts_b)):
        try:
            merge_contract.check_length(length, attrs.r)
            merge_launch.check_shape(length, dim, attrs.r, parts, parts_b)
        except (ValueError, UserError) as exc:
            raise UserError(f"{label}: {exc}") from None
    return batch, length, dim, parts, parts_b


def merge_nodes(model: onnx.ModelProto) -> list[MergeNode]:
    """Check every ``mame::TokenMerge`` node of the main graph against the plugin's contract
    (an unmerged model has none). Raises UserError naming the node on the first mismatch."""
    nodes = [n for n in model.graph.node if merge_contract.is_node(n)]
    if not nodes:
        return []
    imports = {op.domain: op.version for op in model.opset_import}
    if imports.get(merge_contract.ONNX_DOMAIN) != merge_contract.FUNCTION_VERSION:
        raise UserError(f"the model does not import the {merge_contract.ONNX_DOMAIN!r} domain at version "
                        f"{merge_contract.FUNCTION_VERSION}; re-export it")
    values = _value_types(model)
    found = []
    for index, node in enumerate(nodes):
        label = f"TokenMerge node {node.name or index!r}"
        names = merge_contract.INPUT_NAMES
        if len(node.input) != len(names) or not all(node.input):
            raise UserError(f"{label} has inputs {list(node.input)}; the plugin takes all of {', '.join(names)}")
        outs = merge_contract.OUTPUT_NAMES
        if len(node.output) != len(outs) or not all(node.output):
            raise UserError(f"{label} must have the {len(outs)} outputs {', '.join(outs)}")
        attrs = _merge_attributes(node, label)
        named = dict(zip(names, node.input))
        types = {k: values.get(v, (None, None))[0] for k, v in named.items()}
        shapes = {k: values.get(v, (None, None))[1] for k, v in named.items()}
        dims = _check_merge_node(label, attrs, types, shapes)
        found.append(MergeNode(node.name, attrs, types["hidden"], types["residual"], *dims))
    return found


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def prepare_onnx(model: onnx.ModelProto, jit: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` ready for TensorRT's parser (see the module docstring).

    ``jit=True`` tags the nodes for the plugin's Python implementation (debugging only).
    The input model is not modified; preparing a prepared model again gives the same result.
    """
    scan_nodes(model)  # raises on anything the plugins would not accept
    merge_nodes(model)
    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    kept = [f for f in prepared.functions if (f.domain, f.name) not in PLUGIN_CONTRACTS]
    del prepared.functions[:]
    prepared.functions.extend(kept)
    for node in prepared.graph.node:
        contract = PLUGIN_CONTRACTS.get((node.domain, node.op_type))
        if contract is not None:
            _set_attribute(node, "plugin_namespace", node.domain)
            _set_attribute(node, "plugin_version", contract.PLUGIN_VERSION)
            _set_attribute(node, "aot", 0 if jit else 1)
    return prepared


# ---------------------------------------------------------------------------------------------
# Build settings


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes the engine accepts: static (min == opt == max) or one optimisation profile."""

    min: int
    opt: int
    max: int

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    def as_json(self):
        return self.max if not self.dynamic else {"min": self.min, "opt": self.opt, "max": self.max}


def graph_inputs(model: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    """Shapes of the graph's real inputs (initializers listed as inputs are left out)."""
    inits = {i.name for i in model.graph.initializer}
    shapes = {}
    for info in model.graph.input:
        if info.name in inits:
            continue
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)
    return shapes


def batch_profile(
    model: onnx.ModelProto, max_batch: Optional[int] = None, opt_batch: Optional[int] = None
) -> BatchProfile:
    """The batch sizes to build for: the file's static batch, or a profile for a dynamic one."""
    shapes = graph_inputs(model)
    static_batches = set()
    dynamic = False
    for name, shape in shapes.items():
        for axis, dim in enumerate(shape):
            if not isinstance(dim, int) or dim <= 0:
                if axis != 0:
                    raise UserError(f"input {name!r} has a dynamic axis {axis}; only the batch axis may be dynamic")
                dynamic = True
            elif axis == 0:
                static_batches.add(dim)
    if not dynamic:
        if max_batch is not None or opt_batch is not None:
            raise UserError(
                "`max_batch`/`opt_batch` apply to models exported with `dynamic_batch`; "
                "this file has a static batch (re-export with `batch` N to change it)"
            )
        if len(static_batches) != 1:
            raise UserError(f"the inputs disagree on the batch size ({sorted(static_batches)}); re-export the model")
        batch = static_batches.pop()
        return BatchProfile(batch, batch, batch)
    maximum = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    optimum = maximum if opt_batch is None else opt_batch
    if not 1 <= optimum <= maximum:
        raise UserError(f"need 1 <= `opt_batch` ({optimum}) <= `max_batch` ({maximum})")
    return BatchProfile(1, optimum, maximum)


def resolve_precision(requested: Optional[str], file_dtype: str) -> tuple[str, bool]:
    """(precision, strongly_typed) for a file whose scan runs in ``file_dtype``."""
    by_dtype = {v: k for k, v in PRECISIONS.items()}
    native = by_dtype[file_dtype]
    precision = native if requested is None else requested.lower()
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {requested!r}; use one of {', '.join(PRECISIONS)}")
    if precision == native:
        return precision, True
    if native != "fp32":
        raise UserError(
            f"the model was exported in {native}; an engine in {precision} needs a model exported in fp32 or {precision}"
        )
    return precision, False


# ---------------------------------------------------------------------------------------------
# Files


def read_export(onnx_path: Path) -> tuple[onnx.ModelProto, str, dict]:
    """The exported graph, its sha256 and its manifest (checked to describe this very file):
    the file is read and hashed once."""
    model, data = artifacts.read_onnx(onnx_path)
    sha256 = artifacts.sha256_bytes(data)
    return model, sha256, sources.read_manifest(onnx_path, sha256)


# ---------------------------------------------------------------------------------------------
# Build


@dataclass(frozen=True)
class BuildPlan:
    """Everything decided before TensorRT is touched; checked on any machine."""

    onnx_path: Path
    output: Path
    manifest_in: Path
    manifest_out: Path
    precision: str
    strongly_typed: bool
    workspace: Optional[int]
    batch: BatchProfile
    nodes: tuple[ScanNode, ...]
    jit: bool
    merge_nodes: tuple[MergeNode, ...] = ()
    onnx_sha256: str = ""
    manifest: dict = field(default_factory=dict, repr=False)  # the export's, which the build extends
    model: Optional[onnx.ModelProto] = field(default=None, repr=False, compare=False)  # parsed once


def plan_build(
    onnx_path: Union[str, Path],
    output: Union[str, Path, None] = None,
    precision: Optional[str] = None,
    workspace: Optional[int] = None,
    force: bool = False,
    max_batch: Optional[int] = None,
    opt_batch: Optional[int] = None,
    jit: bool = False,
) -> BuildPlan:
    """Check the inputs of a build and decide its settings (no TensorRT needed)."""
    onnx_path = Path(onnx_path)
    output = Path(output) if output is not None else onnx_path.with_suffix(".plan")
    if output.suffix != ".plan":
        raise UserError(f"the engine file must end in .plan, got {output}")
    manifest_in, manifest_out = manifests.manifest_path(onnx_path), manifests.manifest_path(output)
    if precision is not None and precision.lower() not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    # The ONNX file's own manifest is updated in place; another stem gets a new manifest.
    artifacts.check_writable([output] + ([manifest_out] if manifest_out != manifest_in else []), force)
    if workspace is not None and (not isinstance(workspace, int) or workspace <= 0):
        raise UserError(f"`workspace` must be a positive number of bytes, got {workspace!r}")
    model, sha256, manifest = read_export(onnx_path)
    nodes = tuple(scan_nodes(model))
    merges = tuple(merge_nodes(model))
    file_dtype = next((n.dtype for n in nodes if n.dtype is not None), "float32")
    precision, strongly_typed = resolve_precision(precision, file_dtype)
    if jit and "bfloat16" in (file_dtype, PRECISIONS[precision]):
        raise UserError(
            "build `jit` cannot run bf16: TensorRT hands Python plugins their buffers through "
            "__cuda_array_interface__, which has no bfloat16; build bf16 engines without `jit`"
        )
    batch = batch_profile(model, max_batch, opt_batch)
    return BuildPlan(onnx_path, output, manifest_in, manifest_out, precision, strongly_typed, workspace, batch, nodes,
                     jit, merges, sha256, manifest, model)


def gpu_info() -> dict:
    """Name and compute capability of CUDA device 0 (the one TensorRT builds for)."""
    try:
        from cuda.bindings import driver

        def check(result):
            err, *values = result
            if err != driver.CUresult.CUDA_SUCCESS:
                raise RuntimeError(str(err))
            return values[0] if values else None

        check(driver.cuInit(0))
        device = check(driver.cuDeviceGet(0))
        name = check(driver.cuDeviceGetName(256, device)).split(b"\0", 1)[0].decode()
        attr = driver.CUdevice_attribute
        major = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device))
        minor = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device))
        return {"gpu": name, "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:
        pass
    return {"gpu": "unknown", "compute_capability": "unknown"}


def engine_record(plan: BuildPlan, engine: bytes, trt_version: str, gpu: dict) -> dict:
    """The manifest's ``engine`` section for a built plan."""
    base = plan.manifest_out.parent
    return {
        "path": os.path.relpath(plan.output, base),
        "sha256": artifacts.sha256_bytes(engine),
        "bytes": len(engine),
        "onnx": os.path.relpath(plan.onnx_path, base),
        "onnx_sha256": plan.onnx_sha256,
        "tensorrt": trt_version,
        "precision": plan.precision,
        "strongly_typed": plan.strongly_typed,
        "workspace_bytes": plan.workspace,
        "batch": plan.batch.as_json(),
        "plugin": {
            "id": scan_contract.PLUGIN_ID,
            "implementation": "jit" if plan.jit else "aot",
            "nodes": len(plan.nodes),
        },
        **({"merge_plugin": {"id": merge_contract.PLUGIN_ID, "implementation": "jit" if plan.jit else "aot",
                             "nodes": len(plan.merge_nodes)}} if plan.merge_nodes else {}),
        **gpu,
    }


def _build_bytes(trt, plan: BuildPlan, prepared: onnx.ModelProto) -> bytes:
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxBytes, Profile, engine_bytes_from_network

    config = {}
    if not plan.strongly_typed:
        # Weak typing: deprecated since TensorRT 10.12, gone in 11 (no BuilderFlag.FP16/BF16).
        flag = plan.precision.upper()
        if not hasattr(trt.BuilderFlag, flag):
            raise UserError(
                f"TensorRT {trt.__version__} builds only strongly typed networks; export the model "
                f"in {plan.precision} to build a {plan.precision} engine"
            )
        config[plan.precision] = True
    if plan.workspace is not None:
        config["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: plan.workspace}
    if plan.batch.dynamic:
        profile = Profile()
        for name, shape in graph_inputs(prepared).items():
            rest = tuple(shape[1:])
            profile.add(
                name, min=(plan.batch.min,) + rest, opt=(plan.batch.opt,) + rest, max=(plan.batch.max,) + rest
            )
        config["profiles"] = [profile]
    try:
        parsed = NetworkFromOnnxBytes(prepared.SerializeToString(), strongly_typed=plan.strongly_typed)()
        check_plugin_layers(trt, parsed[1], len(plan.nodes) + len(plan.merge_nodes))
        engine = engine_bytes_from_network(parsed, config=CreateConfig(**config))
    except UserError:
        raise
    except Exception as exc:  # polygraphy has logged TensorRT's own messages above
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"TensorRT could not build {plan.onnx_path}: {first}") from None
    return bytes(engine)


def check_plugin_layers(trt, network, expected: int) -> None:
    """Every scan node must have become a plugin layer, not an expansion of its function."""
    found = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
    if found != expected:
        raise UserError(
            f"TensorRT's parser made {found} plugin layers for {expected} {scan_contract.PLUGIN_ID} and "
            f"{merge_contract.PLUGIN_ID} nodes; a plugin was not bound to every such node"
        )


def build_engine(
    onnx_path: Union[str, Path],
    output: Union[str, Path, None] = None,
    precision: Optional[str] = None,
    workspace: Union[str, int, None] = None,
    force: bool = False,
    max_batch: Optional[int] = None,
    opt_batch: Optional[int] = None,
    jit: bool = False,
) -> Path:
    """Build ``onnx_path`` into a TensorRT engine; returns the .plan path.

    Writes the plan (default: beside the ONNX file, suffix .plan) and records the build in the
    plan's manifest (the ONNX file's manifest when they share a stem, else a copy of it).
    """
    onnx_path = Path(onnx_path)
    trt = require_tensorrt("building an engine")
    plan = plan_build(onnx_path, output, precision, workspace, force, max_batch, opt_batch, jit)

    from mame_deploy import plugins

    plugins.register(jit=jit)
    engine = _build_bytes(trt, plan, prepare_onnx(plan.model, jit=jit))

    manifest = {**plan.manifest, "engine": engine_record(plan, engine, trt.__version__, gpu_info())}
    artifacts.write_bytes(plan.output, engine)
    artifacts.write_json(plan.manifest_out, manifest)
    return plan.output


def read_engine_manifest(plan: Union[str, Path]) -> dict:
    """The manifest beside a .plan, checked to record a build of this very file."""
    plan = Path(plan)
    if not plan.is_file():
        raise UserError(f"{plan} does not exist; build an engine with mame-deploy build")
    data = sources.read_manifest(plan)
    record = data.get("engine")
    if not isinstance(record, dict) or "sha256" not in record:
        raise UserError(f"manifest {manifests.manifest_path(plan)} records no engine; build one with mame-deploy build")
    if record["sha256"] != artifacts.file_sha256(plan):
        raise UserError(
            f"{plan} is not the engine its manifest records (sha256 differs); rebuild it with mame-deploy build"
        )
    return data
