"""mame_deploy.decisions: a step's decision is its survivors' origins AND sizes, compared per
sample and step; traces from PyTorch and from an exported file line up."""

import numpy as np

import mame_deploy
from mame_deploy import decisions
from mame_deploy.models import create_model


def _trace(origins, sizes, layers):
    out = {}
    for layer, origin, size in zip(layers, origins, sizes):
        out[decisions.trace_name(layer, "origin_out")] = np.asarray(origin)
        out[decisions.trace_name(layer, "size_out")] = np.asarray(size, dtype=np.float32)
    return out


def test_a_source_sent_elsewhere_is_a_flip_even_with_the_same_survivors():
    layers = [0, 3]
    origin = [[[0, 2, 3], [0, 1, 3]], [[0, 3], [0, 3]]]
    ref = _trace(origin, [[[1, 2, 1], [2, 1, 1]], [[3, 1], [3, 1]]], layers)
    # Sample 1 keeps the same tokens at step 0 but its removed token joined another destination.
    out = _trace(origin, [[[1, 2, 1], [1, 2, 1]], [[3, 1], [3, 1]]], layers)
    flips = decisions.compare_decisions(out, ref, layers)
    assert flips["flipped"].tolist() == [False, True]
    assert flips["first_step"].tolist() == [-1, 0]
    assert flips["differing"] == [1, 0] and flips["first_flips"] == [1, 0]
    assert not decisions.compare_decisions(ref, ref, layers)["flipped"].any()


def test_torch_trace_matches_the_schedule_and_near_tie_runs():
    model = mame_deploy.patch(create_model("vim_digits"), ratio=0.5)
    from mame_deploy.runners import TorchRunner

    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32), dtype=np.float32)
    with TorchRunner(model, trace_merges=True) as runner:
        out = runner.infer({"images": x}, check_inputs=False)
    layers = model.token_merge.layers
    tokens = 65
    for layer in layers:
        tokens -= model.mame_schedule[layer]
        assert out[decisions.trace_name(layer, "origin_out")].shape == (2, tokens)
        sizes = out[decisions.trace_name(layer, "size_out")]
        assert np.all(sizes.sum(axis=1) == 65)             # every original token is accounted for
    assert model.token_merge.trace is None                  # tracing is off again
    # The test perturbs only the asked-for step: no noise never moves it, gross noise always does.
    assert not decisions.near_tie(model, x[0], 1, noise=0.0)
    assert decisions.near_tie(model, x[0], 1, noise=0.5)
