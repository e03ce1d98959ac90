"""``mame-deploy tune``: the fastest merge schedule within an accuracy budget (or the most
accurate one within a latency budget), with latency MEASURED on the runtime it will be deployed on.

Why measure: what a merge costs depends on the runtime. On the GPU a merge step costs about as
much as two blocks at batch 1, so every-block merging was slower than no merging there while
it saved 27% of the FLOPs; a fused merge operator changes those costs again. FLOPs only rank the
candidates here; the answer comes from timings.

The search, in three stages:

1. **Space.** Total ratio x placement (which blocks merge) x per-layer profile (how the total is
   split over them) x method. Each distinct (method, schedule) is one candidate; the unmerged
   model is always one. The uniform ``--ratio`` schedules (every block but the last, a constant
   fraction per layer, the first method) are always in the space: they are the comparison.
2. **Accuracy** of every candidate on a calibration split (never the test split). Accuracy falls
   as the ratio grows, so under ``max_drop`` a family (method, placement, profile) stops at the
   first ratio that loses more than ``max_drop + STOP_SLACK_POINTS``.
3. **Latency** by real measurement, first of the unmerged model (twice: the spread of repeated
   timings is the machine's noise), then of the uniform schedules, then of the rest in the order
   a cost model fitted to the timings so far predicts (latency linear in the token-blocks
   processed and the number of merge steps). A candidate is measured only while it could still
   beat the best measured one by the model's prediction, allowed an error of ``margin``, of the
   fit's worst residual or of the timing noise, whichever is largest; the winner and its close
   rivals are re-measured ``confirm`` times and judged on the median (and when the repeats show
   more noise, the pursuit goes on with the wider margin). Only measured candidates can win or
   sit on the front.

The state (every accuracy and every timing) is written to ``state_path`` atomically after each
candidate, so an interrupted search resumes from it and re-measures nothing. Records are keyed by
candidate, and the resume key (``Setup``) holds only what the numbers depend on: a search with a
new budget or a wider space reuses what was measured.
"""

from __future__ import annotations

import io
import json
import math
import re
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from mame_deploy import artifacts
from mame_deploy.errors import UserError
from mame_deploy.flops import relative_gflops
from mame_deploy.manifest import Source
from mame_deploy.schedule import (
    check_schedule, mergeable_layers, schedule_from_ratio, schedule_text, tokens_per_layer,
)

FORMAT = "mame-deploy tune 1"
RUNTIMES = ("onnxruntime", "torch", "torch-graph", "tensorrt")
GPU_RUNTIMES = ("torch-graph", "tensorrt")
PROFILES = ("constant", "front")
DEFAULT_RATIOS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)
DEFAULT_PLACEMENTS = ("all", "every2", "every3", "early", "late", "spread2", "spread3")
DEFAULT_METHODS = ("mame", "prune")
UNIFORM = ("all", "constant")      # what --ratio does: every block but the last, constant fraction
UNMERGED = "unmerged"
STOP_SLACK_POINTS = 2.0            # a family stops once it loses max_drop + this many points
DEFAULT_MARGIN = 0.10              # smallest relative error allowed to the cost model's predictions
DEFAULT_MAX_MEASURE = 30
DEFAULT_CONFIRM = 2
MAX_CONTENDERS = 6
MAX_MARGIN = 0.9                   # however noisy the timings, a prediction 10x too high still prunes

_PLACEMENT = re.compile(r"^(all|early|late|every(\d+)|spread(\d+))$")

Progress = Callable[[str, int, Optional[int], str], None]  # (stage, done, total, what)


# ---------------------------------------------------------------------------------------------
# What is searched, for what, and where


@dataclass(frozen=True)
class Budget:
    """``max_drop``: top-1 points the calibration split may lose against the unmerged model;
    ``latency_ms`` / ``min_speedup``: the measured p50 limit. With a latency limit the most
    accurate schedule under it wins; with ``max_drop`` alone the fastest one within it."""

    max_drop: Optional[float] = None
    latency_ms: Optional[float] = None
    min_speedup: Optional[float] = None

    def __post_init__(self):
        if self.max_drop is None and self.latency_ms is None and self.min_speedup is None:
            raise UserError("tune needs a budget: `max_drop` POINTS and/or `latency_ms` MS / `min_speedup` X")
        for flag, value in (("`max_drop`", self.max_drop), ("`latency_ms`", self.latency_ms),
                            ("`min_speedup`", self.min_speedup)):
            if value is not None and (not math.isfinite(value) or value < 0 or (value == 0 and flag != "`max_drop`")):
                raise UserError(f"{flag} must be a positive number, got {value}")

    @property
    def objective(self) -> str:
        return "accuracy" if self.latency_ms is not None or self.min_speedup is not None else "latency"

    def latency_limit(self, baseline_ms: float) -> Optional[float]:
        limits = [v for v in (self.latency_ms, baseline_ms / self.min_speedup if self.min_speedup else None)
                  if v is not None]
        return min(limits) if limits else None

    def text(self) -> str:
        parts = [f"--max-drop {self.max_drop:g}" if self.max_drop is not None else "",
                 f"--latency-ms {self.latency_ms:g}" if self.latency_ms is not None else "",
                 f"--min-speedup {self.min_speedup:g}" if self.min_speedup is not None else ""]
        return " ".join(p for p in parts if p)


