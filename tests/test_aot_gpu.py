"""The TensorRT plugin's ahead-of-time path, end to end on a GPU, without TensorRT.

For every scan shape of a vim_s engine at ratio 0.5 (read from an exported ONNX file with the
same ``scan_nodes`` the engine build uses), as a static engine and as a dynamic-batch one
(whose launch is an expression of the batch), this does what TensorRT does with the plugin's
``aot_impl``: take the PTX NVRTC compiled from the one kernel source, load it with
``cuModuleLoadData``, and ``cuLaunchKernel`` it with the plugin's grid, block, shared memory
and argument list -- input pointers in the plugin's input order, then the int32 extra
arguments, then the two output pointers -- on device buffers. The outputs (poisoned with NaN
before) are compared with the reference (``out`` and ``dt_sums``).

The ONNX file: ``MAME_AOT_ONNX=path`` (weights may be absent: only shapes are read), else the
test exports vim_s at ratio 0.5 itself.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
driver = pytest.importorskip("cuda.bindings.driver", reason="needs cuda-python (pip install 'mame-deploy[gpu]')")

from shape_expr import Sym, evaluate  # noqa: E402

from mame_deploy.engine import scan_nodes  # noqa: E402
from mame_deploy.ops.selective_scan import INPUT_NAMES  # noqa: E402
from mame_deploy.ops.selective_scan.contract import dt_groups  # noqa: E402
from mame_deploy.ops.selective_scan.reference import scan_ref_outputs  # noqa: E402
from mame_deploy.plugins.trt_plugin import KERNEL_DTYPES, aot_kernel  # noqa: E402

pytestmark = pytest.mark.gpu

MODEL, RATIO = "vim_s", 0.5
EXTRA_BATCHES = (64,)  # besides the file's own batch: an engine batch that fills the GPU
TOLERANCE = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 1e-2}  # norm-wise relative error
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check(result):
    err, *values = result
    assert err == driver.CUresult.CUDA_SUCCESS, err
    return values[0] if len(values) == 1 else (values or None)


def _exported_onnx(tmp_path_factory) -> Path:
    given = os.environ.get("MAME_AOT_ONNX")
    if given:
        return Path(given)
    from mame_deploy.manifest import Source
    from mame_deploy.onnx_export import export

    return export(Source(model=MODEL, ratio=RATIO), output=tmp_path_factory.mktemp("aot") / f"{MODEL}.onnx").onnx_path


@pytest.fixture(scope="module")
def engine_scans(tmp_path_factory):
    """Distinct (batch, dim, length, dstate, delta_softplus, reverse) of the engine's scan nodes."""
    model = onnx.load(str(_exported_onnx(tmp_path_factory)), load_external_data=False)
    nodes = scan_nodes(model)
    shapes = set()
    for node in nodes:
        assert isinstance(node.dim, int) and isinstance(node.length, int) and isinstance(node.dstate, int)
        batches = ({node.batch} if isinstance(node.batch, int) else {1}) | set(EXTRA_BATCHES)
        for batch in batches:
            shapes.add((batch, node.dim, node.length, node.dstate, node.delta_softplus, node.reverse))
    return nodes, sorted(shapes)


def plugin_kernel(dtype, batch, dim, length, dstate, softplus, reverse, dynamic_batch):
    """What TensorRT gets from the plugin: for a static engine the sizes are known at build
    time; a dynamic-batch engine gets a batch expression, evaluated at each run."""
    if not dynamic_batch:
        return aot_kernel(dtype, batch, dim, length, dstate, softplus, reverse)
    kernel = aot_kernel(dtype, Sym.var("batch"), dim, length, dstate, softplus, reverse)
    env = {"batch": batch}
    return replace(
        kernel,
        grid=tuple(evaluate(x, env) for x in kernel.grid),
        block=tuple(evaluate(x, env) for x in kernel.block),
        shared_mem=evaluate(kernel.shared_mem, env),
        scalars=tuple(evaluate(x, env) for x in kernel.scalars),
    )


