"""`mame-deploy tune`: the search space, the Pareto front and the budget (pure functions, property
tests), and a real search on vim_digits in onnxruntime: interrupted and resumed without
re-measuring, the winner exported with --tuned and validated, every bad input one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mame_deploy import tune
from mame_deploy.cli.main import main
from mame_deploy.errors import UserError
from mame_deploy.models import VimConfig
from mame_deploy.schedule import schedule_from_ratio

DIGITS = VimConfig(embed_dim=64, depth=8, img_size=32, patch_size=4, in_chans=1, num_classes=10)  # 64 patches
VIM_S = VimConfig(embed_dim=384)                                                                 # 24 blocks
# A space small enough for CI: the uniform --ratio 0.1 and two few-layer placements of it.
SEARCH = ["tune", "vim_digits", "--max-drop", "100", "--runtime", "onnxruntime", "--threads", "1",
          "--ratios", "0.1", "--placements", "spread1,spread2", "--profiles", "constant", "--methods", "mame",
          "--calib-images", "48", "--warmup", "1", "--iters", "3", "--confirm", "0", "--max-measure", "3",
          "--margin", "0.99"]
# --margin 0.99: every candidate could still win, so the search times exactly --max-measure of them
# whatever this machine's timing noise says (with the default margin, noisy timings sometimes
# made a third timing pointless and the interrupted-search fixture found nothing to interrupt).


@pytest.fixture(autouse=True)
def _one_thread(_deterministic_threads):
    torch.set_num_threads(1)  # the reference scan is a loop of small ops (see test_digits.py)
    yield


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, out, err, *phrases):
    assert code == 2, (out, err)
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1, err
    for phrase in phrases:
        assert phrase in err, err


# ---------------------------------------------------------------------------------------------
# The space


def test_placements():
    assert tune.placement_layers("spread3", 24) == tune.placement_layers("every6", 24) == [5, 11, 17]
    assert tune.placement_layers("all", 8) == list(range(7))
    assert tune.placement_layers("early", 8) == [0, 1, 2, 3] and tune.placement_layers("late", 8) == [3, 4, 5, 6]
    assert tune.placement_layers("every2", 8) == [1, 3, 5] and tune.placement_layers("spread2", 8) == [2, 4]
    with pytest.raises(UserError, match="unknown placement 'middle'"):
        tune.placement_layers("middle", 8)
    with pytest.raises(UserError, match="does not fit a model of 8 blocks"):
        tune.placement_layers("spread9", 8)
    with pytest.raises(UserError, match="does not fit"):
        tune.placement_layers("every9", 8)


@settings(max_examples=60, deadline=None)
@given(ratio=st.floats(0.01, 0.9), placement=st.sampled_from(["all", "every2", "early", "late", "spread2", "spread3"]),
       config=st.sampled_from([DIGITS, VIM_S]))
def test_front_loaded_counts(ratio, placement, config):
    layers = tune.placement_layers(placement, config.depth)
    try:
        counts = tune.front_loaded(config, ratio, layers)
    except UserError as exc:
        assert "cannot be front-loaded" in str(exc)
        return
    total = round(ratio * config.num_patches)
    assert sum(counts) == total
    assert all(c == 0 for i, c in enumerate(counts) if i not in layers)
    left = config.num_patches
    for c in counts:
        assert c <= left // 2
        left -= c
    # front-loaded: at least as much removed in the first half of its layers as in the second
    first, second = layers[: len(layers) // 2], layers[(len(layers) + 1) // 2:]
    assert sum(counts[i] for i in first) >= sum(counts[i] for i in second)


def test_candidates_are_distinct_deterministic_and_hold_the_uniform_ratios():
    space = tune.Space(ratios=(0.1, 0.3), placements=("every2", "spread2"), profiles=("front",),
                       methods=("mame", "prune"))
    pool, families, uniform = tune.candidates(DIGITS, space)
    assert (pool, families, uniform) == tune.candidates(DIGITS, space)
    assert list(pool)[0] == tune.UNMERGED
    assert len({(c.method, c.counts) for c in pool.values()}) == len(pool)
    # the uniform --ratio schedules are always in the space, under the first method
    assert {pool[k].counts for k in uniform} == {tuple(schedule_from_ratio(DIGITS, r)) for r in (0.1, 0.3)}
    assert all(pool[k].method == "mame" for k in uniform)
    assert all(all(pool[k].ratio <= pool[j].ratio for k, j in zip(f, f[1:])) for f in families)


# ---------------------------------------------------------------------------------------------
# Front, budget, cost model (pure functions)


def _record(key, accuracy, latency_ms, uniform=False):
    return {"key": key, "accuracy": accuracy, "latency_runs": [{"p50_ms": latency_ms}], "uniform": uniform}


records_strategy = st.lists(st.tuples(st.integers(0, 20), st.integers(1, 30)), min_size=1, max_size=25)


@settings(max_examples=100, deadline=None)
@given(points=records_strategy)
def test_front_is_pareto_optimal(points):
    records = [_record(f"c{i}", a / 20, float(ms)) for i, (a, ms) in enumerate(points)]
    front = tune.pareto_front(records)
    keys = {r["key"] for r in front}

    def beats(a, b):
        return (a["accuracy"] >= b["accuracy"] and tune.latency(a) <= tune.latency(b)
                and (a["accuracy"] > b["accuracy"] or tune.latency(a) < tune.latency(b)))

    for r in front:
        assert not any(beats(o, r) for o in records)
    for r in records:
        if r["key"] not in keys:  # off the front: beaten, or equal to a front point on both
            assert any(beats(f, r) or (f["accuracy"] == r["accuracy"] and tune.latency(f) == tune.latency(r))
                       for f in front)
    assert [tune.latency(r) for r in front] == sorted(tune.latency(r) for r in front)


@settings(max_examples=100, deadline=None)
@given(points=records_strategy, max_drop=st.one_of(st.none(), st.sampled_from([0.0, 5.0, 20.0])),
       latency_ms=st.one_of(st.none(), st.sampled_from([5.0, 15.0])))
def test_choice_honours_the_budget(points, max_drop, latency_ms):
    if max_drop is None and latency_ms is None:
        max_drop = 10.0
    budget = tune.Budget(max_drop=max_drop, latency_ms=latency_ms)
    baseline = _record(tune.UNMERGED, 0.9, 20.0)
    records = [baseline] + [_record(f"c{i}", a / 20, float(ms)) for i, (a, ms) in enumerate(points)]
    best = tune.choose(records, baseline, budget)
    ok = [r for r in records if tune.meets(r, baseline, budget)]
    for r in ok:
        assert max_drop is None or 100 * (0.9 - r["accuracy"]) <= max_drop + 1e-9
        assert latency_ms is None or tune.latency(r) <= latency_ms
    if not ok:
        assert best is None
        return
    assert best in ok
    if budget.objective == "latency":
        assert tune.latency(best) == min(tune.latency(r) for r in ok)
    else:
        assert best["accuracy"] == max(r["accuracy"] for r in ok)


def test_budget_needs_a_limit_and_positive_values():
    with pytest.raises(UserError, match="needs a budget"):
        tune.Budget()
    with pytest.raises(UserError, match="`latency_ms` must be a positive number"):
        tune.Budget(latency_ms=0)
    assert tune.Budget(max_drop=1).objective == "latency"
    assert tune.Budget(max_drop=1, min_speedup=2).objective == "accuracy"
    assert tune.Budget(latency_ms=5, min_speedup=2).latency_limit(8.0) == 4.0


def test_cost_model_fits_measured_latency_and_starts_from_flops():
    def rec(blocks, steps, ms=None):
        return {"merge_steps": steps, "token_blocks": blocks, "method": "mame", "relative_gflops": blocks / 100,
                **({"latency_runs": [{"p50_ms": ms}]} if ms is not None else {})}

    truth = lambda blocks, steps: 1.0 + 0.1 * blocks + 2.0 * steps  # noqa: E731
    baseline = rec(100, 0, truth(100, 0))
    prior = tune.CostModel([baseline], baseline, 0.1)
    assert prior.coef is None and prior.predict(rec(50, 3)) == pytest.approx(truth(100, 0) * 0.5)
    measured = [rec(b, s, truth(b, s)) for b, s in ((100, 0), (90, 2), (80, 7), (70, 3))]
    model = tune.CostModel(measured, baseline, 0.1)
    assert model.predict(rec(60, 5)) == pytest.approx(truth(60, 5))
    assert model.margin == pytest.approx(0.1)
    # repeated timings that spread by 40% of their median: predictions get no more trust than that
    noisy = {**baseline, "latency_runs": [{"p50_ms": 10.0}, {"p50_ms": 14.0}, {"p50_ms": 12.0}]}
    assert tune.timing_noise([noisy]) == pytest.approx(4 / 12)
    assert tune.CostModel([noisy, *measured[1:]], noisy, 0.1).margin == pytest.approx(4 / 12)


# ---------------------------------------------------------------------------------------------
# A real search (onnxruntime on the CPU)


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """The small search run through the CLI, interrupted (Ctrl-C) at its third timing, then
    resumed: (folder, state after the interruption, state at the end, keys timed on resume)."""
    folder = tmp_path_factory.mktemp("tune")
    state_path = folder / "t.json"
    real = tune.measure_latency
    calls = []

    def interrupt_third(*args, **kwargs):
        calls.append(args[1]["key"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tune, "measure_latency", interrupt_third)
        assert main([*SEARCH, "--json", str(state_path)]) == 130
    partial = json.loads(state_path.read_text())
    resumed = []

    def spy(*args, **kwargs):
        resumed.append(args[1]["key"])
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tune, "measure_latency", spy)
        assert main([*SEARCH, "--json", str(state_path), "--plot", str(folder / "t.png")]) == 0
    return folder, partial, json.loads(state_path.read_text()), resumed


def _timed(state):
    return {k: r["latency_runs"] for k, r in state["candidates"].items() if r.get("latency_runs")}


def test_interrupted_search_keeps_what_was_measured_and_resumes_without_remeasuring(searched):
    folder, partial, final, resumed = searched
    before = _timed(partial)
    assert len(before) == 2 and tune.UNMERGED in before  # the unmerged model is timed first
    assert not set(resumed) & set(before)                 # nothing timed twice
    after = _timed(final)
    assert {k: after[k] for k in before} == before        # the very same numbers
    assert len(after) == 3 and final["measured"] == 3 and final["resumed"] is True
    assert all("load_1min" in run for runs in after.values() for run in runs)  # how busy the machine was
    assert (folder / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_front_and_winner_over_what_was_measured(searched):
    _, _, state, _ = searched
    records = list(state["candidates"].values())
    measured = [r for r in records if r.get("latency_runs")]
    assert state["front"] == [r["key"] for r in tune.pareto_front(measured)]
    best = state["best"]
    baseline = state["candidates"][tune.UNMERGED]
    budget = tune.Budget(**state["budget"])
    assert best["key"] == tune.choose(measured, baseline, budget)["key"] and best["key"] in state["front"]
    assert best["latency"]["p50_ms"] == tune.latency(state["candidates"][best["key"]])
    assert best["calibration"]["images"] == 48 and best["calibration"]["data"].startswith("digits/val")
    assert state["best_uniform"]["uniform"] and state["best_uniform"]["family_ratio"] == 0.1
    # every record was scored on the calibration split only
    assert all(r["images"] == 48 for r in records)


def test_same_seed_same_candidates_and_accuracies(searched):
    _, _, state, _ = searched
    setup = tune.Setup(**{**state["setup"], "runtime": "torch", "iters": 1, "warmup": 0})
    space = tune.Space(ratios=(0.1,), placements=("spread1", "spread2"), profiles=("constant",), methods=("mame",))
    # latency_ms=1e-9: nothing can meet it, so nothing but the unmerged model is timed
    again = tune.search(setup, space, tune.Budget(latency_ms=1e-9), confirm=0)
    assert again["best"] is None
    assert sorted(again["candidates"]) == sorted(state["candidates"])
    assert {k: r["correct"] for k, r in again["candidates"].items()} == \
           {k: r["correct"] for k, r in state["candidates"].items()}
    other = tune.calibration_data(tune.Setup(**{**setup.as_dict(), "seed": 1}), DIGITS)
    assert not torch.equal(other.images, tune.calibration_data(setup, DIGITS).images)


def test_unmet_budget_is_one_line_and_reuses_the_measurements(searched, capsys, tmp_path):
    folder, _, state, _ = searched
    path = tmp_path / "t.json"
    shutil.copy(folder / "t.json", path)
    argv = [a for a in SEARCH if a not in ("--max-drop", "100")]
    code, out, err = run(capsys, *argv, "--latency-ms", "0.000001", "--json", path)
    assert_one_line_error(code, out, err, "no measured schedule meets --latency-ms 1e-06", "loosen the budget")
    assert _timed(json.loads(path.read_text())) == _timed(state)


def test_winner_round_trips_through_export_and_validate(searched, capsys):
    folder, _, state, _ = searched
    best = state["best"]
    onnx = folder / "w.onnx"
    code, out, err = run(capsys, "export", "vim_digits", "--tuned", folder / "t.json", "--output", onnx)
    assert code == 0, err
    manifest = json.loads(onnx.with_suffix(".json").read_text())
    assert manifest["schedule"] == best["counts"] and manifest["method"] == best["method"]
    assert manifest["tuned"]["schedule"] == best["schedule"]
    assert manifest["tuned"]["latency"] == best["latency"] and manifest["tuned"]["budget"]["max_drop"] == 100
    assert manifest["tuned"]["calibration"]["drop_points"] == best["calibration"]["drop_points"]
    code, out, err = run(capsys, "validate", "--onnx", onnx, "--samples", "16")
    assert code == 0 and "PASS" in out, out + err
    if best["merged"]:  # the schedule text is what every command takes
        code, out, err = run(capsys, "eval", "vim_digits", "--schedule", best["schedule"], "--limit", "16")
        assert code == 0, err


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any work


@pytest.mark.parametrize("extra, phrases", [
    (["--max-drop", "1", "--subset", "test"], ["never the test split"]),
    (["--max-drop", "1", "--placements", "middle"], ["unknown placement 'middle'"]),
    (["--max-drop", "1", "--placements", "spread9"], ["spread9 does not fit a model of 8 blocks"]),
    (["--max-drop", "1", "--profiles", "back"], ["unknown profile(s) back"]),
    (["--max-drop", "1", "--runtime", "tflite"], ["unknown --runtime 'tflite'"]),
    (["--max-drop", "1", "--runtime", "torch-graph", "--device", "cpu"], ["runs on the GPU; pass --device cuda"]),
    (["--max-drop", "1", "--ratios", "0"], ["no ratio above 0"]),
    (["--min-speedup", "-1"], ["--min-speedup must be a positive number"]),
    (["--max-drop", "1", "--threads", "0"], ["--threads must be at least 1"]),
    (["--max-drop", "1", "--override", "depth=x"], ["depth"]),
    (["--max-drop", "1", "--batch-size", "0"], ["--batch-size must be at least 1"]),
    (["--max-drop", "1", "--scores-from", "/nonexistent.json"], ["--scores-from /nonexistent.json is not readable"]),
    ([], ["needs a budget"]),
])
def test_bad_input_is_one_line(capsys, extra, phrases):
    code, out, err = run(capsys, "tune", "vim_digits", *extra)
    assert_one_line_error(code, out, err, *phrases)


def test_json_of_another_search_is_refused(searched, capsys):
    folder, _, _, _ = searched
    argv = [a if a != "3" else "4" for a in SEARCH]  # --iters 4: the timings would not compare
    code, out, err = run(capsys, *argv, "--json", folder / "t.json")
    assert_one_line_error(code, out, err, "holds a search with other settings", "--force to start over")


def test_force_replaces_only_what_is_not_this_search(searched, tmp_path):
    folder, _, state, _ = searched
    setup = tune.Setup(**state["setup"])
    path = tmp_path / "t.json"
    shutil.copy(folder / "t.json", path)
    resumed, was = tune.load_state(path, setup, restart=True)  # --force (e.g. for --plot): kept
    assert was and _timed(resumed) == _timed(state)
    other = tune.Setup(**{**setup.as_dict(), "iters": 4})
    fresh, was = tune.load_state(path, other, restart=True)
    assert not was and fresh["candidates"] == {}
    path.write_text("not json")
    with pytest.raises(UserError, match="not readable JSON"):
        tune.load_state(path, setup)
    assert tune.load_state(path, setup, restart=True)[1] is False


def test_export_tuned_errors(searched, capsys, tmp_path):
    folder, _, _, _ = searched
    code, out, err = run(capsys, "export", "vim_digits", "--tuned", folder / "t.json", "--ratio", "0.2",
                         "--output", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, "--tuned fixes the schedule")
    code, out, err = run(capsys, "export", "vim_t", "--tuned", folder / "t.json", "--output", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, "was tuned for vim_digits, not vim_t")
    (tmp_path / "bad.json").write_text("{}")
    code, out, err = run(capsys, "export", "vim_digits", "--tuned", tmp_path / "bad.json",
                         "--output", tmp_path / "x.onnx")
    assert_one_line_error(code, out, err, "is not a tune result")


def test_families_stop_once_past_the_budget(monkeypatch):
    """Under --max-drop a family's larger ratios are not scored once one loses max_drop + slack."""
    import mame_deploy.evaluate as evaluate

    def fake(model, dataset, setting, batch_size):  # 1 point lost per token removed
        removed = sum(int(step.split(":")[1]) for step in (setting.schedule or "").split(",") if step)
        return {"accuracy": 1 - removed / 100, "correct": 100 - removed, "images": 100, "data": "fake"}

    monkeypatch.setattr(evaluate, "evaluate_setting", fake)
    space = tune.Space(ratios=(0.05, 0.1, 0.2, 0.4), placements=("all",), profiles=("constant",), methods=("mame",))
    pool, families, _ = tune.candidates(DIGITS, space)
    state = {"candidates": {k: tune.describe(DIGITS, c) for k, c in pool.items()}}

    class Net:
        def cpu(self):
            return self

    scored = tune._score(state, families, Net(), None, "cpu", tune.Budget(max_drop=1.0), 16, lambda: None,
                         lambda *a: None)
    removed = sorted(r["removed"] for r in scored)
    assert removed == [0, 3, 6]  # 6 tokens lose 6 > 1 + 2 points: 13 and 26 are never scored
    assert len(scored) == len(pool) - 2


def test_scores_from_another_search_are_reused(searched, monkeypatch):
    """The same search on another runtime and batch scores nothing again."""
    import mame_deploy.evaluate as evaluate

    folder, _, state, _ = searched
    monkeypatch.setattr(evaluate, "evaluate_setting", lambda *a, **k: pytest.fail("scored again"))
    setup = tune.Setup(**{**state["setup"], "runtime": "torch", "batch": 2, "iters": 1, "warmup": 0})
    space = tune.Space(ratios=(0.1,), placements=("spread1", "spread2"), profiles=("constant",), methods=("mame",))
    again = tune.search(setup, space, tune.Budget(latency_ms=1e-9), confirm=0, scores_from=folder / "t.json")
    assert {k: r["correct"] for k, r in again["candidates"].items()} == \
           {k: r["correct"] for k, r in state["candidates"].items()}
    other = tune.Setup(**{**setup.as_dict(), "calib_images": 40})
    with pytest.raises(UserError, match="scored with another calib_images"):
        tune.search(other, space, tune.Budget(max_drop=1), scores_from=folder / "t.json")