@dataclass(frozen=True)
class Space:
    ratios: tuple = DEFAULT_RATIOS
    placements: tuple = DEFAULT_PLACEMENTS
    profiles: tuple = PROFILES
    methods: tuple = DEFAULT_METHODS
    options: dict = field(default_factory=dict)   # mame's switches (the baselines keep their own)


@dataclass(frozen=True)
class Setup:
    """Everything the recorded numbers depend on: the resume key of a state file."""

    model: str
    runtime: str = "onnxruntime"
    device: str = "cpu"
    batch: int = 1
    checkpoint: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    seed: int = 0
    overrides: dict = field(default_factory=dict)
    threads: Optional[int] = None
    warmup: int = 3
    iters: int = 20
    precision: Optional[str] = None         # tensorrt only
    data: Optional[str] = None              # an ImageFolder root, else the model's bundled data
    subset: Optional[str] = "val"
    calib_images: Optional[int] = None      # a seeded random subset of the calibration split
    machine: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def check_setup(setup: Setup) -> None:
    """Fail before any work on what cannot run here."""
    if setup.runtime not in RUNTIMES:
        raise UserError(f"unknown `runtime` {setup.runtime!r}; use one of {', '.join(RUNTIMES)}")
    if setup.device not in ("cpu", "cuda"):
        raise UserError(f"`device` must be cpu or cuda, got {setup.device!r}")
    if setup.runtime in GPU_RUNTIMES and setup.device != "cuda":
        raise UserError(f"`runtime` {setup.runtime} runs on the GPU; pass `device` cuda")
    if setup.batch < 1:
        raise UserError(f"`batch` must be at least 1, got {setup.batch}")
    from mame_deploy.runners import check_threads

    check_threads(setup.threads)
    if setup.warmup < 0 or setup.iters < 1:
        raise UserError(f"need `warmup` >= 0 and `iters` >= 1, got {setup.warmup} and {setup.iters}")
    if setup.data is None and setup.subset is None:
        raise UserError("name the calibration split of the bundled data: `subset` val")
    if setup.subset == "test":
        raise UserError("tune calibrates on a validation split, never the test split; use `subset` val "
                        "(then check the winner on test with `mame-deploy eval`)")
    if setup.calib_images is not None and setup.calib_images < 1:
        raise UserError(f"`calib_images` must be at least 1, got {setup.calib_images}")
    if setup.precision is not None and setup.runtime != "tensorrt":
        raise UserError("`precision` applies to `runtime` tensorrt only")
    if setup.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("PyTorch sees no CUDA device here; use `device` cpu `runtime` onnxruntime")
    if setup.runtime == "tensorrt":
        from mame_deploy.plugins.trt_aot import require_tensorrt

        require_tensorrt("`runtime` tensorrt")
    if setup.runtime == "onnxruntime" and setup.device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError("this onnxruntime has no CUDA execution provider; install onnxruntime-gpu, "
                            "or use `runtime` torch-graph for the GPU")


def parse_placements(text: str, depth: int) -> tuple:
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not names:
        raise UserError(f"empty `placements` {text!r}; name some of all, everyK, early, late, spreadK")
    for name in names:
        placement_layers(name, depth)
    return names