class PluginLauncher:
    """Loads each PTX once and launches it as TensorRT launches an AOT plugin kernel."""

    def __init__(self):
        torch.zeros(1, device="cuda")  # initialise torch's CUDA state
        _check(driver.cuInit(0))
        # Modules load into the current context: make it the device's primary one (torch's).
        device = _check(driver.cuDeviceGet(torch.cuda.current_device()))
        _check(driver.cuCtxSetCurrent(_check(driver.cuDevicePrimaryCtxRetain(device))))
        self.functions = {}

    def function(self, kernel):
        key = (kernel.name, kernel.ptx)  # one name, several work splits: the PTX tells them apart
        if key not in self.functions:
            # The driver reads PTX as a C string; TensorRT stores the plugin's bytes with a size.
            module = _check(driver.cuModuleLoadData(kernel.ptx + b"\0"))
            self.functions[key] = _check(driver.cuModuleGetFunction(module, kernel.name.encode()))
        return self.functions[key]

    def launch(self, kernel, inputs, outputs):
        # One host slot per argument, then the array of their addresses (CUDA's void** params).
        slots = [np.array([t.data_ptr()], dtype=np.uint64) for t in inputs]
        slots += [np.array([int(s)], dtype=np.int32) for s in kernel.scalars]
        slots += [np.array([t.data_ptr()], dtype=np.uint64) for t in outputs]
        params = np.array([s.ctypes.data for s in slots], dtype=np.uint64)
        stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        _check(driver.cuLaunchKernel(
            self.function(kernel), *kernel.grid, *kernel.block, kernel.shared_mem, stream, params.ctypes.data, 0
        ))
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def launcher():
    return PluginLauncher()


def _inputs(batch, dim, length, dstate, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    act = TORCH_DTYPES[dtype]

    def randn(*shape, scale=1.0, dt=act):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dt).contiguous()

    u, z = randn(batch, dim, length), randn(batch, dim, length)
    delta = randn(batch, dim, length, scale=0.5)
    B, C = randn(batch, dstate, length), randn(batch, dstate, length)
    # Vim's A = -exp(A_log) with A_log = log(1..N) at init; jitter it so channels differ.
    A = -(torch.arange(1, dstate + 1, device="cuda", dtype=torch.float32).repeat(dim, 1)
          * torch.exp(randn(dim, dstate, scale=0.1, dt=torch.float32)))
    D = randn(dim, dt=torch.float32)
    delta_bias = randn(dim, scale=0.5, dt=torch.float32) - 2.0
    return dict(zip(INPUT_NAMES, (u, delta, A.contiguous(), B, C, D, z, delta_bias)))


def test_engine_contains_the_expected_scans(engine_scans):
    nodes, shapes = engine_scans
    lengths = sorted({n.length for n in nodes})
    print(f"\n{len(nodes)} scan nodes; lengths {lengths}; {len(shapes)} launch shapes")
    assert len(nodes) == 2 * 24  # vim_s: 24 blocks, a forward and a backward scan each
    assert lengths[-1] == 197 and lengths[0] < 197  # merging shortens later layers
    assert {(n.dim, n.dstate) for n in nodes} == {(768, 16)}


@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static", "dynamic-batch"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_aot_launch_matches_the_reference(engine_scans, launcher, dtype, dynamic_batch):
    _, shapes = engine_scans
    worst = []
    for i, (batch, dim, length, dstate, softplus, reverse) in enumerate(shapes):
        kernel = plugin_kernel(dtype, batch, dim, length, dstate, softplus, reverse, dynamic_batch)
        args = _inputs(batch, dim, length, dstate, dtype, seed=i)
        out = torch.full((batch, dim, length), float("nan"), device="cuda", dtype=TORCH_DTYPES[dtype])
        dt_sums = torch.full((batch, dt_groups(dim), length), float("nan"), device="cuda")
        launcher.launch(kernel, list(args.values()), [out, dt_sums])
        wants = scan_ref_outputs(*args.values(), delta_softplus=softplus, reverse=reverse)
        for name, got, want in (("out", out.float(), wants[0].float()), ("dt_sums", dt_sums, wants[1])):
            where = (name, batch, dim, length, softplus, reverse)
            assert torch.isfinite(got).all(), f"unwritten or non-finite {where}"
            err = (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item()
            worst.append((err, where))
            # dt_sums is float32 from the same (rounded) delta: float32 accuracy in every dtype
            assert err < (TOLERANCE[dtype] if name == "out" else 1e-5), f"{dtype} {where}: rel err {err:.2e}"
    err, shape = max(worst)
    kind = "dynamic-batch" if dynamic_batch else "static"
    print(f"\n{dtype} {kind}: {len(worst)} shapes, worst norm-wise relative error {err:.2e} at {shape}")
