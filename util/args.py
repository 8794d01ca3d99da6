"""Command-line helpers shared by the scripts."""
from __future__ import annotations

import argparse
import ast
import copy
import math
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with every option's default (unless its help already states it) and the description
    as written. Flags without a value (store_true / store_false) are off unless given, so they show none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ''
        if action.nargs == 0 or 'default' in text or action.default is argparse.SUPPRESS:
            return text
        return text + ' (default: %(default)s)'


def annotate_mode_defaults(parser: argparse.ArgumentParser, defaults: dict, mode: str) -> None:
    """Add "MODE: VALUE" to the default shown in the help of each option that ``mode`` changes.

    (argparse lists its actions only in the private ``_actions``, which explicit_flags reads too.)"""
    for action in parser._actions:
        if action.dest in defaults and action.help:
            note = f"--mode {mode}: {defaults[action.dest]}"
            if 'default' in action.help:
                action.help = action.help + f' ({note})'
            else:
                action.help = action.help + f' (default: %(default)s; {note})'


def check_range(flag: str, value: float, low: float, high: float, low_open: bool = False,
                 high_open: bool = False, meaning: str = '') -> None:
    """Raise a UserError naming ``flag`` unless ``value`` lies in the interval (open ends as given)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"--{flag} {value:g}: must lie in {interval}" + (f" ({meaning})" if meaning else ''))
