"""Command-line helpers shared by the scripts."""
from __future__ import annotations

import argparse
import ast
import copy
from collections.abc import Sequence

from util.errors import UserError


def parse_kwargs(items: Sequence[str] | dict, flag: str) -> dict:
    """``['patch_size=4', 'qk_norm=True']`` -> ``{'patch_size': 4, 'qk_norm': True}`` (values as Python literals)."""
    if isinstance(items, dict):
        return items
    out = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise UserError(f"{flag}: {item!r} is not KEY=VALUE (e.g. {flag} patch_size=4 embed_dim=192)")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str]:
    """The destinations the command line set explicitly (to apply a mode's own defaults to the rest)."""
    probe = copy.deepcopy(parser)  # parent parsers share their actions: never touch the original's defaults
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    probe._defaults.clear()
    namespace, _ = probe.parse_known_args(argv)
    return sorted(vars(namespace))
