"""Parsing and formatting shared by the CLI's command modules."""

from __future__ import annotations

import json

from mame_deploy.errors import UserError


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


def progress_bar(console):
    """The transient progress bar of long CLI runs (counts done, time elapsed)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def add_parity_rows(table, report: dict, runtime: str, rel_note: str) -> None:
    """The parity metrics every `validate` prints, whatever runtime ran the artifact."""
    table.add_row("max abs error", f"{report['max_abs_err']:.3e} (max |logit| {report['max_abs_logit']:.3g})")
    table.add_row("max rel error", f"{report['max_rel_err']:.3e} ({rel_note})")
    table.add_row("mean cosine", f"{report['mean_cosine']:.8f}")
    table.add_row("top-1 agreement", f"{report['top1_agreement']:.2%}")
    if "top1_accuracy" in report:
        table.add_row("top-1 accuracy", f"{runtime} {report['top1_accuracy']:.2%}, "
                                        f"torch {report['top1_accuracy_reference']:.2%}")