def placement_layers(name: str, depth: int) -> list[int]:
    """The blocks a placement merges after: ``all`` (every block but the last), ``everyK`` (blocks
    K-1, 2K-1, ...: every6 on 24 blocks is 5,11,17), ``early`` / ``late`` (first / second half),
    ``spreadK`` (K blocks spread evenly: spread3 on 24 blocks is 5,11,17, on 8 blocks 1,3,5)."""
    match = _PLACEMENT.match(name)
    allowed = list(mergeable_layers(depth))
    if match is None:
        raise UserError(f"unknown placement {name!r}; use all, everyK (e.g. every2), early, late or spreadK "
                        "(e.g. spread3)")
    half = (len(allowed) + 1) // 2
    if name == "all":
        layers = allowed
    elif name == "early":
        layers = allowed[:half]
    elif name == "late":
        layers = allowed[len(allowed) // 2:]
    elif match[2]:
        k = int(match[2])
        layers = [i for i in allowed if k and (i + 1) % k == 0]
    else:
        k = int(match[3])
        layers = sorted({round((j + 1) * depth / (k + 1)) - 1 for j in range(k)} & set(allowed))
    if not layers or (match[3] and len(layers) != int(match[3])):
        raise UserError(f"placement {name} does not fit a model of {depth} blocks (merges may follow blocks "
                        f"0..{depth - 2}); choose a smaller K")
    return layers


def parse_profiles(text: str) -> tuple:
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [p for p in names if p not in PROFILES]
    if not names or bad:
        raise UserError(f"unknown profile(s) {', '.join(bad) or repr(text)} in `profiles`; use {', '.join(PROFILES)}")
    return names


def front_loaded(config, ratio: float, layers: Sequence[int]) -> list[int]:
    """Remove round(ratio x patches) tokens with shares falling linearly over ``layers`` (the first
    m times the last's): an early removal saves work in every later block. Integer counts by
    largest remainder, non-increasing, adding up exactly; a step that would remove more than half
    of what is left passes the excess on to the next."""
    n, total, m = config.num_patches, round(ratio * config.num_patches), len(layers)
    ideal = [total * (m - j) / (m * (m + 1) / 2) for j in range(m)]
    counts = [math.floor(x) for x in ideal]
    by_remainder = sorted(range(m), key=lambda j: (-(ideal[j] - counts[j]), j))
    for j in by_remainder[: total - sum(counts)]:
        counts[j] += 1
    counts.sort(reverse=True)
    schedule, current, carry = [0] * config.depth, n, 0
    for layer, count in zip(layers, counts):
        schedule[layer] = min(count + carry, current // 2)
        carry = count + carry - schedule[layer]
        current -= schedule[layer]
    if carry:
        raise UserError(f"ratio {ratio} cannot be front-loaded over layers {list(layers)}")
    return check_schedule(config, schedule)


# ---------------------------------------------------------------------------------------------
# Candidates


@dataclass(frozen=True)
class Candidate:
    method: str
    counts: tuple
    placement: str
    profile: str
    ratio: float        # the family's requested ratio (the --ratio that gives a uniform one)
    options: tuple = ()  # sorted (key, value) pairs of merge switches

    @property
    def schedule(self) -> str:
        return schedule_text(self.counts)

    @property
    def key(self) -> str:
        if not any(self.counts):
            return UNMERGED
        opts = "".join(f" {k}={v}" for k, v in self.options)
        return f"{self.method} {self.schedule}{opts}"


def unmerged_candidate(config) -> Candidate:
    return Candidate("mame", (0,) * config.depth, "-", "-", 0.0)


def candidates(config, space: Space) -> tuple[dict[str, Candidate], list[list[str]], set[str]]:
    """All distinct candidates (by key, in generation order, the unmerged model first), the
    families (keys by ascending ratio; a family is one method x placement x profile) and the keys
    of the uniform --ratio schedules (the first method's; added to the space if it lacks them)."""
    base = unmerged_candidate(config)
    pool: dict[str, Candidate] = {base.key: base}
    ratios = sorted({float(r) for r in space.ratios if r > 0})
    families_wanted = [(m, p, q) for m in space.methods for p in space.placements for q in space.profiles]
    uniform_family = (space.methods[0], *UNIFORM)
    if uniform_family not in families_wanted:
        families_wanted.insert(0, uniform_family)
    families, uniform = [], set()
    for method, placement, profile in families_wanted:
        layers = placement_layers(placement, config.depth)
        options = tuple(sorted(space.options.items())) if method == "mame" else ()
        family = []
        for ratio in ratios:
            try:
                counts = (schedule_from_ratio(config, ratio, layers) if profile == "constant"
                          else front_loaded(config, ratio, layers))
            except UserError:
                continue  # this placement cannot remove that many tokens
            cand = Candidate(method, tuple(counts), placement, profile, ratio, options)
            if not any(counts) or cand.key in family:
                continue  # ratios that round to the same counts
            pool.setdefault(cand.key, cand)
            family.append(cand.key)
            if (method, placement, profile) == uniform_family:
                uniform.add(cand.key)
        if family:
            families.append(family)
    return pool, families, uniform


def describe(config, cand: Candidate) -> dict:
    """The static part of a candidate's record."""
    tokens = tokens_per_layer(config, cand.counts)
    return {
        "key": cand.key, "method": cand.method, "schedule": cand.schedule, "counts": list(cand.counts),
        "options": dict(cand.options), "placement": cand.placement, "profile": cand.profile,
        "family_ratio": cand.ratio, "removed": sum(cand.counts),
        "ratio": round(sum(cand.counts) / config.num_patches, 6),
        "merge_steps": sum(1 for c in cand.counts if c), "tokens_per_layer": tokens,
        "token_blocks": sum(tokens), "relative_gflops": round(relative_gflops(config, tokens), 6),
    }


# ---------------------------------------------------------------------------------------------
# The Pareto front and the budget (pure functions of records)


def latency(record: dict) -> Optional[float]:
    """The candidate's latency: the median p50 of its measurements (None if never measured)."""
    runs = record.get("latency_runs") or []
    return float(np.median([r["p50_ms"] for r in runs])) if runs else None


def pareto_front(records: Sequence[dict]) -> list[dict]:
    """The measured records no other measured record beats on both accuracy and latency
    (ties on both: the first kept), fastest first."""
    measured = sorted((r for r in records if latency(r) is not None and r.get("accuracy") is not None),
                      key=lambda r: (latency(r), -r["accuracy"]))
    front, best_acc = [], -1.0
    for record in measured:
        if record["accuracy"] > best_acc:
            front.append(record)
            best_acc = record["accuracy"]
    return front


def drop_points(record: dict, baseline: dict) -> float:
    return 100.0 * (baseline["accuracy"] - record["accuracy"])


def accuracy_ok(record: dict, baseline: dict, budget: Budget) -> bool:
    return budget.max_drop is None or drop_points(record, baseline) <= budget.max_drop + 1e-9


def meets(record: dict, baseline: dict, budget: Budget) -> bool:
    """Measured, within the accuracy budget and under the latency limit."""
    lat, base_lat = latency(record), latency(baseline)
    if lat is None or base_lat is None or record.get("accuracy") is None:
        return False
    limit = budget.latency_limit(base_lat)
    return accuracy_ok(record, baseline, budget) and (limit is None or lat <= limit + 1e-12)


def _rank(record: dict, objective: str) -> tuple:
    """Smaller is better: the fastest (then most accurate), or the most accurate (then fastest)."""
    lat = latency(record)
    return (lat, -record["accuracy"]) if objective == "latency" else (-record["accuracy"], lat)


def choose(records: Sequence[dict], baseline: dict, budget: Budget) -> Optional[dict]:
    """The winner among measured ``records`` under ``budget``; None when none meets it."""
    ok = [r for r in records if meets(r, baseline, budget)]
    return min(ok, key=lambda r: _rank(r, budget.objective)) if ok else None


# ---------------------------------------------------------------------------------------------
# The cost model that orders (and prunes) the measurements


def features(record: dict) -> list[float]:
    steps = record["merge_steps"]
    prune = record["method"] == "prune"
    return [1.0, float(record["token_blocks"]), 0.0 if prune else float(steps), float(steps) if prune else 0.0]


def timing_noise(records: Sequence[dict]) -> float:
    """The widest relative spread, (max - min) / median of the p50s, of a record timed more than once."""
    spreads = [(max(p) - min(p)) / float(np.median(p))
               for p in ([run["p50_ms"] for run in r.get("latency_runs") or []] for r in records) if len(p) > 1]
    return max(spreads, default=0.0)


class CostModel:
    """latency ~ a + b x token-blocks + c x merge steps + d x prune steps, least squares over the
    measurements so far; until they outnumber its free parameters, the unmerged latency scaled
    by relative GFLOPs (optimistic where merge steps cost time: it measures more, never less)."""

    def __init__(self, measured: Sequence[dict], baseline: dict, min_margin: float):
        self.base = latency(baseline)
        self.coef = None
        # A prediction can be no better than the timings: on a busy machine repeats spread widely.
        self.margin = max(min_margin, timing_noise(measured))
        x = np.array([features(r) for r in measured])
        # One measurement more than the fit has free parameters, so its residuals say how far off it is.
        if len(measured) and len(measured) > np.linalg.matrix_rank(x):
            y = np.array([latency(r) for r in measured])
            self.coef = np.linalg.lstsq(x, y, rcond=None)[0]
            self.margin = max(self.margin, float(np.max(np.abs(x @ self.coef - y) / y)))
        self.margin = min(self.margin, MAX_MARGIN)

    def predict(self, record: dict) -> float:
        if self.coef is None:
            return self.base * record["relative_gflops"]
        return max(float(np.dot(features(record), self.coef)), 1e-9)


def could_win(record: dict, best: Optional[dict], baseline: dict, budget: Budget, model: CostModel) -> bool:
    """Whether an unmeasured candidate could beat ``best`` if the prediction were ``margin`` off."""
    if not accuracy_ok(record, baseline, budget):
        return False
    optimistic = model.predict(record) * (1 - model.margin)
    limit = budget.latency_limit(latency(baseline))
    if limit is not None and optimistic > limit:
        return False
    if best is None:
        return True
    if budget.objective == "latency":
        return optimistic < latency(best)
    return record["accuracy"] > best["accuracy"] or (record["accuracy"] == best["accuracy"]
                                                     and optimistic < latency(best))


# ---------------------------------------------------------------------------------------------
# Measuring one candidate


def candidate_source(setup: Setup, record: dict) -> Source:
    merged = record["key"] != UNMERGED
    return Source(model=setup.model, checkpoint=setup.checkpoint, checkpoint_sha256=setup.checkpoint_sha256,
                  seed=setup.seed, overrides=dict(setup.overrides), method=record["method"] if merged else "mame",
                  ratio=0.0, schedule_spec=record["schedule"] if merged else None,
                  options=dict(record["options"]) if merged else {})


def measure_latency(setup: Setup, record: dict, scratch: Path, cache: dict) -> dict:
    """One timing of ``record`` on the setup's runtime (``cache``: exported files by key, so a
    re-measurement does not export again)."""
    from mame_deploy import bench

    source = candidate_source(setup, record)
    if setup.runtime in ("torch", "torch-graph"):
        target = bench.torch_target(source, setup.device, setup.threads, expected_schedule=record["counts"],
                                    cuda_graph=setup.runtime == "torch-graph")
    else:
        path = cache.get(record["key"])
        if path is None:
            path = _export(setup, source, scratch / f"c{len(cache)}.onnx")
            cache[record["key"]] = path
        target = bench.artifact_target(path, setup.device, setup.threads)
    load = bench.load_average()  # other work on the cores inflates CPU timings: keep the evidence
    row = bench.bench([target], [setup.batch], setup.warmup, setup.iters, seed=setup.seed)[0]
    return {**{k: row[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "iters")}, "load_1min": load}


def _export(setup: Setup, source: Source, path: Path) -> Path:
    from mame_deploy.onnx_export import export

    onnx_path = export(source, path, batch=setup.batch, force=True).onnx_path
    if setup.runtime != "tensorrt":
        return onnx_path
    from mame_deploy.engine import build_engine

    return build_engine(onnx_path, precision=setup.precision, force=True)


# ---------------------------------------------------------------------------------------------
# Calibration data and accuracy


def calibration_data(setup: Setup, config):
    """The calibration images: ``setup.data`` (an ImageFolder) or the model's bundled split
    ``setup.subset``; with ``calib_images`` a random subset of that size drawn from ``seed``."""
    from mame_deploy.data import dataset_for

    dataset = dataset_for(setup.model, config, setup.data, setup.subset)
    n = setup.calib_images
    if n is None or n >= len(dataset):
        return dataset
    pick = np.sort(np.random.default_rng(setup.seed).choice(len(dataset), n, replace=False))
    name = f"{dataset.name} ({n} of {len(dataset)}, seed {setup.seed})"
    if hasattr(dataset, "images"):
        import torch

        index = torch.from_numpy(pick)
        return replace(dataset, images=dataset.images[index], labels=dataset.labels[index], name=name)
    if hasattr(dataset, "samples"):
        return replace(dataset, samples=[dataset.samples[i] for i in pick], name=name)
    raise UserError(f"`calib_images` cannot subsample {dataset.name}; leave it out to use all of it")


@dataclass
class _OnDevice:
    """A dataset whose batches are moved to ``device`` (evaluate() runs where the model is)."""

    dataset: object
    device: str

    @property
    def name(self):
        return self.dataset.name

    def __len__(self):
        return len(self.dataset)

    def batches(self, batch_size):
        for images, labels in self.dataset.batches(batch_size):
            yield images.to(self.device), labels.to(self.device)


# ---------------------------------------------------------------------------------------------
# State file


def new_state(setup: Setup) -> dict:
    return {"format": FORMAT, "setup": setup.as_dict(), "candidates": {}}


def load_state(path: Optional[Union[str, Path]], setup: Setup, restart: bool = False) -> tuple[dict, bool]:
    """(state, resumed): the search recorded in ``path`` when it was run with this ``setup``.
    ``restart`` replaces a file that is not that (another setup, not a tune result, unreadable);
    what was measured for this very setup is always resumed, never thrown away."""
    if path is not None and Path(path).is_dir():
        raise UserError(f"`json` {path} is a directory; pass a file name")
    if path is None or not Path(path).exists():
        return new_state(setup), False
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        if restart:
            return new_state(setup), False
        raise UserError(f"`json` {path} is not readable JSON ({exc}); pass `force` to start a new search "
                        "there") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        if restart:
            return new_state(setup), False
        raise UserError(f"`json` {path} is not a tune result; pass another file or `force` to replace it")
    recorded = state.get("setup", {})
    diff = [k for k, v in setup.as_dict().items() if recorded.get(k) != v]
    if diff and restart:
        return new_state(setup), False
    if diff:
        what = ", ".join(f"{k} {recorded.get(k)!r} -> {getattr(setup, k)!r}" for k in diff)
        raise UserError(f"`json` {path} holds a search with other settings ({what}); its numbers do not apply: "
                        "pass another `json`, or `force` to start over")
    state.setdefault("candidates", {})
    return state, True


SCORE_KEYS = ("model", "checkpoint_sha256", "seed", "overrides", "data", "subset", "calib_images")


def read_scores(path: Union[str, Path], setup: Setup) -> dict:
    """The state file ``path``, checked to hold accuracies scored as ``setup`` would score them."""
    try:
        other = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"`scores_from` {path} is not readable JSON ({exc}); pass a `json` of "
                        "`mame-deploy tune`") from None
    if not isinstance(other, dict) or other.get("format") != FORMAT:
        raise UserError(f"`scores_from` {path} is not a tune result; pass a `json` of `mame-deploy tune`")
    theirs, ours = other.get("setup", {}), setup.as_dict()
    diff = [k for k in SCORE_KEYS if theirs.get(k) != ours[k]]
    if diff:
        raise UserError(f"`scores_from` {path} was scored with another {', '.join(diff)}; its accuracies do not "
                        "apply to this search")
    return other


def import_scores(state: dict, other: dict) -> int:
    """Copy the calibration accuracies of ``other`` (from ``read_scores``) into ``state`` for the
    candidates that lack them; returns how many."""
    copied = 0
    for key, record in state["candidates"].items():
        source = other.get("candidates", {}).get(key, {})
        if record.get("accuracy") is None and source.get("accuracy") is not None:
            record.update({k: source[k] for k in ("accuracy", "correct", "images")})
            copied += 1
    if copied:
        state["calibration"] = other.get("calibration", {})
    return copied


def _save(path: Optional[Union[str, Path]], state: dict) -> None:
    if path is not None:
        artifacts.write_json(path, state)


# ---------------------------------------------------------------------------------------------
# The search


def search(
    setup: Setup,
    space: Space,
    budget: Budget,
    state_path: Optional[Union[str, Path]] = None,
    restart: bool = False,
    max_measure: int = DEFAULT_MAX_MEASURE,
    confirm: int = DEFAULT_CONFIRM,
    margin: float = DEFAULT_MARGIN,
    batch_size: int = 128,
    progress: Optional[Progress] = None,
    scores_from: Optional[Union[str, Path]] = None,
) -> dict:
    """Run (or resume) the search; returns the state with ``front``, ``best`` and ``best_uniform``.
    The state is saved to ``state_path`` after every candidate. ``scores_from``: another state
    file whose calibration accuracies to reuse (same model and calibration data; e.g. the same
    search at another batch size or on another runtime)."""
    import torch

    from mame_deploy.models import create_model

    check_setup(setup)
    if max_measure < 1 or confirm < 0 or not 0 <= margin < 1:
        raise UserError(f"need `max_measure` >= 1, `confirm` >= 0 and a margin in [0, 1), got {max_measure}, "
                        f"{confirm} and {margin}")
    if batch_size < 1:
        raise UserError(f"`batch_size` must be at least 1, got {batch_size}")
    scores = read_scores(scores_from, setup) if scores_from is not None else None
    progress = progress or (lambda stage, done, total, what: None)
    state, resumed = load_state(state_path, setup, restart)
    if setup.threads:
        torch.set_num_threads(setup.threads)
    net = create_model(setup.model, checkpoint=setup.checkpoint, seed=setup.seed, **setup.overrides)
    pool, families, uniform = candidates(net.config, space)
    records = state["candidates"]
    for key, cand in pool.items():
        records.setdefault(key, describe(net.config, cand))
        records[key]["uniform"] = key in uniform
    state.update(space=asdict(space), budget=asdict(budget), resumed=resumed)
    if scores is not None:
        import_scores(state, scores)
    save = lambda: _save(state_path, state)  # noqa: E731

    scored = _score(state, families, net, calibration_data(setup, net.config), setup.device, budget, batch_size,
                    save, progress)
    state["skipped"] = len(pool) - len(scored)
    baseline = records[UNMERGED]
    limit_hit = _time(setup, scored, baseline, budget, max_measure, confirm, margin, save, progress)

    for record in records.values():
        if record.get("latency_runs") and record.get("accuracy") is not None:
            record["latency_ms"] = latency(record)
            record["speedup"] = round(latency(baseline) / latency(record), 4)
            record["drop_points"] = round(drop_points(record, baseline), 4)
    measured = [r for r in scored if latency(r) is not None]
    best = choose(measured, baseline, budget)
    best_uniform = choose([r for r in measured if r["uniform"]], baseline, budget)
    loads = [run["load_1min"] for r in measured for run in r["latency_runs"] if run.get("load_1min") is not None]
    state.update(
        max_load_1min=max(loads) if loads else None, timing_noise=round(timing_noise(measured), 4),
        front=[r["key"] for r in pareto_front(measured)],
        best=_summary(best, baseline, budget, setup, state) if best else None,
        best_uniform=_summary(best_uniform, baseline, budget, setup, state) if best_uniform else None,
        measured=len(measured), max_measure_reached=limit_hit, margin=margin, confirm=confirm,
    )
    save()
    return state


def _score(state: dict, families: list, net, dataset, device: str, budget: Budget, batch_size: int,
           save: Callable[[], None], progress: Progress) -> list:
    """Stage 2: calibration accuracy of the unmerged model, then of each family by ascending
    ratio, a family stopping once it loses ``max_drop + STOP_SLACK_POINTS``; the scored records."""
    from mame_deploy.evaluate import Setting, evaluate_setting

    records = state["candidates"]
    if device == "cuda":
        net, dataset = net.to("cuda"), _OnDevice(dataset, "cuda")
    order = list(dict.fromkeys([UNMERGED] + [k for family in families for k in family]))
    visited: set = set()

    def evaluate(key):
        record = records[key]
        if record.get("accuracy") is None:
            setting = Setting(record["method"], 0.0, record["schedule"] or None, options=record["options"])
            result = evaluate_setting(net, dataset, setting, batch_size)
            record.update(accuracy=result["accuracy"], correct=result["correct"], images=result["images"])
            state["calibration"] = {"data": result["data"], "images": result["images"]}
            save()
        visited.add(key)
        progress("accuracy", len(visited), len(order), key)
        return record

    baseline = evaluate(UNMERGED)
    for family in families:
        for key in family:
            record = evaluate(key)
            lost = drop_points(record, baseline)
            if budget.max_drop is not None and lost > budget.max_drop + STOP_SLACK_POINTS + 1e-9:
                break  # the rest of this family merges more: it would lose more still
    progress("accuracy", len(order), len(order), "done")
    net.cpu()
    return [records[k] for k in order if records[k].get("accuracy") is not None]


def _time(setup: Setup, scored: list, baseline: dict, budget: Budget, max_measure: int, confirm: int, margin: float,
          save: Callable[[], None], progress: Progress) -> bool:
    """Stage 3: the unmerged model, then the uniform schedules, then the rest while one could win,
    then ``confirm`` more timings of the contenders; True when ``max_measure`` cut it short."""
    with tempfile.TemporaryDirectory(prefix="mame-deploy-tune-") as scratch:
        cache: dict = {}
        count = 0

        def measure(record):
            nonlocal count
            record.setdefault("latency_runs", []).append(measure_latency(setup, record, Path(scratch), cache))
            record["latency_ms"] = latency(record)
            save()
            count += 1
            progress("latency", count, None, record["key"])

        # Timed twice (when confirming at all) before anything else: the spread of the two says
        # how noisy this machine's timings are, and so how far a prediction may be trusted.
        while len(baseline.get("latency_runs") or []) < (2 if confirm else 1):
            measure(baseline)
        limit_hit, timed = False, -1
        # Repeats may show the timings noisier than thought, which widens the margin: pursue again
        # until a round times no new candidate.
        while timed != sum(1 for r in scored if latency(r) is not None):
            timed = sum(1 for r in scored if latency(r) is not None)
            for pool in ([r for r in scored if r["uniform"]], scored):
                limit_hit |= _pursue(pool, scored, baseline, budget, margin, max_measure, measure)
            measured = [r for r in scored if latency(r) is not None]
            contenders = _contenders(scored, baseline, budget, CostModel(measured, baseline, margin).margin)
            for round_ in range(confirm):
                for record in contenders:
                    if len(record["latency_runs"]) < 2 + round_:
                        measure(record)
    return limit_hit


def _pursue(pool: list, scored: list, baseline: dict, budget: Budget, margin: float, max_measure: int,
            measure: Callable[[dict], None]) -> bool:
    """Measure candidates of ``pool`` while one could still beat the best measured there, most
    promising first; True when ``max_measure`` stopped it."""
    while True:
        measured = [r for r in scored if latency(r) is not None]
        model = CostModel(measured, baseline, margin)
        best = choose([r for r in pool if latency(r) is not None], baseline, budget)
        open_ = [r for r in pool if latency(r) is None and could_win(r, best, baseline, budget, model)]
        if not open_:
            return False
        if len(measured) >= max_measure:
            return True
        if budget.objective == "latency":
            measure(min(open_, key=model.predict))
        else:
            measure(min(open_, key=lambda r: (-r["accuracy"], model.predict(r))))


def _contenders(scored: list, baseline: dict, budget: Budget, margin: float) -> list:
    """The records whose rank could change with another measurement: the best, those within
    ``margin`` of it, the best uniform one and the unmerged model."""
    measured = [r for r in scored if latency(r) is not None]
    best = choose(measured, baseline, budget)
    if best is None:
        return [baseline]
    limit = budget.latency_limit(latency(baseline))
    if budget.objective == "latency":
        close = [r for r in measured if accuracy_ok(r, baseline, budget) and latency(r) <= latency(best) * (1 + margin)]
    else:
        close = [r for r in measured if accuracy_ok(r, baseline, budget) and r["accuracy"] >= best["accuracy"]
                 and latency(r) <= limit * (1 + margin)]
    close = sorted(close, key=lambda r: _rank(r, budget.objective))[:MAX_CONTENDERS]
    uniform = choose([r for r in measured if r["uniform"]], baseline, budget)
    return list({r["key"]: r for r in [*close, *([uniform] if uniform else []), baseline]}.values())


def _summary(record: dict, baseline: dict, budget: Budget, setup: Setup, state: dict) -> dict:
    """The chosen record as the manifest keeps it: schedule, budget, calibration, latency."""
    return {
        "key": record["key"], "merged": record["key"] != UNMERGED, "schedule": record["schedule"],
        "method": record["method"], "options": record["options"], "ratio": record["ratio"],
        "family_ratio": record["family_ratio"], "placement": record["placement"], "profile": record["profile"],
        "uniform": record["uniform"], "counts": record["counts"], "relative_gflops": record["relative_gflops"],
        "budget": asdict(budget),
        "calibration": {**state.get("calibration", {}), "accuracy": record["accuracy"],
                        "baseline_accuracy": baseline["accuracy"],
                        "drop_points": round(drop_points(record, baseline), 4)},
        "latency": {"runtime": setup.runtime, "device": setup.device, "batch": setup.batch,
                    "machine": setup.machine, "p50_ms": latency(record), "baseline_p50_ms": latency(baseline),
                    "speedup": round(latency(baseline) / latency(record), 4), "runs": len(record["latency_runs"])},
    }


# ---------------------------------------------------------------------------------------------
# Plot


def plot_front(state: dict, path: Union[str, Path], title: str = "") -> Path:
    """Calibration top-1 vs measured latency: every measured candidate, the front, the uniform
    --ratio schedules, the unmerged model, the winner and the budget (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in state["candidates"].values() if r.get("latency_runs") and r.get("accuracy") is not None]
    front = [state["candidates"][k] for k in state["front"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    ax.scatter([latency(r) for r in records], [100 * r["accuracy"] for r in records], s=14, c="0.65",
               label="measured")
    uniform = sorted((r for r in records if r["uniform"]), key=latency)
    if uniform:
        ax.scatter([latency(r) for r in uniform], [100 * r["accuracy"] for r in uniform], s=28, marker="s",
                   facecolors="none", edgecolors="tab:blue", label="uniform --ratio")
    ax.plot([latency(r) for r in front], [100 * r["accuracy"] for r in front], "-o", c="tab:orange", ms=4,
            label="Pareto front")
    base = state["candidates"][UNMERGED]
    ax.scatter([latency(base)], [100 * base["accuracy"]], marker="D", c="k", s=30, label="unmerged", zorder=3)
    if state.get("best"):
        best = state["candidates"][state["best"]["key"]]
        ax.scatter([latency(best)], [100 * best["accuracy"]], marker="*", c="tab:red", s=160, label="chosen", zorder=4)
    budget = state["budget"]
    if budget.get("max_drop") is not None:
        ax.axhline(100 * base["accuracy"] - budget["max_drop"], ls="--", c="tab:red", lw=0.8)
    limit = Budget(**budget).latency_limit(latency(base))
    if limit is not None:
        ax.axvline(limit, ls="--", c="tab:red", lw=0.8)
    setup = state["setup"]
    ax.set_xlabel(f"p50 latency (ms), {setup['runtime']} on {setup['device']}, batch {setup['batch']}")
    ax.set_ylabel("calibration top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return artifacts.write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# The winner in an export


def apply_tuned(source: Source, path: Union[str, Path]) -> tuple[Source, dict]:
    """``source`` (the export's model, merging left at its defaults) merged as the tune result in
    ``path`` chose, and the record the manifest keeps under ``"tuned"``."""
    path = Path(path)
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"`tuned` {path} is not a readable tune result ({exc}); pass the `json` of "
                        "`mame-deploy tune`") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"`tuned` {path} is not a tune result; pass the `json` written by `mame-deploy tune`")
    best, setup = state.get("best"), state.get("setup", {})
    if not best:
        raise UserError(f"`tuned` {path} has no chosen schedule (the search did not finish or nothing met its "
                        "budget); rerun `mame-deploy tune` until it reports one")
    if source.ratio or source.schedule_spec or source.options or source.method != "mame":
        raise UserError("`tuned` fixes the schedule, method and options; drop `ratio`, `schedule`, `method` "
                        "and `option`")
    if source.model != setup.get("model"):
        raise UserError(f"`tuned` {path} was tuned for {setup.get('model')}, not {source.model}; export that model")
    mismatch = [what for what, ours, theirs in (
        ("`override`", source.overrides, setup.get("overrides") or {}),
        ("checkpoint", source.checkpoint_sha256, setup.get("checkpoint_sha256")),
        ("`seed`", source.seed if source.checkpoint is None else None,
         setup.get("seed") if setup.get("checkpoint") is None else None),
    ) if ours != theirs]
    if mismatch:
        raise UserError(f"`tuned` {path} was tuned for {source.model} with another {', '.join(mismatch)}; "
                        "export the model it was tuned for (same checkpoint, overrides and seed)")
    merged = replace(source, method=best["method"], schedule_spec=best["schedule"] or None,
                     options=dict(best["options"]) if best["merged"] else {})
    record = {"file": path.name, "sha256": artifacts.file_sha256(path),
              **{k: best[k] for k in ("schedule", "method", "options", "budget", "calibration", "latency")}}
    return merged, record
