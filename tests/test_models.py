"""The Vision Mamba zoo against the contract in docs/vim.md."""

import math

import pytest
import torch
import torch.nn.functional as F

import mame_deploy
from mame_deploy.errors import UserError
from mame_deploy.ops.selective_scan import scan_dt_sums, selective_scan_ref
from mame_deploy.ops.token_merge.reference import informativeness

CONFIGS = {"vim_t": (192, 7_148_008), "vim_s": (384, 25_796_584), "vim_b": (768, 97_598_440)}


def official_shapes(embed: int, depth: int = 24, n: int = 16, tokens: int = 197) -> dict:
    """Key -> shape of an official checkpoint, written out from docs/vim.md's table."""
    di, r = 2 * embed, math.ceil(embed / 16)
    shapes = {
        "cls_token": (1, 1, embed), "pos_embed": (1, tokens, embed),
        "patch_embed.proj.weight": (embed, 3, 16, 16), "patch_embed.proj.bias": (embed,),
        "head.weight": (1000, embed), "head.bias": (1000,), "norm_f.weight": (embed,),
    }
    for i in range(depth):
        p = f"layers.{i}."
        shapes.update({
            p + "mixer.A_log": (di, n), p + "mixer.D": (di,),
            p + "mixer.A_b_log": (di, n), p + "mixer.D_b": (di,),
            p + "mixer.in_proj.weight": (2 * di, embed), p + "mixer.out_proj.weight": (embed, di),
            p + "norm.weight": (embed,),
        })
        for s in ("", "_b"):
            shapes.update({
                p + f"mixer.conv1d{s}.weight": (di, 1, 4), p + f"mixer.conv1d{s}.bias": (di,),
                p + f"mixer.x_proj{s}.weight": (r + 2 * n, di),
                p + f"mixer.dt_proj{s}.weight": (di, r), p + f"mixer.dt_proj{s}.bias": (di,),
            })
    return shapes


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_matches_official_keys_and_shapes(name):
    embed, params = CONFIGS[name]
    model = mame_deploy.create_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == 415
    assert got == official_shapes(embed)
    assert sum(p.numel() for p in model.parameters()) == params


def test_list_models_has_the_three_sizes():
    assert {"vim_t", "vim_s", "vim_b"} <= set(mame_deploy.list_models())


def test_unknown_model_names_the_available_ones():
    with pytest.raises(UserError, match="unknown model 'vim_q'.*vim_b, .*vim_s, .*vim_t"):
        mame_deploy.create_model("vim_q")


def test_unknown_override_is_rejected():
    with pytest.raises(UserError, match="unknown option"):
        mame_deploy.create_model("vim_t", embed_size=3)


def test_init_follows_vim_md_and_is_seed_deterministic():
    a = mame_deploy.create_model("vim_t", depth=2, seed=3).state_dict()
    b = mame_deploy.create_model("vim_t", depth=2, seed=3).state_dict()
    c = mame_deploy.create_model("vim_t", depth=2, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.mixer.in_proj.weight"], c["layers.0.mixer.in_proj.weight"])
    m = "layers.1.mixer."
    torch.testing.assert_close(a[m + "A_log"][5], torch.log(torch.arange(1.0, 17.0)))
    assert torch.equal(a[m + "D"], torch.ones(384)) and torch.equal(a[m + "D_b"], torch.ones(384))
    dt = F.softplus(a[m + "dt_proj.bias"])
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert a["pos_embed"].std().item() == pytest.approx(0.02, rel=0.2)


def test_strict_load_roundtrip_official_and_bare_layout(tmp_path):
    src = mame_deploy.create_model("vim_t", depth=2, seed=1)
    x = torch.randn(2, 3, 224, 224)
    for layout, payload in (("official", {"model": src.state_dict()}), ("bare", src.state_dict())):
        path = tmp_path / f"{layout}.pth"
        torch.save(payload, path)
        loaded = mame_deploy.create_model("vim_t", depth=2, seed=9, checkpoint=path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)


def test_checkpoint_that_does_not_fit_lists_what_differs(tmp_path):
    sd = mame_deploy.create_model("vim_t", depth=2).state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["norm_f.weight"] = torch.zeros(7)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(UserError) as err:
        mame_deploy.create_model("vim_t", depth=2, checkpoint=path)
    msg = str(err.value)
    assert "1 missing keys: head.bias" in msg and "1 unexpected keys: extra.weight" in msg
    assert "norm_f.weight (7,) vs (192,)" in msg and "\n" not in msg


@pytest.mark.parametrize("content,phrase", [(b"not a checkpoint", "is a text file, not a PyTorch checkpoint"),
                                            (b"", "is empty")])
def test_unreadable_checkpoint_is_one_clear_error(tmp_path, content, phrase):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=phrase):
        mame_deploy.create_model("vim_t", checkpoint=path)
    with pytest.raises(UserError, match="does not exist"):
        mame_deploy.create_model("vim_t", checkpoint=tmp_path / "missing.pth")


def test_wrong_image_size_is_a_clear_error():
    model = mame_deploy.create_model("vim_t", depth=1)
    with pytest.raises(UserError, match=r"expected images of shape \(B, 3, 224, 224\), got \(1, 3, 192, 192\)"):
        model(torch.randn(1, 3, 192, 192))


