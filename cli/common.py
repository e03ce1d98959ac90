"""Parsing, help texts and progress output shared by the CLI's command modules."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Callable, Iterator, Optional, Union

from mame_deploy.errors import UserError
from mame_deploy.finetuned import with_checkpoint_merge
from mame_deploy.manifest import Source
from mame_deploy.schedule import MAX_RATIO, check_ratio, resolve_schedule
from mame_deploy.source import model_config, resolve_checkpoint

# One wording, and the one bound (schedule.MAX_RATIO), for every command that merges.
RATIO_HELP = f"Fraction of patch tokens removed by merging, in [0, {MAX_RATIO}]."
SCHEDULE_HELP = "Explicit merges LAYER:COUNT,... instead of --ratio (the two exclude each other)."
LAYERS_HELP = "Blocks after which --ratio merges, e.g. 2,5,8 (default: every block but the last)."
MERGE_HELP = "Merge method: mame (default), tome or prune."
OPTION_HELP = "Merge option KEY=VALUE passed to mame_deploy.patch (repeatable)."
OVERRIDE_HELP = "Change a model config field, KEY=VALUE (repeatable; e.g. depth=2 for a quick check)."


_PARAMETER = re.compile(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)*)`")


def with_flags(message: str) -> str:
    """A library message with each parameter it names (`batch_sizes`) written as its flag
    (--batch-sizes): the CLI's flags are the parameters' names with dashes."""
    return _PARAMETER.sub(lambda m: "--" + m.group(1).replace("_", "-"), message)


def parse_batch_sizes(text: str) -> list[int]:
    """--batch-sizes 1,8 -> [1, 8] (sorted, without repeats)."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers such as 1,8; got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes needs positive integers such as 1,8; got {text!r}")
    return sorted(set(sizes))


def parse_size(text: Union[str, int, None]) -> Optional[int]:
    """Bytes from '4G', '4GiB', '512M', '512MiB' or a plain number of MiB (text); an int is
    already bytes (as recorded in a manifest); None stays None."""
    if text is None or (isinstance(text, int) and text > 0):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"--workspace: cannot read the size {text!r}; write e.g. 4G, 512M or 2048 (MiB)")
    number, unit = float(match.group(1)), (match.group(2) or "M").upper()
    size = int(number * 1024 ** "KMGT".index(unit) * 1024)
    if size <= 0:
        raise UserError(f"--workspace: the size {text!r} must be positive")
    return size


def key_values(pairs: list[str], flag: str) -> dict:
    """KEY=VALUE strings -> dict; values are read as JSON (numbers, true/false) or kept as text."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(text)
        except ValueError:
            out[key.strip()] = text
    return out


def merge_options(pairs: list[str]) -> dict:
    """--option KEY=VALUE pairs for mame_deploy.patch; merge layers have their own flag."""
    options = key_values(pairs, "--option")
    if "layers" in options:
        raise UserError("give merge layers with --layers, e.g. --layers 2,5, not --option layers=...")
    return options


def merge_layers(text: Optional[str]) -> Optional[list[int]]:
    from mame_deploy.schedule import parse_layers

    return parse_layers(text) if text is not None else None


def compact_runs(values: list[int]) -> str:
    """[197, 197, 165] -> '197 x2, 165'."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        parts.append(f"{values[i]} x{j - i}" if j - i > 1 else str(values[i]))
        i = j
    return ", ".join(parts)


