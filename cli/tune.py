"""``mame-deploy tune``: thin over mame_deploy.tune (the search, its state file and plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mame_deploy.cli.common import key_values
from mame_deploy.errors import UserError

console = Console()


def _ratios(text: str) -> tuple:
    from mame_deploy.evaluate import parse_ratios

    ratios = tuple(r for r in parse_ratios(text) if r > 0)
    if not ratios:
        raise UserError(f"--ratios {text!r} has no ratio above 0; the unmerged model is always a candidate")
    return ratios


def tune_cmd(
    model: str = typer.Argument(..., help="Model name (see `mame-deploy models`)."),
    max_drop: Optional[float] = typer.Option(None, help="Top-1 points the calibration split may lose vs unmerged."),
    latency_ms: Optional[float] = typer.Option(None, help="Measured p50 limit in ms at --batch (then: most accurate)."),
    min_speedup: Optional[float] = typer.Option(None, help="Measured speed-up over the unmerged model, at least X."),
    runtime: str = typer.Option("onnxruntime", help="Where latency is measured: onnxruntime, torch, torch-graph "
                                                    "(CUDA graph) or tensorrt."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda for torch-graph and tensorrt)."),
    batch: int = typer.Option(1, help="Batch size the latency is measured (and the winner deployed) at."),
    threads: Optional[int] = typer.Option(None, help="CPU threads for onnxruntime and PyTorch."),
    precision: Optional[str] = typer.Option(None, help="With --runtime tensorrt: fp32, fp16 or bf16."),
    ratios: str = typer.Option(",".join(f"{r:g}" for r in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)),
                               help="Total ratios of patch tokens removed to try."),
    placements: str = typer.Option("all,every2,every3,early,late,spread2,spread3",
                                   help="Where merges go: all (every block but the last), everyK, early, late, "
                                        "spreadK (K blocks spread evenly)."),
    profiles: str = typer.Option("constant,front",
                                 help="Per-layer counts: constant (fraction) and/or front (-loaded)."),
    methods: str = typer.Option("mame,prune", help="Merge methods to try (the first gives the uniform comparison)."),
    option: list[str] = typer.Option([], "--option", help="Merge option KEY=VALUE for mame (repeatable)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Weights to load (default: bundled, else random)."),
    seed: int = typer.Option(0, help="Seed of the random weights, the calibration subset and the timing inputs."),
    override: list[str] = typer.Option([], "--override", help="Change a model config field, KEY=VALUE (repeatable)."),
    data: Optional[Path] = typer.Option(None, help="Calibration ImageFolder (default: the model's bundled val split)."),
    subset: Optional[str] = typer.Option(None, help="Calibration split of the bundled data (default val; never test)."),
    calib_images: Optional[int] = typer.Option(None, help="Use a random subset of this many calibration images."),
    batch_size: int = typer.Option(128, help="Images per forward pass when scoring accuracy."),
    warmup: int = typer.Option(3, help="Untimed calls before each timing."),
    iters: int = typer.Option(20, help="Timed calls per timing."),
    max_measure: int = typer.Option(30, help="At most this many candidates timed."),
    confirm: int = typer.Option(2, help="Extra timings of the winner and its close rivals."),
    margin: float = typer.Option(0.10, help="Relative error allowed to the cost model before it prunes."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="State file: written after every candidate, "
                                                                  "resumed from when it exists."),
    plot: Optional[Path] = typer.Option(None, help="Write calibration top-1 vs latency here (PNG)."),
    scores_from: Optional[Path] = typer.Option(None, help="Reuse the calibration accuracies of another --json "
                                                          "(same model and data; other runtime or batch)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --plot; replace a --json that holds another search."),
):
    """Search merge schedules for the fastest one within an accuracy budget (or the most accurate
    within a latency budget), timing each on the target runtime."""
    from mame_deploy import artifacts, tune
    from mame_deploy.evaluate import parse_methods
    from mame_deploy.manifest import Source
    from mame_deploy.models import model_config
    from mame_deploy.source import resolve_checkpoint

    budget = tune.Budget(max_drop, latency_ms, min_speedup)
    device = device or ("cuda" if runtime in tune.GPU_RUNTIMES else "cpu")
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise UserError(f"--plot {plot} must end in .png")
        artifacts.check_writable([plot], force)
    if data is not None and subset is not None:
        raise UserError("--subset picks a split of the bundled data; it does not apply with --data")
    overrides = key_values(override, "--override")
    depth = model_config(model, **overrides).depth  # bad overrides: one line, before any work
    space = tune.Space(_ratios(ratios), tune.parse_placements(placements, depth), tune.parse_profiles(profiles),
                       tuple(parse_methods(methods)), key_values(option, "--option"))
    source = resolve_checkpoint(Source(model=model, checkpoint=str(checkpoint) if checkpoint else None))
    setup = tune.Setup(
        model=model, runtime=runtime, device=device, batch=batch, checkpoint=source.checkpoint,
        checkpoint_sha256=source.checkpoint_sha256, seed=seed, overrides=overrides, threads=threads,
        warmup=warmup, iters=iters, precision=precision, data=str(data) if data else None,
        subset=None if data else (subset or "val"), calib_images=calib_images, machine=_machine(device, threads),
    )
    tune.check_setup(setup)

    with _bars() as bars:
        try:
            state = tune.search(setup, space, budget, json_path, restart=force, max_measure=max_measure,
                                confirm=confirm, margin=margin, batch_size=batch_size, progress=bars,
                                scores_from=scores_from)
        except KeyboardInterrupt:
            bars.stop()
            where = f"; rerun the same command to resume from {escape(str(json_path))}" if json_path else ""
            console.print(f"interrupted: what was measured is kept{where}", soft_wrap=True)
            raise typer.Exit(130)

    console.print(front_table(state))
    _print_outcome(state, model, json_path)
    if json_path is not None:
        console.print(f"wrote {escape(str(json_path))}")
    if plot is not None:
        tune.plot_front(state, plot, title=f"{model}: {budget.text()}, {runtime} batch {batch}")
        console.print(f"wrote {escape(str(plot))}")
    if state["best"] is None:
        closest = tune.choose([r for r in state["candidates"].values() if r.get("latency_runs")],
                              state["candidates"][tune.UNMERGED], tune.Budget(max_drop=100.0))
        hint = f" (fastest measured: {closest['key']}, {closest['latency_ms']:.3g} ms)" if closest else ""
        raise UserError(f"no measured schedule meets {budget.text()}{hint}; loosen the budget or widen the "
                        "search (--ratios, --placements, --max-measure)")


def _machine(device: str, threads: Optional[int]) -> str:
    from mame_deploy.bench import environment

    env = environment(device, threads)
    return (env.get("gpu") or env["processor"]) if device == "cuda" else env["processor"]


class _bars:
    """One rich progress bar per stage, fed by the search's (stage, done, total, what) calls."""

    def __init__(self):
        from mame_deploy.cli.common import progress_bar

        self.progress = progress_bar(console)
        self.tasks = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def stop(self):
        self.progress.stop()

    def __call__(self, stage: str, done: int, total: Optional[int], what: str):
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        label = {"accuracy": "calibration accuracy", "latency": "latency (measured)"}.get(stage, stage)
        self.progress.update(self.tasks[stage], completed=done, total=total, description=escape(f"{label}: {what}"))