def test_forward_shape_and_batch_independence():
    model = mame_deploy.create_model("vim_t", depth=3)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        full = model(x)
        single = model(x[1:2])
    assert full.shape == (3, 1000) and torch.isfinite(full).all()
    torch.testing.assert_close(full[1:2], single, rtol=1e-5, atol=1e-5)


def flip_formulation_mixer(mixer, h):
    """The official bimamba-v2 forward in words of docs/vim.md: the backward branch runs the
    forward machinery on the flipped sequence and flips its output back."""
    L = h.shape[1]
    xz = mixer.in_proj(h).transpose(1, 2)

    def branch(xz, conv, x_proj, dt_proj, A_log, D):
        x, z = xz.chunk(2, dim=1)
        x = F.silu(conv(x)[..., :L])
        dbl = x_proj(x.transpose(1, 2))
        dt, Bm, Cm = dbl.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)
        return selective_scan_ref(x, delta, -torch.exp(A_log), Bm.transpose(1, 2), Cm.transpose(1, 2),
                                  D, z, dt_proj.bias, delta_softplus=True)

    y_f = branch(xz, mixer.conv1d, mixer.x_proj, mixer.dt_proj, mixer.A_log, mixer.D)
    y_b = branch(xz.flip(-1), mixer.conv1d_b, mixer.x_proj_b, mixer.dt_proj_b, mixer.A_b_log, mixer.D_b)
    return mixer.out_proj(((y_f + y_b.flip(-1)) / 2).transpose(1, 2))


def test_backward_branch_without_flips_equals_flip_formulation():
    model = mame_deploy.create_model("vim_t", depth=1, seed=2)
    mixer = model.layers[0].mixer
    with torch.no_grad():  # random conv/x_proj weights so the anti-causal conv matters
        for p in mixer.parameters():
            p.add_(0.05 * torch.randn_like(p))
        h = torch.randn(2, 37, 192)
        torch.testing.assert_close(mixer(h), flip_formulation_mixer(mixer, h), rtol=1e-5, atol=1e-5)


def test_informativeness_does_not_change_the_mixer_output():
    mixer = mame_deploy.create_model("vim_t", depth=1).layers[0].mixer
    h = torch.randn(2, 20, 192)
    with torch.no_grad():
        out, parts = mixer(h, return_score=True)
        torch.testing.assert_close(out, mixer(h), rtol=0, atol=0)
    assert len(parts) == 2  # both scans' dt_sums, each (batch, channel groups, length)
    assert all(p.shape == (2, 384 // 8, 20) and (p > 0).all() for p in parts)


def test_informativeness_is_the_mean_step_size_of_both_branches(monkeypatch):
    """The score comes from the scans' dt_sums, summed by the merge operator; it must equal MaMe's
    definition, the mean over channels of softplus(delta + delta_bias), averaged over the two
    branches."""
    import mame_deploy.models.vim as vim

    seen, scan = [], vim.selective_scan

    def recording_scan(*args):
        seen.append((args[1], args[7]))  # delta, delta_bias
        return scan(*args)

    monkeypatch.setattr(vim, "selective_scan", recording_scan)
    mixer = mame_deploy.create_model("vim_t", depth=1, seed=3).layers[0].mixer
    with torch.no_grad():
        _, parts = mixer(torch.randn(2, 21, 192), return_score=True)
    score = informativeness(torch.cat(parts, dim=1), mixer.score_scale)  # what mame::TokenMerge makes of them
    (delta_f, bias_f), (delta_b, bias_b) = seen
    step = lambda delta, bias: F.softplus(delta + bias[None, :, None])  # noqa: E731
    want = (step(delta_f, bias_f).mean(1) + step(delta_b, bias_b).mean(1)) / 2
    torch.testing.assert_close(score, want, rtol=1e-6, atol=0)


def test_mamba_ssm_backend_computes_the_score_only_where_asked(monkeypatch):
    """mamba-ssm's scan has no dt_sums output: the mixer computes it apart, and only when a merge
    asks for the score, so an unmerged block times mamba-ssm's kernel alone."""
    import mame_deploy.models.vim as vim
    from mame_deploy.ops import mamba_ssm_backend

    def stand_in(u, delta, A, B, C, D, z, delta_bias, delta_softplus):  # mamba-ssm's signature
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    monkeypatch.setattr(mamba_ssm_backend, "selective_scan_fn", lambda: stand_in)
    calls = []
    monkeypatch.setattr(vim, "scan_dt_sums", lambda *a: calls.append(1) or scan_dt_sums(*a))
    mixer = mame_deploy.create_model("vim_t", depth=1, seed=4).layers[0].mixer
    h = torch.randn(2, 13, 192)
    with torch.no_grad():
        _, want = mixer(h, return_score=True)
        mixer.scan_backend = "mamba_ssm"
        mixer(h)
        assert calls == []
        _, score = mixer(h, return_score=True)
    assert len(calls) == 2  # one per branch
    torch.testing.assert_close(score, want, rtol=1e-6, atol=0)
