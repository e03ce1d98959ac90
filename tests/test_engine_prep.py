"""ONNX preparation for TensorRT (CPU): what the parser reads must bind every scan to the plugin."""

from __future__ import annotations

import json
import re

import onnx

import pytest
from onnx import TensorProto, helper

from mame_deploy import engine
from mame_deploy.cli.common import parse_size
from mame_deploy.errors import UserError
from mame_deploy.ops.selective_scan.contract import INPUT_NAMES, ONNX_DOMAIN, ONNX_OP_TYPE

FLOAT32_INPUTS = ("A", "D", "delta_bias")


def scan_model(
    batch=2,
    dim=4,
    length=5,
    dstate=3,
    dtype=TensorProto.FLOAT,
    attrs=None,
    shapes=None,
    types=None,
    inputs=INPUT_NAMES,
    outputs=("y", "y_dt_sums"),
    with_function=True,
    extra_function=False,
    opset_mame=1,
):
    """A graph of one mame::SelectiveScan node carrying a function body, like an exported model."""
    shapes = {
        "u": [batch, dim, length], "delta": [batch, dim, length], "z": [batch, dim, length],
        "B": [batch, dstate, length], "C": [batch, dstate, length],
        "A": [dim, dstate], "D": [dim], "delta_bias": [dim],
        **(shapes or {}),
    }
    types = {n: TensorProto.FLOAT if n in FLOAT32_INPUTS else dtype for n in INPUT_NAMES} | (types or {})
    # Activations are graph inputs; A, D and delta_bias are weights, as in an exported model.
    activations = [n for n in INPUT_NAMES if n not in FLOAT32_INPUTS]
    graph_inputs = [helper.make_tensor_value_info(n, types[n], shapes[n]) for n in activations]
    weights = [
        helper.make_tensor(n, types[n], shapes[n], [0.5] * _numel(shapes[n])) for n in FLOAT32_INPUTS
    ]
    attrs = {"delta_softplus": 1, "reverse": 0} if attrs is None else attrs
    node = helper.make_node(ONNX_OP_TYPE, list(inputs), list(outputs), domain=ONNX_DOMAIN, name="scan0", **attrs)
    out_shapes = (shapes["u"], [batch, (dim + 7) // 8 if isinstance(dim, int) else "G", length])
    out = [helper.make_tensor_value_info(name, types["u"] if k == 0 else TensorProto.FLOAT, out_shapes[k])
           for k, name in enumerate(outputs)]
    graph = helper.make_graph([node], "g", graph_inputs, out, initializer=weights)
    functions = []
    if with_function:
        body = [helper.make_node("Identity", ["u"], ["out"]), helper.make_node("Identity", ["delta"], ["dt_sums"])]
        functions.append(
            helper.make_function(
                ONNX_DOMAIN, ONNX_OP_TYPE, list(INPUT_NAMES), ["out", "dt_sums"], body,
                [helper.make_opsetid("", 20)], attributes=["delta_softplus", "reverse"],
            )
        )
    if extra_function:
        body = [helper.make_node("Identity", ["x"], ["y"])]
        functions.append(helper.make_function("other", "Keep", ["x"], ["y"], body, [helper.make_opsetid("", 20)]))
    opsets = [helper.make_opsetid("", 20)]
    if opset_mame is not None:
        opsets.append(helper.make_opsetid(ONNX_DOMAIN, opset_mame))
    return helper.make_model(graph, opset_imports=opsets, functions=functions)


def _numel(shape):
    count = 1
    for d in shape:
        count *= d if isinstance(d, int) else 1
    return count


def attributes(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---------------------------------------------------------------------------------------------
# preparation


def test_prepare_strips_the_scan_function_and_tags_nodes_for_the_plugin():
    model = scan_model(extra_function=True)
    before = model.SerializeToString()
    prepared = engine.prepare_onnx(model)

    assert model.SerializeToString() == before, "the input model must not be modified"
    assert [(f.domain, f.name) for f in prepared.functions] == [("other", "Keep")]
    (node,) = prepared.graph.node
    assert (node.domain, node.op_type) == (ONNX_DOMAIN, ONNX_OP_TYPE)
    assert list(node.input) == list(INPUT_NAMES)
    assert attributes(node) == {
        "delta_softplus": 1, "reverse": 0,
        "plugin_namespace": b"mame", "plugin_version": b"1", "aot": 1,
    }
    assert {(o.domain, o.version) for o in prepared.opset_import} == {("", 20), (ONNX_DOMAIN, 1)}
    onnx.checker.check_model(prepared, full_check=True)


def test_prepare_is_idempotent_and_jit_tags_the_python_implementation():
    once = engine.prepare_onnx(scan_model())
    assert engine.prepare_onnx(once).SerializeToString() == once.SerializeToString()
    (node,) = engine.prepare_onnx(scan_model(), jit=True).graph.node
    assert attributes(node)["aot"] == 0


def test_scan_nodes_reads_attributes_dtype_and_shapes():
    (node,) = engine.scan_nodes(scan_model(batch=3, dim=8, length=7, dstate=16, attrs={"delta_softplus": 0, "reverse": 1}))
    assert node == engine.ScanNode("scan0", False, True, "float32", 3, 8, 7, 16)
    (half,) = engine.scan_nodes(scan_model(dtype=TensorProto.FLOAT16))
    assert half.dtype == "float16"
    (dynamic,) = engine.scan_nodes(scan_model(batch="N"))
    assert dynamic.batch == "N"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attrs={"reverse": 0}), "lacks the attribute 'delta_softplus'"),
        (dict(attrs={"delta_softplus": 2, "reverse": 0}), "must be the integer 0 or 1"),
        (dict(attrs={"delta_softplus": 1.0, "reverse": 0}), "must be the integer 0 or 1"),
        (dict(attrs={"delta_softplus": 1, "reverse": 0, "chunk": 64}), "does not know: ['chunk']"),
        (dict(inputs=INPUT_NAMES[:7]), "the plugin takes all of u, delta, A, B, C, D, z, delta_bias"),
        (dict(inputs=INPUT_NAMES[:5] + ("",) + INPUT_NAMES[6:]), "the plugin takes all of"),
        (dict(outputs=("y",)), "has outputs ['y']; the plugin writes out, dt_sums: re-export the model"),
        (dict(types={"A": TensorProto.FLOAT16}), "input A is float16, the plugin expects float32"),
        (dict(types={"delta": TensorProto.FLOAT16}), "input delta is float16, the plugin expects float32"),
        (dict(dtype=TensorProto.DOUBLE), "u is double; the kernel supports float32, float16, bfloat16"),
        (dict(shapes={"B": [2, 5, 5]}), "input B has shape [2, 5, 5], expected [2, 3, 5]"),
        (dict(shapes={"A": [4]}), "input A has rank 1, the plugin expects 2"),
        (dict(shapes={"D": [6]}), "input D has shape [6], expected [4]"),
        (dict(length="L"), "length is symbolic ('L'); only the batch axis may be dynamic"),
        (dict(opset_mame=None), "does not import the 'mame' domain at version 1"),
        (dict(opset_mame=2), "does not import the 'mame' domain at version 1"),
    ],
)
def test_scan_nodes_rejects_what_the_plugin_cannot_run(kwargs, message):
    with pytest.raises(UserError) as err:
        engine.prepare_onnx(scan_model(**kwargs))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_model_without_scan_nodes_is_refused_with_the_fix():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(UserError, match="`scan` inline.*`scan` plugin"):
        engine.prepare_onnx(helper.make_model(graph))


