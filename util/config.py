"""The resolved configuration of a run: every flag and every value resolved from the flags, read-only.

Parsing gives an ``argparse.Namespace``; resolution (mode defaults, the checkpoint's model arguments, the
student's architecture, precision, device, attention path, ...) turns it into one ``Config`` step by step,
each step returning a new ``Config`` (``replace``); nothing writes into a ``Config`` afterwards. It reads like
the namespace it came from (``cfg.lr``, ``vars(cfg)``, ``getattr(cfg, name, default)``), pickles (submitit
sends it to the job) and is recorded in checkpoints as a dict (``record``).
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any


class Config(argparse.Namespace):
    """A run's resolved, read-only configuration."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    @classmethod
    def of(cls, args: argparse.Namespace | Mapping, **changes: Any) -> Config:
        """A configuration holding ``args``'s values (a namespace or a mapping), with ``changes`` on top."""
        values = dict(args) if isinstance(args, Mapping) else dict(vars(args))
        return cls(**{**values, **changes})

    def replace(self, **changes: Any) -> Config:
        """A new configuration: this one with ``changes``."""
        return Config.of(self, **changes)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the resolved configuration is read-only (setting {name!r}): resolution returns a new "
                             "one with Config.replace")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"the resolved configuration is read-only (deleting {name!r})")

    def record(self) -> dict:
        """The values as a plain dict (what checkpoints record as their ``args``)."""
        return dict(vars(self))
