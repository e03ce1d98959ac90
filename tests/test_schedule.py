"""Merge schedules: parsing, ratio -> per-layer counts, validation messages, the summary."""

import pytest
from hypothesis import given, settings, strategies as st

from mame_deploy.errors import UserError
from mame_deploy.flops import relative_gflops
from mame_deploy.models import VimConfig
from mame_deploy.schedule import (
    MAX_RATIO, default_merge_layers, parse_layers, parse_schedule, resolve_schedule, schedule_from_counts,
    schedule_from_ratio, schedule_text, summary, tokens_per_layer,
)

VIM_T = VimConfig()                                                   # 196 patches, 24 blocks
DIGITS = VimConfig(embed_dim=64, depth=8, img_size=32, patch_size=4, in_chans=1, num_classes=10)  # 64 patches


def test_parse_schedule():
    assert parse_schedule("4:20,8:20") == {4: 20, 8: 20}
    assert parse_schedule(" 0 : 5 , 3:1 ") == {0: 5, 3: 1}


@pytest.mark.parametrize("text, message", [
    ("", "empty `schedule`"),
    ("4-20", "malformed schedule step '4-20'"),
    ("4:20,", "malformed schedule step ''"),
    ("a:3", "malformed"),
    ("4:2,4:3", "layer 4 appears twice"),
])
def test_parse_schedule_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_schedule(text)


def test_parse_layers():
    assert parse_layers("2,5, 8") == [2, 5, 8]
    with pytest.raises(UserError, match="malformed `layers`"):
        parse_layers("2;5")


@pytest.mark.parametrize("ratio", [-0.1, 0.96, 1.0, float("nan")])
def test_ratio_out_of_range(ratio):
    with pytest.raises(UserError, match=r"`ratio` must lie in \[0, 0.95\]"):
        schedule_from_ratio(VIM_T, ratio)


def test_ratio_zero_merges_nothing():
    assert schedule_from_ratio(VIM_T, 0.0) == [0] * 24


@settings(max_examples=40, deadline=None)
@given(ratio=st.floats(0.0, MAX_RATIO), config=st.sampled_from([VIM_T, DIGITS]))
def test_ratio_schedule_removes_exactly_and_validly(ratio, config):
    schedule = schedule_from_ratio(config, ratio)
    n = config.num_patches
    assert len(schedule) == config.depth
    assert sum(schedule) == round(ratio * n)
    assert schedule[-1] == 0  # nothing to save after the last block
    remaining = n
    for count in schedule:
        assert 0 <= count <= remaining // 2
        remaining -= count
    # Only the default layers merge.
    assert {i for i, c in enumerate(schedule) if c} <= set(default_merge_layers(config.depth))


def test_ratio_spreads_as_constant_fraction():
    schedule = schedule_from_ratio(VIM_T, 0.5, layers=[3, 9, 15])
    assert schedule[3] + schedule[9] + schedule[15] == 98 and sum(schedule) == 98
    assert schedule[3] > schedule[9] > schedule[15] > 0  # same fraction of fewer tokens: fewer tokens


def test_ratio_with_too_few_layers_is_refused():
    with pytest.raises(UserError, match="1 merge layers cannot"):
        schedule_from_ratio(VIM_T, 0.6, layers=[5])
    assert sum(schedule_from_ratio(VIM_T, 0.5, layers=[5])) == 98  # exactly half: allowed


@pytest.mark.parametrize("layers, message", [
    ([23], "merge layer 23 is out of range"),
    ([-1], "merge layer -1 is out of range"),
    ([2, 2], "name a block twice"),
    ([], "no merge layers"),
])
def test_layer_errors(layers, message):
    with pytest.raises(UserError, match=message):
        schedule_from_ratio(VIM_T, 0.3, layers=layers)


def test_explicit_schedules():
    assert resolve_schedule(VIM_T, schedule="4:20,8:20") == [0] * 4 + [20] + [0] * 3 + [20] + [0] * 15
    assert resolve_schedule(VIM_T, schedule={4: 20}) == resolve_schedule(VIM_T, schedule="4:20")
    full = [0] * 24
    full[1] = 7
    assert resolve_schedule(VIM_T, schedule=full) == full
    assert schedule_text(full) == "1:7" and schedule_text([0] * 24) == ""


@pytest.mark.parametrize("text, message", [
    ("0:99", "layer 0 removes 99 tokens but only 196 patches remain there; one step may remove at most half"),
    ("0:98,1:50", "layer 1 removes 50 tokens but only 98 patches remain"),
    ("24:3", "merge layer 24 is out of range: this model has 24 blocks, merges may follow blocks 0..22"),
    ("23:3", "merge layer 23 is out of range"),
    ("3:-1", "negative"),
])
def test_explicit_schedule_errors(text, message):
    with pytest.raises(UserError, match=message):
        resolve_schedule(VIM_T, schedule=text)


def test_ratio_and_schedule_are_exclusive():
    with pytest.raises(UserError, match="either `ratio` or `schedule`"):
        resolve_schedule(VIM_T, ratio=0.3, schedule="4:20")
    with pytest.raises(UserError, match="`layers` goes with `ratio`"):
        resolve_schedule(VIM_T, schedule="4:20", layers=[4])
    with pytest.raises(UserError, match="one count per block"):
        resolve_schedule(VIM_T, schedule=[1, 2])


def test_tokens_per_layer_and_summary():
    schedule = schedule_from_counts(DIGITS, {1: 16, 4: 8})
    tokens = tokens_per_layer(DIGITS, schedule)
    assert tokens == [65, 65, 49, 49, 49, 41, 41, 41]
    rows = summary(DIGITS, schedule)
    assert [r["tokens"] for r in rows[:-1]] == tokens
    assert [r["removed"] for r in rows[:-1]] == schedule
    total = rows[-1]
    assert total["block"] == "total" and total["removed"] == 24 and total["tokens"] == 41
    assert total["relative_gflops"] == pytest.approx(relative_gflops(DIGITS, tokens))
    assert 0.6 < total["relative_gflops"] < 1.0
    assert summary(DIGITS, [0] * 8)[-1]["relative_gflops"] == 1.0