def test_mixed_scan_precisions_are_refused():
    model = scan_model()
    second = onnx.NodeProto()
    second.CopyFrom(model.graph.node[0])
    second.name = "scan1"
    del second.input[:]
    second.input.extend(["u16", "d16", "A", "B16", "C16", "D", "z16", "delta_bias"])
    model.graph.node.append(second)
    for name, shape in (("u16", [2, 4, 5]), ("d16", [2, 4, 5]), ("z16", [2, 4, 5]), ("B16", [2, 3, 5]), ("C16", [2, 3, 5])):
        model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT16, shape))
    model.graph.output.append(helper.make_tensor_value_info("y16", TensorProto.FLOAT16, [2, 4, 5]))
    second.output[0] = "y16"
    with pytest.raises(UserError, match="mix float types"):
        engine.scan_nodes(model)


# ---------------------------------------------------------------------------------------------
# build settings


@pytest.mark.parametrize(
    "requested, file_dtype, expected",
    [
        (None, "float32", ("fp32", True)),
        ("fp32", "float32", ("fp32", True)),
        ("FP16", "float32", ("fp16", False)),
        ("bf16", "float32", ("bf16", False)),
        (None, "float16", ("fp16", True)),
        ("bf16", "bfloat16", ("bf16", True)),
    ],
)
def test_precision_is_strongly_typed_when_it_is_the_files_own(requested, file_dtype, expected):
    assert engine.resolve_precision(requested, file_dtype) == expected


