"""The reference selective scan against a naive float64 loop written straight from docs/vim.md."""

import pytest
import torch
import torch.nn.functional as F

from mame_deploy.ops.selective_scan import selective_scan, selective_scan_ref
from mame_deploy.ops.selective_scan.contract import DT_GROUP, output_shapes
from mame_deploy.ops.selective_scan.reference import scan_ref_outputs


def naive_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    dt = delta + (delta_bias.double()[:, None] if delta_bias is not None else 0)
    dt = F.softplus(dt) if delta_softplus else dt
    out = torch.zeros_like(u)
    for b in range(batch):
        h = torch.zeros(dim, A.shape[1], dtype=torch.float64)
        for t in (range(length - 1, -1, -1) if reverse else range(length)):
            h = torch.exp(dt[b, :, t, None] * A) * h + dt[b, :, t, None] * B[b, None, :, t] * u[b, :, t, None]
            out[b, :, t] = (h * C[b, None, :, t]).sum(-1)
    if D is not None:
        out = out + D.double()[None, :, None] * u
    if z is not None:
        out = out * F.silu(z.double())
    return out


def random_inputs(batch, dim, dstate, length, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return dict(
        u=r(batch, dim, length).to(dtype),
        delta=(0.5 * r(batch, dim, length)).to(dtype),
        A=-torch.exp(r(dim, dstate).clamp(-2, 2.5)),
        B=r(batch, dstate, length).to(dtype),
        C=r(batch, dstate, length).to(dtype),
        D=r(dim),
        z=r(batch, dim, length).to(dtype),
        delta_bias=r(dim) - 2,
    )


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape", [(1, 4, 16, 1), (2, 8, 16, 37), (3, 5, 8, 64), (1, 6, 32, 97)])
def test_reference_matches_float64_loop(shape, reverse):
    inputs = random_inputs(*shape, seed=hash(shape) % 1000)
    ref = naive_scan(**inputs, delta_softplus=True, reverse=reverse)
    out = selective_scan_ref(**inputs, delta_softplus=True, reverse=reverse)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("optional", ["D", "z", "delta_bias"])
def test_optional_inputs_may_be_absent(optional):
    inputs = random_inputs(2, 4, 16, 20, seed=3)
    inputs[optional] = None
    ref = naive_scan(**inputs, delta_softplus=True, reverse=False)
    assert rel_err(selective_scan_ref(**inputs, delta_softplus=True), ref) < 1e-5


def test_without_softplus_delta_is_the_step():
    inputs = random_inputs(2, 4, 16, 20, seed=4)
    inputs["delta"] = inputs["delta"].abs()  # a raw step must be positive to stay stable
    inputs["delta_bias"] = inputs["delta_bias"].abs()
    ref = naive_scan(**inputs, delta_softplus=False, reverse=True)
    assert rel_err(selective_scan_ref(**inputs, delta_softplus=False, reverse=True), ref) < 1e-5


def test_reverse_equals_flip_scan_flip():
    inputs = random_inputs(2, 8, 16, 41, seed=7)
    flipped = {k: (v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
    rev = selective_scan_ref(**inputs, delta_softplus=True, reverse=True)
    via_flip = selective_scan_ref(**flipped, delta_softplus=True).flip(-1)
    torch.testing.assert_close(rev, via_flip, rtol=1e-6, atol=1e-6)


def test_half_inputs_accumulate_in_float32():
    inputs = random_inputs(2, 8, 16, 50, seed=11, dtype=torch.bfloat16)
    ref = naive_scan(**inputs, delta_softplus=True, reverse=False)
    out = selective_scan_ref(**inputs, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 5e-3


def test_registered_op_is_the_reference_on_cpu():
    inputs = random_inputs(2, 4, 16, 9, seed=5)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    op = torch.ops.mame.selective_scan(*args, True, True)
    torch.testing.assert_close(op, scan_ref_outputs(*args, True, True), rtol=0, atol=0)
    torch.testing.assert_close(selective_scan(*args, True, True), op, rtol=0, atol=0)
    torch.testing.assert_close(op[0], selective_scan_ref(*args, True, True), rtol=0, atol=0)


@pytest.mark.parametrize("dim", [8, 20, 3])
@pytest.mark.parametrize("softplus", [True, False])
def test_dt_sums_are_step_sizes_summed_over_groups_of_8_channels(dim, softplus):
    inputs = random_inputs(2, dim, 16, 7, seed=dim, dtype=torch.float16)
    _, dt_sums = scan_ref_outputs(**inputs, delta_softplus=softplus, reverse=True)
    assert dt_sums.dtype == torch.float32
    assert tuple(dt_sums.shape) == output_shapes(2, dim, 7)["dt_sums"] == (2, -(-dim // DT_GROUP), 7)
    dt = inputs["delta"].double() + inputs["delta_bias"].double()[:, None]
    dt = F.softplus(dt) if softplus else dt
    want = torch.stack([dt[:, g:g + DT_GROUP].sum(1) for g in range(0, dim, DT_GROUP)], dim=1)
    torch.testing.assert_close(dt_sums.double(), want, rtol=1e-6, atol=1e-6)


def test_dt_sums_carry_gradients_for_training():
    inputs = random_inputs(1, 8, 16, 5, seed=2)
    inputs["delta"].requires_grad_(True)
    _, dt_sums = selective_scan(*inputs.values(), True, False)
    dt_sums.sum().backward()
    want = torch.sigmoid(inputs["delta"] + inputs["delta_bias"][:, None]).detach()  # d softplus
    torch.testing.assert_close(inputs["delta"].grad, want)


def test_op_passes_torch_library_checks_with_strided_inputs():
    """Fake and real outputs agree in shape, dtype and strides (torch.compile asserts them), also
    for a transposed u and delta as the model passes them."""
    inputs = random_inputs(2, 8, 4, 11, seed=9)
    for name in ("u", "delta"):
        inputs[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    assert not inputs["u"].is_contiguous()
    torch.library.opcheck(torch.ops.mame.selective_scan.default, (*inputs.values(), True, True))
