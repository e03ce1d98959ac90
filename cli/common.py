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