@pytest.mark.parametrize(
    "requested, file_dtype, message",
    [("fp8", "float32", "unknown precision 'fp8'"), ("fp32", "float16", "exported in fp16")],
)
def test_precision_errors(requested, file_dtype, message):
    with pytest.raises(UserError, match=message):
        engine.resolve_precision(requested, file_dtype)


def test_batch_profile_static_and_dynamic():
    assert engine.batch_profile(scan_model(batch=3)) == engine.BatchProfile(3, 3, 3)
    dynamic = scan_model(batch="batch")
    assert engine.batch_profile(dynamic) == engine.BatchProfile(1, engine.DEFAULT_MAX_BATCH, engine.DEFAULT_MAX_BATCH)
    profile = engine.batch_profile(dynamic, max_batch=256, opt_batch=32)
    assert profile == engine.BatchProfile(1, 32, 256) and profile.dynamic
    assert profile.as_json() == {"min": 1, "opt": 32, "max": 256}
    assert engine.BatchProfile(3, 3, 3).as_json() == 3
    with pytest.raises(UserError, match="static batch"):
        engine.batch_profile(scan_model(batch=3), max_batch=8)
    with pytest.raises(UserError, match=r"1 <= `opt_batch` \(9\) <= `max_batch` \(8\)"):
        engine.batch_profile(dynamic, max_batch=8, opt_batch=9)
    with pytest.raises(UserError, match="dynamic axis 2"):
        engine.batch_profile(scan_model(batch="b", length="L"))


@pytest.mark.parametrize(
    "text, size",
    [("4G", 4 << 30), ("4GiB", 4 << 30), ("512M", 512 << 20), ("512mb", 512 << 20), ("2048", 2048 << 20), (None, None)],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "0", "-1G", "4X"])
def test_parse_size_errors(text):
    with pytest.raises(UserError):
        parse_size(text)


# ---------------------------------------------------------------------------------------------
# build plan: every check that runs before TensorRT is touched


def write_export(path, model=None):
    """An exported file as `mame-deploy export` leaves it: the ONNX and its manifest."""
    from mame_deploy import artifacts, manifest

    data = (model or scan_model()).SerializeToString()
    artifacts.write_bytes(path, data)
    # A manifest that passes manifest.check_fields: a one-block vim_t, unmerged, batch 2.
    record = {key: None for key in manifest.REQUIRED_KEYS}
    record.update(model="vim_t", overrides={"depth": 1}, seed=0, method="mame", ratio=0.0, schedule=[0],
                  tokens_per_layer=[197], input_shape=[2, 3, 224, 224], batch=2, opset=20, scan="plugin",
                  versions={}, onnx_sha256=artifacts.sha256_bytes(data))
    artifacts.write_json(manifest.manifest_path(path), record)
    return path


@pytest.fixture()
def exported(tmp_path):
    return write_export(tmp_path / "net.onnx")


def test_plan_defaults_to_the_onnx_stem_and_its_manifest(exported):
    plan = engine.plan_build(exported)
    assert plan.output == exported.with_suffix(".plan")
    assert plan.manifest_in == plan.manifest_out == exported.with_suffix(".json")
    assert (plan.precision, plan.strongly_typed, plan.workspace) == ("fp32", True, None)
    assert plan.batch == engine.BatchProfile(2, 2, 2)
    assert len(plan.nodes) == 1