_PROFILE_SHORT = {"constant": "const", "front": "front"}


def front_table(state: dict) -> Table:
    from mame_deploy import tune

    setup, records = state["setup"], state["candidates"]
    best = (state.get("best") or {}).get("key")
    uniform = (state.get("best_uniform") or {}).get("key")
    cal = state.get("calibration", {})
    from rich import box

    table = Table(title=f"Pareto front: {setup['model']}, {setup['runtime']} on {escape(setup['machine'])}, "
                        f"batch {setup['batch']} ({state['measured']} timed of {len(records)} candidates; "
                        f"accuracy on {escape(str(cal.get('data')))})", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("schedule", overflow="fold", min_width=12)
    for col in ("method, placement", "GFLOPs", "top-1 %", "drop", "p50 ms", "speed-up"):
        table.add_column(col, justify="left" if col.startswith("method") else "right", no_wrap=True)
    for key in state["front"]:
        r = records[key]
        mark = "".join(m for m, on in ((" *", key == best), (" u", key == uniform)) if on)
        merged = key != tune.UNMERGED
        how = f"{r['method']} {r['placement']}/{_PROFILE_SHORT.get(r['profile'], r['profile'])}" if merged else "-"
        table.add_row(escape((r["schedule"] or "(unmerged)") + mark), how,
                      f"{r['relative_gflops']:.3f}", f"{100 * r['accuracy']:.2f}", f"{r['drop_points']:.2f}",
                      f"{r['latency_ms']:.3f}", f"{r['speedup']:.2f}x")
    table.caption = ("* chosen, u best uniform --ratio; GFLOPs relative to unmerged; drop: calibration top-1 "
                     "points lost; p50 measured")
    return table


def _print_outcome(state: dict, model: str, json_path: Optional[Path]) -> None:
    from mame_deploy.bench import load_warning, usable_cpus

    best, uniform = state.get("best"), state.get("best_uniform")
    setup = state["setup"]
    if setup["device"] == "cpu":
        cpus = usable_cpus()
        warning = load_warning(setup["threads"] or cpus, state.get("max_load_1min"), cpus)
        if warning:
            console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if state.get("max_measure_reached"):
        console.print("stopped at --max-measure: candidates that might still win were not timed", soft_wrap=True)
    if best is None:
        return
    lat = best["latency"]
    what = (f"--schedule {best['schedule']} --method {best['method']} ({best['placement']}/{best['profile']})"
            if best["merged"] else "no merging (the unmerged model meets the budget best)")
    console.print(f"chosen: [bold]{escape(what)}[/]: calibration drop "
                  f"{best['calibration']['drop_points']:.2f} pts, p50 {lat['p50_ms']:.3f} ms, {lat['speedup']:.2f}x "
                  f"vs unmerged", highlight=False, soft_wrap=True)
    if uniform is None:
        console.print("no uniform --ratio schedule meets the budget", soft_wrap=True)
    elif uniform["key"] != best["key"]:
        gain = uniform["latency"]["p50_ms"] / lat["p50_ms"]
        console.print(f"best uniform: --ratio {uniform['family_ratio']:g}: drop "
                      f"{uniform['calibration']['drop_points']:.2f} "
                      f"pts, p50 {uniform['latency']['p50_ms']:.3f} ms; the chosen one runs {gain:.2f}x as fast",
                      highlight=False, soft_wrap=True)
    if best["merged"] and json_path is not None:
        batch = f" --batch {lat['batch']}" if lat["batch"] != 1 else ""
        console.print(escape(f"deploy it: mame-deploy export {model} --tuned {json_path}{batch}"), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_cmd)