def progress_bar(console, *columns):
    """The transient progress bar of long CLI runs (counts done, time elapsed, ``columns``).
    Where the output is not a terminal the bar cannot draw: each task then prints one line
    as it starts, so a log shows what is running."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    class LineProgress(Progress):
        def add_task(self, description, *args, **kwargs):
            if not self.console.is_terminal:
                self.console.print(f"{description} ...", highlight=False, soft_wrap=True)
            return super().add_task(description, *args, **kwargs)

    return LineProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        *columns, console=console, transient=True)


@contextlib.contextmanager
def stages(console) -> Iterator[Callable[[str], None]]:
    """Report the stages of a long command: a spinner naming the current one on a terminal,
    else one line per stage (a spinner prints nothing into a pipe or log)."""
    from rich.markup import escape

    if console.is_terminal:
        with console.status("") as status:
            yield lambda message: status.update(escape(message) + " ...")
    else:
        yield lambda message: console.print(escape(message) + " ...", highlight=False, soft_wrap=True)


def add_parity_rows(table, report: dict, runtime: str, rel_note: str) -> None:
    """The parity metrics every `validate` prints, whatever runtime ran the artifact."""
    table.add_row("max abs error", f"{report['max_abs_err']:.3e} (max |logit| {report['max_abs_logit']:.3g})")
    table.add_row("max rel error", f"{report['max_rel_err']:.3e} ({rel_note})")
    table.add_row("mean cosine", f"{report['mean_cosine']:.8f}")
    table.add_row("top-1 agreement", f"{report['top1_agreement']:.2%}")
    if "top1_accuracy" in report:
        table.add_row("top-1 accuracy", f"{runtime} {report['top1_accuracy']:.2%}, "
                                        f"torch {report['top1_accuracy_reference']:.2%}")


def add_decision_rows(table, report: dict, tolerance: float) -> None:
    """The merge-decision part of a `validate` report (see mame_deploy.decisions)."""
    decisions = report.get("decisions") or {}
    layers = decisions.get("layers") or []
    if not report.get("decisions_traced"):
        if report.get("tokens_per_layer") and len(set(report["tokens_per_layer"])) > 1:
            table.add_row("merge decisions", "not traced (the file has no mame::TokenMerge nodes, e.g. --scan inline): "
                                             "every sample is held to the parity rule")
        return
    flipped, samples = report["flipped_samples"], report["samples"]
    if not flipped:
        table.add_row("merge decisions", f"identical in all {samples} samples at all {len(layers)} merge steps")
    else:
        firsts = [f"block {layer}: {n}" for layer, n in zip(layers, decisions["first_flips"]) if n]
        table.add_row("merge decisions", f"{flipped} of {samples} samples decided differently at some step "
                                         f"(first at {', '.join(firsts)}); {flipped - report['unexplained_flips']} "
                                         f"of them near-ties, {report['unexplained_flips']} unexplained")
        per_step = [f"{layer}:{n}" for layer, n in zip(layers, decisions["differing"]) if n]
        table.add_row("differing per block", ", ".join(per_step))
        table.add_row("effect of the flips", f"top-1 changed on {report['top1_changed_by_flips']} of the "
                                             f"{flipped} samples")
    if report.get("precision", "fp32") != "fp32":  # held to the reduced-precision rule (tolerance row)
        table.add_row("same-decision samples", f"{report['agreeing_samples']}: mean cosine "
                                               f"{report['mean_cosine_agreeing']:.8f}, max rel error "
                                               f"{report['max_rel_err_agreeing']:.3e}, top-1 agreement "
                                               f"{report['top1_agreement_agreeing']:.2%}")
        return
    table.add_row("same-decision samples", f"{report['agreeing_samples']}: max rel error "
                                           f"{report['max_rel_err_agreeing']:.3e} (tolerance {tolerance:g}), top-1 "
                                           f"agreement {report['top1_agreement_agreeing']:.2%}")


def source_from_flags(model, ratio, schedule, method, options, checkpoint, seed, overrides, layers=None):
    """The Source the flags describe, checked as far as it can be without building the model."""
    check_ratio(ratio)
    options = merge_options(options)
    layer_list = merge_layers(layers)
    if layer_list is not None:
        options["layers"] = layer_list
    source = Source(
        model=model, checkpoint=str(checkpoint) if checkpoint else None, seed=seed,
        overrides=key_values(overrides, "--override"), method=method, ratio=ratio,
        schedule_spec=schedule, options=options,
    )
    resolve_schedule(model_config(source), ratio, schedule, layer_list)  # bad layers/schedule: fail now
    # Fine-tuned weights bring the merging they were trained with when the flags name none.
    return with_checkpoint_merge(resolve_checkpoint(source))


def merge_settings(record: dict) -> str:
    """'mame, ratio 0.5' or 'tome, schedule 4:20,8:20' (an explicit schedule overrides the ratio)."""
    spec = record.get("schedule_spec")
    layers = (record.get("options") or {}).get("layers")
    where = f" after blocks {','.join(map(str, layers))}" if layers and not spec else ""
    return f"{record['method']}, " + (f"schedule {spec}" if spec else f"ratio {record['ratio']:g}{where}")


def write_report(console, path, report) -> None:
    """Write a command's JSON report (its path was checked writable before the work began)."""
    if path is None:
        return
    from rich.markup import escape

    from mame_deploy import artifacts

    artifacts.write_json(path, report)
    console.print(f"wrote {escape(str(path))}")
