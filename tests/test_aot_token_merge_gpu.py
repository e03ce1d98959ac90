"""The TokenMerge plugin's ahead-of-time path on a GPU, without TensorRT.

What TensorRT does with the plugin's ``aot_impl``, done with cuda-python: take the PTX and
kernel name ``aot_kernel`` returns, ``cuModuleLoadData`` it, and ``cuLaunchKernel`` it with the
plugin's grid, block, shared memory and argument list (input pointers in the node's order, the
int32 extra arguments, output pointers) on NaN-poisoned device buffers; compare with
``token_merge_ref``. Every merge shape of vim_s at ratio 0.5 (the schedule's lengths), batch 1
and 64, as a static engine and as a dynamic-batch one (a batch expression), every tactic.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
driver = pytest.importorskip("cuda.bindings.driver", reason="needs cuda-python (pip install 'mame-deploy[gpu]')")

from shape_expr import Sym, evaluate  # noqa: E402

from mame_deploy.models import create_model  # noqa: E402
from mame_deploy.ops.token_merge.contract import MergeAttributes  # noqa: E402
from mame_deploy.ops.fixtures import merge_inputs  # noqa: E402
from mame_deploy.ops.token_merge.reference import token_merge_ref  # noqa: E402
from mame_deploy.plugins.trt_token_merge import aot_kernel, tactics  # noqa: E402
from mame_deploy.schedule import resolve_schedule  # noqa: E402

pytestmark = pytest.mark.gpu
torch.backends.cuda.matmul.allow_tf32 = False
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-3}
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _check(result):
    err, *values = result
    assert err == driver.CUresult.CUDA_SUCCESS, err
    return values[0] if len(values) == 1 else (values or None)


def vim_s_merges():
    """(length, r) of every merge step of vim_s at ratio 0.5."""
    cfg = create_model("vim_s").config
    length, steps = cfg.num_patches + 1, []
    for r in resolve_schedule(cfg, 0.5):
        if r:
            steps.append((length, r))
            length -= r
    return steps


class Launcher:
    def __init__(self):
        torch.zeros(1, device="cuda")
        _check(driver.cuInit(0))
        device = _check(driver.cuDeviceGet(torch.cuda.current_device()))
        _check(driver.cuCtxSetCurrent(_check(driver.cuDevicePrimaryCtxRetain(device))))
        self.functions = {}

    def launch(self, kernel, inputs, outputs):
        key = (kernel.name, kernel.ptx)
        if key not in self.functions:
            module = _check(driver.cuModuleLoadData(kernel.ptx + b"\0"))
            self.functions[key] = _check(driver.cuModuleGetFunction(module, kernel.name.encode()))
        slots = [np.array([t.data_ptr()], dtype=np.uint64) for t in inputs]
        slots += [np.array([int(s)], dtype=np.int32) for s in kernel.scalars]
        slots += [np.array([t.data_ptr()], dtype=np.uint64) for t in outputs]
        params = np.array([s.ctypes.data for s in slots], dtype=np.uint64)
        stream = driver.CUstream(torch.cuda.current_stream().cuda_stream)
        _check(driver.cuLaunchKernel(self.functions[key], *kernel.grid, *kernel.block, kernel.shared_mem, stream,
                                     params.ctypes.data, 0))
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def launcher():
    return Launcher()


def plugin_kernel(hidden, residual, batch, length, dim, parts, parts_b, attrs, tactic, dynamic):
    if not dynamic:
        return aot_kernel(hidden, residual, batch, length, dim, parts, parts_b, attrs, tactic)
    kernel = aot_kernel(hidden, residual, Sym.var("batch"), length, dim, parts, parts_b, attrs, tactic)
    env = {"batch": batch}
    return replace(kernel, grid=tuple(evaluate(x, env) for x in kernel.grid),
                   block=tuple(evaluate(x, env) for x in kernel.block),
                   shared_mem=evaluate(kernel.shared_mem, env),
                   scalars=tuple(evaluate(x, env) for x in kernel.scalars))


def test_vim_s_has_merge_steps():
    steps = vim_s_merges()
    assert steps[0][0] == 197 and len(steps) >= 20, steps


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.float32)], ids=["fp32", "fp16", "bf16-fp32res"])
def test_aot_launch_matches_the_reference(launcher, dtypes, dynamic):
    scale = 0.5 / 768  # vim_s's score scale
    attrs_of = {"mame": lambda r: MergeAttributes(r, lam=1.0, score_scale=scale),
                "tome": lambda r: MergeAttributes(r, split=1, arrangement=1, weighting=1, score_scale=scale)}
    worst, count = 0.0, 0
    for i, (length, r) in enumerate(vim_s_merges()):
        for batch in (1, 64):
            for method, make in attrs_of.items():
                attrs = make(r)
                args = merge_inputs(batch, length, 384, *dtypes, seed=i)
                want = token_merge_ref(**args, attrs=attrs)
                for tactic in (0,) + tactics():
                    kernel = plugin_kernel(NAMES[dtypes[0]], NAMES[dtypes[1]], batch, length, 384,
                                           args["score"].shape[1], args["score_b"].shape[1], attrs, tactic,
                                           dynamic)
                    Q = length - r
                    outs = [torch.full((batch, Q, 384), float("nan"), device="cuda", dtype=dtypes[0]),
                            torch.full((batch, Q, 384), float("nan"), device="cuda", dtype=dtypes[1]),
                            torch.full((batch, Q), float("nan"), device="cuda"),
                            torch.full((batch, Q), -7, device="cuda", dtype=torch.long),
                            torch.full((batch,), -7, device="cuda", dtype=torch.long)]
                    launcher.launch(kernel, list(args.values()), outs)
                    label = f"L={length} r={r} B={batch} {method} tactic {tactic}"
                    assert torch.equal(outs[3], want[3]) and torch.equal(outs[4], want[4]), f"{label}: decisions"
                    torch.testing.assert_close(outs[2], want[2], rtol=1e-6, atol=0)
                    for got, ref, dt in ((outs[0], want[0], dtypes[0]), (outs[1], want[1], dtypes[1])):
                        err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
                        assert err < TOLERANCE[dt], f"{label}: relative error {err:.2e}"
                        worst = max(worst, err)
                    count += 1
    print(f"\n{dtypes} {'dynamic' if dynamic else 'static'}: {count} launches, worst relative error {worst:.2e}")
