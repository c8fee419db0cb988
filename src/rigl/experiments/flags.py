"""Documented config fields, and the command-line flags derived from them.

A field of :class:`~rigl.experiments.config.ExperimentConfig` is declared with
:func:`setting` (default, help text, allowed values). Validation reads the allowed values
from there, and every field becomes a flag ``--key VALUE`` (also ``--key-with-dashes``)
whose help shows the text, the default and the allowed values: nothing is repeated by
hand, so a new config key is a new, documented flag.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import types
import typing
from collections.abc import Sequence
from typing import Any

# allowed values: a fixed tuple, or "module:function" of a registry's list (imported when
# needed, so that declaring the config imports no registry)
Choices = tuple[str, ...] | str | None


def setting(default: Any, help: str, choices: Choices = None) -> Any:
    """A config field with its help text and allowed values."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def choices_of(f: dataclasses.Field) -> list[str] | None:
    """The allowed values of a config field, or None when any value of its type goes."""
    choices = f.metadata.get("choices")
    if isinstance(choices, str):
        module, function = choices.split(":")
        return list(getattr(importlib.import_module(module), function)())
    return None if choices is None else list(choices)


def add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """A flag ``--key VALUE`` (also ``--key-with-dashes``) per config field, with the field's
    help, default and allowed values; a flag given overrides the config file."""
    from rigl.experiments.config import ExperimentConfig
    from rigl.experiments.configfile import parse_value

    hints = typing.get_type_hints(ExperimentConfig)
    group = parser.add_argument_group(
        "config overrides",
        "Every config key is a flag; values use YAML syntax: 0.1, 1e-3, true, [100, 200], "
        "{a: 1}. A default is the value when neither the config nor a flag sets the key.",
    )
    for f in dataclasses.fields(ExperimentConfig):
        if f.name in skip:
            continue
        allowed = choices_of(f)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        notes = [f"default: {_shown(default)}"]
        listed = ", ".join(allowed or [])
        metavar = _metavar(hints[f.name])
        if allowed and len(listed) <= 30 and not isinstance(default, list):
            metavar = "{" + ",".join(allowed) + "}"  # short lists: in the usage line
        elif allowed:
            metavar = "LIST" if isinstance(default, list) else "NAME"
            notes.append(f"{'items' if isinstance(default, list) else 'one'} of: {listed}")
        text = f"{f.metadata.get('help', '')} ({'; '.join(notes)})"
        group.add_argument(
            *sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"}),
            dest=f.name,
            type=str if hints[f.name] is str else parse_value,  # "2:4" stays a string
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=text.replace("%", "%%"),  # argparse %-formats help strings
        )


def _metavar(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _metavar(args[0]) if len(args) == 1 else "NUMBER"  # int | float
    origin = typing.get_origin(hint) or hint
    names = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT", list: "LIST", dict: "MAPPING"}
    return names.get(origin, "VALUE")


def _shown(value: Any) -> str:
    """A default as one would write it in YAML: null, true, [topology], {}."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    return f"{value:g}" if isinstance(value, float) else str(value)
