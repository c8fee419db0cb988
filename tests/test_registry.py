"""The method registry: names and aliases, one class per name, every method's own facts
(training cost, table label), methods from outside the package (``RIGL_PLUGINS``)."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rigl
from conftest import TinyMLP, tiny_run_config
from rigl import registry

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")


@pytest.fixture
def own_registry(monkeypatch):
    """Registrations made by the test are dropped afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._registry()))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))


def test_registering_a_name_twice_is_an_error_naming_it(own_registry):
    @rigl.register_method("twice")
    class First(rigl.Static):
        pass

    with pytest.raises(rigl.ConfigError, match="'twice' is already registered by .*First"):

        @rigl.register_method("twice")
        class Second(rigl.Static):
            pass

    with pytest.raises(rigl.ConfigError, match="'rigl' is already registered"):
        rigl.register_method("rigl")(type("Mine", (rigl.SET,), {}))
    with pytest.raises(rigl.ConfigError, match="'pruning' is already registered"):
        rigl.register_method("my_pruning")(type("Mine", (rigl.GMP,), {"aliases": ("pruning",)}))
    assert rigl.get_method("twice") is First
    assert rigl.register_method("twice")(First) is First  # the same class again: fine


def test_a_reloaded_plugin_module_registers_again(own_registry):
    module = importlib.import_module("plugin_methods")
    importlib.reload(module)  # a new class object of the same name replaces the entry
    assert rigl.get_method("random_grow_rigl") is module.RandomGrowRigL


def test_aliases_are_the_methods_own(own_registry):
    assert rigl.get_method("pruning") is rigl.GMP and "pruning" not in rigl.list_methods()
    sub = rigl.register_method("gmp_variant")(type("GMPVariant", (rigl.GMP,), {}))
    assert sub.aliases == ("pruning",) and rigl.get_method("pruning") is rigl.GMP


@pytest.mark.parametrize("method", rigl.list_methods())
def test_every_method_states_its_training_cost_and_label(method):
    """Every registered method answers train_flops_ratio and has a table label; one
    whose forward and backward are all sparse costs f_S / f_D of dense training."""
    cls = rigl.get_method(method)
    ratio = rigl.train_flops_ratio(method, 0.2, 1.0, update_interval=10)
    assert math.isfinite(ratio) and 0.2 <= ratio <= 1.0
    assert cls.label and registry.method_label(method) == cls.label
    assert rigl.train_flops_ratio(method, 1.0, 1.0) == pytest.approx(1.0)  # dense = dense


def test_unknown_method_names_the_valid_ones_and_aliases():
    with pytest.raises(
        ValueError, match=r"unknown method .no_such_method.; valid: dense, gmp.*pruning"
    ):
        rigl.train_flops_ratio("no_such_method", 0.2, 1.0)


def _cli_driver(commands: list[list[str]]) -> str:
    return textwrap.dedent(
        f"""
        import contextlib, io, json
        from rigl.cli import main
        results = []
        for argv in {commands!r}:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code
            results.append({{"rc": code, "out": out.getvalue(), "err": err.getvalue()}})
        print(json.dumps(results))
        """
    )


def _run_cli(commands: list[list[str]], plugins: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(TESTS)]),
           "RIGL_PLUGINS": plugins, "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _cli_driver(commands)], capture_output=True,
                          text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    for result in results:
        assert "Traceback" not in result["out"] + result["err"], result
    return results


def test_a_plugin_method_trains_through_train_compare_and_flops(tmp_path):
    """tests/plugin_methods.py, named by RIGL_PLUGINS, through the three commands."""
    data = tmp_path / "data"
    data.mkdir()
    config = tiny_run_config(tmp_path, data, method="random_grow_rigl", epochs=1,
                             checkpoint_every=0)  # fmt: skip
    compare = ["compare", "--config", str(config), "--methods", "random_grow_rigl",
               "--sparsities", "0.8", "--seeds", "1", "--jobs", "1", "--out", str(tmp_path / "c")]  # fmt: skip
    train, cmp, flops = _run_cli(
        [["train", "--config", str(config), "--quiet"], compare,
         ["flops", "--model", "mlp", "--method", "random_grow_rigl", "--json"]],
        plugins="plugin_methods",
    )  # fmt: skip
    assert train["rc"] == cmp["rc"] == flops["rc"] == 0, (train, cmp, flops)
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    # 3 f_S per step: the training cost is the inference cost
    assert final["train_flops_ratio"] == pytest.approx(final["inference_flops_ratio"])
    assert "| RigL (random growth) |" in cmp["out"]
    records = json.loads((tmp_path / "c" / "results.json").read_text())["records"]
    assert sorted(r["method"] for r in records) == ["dense", "random_grow_rigl"]
    report = json.loads(flops["out"])
    assert report["train_flops_ratio"] == pytest.approx(report["inference_flops_ratio"])


def test_a_plugin_that_cannot_be_imported_is_one_error_line():
    (result,) = _run_cli([["flops", "--model", "mlp"]], plugins="no_such_rigl_plugin")
    assert result["rc"] == 2
    assert "error: RIGL_PLUGINS='no_such_rigl_plugin': cannot import" in result["err"]


def test_a_subclass_sets_its_attributes_after_super_init():
    """The hooks (here ``initial_indices``) run after the whole ``__init__`` chain."""

    class FirstPositions(rigl.Static):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.start = 0  # read by the hook below

        def initial_indices(self, index, target, n_active):
            return torch.arange(self.start, self.start + n_active)

    sparsifier = FirstPositions(TinyMLP(), None, sparsity=0.5, distribution="uniform")
    for weight, n in zip(sparsifier.weights, sparsifier.target_counts, strict=True):
        flat = weight.mask.reshape(-1)
        assert bool(flat[:n].all()) and not bool(flat[n:].any())
