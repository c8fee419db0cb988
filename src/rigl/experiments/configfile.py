"""Config files and values as text: a YAML or JSON file read into a mapping, a command-line
value parsed as YAML, and a value checked against the config field's type hint. Every
problem is a :class:`rigl.ConfigError` naming the file (and line) or the key."""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rigl.errors import ConfigError, is_int, is_real


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file as a dict; a missing, binary or malformed file is a ConfigError
    naming the path and, for a syntax error, the line."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {problem}; give a YAML or JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"config file {str(path)!r} is not a text file (not UTF-8); give a YAML or JSON file"
        ) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {_yaml_problem(exc)}"
        ) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of config keys (key: value "
            f"lines), not a {type(data).__name__}"
        )
    return data


def _yaml_problem(exc: Exception) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML spreads it over several,
    with a quote of the line)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalar/list syntax (``0.1``, ``1e-3``, ``true``, ``[1, 2]``)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


# -- type checks ---------------------------------------------------------------------------
def check_type(name: str, value: Any, hint: Any) -> Any:
    """``value`` if it has type ``hint`` (ints are accepted for floats), else ConfigError."""
    ok, converted = _match(value, hint)
    if not ok:
        raise ConfigError(f"{name}={value!r} has the wrong type: expected {_type_name(hint)}")
    return converted


def _match(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):  # int before float keeps 100 an int
            ok, converted = _match(value, arg)
            if ok:
                return True, converted
        return False, value
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return is_int(value), int(value) if is_int(value) else value
    if hint is float:
        return is_real(value), float(value) if is_real(value) else value
    if hint is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, list | tuple):
            return False, value
        (item,) = typing.get_args(hint)
        results = [_match(v, item) for v in value]
        return all(ok for ok, _ in results), [v for _, v in results]
    if origin is dict:
        ok = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
        return ok, dict(value) if ok else value
    raise TypeError(f"unsupported config type {hint!r} for {value!r}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)
