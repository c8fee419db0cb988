"""ExperimentConfig validation and round trips, schedules, data order, sweeps and tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rigl import ConfigError
from rigl.experiments.config import ExperimentConfig, from_dict, load_config
from rigl.experiments.configfile import parse_value
from rigl.experiments.sweeps.results import markdown, summarise
from rigl.experiments.sweeps.sweep import RunSpec, expand, find_preset, read_sweep_file
from rigl.experiments.training.batches import epoch_order
from rigl.experiments.training.builders import lr_factor

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- round trips ---------------------------------------------------------------------------------
def test_defaults_are_valid_and_round_trip_yaml_and_json(tmp_path):
    config = ExperimentConfig(method="set", lr_milestones=[100, 0.5], dataset_options={"seed": 3})
    config.save(tmp_path / "c.yaml")
    config.save(tmp_path / "c.json")
    assert load_config(tmp_path / "c.yaml") == config
    assert load_config(tmp_path / "c.json") == config
    assert json.loads(config.to_json())["lr_milestones"] == [100, 0.5]


def test_yaml_reads_exponent_floats_and_flags_win(tmp_path):
    path = write(tmp_path / "c.yaml", "lr: 1e-3\nweight_decay: 5E-4\nepochs: 3\n")
    config = load_config(path, {"epochs": 7, "lr": parse_value("2e-2")})
    assert config.lr == pytest.approx(0.02) and config.weight_decay == pytest.approx(5e-4)
    assert config.epochs == 7  # the command line wins over the file
    assert parse_value("[1, 2]") == [1, 2] and parse_value("true") is True


# every config file but big_sparse.yaml, which is benchmarks/big_sparse.py's own format
SHIPPED = sorted(p.stem for p in (REPO / "configs").glob("*.yaml") if p.stem != "big_sparse")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_valid(name):
    path = REPO / "configs" / f"{name}.yaml"
    base, settings = read_sweep_file(path)
    config = from_dict(base, source=str(path))
    if settings:
        assert len(expand(config, settings).runs) > 0


def test_lm_patterns_preset_puts_every_layer_of_the_char_gpt_under_its_pattern():
    """``--preset lm_patterns``: dense, RigL and fan-in at four sparsities, 2:4 / 1:4 / 1:8
    at theirs, 3 seeds; every sparsified layer of the char GPT (64 or 256 inputs) holds
    N:M, none is left unstructured (no warning), the tied embedding stays dense."""
    import warnings

    import rigl
    from rigl.experiments.models.zoo import build_model

    base, settings = read_sweep_file(find_preset("lm_patterns"))
    config = from_dict(base)
    assert config.dataset == "pydoc" and config.model == "char_gpt"
    runs = expand(config, settings).runs
    assert len(runs) == 3 * (1 + 4 + 4 + 3)
    cases = {(r.sparsity, dict(r.extra).get("pattern", "unstructured")) for r in runs}
    fixed = {(0.5, "2:4"), (0.75, "1:4"), (0.875, "1:8")}
    four = {(s, p) for s in (0.5, 0.75, 0.875, 0.9) for p in ("unstructured", "fanin")}
    assert cases == {(0.0, "unstructured")} | four | fixed
    for sparsity, pattern in sorted(fixed | {(0.9, "fanin")}):
        model = build_model("char_gpt", num_classes=256, input_shape=(128,), **config.model_options)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a layer left unstructured warns
            sp = rigl.create(
                "rigl", model, None, sparsity=sparsity, pattern=pattern,
                distribution=config.distribution, total_steps=100, update_interval=25,
            )  # fmt: skip
        assert len(sp.weights) == 12 and all(str(w.pattern) == pattern for w in sp.weights)
        assert "embedding.weight" in sp.left_dense
        sp.remove()


def test_lm_preset_fits_its_budget_and_lm_full_adds_only_the_other_5x_runs():
    """``--preset lm`` (15 minutes on 2 cores): every method at 80/90/95%, RigL 5x at 90%
    only, 63 run-lengths (a run-length: one 600-step run; measured 20 min 37 s for 93 on
    2 AVX2 cores). ``--preset lm_full`` is the same configs plus RigL 5x at 80% and 95%,
    so the same --out reuses every finished lm run."""
    plans = {}
    for name in ("lm", "lm_full"):
        base, settings = read_sweep_file(find_preset(name))
        config = from_dict(base)
        plans[name] = {
            r: r.config(config, REPO / "out").to_dict() for r in expand(config, settings).runs
        }
    lm, full = plans["lm"], plans["lm_full"]
    assert sum(r.multiplier for r in lm) == 63 and sum(r.multiplier for r in full) == 93
    assert all(full[r] == lm[r] for r in lm)  # the same config, so the run folder is reused
    added = set(full) - set(lm)
    assert {(r.method, r.multiplier, r.sparsity) for r in added} == {
        ("rigl", 5.0, 0.8),
        ("rigl", 5.0, 0.95),
    }
    assert len(added) == 6
    five = {(r.sparsity, r.seed) for r in lm if r.multiplier == 5}
    assert five == {(0.9, s) for s in range(3)}


def test_cifar_recipe_matches_the_paper():
    config = load_config(REPO / "configs" / "cifar10_wrn22_2.yaml")
    assert (config.steps, config.batch_size, config.lr, config.weight_decay) == (
        97656,
        128,
        0.1,
        5e-4,
    )
    assert (config.update_interval, config.drop_fraction, config.end_step) == (100, 0.3, 75000)
    assert config.lr_milestones == [30000, 60000, 90000] and config.lr_gamma == pytest.approx(0.2)
    assert config.optimizer == "sgd" and config.nesterov and config.momentum == 0.9


# -- errors name the key, the value or the path ----------------------------------------------
@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("learning_rate: 0.1\n", "unknown key 'learning_rate'.*did you mean 'lr'"),
        ("lr: fast\n", "lr='fast' has the wrong type"),
        ("epochs: 2.5\n", "epochs=2.5 has the wrong type: expected int"),
        ("nesterov: 1\n", "nesterov=1 has the wrong type: expected bool"),
        ("sparsity: 1.2\n", r"sparsity=1.2 is outside \[0, 1\)"),
        ("method: magic\n", "method='magic' is unknown; allowed: dense, gmp"),
        ("optimizer: rmsprop\n", "optimizer='rmsprop' is unknown"),
        ("dataset: imagenet\n", "dataset='imagenet' is unknown"),
        ("end_step: 1.5\n", "end_step=1.5: a float is a fraction"),
        ("batch_size: 0\n", "batch_size=0 must be > 0"),
        ("recorders: [nope]\n", "recorders='nope' is unknown"),
        ("data_root: /no/such/folder\n", "data_root='/no/such/folder': no such folder"),
        ("width_rule: small_dense\n", "width_rule='small_dense' with method='rigl'"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path / "bad.yaml", text))


@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay", "lr_gamma", "sparsity"])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"{key}=(nan|inf|-inf) must be a finite number"):
        load_config(write(tmp_path / "bad.yaml", f"{key}: {value}\n"))


def test_non_finite_lr_is_a_one_line_cli_error(tmp_path):
    """The run used to start and exit 0 with a NaN loss."""
    import subprocess
    import sys

    config = write(tmp_path / "c.yaml", "lr: .nan\nweight_decay: .inf\n")
    done = subprocess.run(
        [sys.executable, "-m", "rigl.cli", "train", "--config", str(config), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "error: lr=nan must be a finite number" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_numpy_scalars_are_numbers_in_the_config():
    config = ExperimentConfig(lr=np.float32(0.5), epochs=np.int64(3), sparsity=np.float64(0.8))
    assert config.lr == 0.5 and type(config.lr) is float
    assert config.epochs == 3 and type(config.epochs) is int
    json.loads(config.to_json())  # plain data


def test_missing_or_broken_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(write(tmp_path / "broken.yaml", "lr: [1,\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


# -- schedules and data order ------------------------------------------------------------------
def test_multiplier_stretches_absolute_schedule_steps():
    config = ExperimentConfig(
        steps=1000, multiplier=2.0, lr_schedule="step", lr_milestones=[300, 0.9], lr_gamma=0.1
    )
    total = config.total_steps(steps_per_epoch=10)
    assert total == 2000
    factor = lr_factor(config, total)
    assert factor(599) == 1.0 and factor(600) == pytest.approx(0.1)  # 300 stretched to 600
    assert factor(1799) == pytest.approx(0.1) and factor(1800) == pytest.approx(0.01)  # 0.9
    assert config.scaled_step(75) == 150 and config.scaled_step(0.75) == 0.75


def test_cosine_and_warmup_learning_rate():
    factor = lr_factor(ExperimentConfig(lr_schedule="cosine", warmup_steps=4), 100)
    assert factor(0) == pytest.approx(0.25 * 1.0)
    assert factor(50) == pytest.approx(0.5) and factor(100) == pytest.approx(0.0)


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = epoch_order(0, 3, 50)
    assert torch.equal(a, epoch_order(0, 3, 50))
    assert sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, epoch_order(0, 4, 50))
    assert not torch.equal(a, epoch_order(1, 3, 50))


# -- sweeps and the results table -------------------------------------------------------------------
def test_sweep_grid_runs_dense_once_per_seed():
    plan = expand(
        ExperimentConfig(),
        {"methods": ["static", "rigl"], "sparsities": [0.8, 0.9], "seeds": 2,
         "distributions": ["erk", "uniform"]},
    )  # fmt: skip
    names = [r.name for r in plan.runs]
    assert len(names) == len(set(names)) == 2 + 2 * 2 * 2 * 2
    assert [n for n in names if n.startswith("dense")] == ["dense-1x-seed0", "dense-1x-seed1"]
    assert "rigl-uniform-s0.9-1x-seed1" in names and plan.sparsities == [0.8, 0.9]


def test_sweep_run_list_and_row_names():
    plan = expand(
        ExperimentConfig(),
        {"sparsities": [0.9], "seeds": 1,
         "runs": [{"method": "dense"}, {"method": "rigl", "multiplier": 5},
                  {"method": "rigl", "distribution": "uniform"},
                  {"method": "dense", "width_rule": "small_dense"}]},
    )  # fmt: skip
    rows = [r.row(show_distribution=True) for r in plan.runs]
    assert rows == ["Dense", "RigL 5x (ERK)", "RigL (uniform)", "Small-Dense"]
    with pytest.raises(ConfigError, match="lr='x' has the wrong type"):
        expand(ExperimentConfig(), {"runs": [{"method": "rigl", "lr": "x"}]})


def test_presets_are_found_by_name():
    assert find_preset("main").name == "main.yaml"
    with pytest.raises(ConfigError, match="preset='nope' not found; available: .*main"):
        find_preset("nope")


def test_summary_table_mean_and_std_over_seeds():
    def rec(method, sparsity, seed, acc):
        spec = RunSpec(method, sparsity, "erk", seed)
        return {"row": spec.row(False), "method": method, "sparsity": sparsity, "seed": seed,
                "distribution": "erk", "multiplier": 1.0, "test_accuracy": acc, "params": 10,
                "train_flops_ratio": 0.5, "inference_flops_ratio": 0.25}  # fmt: skip

    records = [rec("dense", 0.0, 0, 0.90), rec("dense", 0.0, 1, 0.92)]
    records += [rec("rigl", 0.9, 0, 0.80), rec("rigl", 0.9, 1, 0.84)]
    table = markdown(summarise(records, [0.9]), [0.9])
    lines = table.splitlines()
    assert lines[0] == "| Method | test acc. % at 90% | train FLOPs 90% | test FLOPs 90% |"
    assert lines[2] == "| Dense | 91.0 ± 1.4 | 0.50x | 0.25x |"
    assert lines[3] == "| RigL | 82.0 ± 2.8 | 0.50x | 0.25x |"


def test_presets_ship_inside_the_package():
    """src/rigl/configs links to the repository's configs/, so a wheel (non-editable
    install) carries the presets (pyproject package-data ``configs/*.yaml``)."""
    import rigl
    from rigl.experiments.sweeps.sweep import find_preset

    shipped = Path(rigl.__file__).resolve().parent / "configs"
    assert (shipped / "main.yaml").is_file() and (shipped / "mnist5k.yaml").is_file()
    assert find_preset("main").name == "main.yaml"
