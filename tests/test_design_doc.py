"""docs/design.md names only what exists: dotted names, file paths, and the names its module
tables list for each module (so the document cannot silently rot as the code moves)."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
ROOTS = "rigl|tests|benchmarks|docs|configs|examples"  # where a path in the document starts
DOTTED = re.compile(r"`(rigl(?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"`((?:" + ROOTS + r")/[\w./*-]+)`")
ROW = re.compile(r"^\| `(rigl/[\w/]+\.py)` \| (.*) \|$", re.MULTILINE)
NAME = re.compile(r"`([A-Za-z_]\w*)`")


def resolve(dotted: str) -> object:
    """The object ``dotted`` names: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def module_of(path: str) -> str:
    """``rigl/sparse/storage.py`` -> ``rigl.sparse.storage`` (``__init__.py``: the package)."""
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def defines(module: object, name: str) -> bool:
    """``name`` is an attribute of ``module`` or of a class defined in it."""
    if hasattr(module, name):
        return True
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass)]
    return any(c.__module__ == module.__name__ and hasattr(c, name) for c in classes)


@pytest.mark.parametrize("dotted", sorted(set(DOTTED.findall(DOC))))
def test_dotted_name_exists(dotted):
    try:
        resolve(dotted)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"docs/design.md names {dotted}, which does not exist: {exc}")


@pytest.mark.parametrize("path", sorted(set(PATH.findall(DOC))))
def test_path_exists(path):
    base = REPO / "src" if path.startswith("rigl/") else REPO
    assert list(base.glob(path)), f"docs/design.md names {path}, which does not exist"


ROWS = ROW.findall(DOC)


@pytest.mark.parametrize("path,cell", ROWS, ids=[path for path, _ in ROWS])
def test_module_table_names_exist(path, cell):
    module = importlib.import_module(module_of(path))
    missing = [n for n in NAME.findall(cell) if not defines(module, n)]
    assert not missing, f"docs/design.md lists {missing} for {path}, which has none of them"


def test_the_checks_see_the_document():
    """The patterns find what the document holds (a reworded table would check nothing)."""
    assert len(ROWS) >= 40
    assert len(set(DOTTED.findall(DOC))) >= 5 and len(set(PATH.findall(DOC))) >= 10