def test_plan_refuses_to_overwrite_without_force(exported):
    exported.with_suffix(".plan").write_bytes(b"old")
    with pytest.raises(UserError, match="net.plan already exists; pass `force`"):
        engine.plan_build(exported)
    assert engine.plan_build(exported, force=True).output.read_bytes() == b"old"
    other = exported.parent / "other.plan"
    (exported.parent / "other.json").write_text("{}")
    with pytest.raises(UserError, match="other.json already exists"):
        engine.plan_build(exported, output=other)
    assert engine.plan_build(exported, output=other, force=True).manifest_out == other.with_suffix(".json")


@pytest.mark.parametrize(
    "setup, kwargs, message",
    [
        (lambda p: p.with_suffix(".json").unlink(), {}, "no manifest"),
        (lambda p: p.with_suffix(".json").write_text("[1]"), {}, "not a manifest"),
        (lambda p: p.with_suffix(".json").write_text("{"), {}, "not a readable manifest"),
        (lambda p: p.with_suffix(".json").write_text('{"model": "vim_t"}'), {}, "lacks checkpoint"),
        (lambda p: p.write_bytes(b"not onnx at all"), {}, "is not a"),
        (lambda p: write_export(p, scan_model(length=6)).with_suffix(".json").write_text(
            re.sub(r'"onnx_sha256": "[0-9a-f]+"', '"onnx_sha256": "' + "0" * 64 + '"', p.with_suffix(".json").read_text())),
         {}, "does not match"),  # a well-formed sha256 of another file
        (lambda p: p.unlink(), {}, "does not exist"),
        (lambda p: None, {"output": "x.engine"}, "must end in .plan"),
        (lambda p: None, {"precision": "int8"}, "unknown precision 'int8'"),
        (lambda p: None, {"workspace": "big"}, "`workspace` must be a positive number of bytes"),
    ],
)
def test_plan_errors_are_one_line(exported, setup, kwargs, message):
    setup(exported)
    with pytest.raises(UserError) as err:
        engine.plan_build(exported, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_engine_record_points_at_files_relative_to_the_manifest(exported):
    plan = engine.plan_build(exported, precision="fp16", workspace=1 << 30)
    record = engine.engine_record(plan, b"engine-bytes", "10.13.0", {"gpu": "NVIDIA H100", "compute_capability": "9.0"})
    assert record["path"] == "net.plan" and record["onnx"] == "net.onnx"
    from mame_deploy.artifacts import file_sha256

    assert record["onnx_sha256"] == file_sha256(exported)
    assert (record["precision"], record["strongly_typed"], record["workspace_bytes"]) == ("fp16", False, 1 << 30)
    assert record["tensorrt"] == "10.13.0" and record["gpu"] == "NVIDIA H100"
    assert record["plugin"] == {"id": "mame::SelectiveScan", "implementation": "aot", "nodes": 1}
    assert record["batch"] == 2 and record["bytes"] == len(b"engine-bytes")


def test_a_network_without_a_plugin_layer_per_scan_node_is_refused():
    from types import SimpleNamespace

    trt = SimpleNamespace(LayerType=SimpleNamespace(PLUGIN_V3="plugin", CONVOLUTION="conv"))
    layers = ["conv", "plugin", "conv", "plugin"]
    network = SimpleNamespace(num_layers=len(layers), get_layer=lambda i: SimpleNamespace(type=layers[i]))
    engine.check_plugin_layers(trt, network, 2)
    with pytest.raises(UserError, match="made 2 plugin layers for 3 mame::SelectiveScan and mame::TokenMerge nodes"):
        engine.check_plugin_layers(trt, network, 3)


def test_engine_manifest_must_record_this_very_plan(exported):
    from mame_deploy import artifacts

    plan = exported.with_suffix(".plan")
    with pytest.raises(UserError, match="does not exist; build an engine"):
        engine.read_engine_manifest(plan)
    plan.write_bytes(b"engine")
    with pytest.raises(UserError, match="records no engine"):
        engine.read_engine_manifest(plan)
    data = json.loads(exported.with_suffix(".json").read_text())
    data["engine"] = engine.engine_record(engine.plan_build(exported, force=True), b"engine", "10.13.0", {})
    artifacts.write_json(exported.with_suffix(".json"), data)
    assert engine.read_engine_manifest(plan)["engine"]["sha256"] == artifacts.sha256_bytes(b"engine")
    plan.write_bytes(b"another engine")
    with pytest.raises(UserError, match="not the engine its manifest records"):
        engine.read_engine_manifest(plan)


# ---------------------------------------------------------------------------------------------
# mame::TokenMerge nodes


def merge_model(batch=2, length=9, dim=8, r=2, hidden=TensorProto.FLOAT, residual=None, attrs=None, shapes=None,
                types=None, inputs=None, outputs=None, with_function=True, opset_mame=1, parts=4, parts_b=3):
    """One scan node (every model has them) plus one mame::TokenMerge node with its function."""
    from mame_deploy.ops.token_merge import contract

    model = scan_model(opset_mame=opset_mame)
    residual = hidden if residual is None else residual
    shapes = {"hidden": [batch, length, dim], "residual": [batch, length, dim], "score": [batch, parts, length],
              "score_b": [batch, parts_b, length], "size": [batch, length], "origin": [batch, length], "cls": [batch], **(shapes or {})}
    elem = {"hidden": hidden, "residual": residual, "score": TensorProto.FLOAT, "score_b": TensorProto.FLOAT,
            "size": TensorProto.FLOAT,
            "origin": TensorProto.INT64, "cls": TensorProto.INT64, **(types or {})}
    names = list(contract.INPUT_NAMES if inputs is None else inputs)
    for name in contract.INPUT_NAMES:
        model.graph.input.append(helper.make_tensor_value_info(name, elem[name], shapes[name]))
    attrs = {"r": r, "prune": 0, "split": 0, "arrangement": 0, "weighting": 0, "metric": 0, "lam": 1.0,
             "score_scale": 0.5} if attrs is None else attrs
    outs = list(contract.OUTPUT_NAMES if outputs is None else outputs)
    model.graph.node.append(helper.make_node(contract.ONNX_OP_TYPE, names, outs, domain=contract.ONNX_DOMAIN,
                                             name="merge0", **attrs))
    out_len = length - r if isinstance(length, int) else length
    out_types = [elem["hidden"], elem["residual"], TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT64]
    out_shapes = [[batch, out_len, dim], [batch, out_len, dim], [batch, out_len], [batch, out_len], [batch]]
    for name, t, s in zip(outs, out_types, out_shapes):
        if name:
            model.graph.output.append(helper.make_tensor_value_info(name, t, s))
    if with_function:
        body = [helper.make_node("Identity", [i], [o]) for i, o in zip(
            ["hidden", "residual", "size", "origin", "cls"], list(contract.OUTPUT_NAMES))]
        model.functions.append(helper.make_function(
            contract.ONNX_DOMAIN, contract.ONNX_OP_TYPE, list(contract.INPUT_NAMES), list(contract.OUTPUT_NAMES),
            body, [helper.make_opsetid("", 20)], attributes=list(contract.ATTRIBUTES)))
    return model


def test_prepare_strips_the_merge_function_and_tags_merge_nodes():
    model = merge_model()
    prepared = engine.prepare_onnx(model)
    assert prepared.functions == [] or all(f.name not in ("TokenMerge", ONNX_OP_TYPE) for f in prepared.functions)
    merge = next(n for n in prepared.graph.node if n.op_type == "TokenMerge")
    got = attributes(merge)
    assert got["plugin_namespace"] == b"mame" and got["plugin_version"] == b"1" and got["aot"] == 1
    assert got["r"] == 2 and got["lam"] == pytest.approx(1.0)
    assert engine.prepare_onnx(prepared).SerializeToString() == prepared.SerializeToString()
    assert attributes(next(n for n in engine.prepare_onnx(model, jit=True).graph.node
                           if n.op_type == "TokenMerge"))["aot"] == 0


def test_merge_nodes_reads_attributes_dtypes_and_shapes():
    from mame_deploy.ops.token_merge.contract import MergeAttributes

    (node,) = engine.merge_nodes(merge_model(batch="N", length=197, dim=384, r=6, hidden=TensorProto.BFLOAT16,
                                             residual=TensorProto.FLOAT, parts=96, parts_b=96))
    assert node == engine.MergeNode("merge0", MergeAttributes(6, lam=1.0, score_scale=0.5), "bfloat16", "float32",
                                    "N", 197, 384, 96, 96)
    assert engine.merge_nodes(scan_model()) == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attrs={"r": 2, "prune": 0, "split": 0, "arrangement": 0, "weighting": 0, "metric": 0}),
         "lacks the attribute 'lam'"),
        (dict(attrs={"r": 2, "prune": 0, "split": 0, "arrangement": 0, "weighting": 0, "metric": 0, "lam": 1.0}),
         "lacks the attribute 'score_scale'; re-export the model"),
        (dict(attrs={"r": 2, "prune": 0, "split": 0, "arrangement": 0, "weighting": 0, "metric": 0, "lam": 1.0,
                     "score_scale": -1.0}), "score_scale must be a positive finite number"),
        (dict(attrs={"r": 2, "prune": 0, "split": 0, "arrangement": 0, "weighting": 0, "metric": 0, "lam": 1,
                     "score_scale": 1.0}), "attribute 'lam' must be a float"),
        (dict(attrs={"r": 2, "prune": 0, "split": 3, "arrangement": 0, "weighting": 0, "metric": 0, "lam": 1.0,
                     "score_scale": 1.0}), "attribute split must be in 0..1"),
        (dict(attrs={"r": 2, "prune": 0, "split": 0, "arrangement": 0, "weighting": 0, "metric": 0, "lam": 1.0,
                     "score_scale": 1.0, "tile": 4}), "does not know: ['tile']"),
        (dict(r=5), "r=5 exceeds half of the 8 patches"),
        (dict(inputs=["hidden", "residual", "score", "score_b", "size", "origin", ""]), "takes all of hidden, residual"),
        (dict(inputs=["hidden", "residual", "score", "size", "origin", "cls"]), "takes all of hidden, residual"),
        (dict(outputs=["hidden_out", "residual_out", "size_out", "origin_out"]), "must have the 5 outputs"),
        (dict(types={"score": TensorProto.FLOAT16}), "input score is float16, the plugin expects float32"),
        (dict(types={"cls": TensorProto.INT32}), "input cls is int32, the plugin expects int64"),
        (dict(hidden=TensorProto.DOUBLE), "hidden is double; the kernel supports float32, float16, bfloat16"),
        (dict(hidden=TensorProto.FLOAT, residual=TensorProto.FLOAT16), "residual is float16; the plugin takes float32"),
        (dict(shapes={"score": [2, 4, 8]}), "input score has shape [2, 4, 8], expected [2, 4, 9]"),
        (dict(shapes={"score": [2, 9]}), "input score has rank 2, the plugin expects 3"),
        (dict(shapes={"score": [2, "K", 9]}), "score's parts is symbolic ('K')"),
        (dict(shapes={"score_b": [2, 3, 8]}), "input score_b has shape [2, 3, 8], expected [2, 3, 9]"),
        (dict(types={"score_b": TensorProto.DOUBLE}), "input score_b is double, the plugin expects float32"),
        (dict(shapes={"cls": [2, 1]}), "input cls has rank 2, the plugin expects 1"),
        (dict(length="L"), "length is symbolic ('L'); only the batch axis may be dynamic"),
        (dict(dim=6), "multiple of 4"),
        (dict(length=600, r=6), "at most 513 tokens"),
    ],
)
def test_merge_nodes_reject_what_the_plugin_cannot_run(kwargs, message):
    with pytest.raises(UserError) as err:
        engine.prepare_onnx(merge_model(**kwargs))
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_build_plan_counts_merge_nodes_and_refuses_jit_bf16(tmp_path):
    path = write_export(tmp_path / "m.onnx", merge_model())
    plan = engine.plan_build(path)
    assert len(plan.nodes) == 1 and len(plan.merge_nodes) == 1
    record = engine.engine_record(plan, b"e", "10.13.0", {})
    assert record["merge_plugin"] == {"id": "mame::TokenMerge", "implementation": "aot", "nodes": 1}
    bf16 = write_export(tmp_path / "b.onnx", scan_model(dtype=TensorProto.BFLOAT16))
    with pytest.raises(UserError, match="build `jit` cannot run bf16") as err:
        engine.plan_build(bf16, jit=True)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="build `jit` cannot run bf16"):
        engine.plan_build(path, precision="bf16", jit=True, force=True)
