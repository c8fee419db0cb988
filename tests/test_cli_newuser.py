"""The first hour of a new user through the `rigl` command: a torch-only install, help
texts, clear errors for bad config files, and the tuned base config of a dataset.

CLI behaviour is checked through a subprocess (the message, the exit status, and that no
traceback is printed). To keep that fast, one subprocess runs several commands: a small
driver calls ``rigl.cli.main`` for each command line in turn and reports what each one
printed; an exception escaping ``main`` still prints its traceback and ends the driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import tiny_run_config
from rigl._extras import EXTRAS
from rigl.cli import build_parser, main

SRC = str(Path(__file__).resolve().parents[1] / "src")

DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    for name in json.loads(sys.argv[2]):  # what a torch-only install lacks
        sys.modules[name] = None  # `import name` then raises ModuleNotFoundError
    from rigl.cli import main
    results = []
    for argv in json.loads(sys.argv[1]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:  # --help, --version, argparse errors
                code = exc.code
        results.append({"rc": code, "out": out.getvalue(), "err": err.getvalue()})
    loaded = sorted({m.split(".")[0] for m, v in sys.modules.items() if v is not None})
    print(json.dumps({"results": results, "modules": loaded}))
    """
)


def run_cli(*commands: list[str], blocked: tuple[str, ...] = (), cwd=None) -> dict:
    """Run each command line through ``rigl.cli.main`` in one fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(commands), json.dumps(blocked)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    for result in report["results"]:
        assert "Traceback" not in result["err"] + result["out"]
    return report


# -- item 16: a torch-only install -----------------------------------------------------------
def test_torch_only_install_help_version_and_flops_work_and_train_names_the_extra(tmp_path):
    """numpy, yaml, matplotlib, tqdm, ... (every optional package) made unimportable:
    --help, --version and flops work; train, compare and report name the extra."""
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 1\n")
    report = run_cli(
        ["--help"],
        ["--version"],
        ["flops", "--help"],
        ["flops", "--model", "lenet300_100", "--sparsity", "0.9", "--json"],
        ["train", "--config", str(config), "--out", str(tmp_path / "run")],
        ["compare", "--methods", "rigl", "--out", str(tmp_path / "cmp")],
        ["report", str(tmp_path), "--out", str(tmp_path / "rep")],
        blocked=tuple(EXTRAS),
    )
    helps, version, flops_help, flops, *needs_extra = report["results"]
    assert helps["rc"] == 0 and "train" in helps["out"] and "flops" in helps["out"]
    assert version == {"rc": 0, "out": "rigl 0.1.0\n", "err": ""}
    assert flops_help["rc"] == 0 and "--sparsity" in flops_help["out"]
    assert flops["rc"] == 0 and json.loads(flops["out"])["inference_flops_ratio"] < 0.2
    assert flops["err"] == ""  # not even torch's "Failed to initialize NumPy" warning
    for result, command in zip(needs_extra, ("train", "compare", "report"), strict=True):
        assert result["rc"] == 2 and result["out"] == ""
        lines = result["err"].strip().splitlines()
        assert len(lines) == 1, lines  # one line, no traceback
        assert lines[0].startswith(f"rigl {command}: error: this command needs the package")
        assert lines[0].endswith('pip install "rigl[experiments]"')
    assert not set(EXTRAS) & set(report["modules"])
    assert not (tmp_path / "run").exists()


def test_top_level_help_and_version_import_no_torch():
    """`rigl --help` / `--version` import neither torch nor any command (was 5-10 s)."""
    report = run_cli(["--help"], ["--version"])
    assert not {"torch", "numpy", "yaml", "matplotlib"} & set(report["modules"])
    assert [r["rc"] for r in report["results"]] == [0, 0]


def test_every_command_is_listed_with_its_summary():
    from rigl.cli import COMMANDS

    text = build_parser([]).format_help()
    for name, (_, summary) in COMMANDS.items():
        assert name in text and summary.split()[0] in text


# -- item 15: clear errors for bad config files, model options, report --out -----------------
def test_bad_config_files_model_options_and_report_out_give_one_line_errors(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)  # not UTF-8
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("epochs: 3\nlr: [0.1, 0.2\n")
    listed = tmp_path / "list.yaml"
    listed.write_text("- epochs\n- 3\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model: mlp\nmodel_options: {hidden: [8]}\n")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model: cnn1d\nmodel_options: {channels: 2.5}\n")
    a_file = tmp_path / "report.txt"
    a_file.write_text("mine\n")
    run_dir = tmp_path / "somerun"
    run_dir.mkdir()
    out = ["--out", str(tmp_path / "run")]
    report = run_cli(
        ["train", "--config", str(binary), *out],
        ["train", "--config", str(invalid), *out],
        ["train", "--config", str(listed), *out],
        ["train", "--config", str(unknown), *out],
        ["train", "--config", str(wrong), *out],
        ["compare", "--config", str(binary), "--out", str(tmp_path / "cmp")],
        ["report", str(run_dir), "--out", str(a_file)],
    )
    expected = [
        f"config file {str(binary)!r} is not a text file (not UTF-8)",
        f"config file {str(invalid)!r} is not valid YAML: expected ',' or ']', but got "
        "'<stream end>' at line 3, column 1",
        f"config file {str(listed)!r} must hold a mapping of config keys",
        "model_options: 'hidden' is not an option of model 'mlp'; its options: "
        "hidden_sizes (default [256, 256])",
        "model_options.channels=2.5 has the wrong type for model 'cnn1d': expected int; "
        "its options: channels (default 32)",
        f"config file {str(binary)!r} is not a text file",
        f"--out {str(a_file)!r} is a file; give a folder",
    ]
    for result, message in zip(report["results"], expected, strict=True):
        lines = result["err"].strip().splitlines()
        assert result["rc"] == 2 and len(lines) == 1, result
        assert message in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "cmp").exists()
    assert a_file.read_text() == "mine\n"


# -- item 18: a dataset without a config takes its tuned config --------------------------------
def test_compare_with_a_dataset_and_no_config_uses_the_tuned_base(capsys):
    from rigl.experiments.config import ExperimentConfig, load_config
    from rigl.experiments.sweeps.compare import plan_from_args
    from rigl.experiments.sweeps.sweep import find_preset

    args = ["compare", "--dataset", "mnist1d", "--methods", "static,set,rigl",
            "--sparsities", "0.95", "--seeds", "2"]  # fmt: skip
    plan = plan_from_args(build_parser(["compare"]).parse_args(args))
    tuned = load_config(find_preset("mnist1d_mlp"))
    assert plan.base == tuned  # 30 epochs, cosine lr, ΔT 50: the main preset's recipe
    assert plan.base != ExperimentConfig()  # not the generic defaults (10 epochs, constant lr)
    assert "mnist1d_mlp.yaml (tuned for mnist1d" in capsys.readouterr().err
    assert len(plan.runs) == 2 * 4 and {r.sparsity for r in plan.runs} == {0.0, 0.95}


def test_train_with_a_dataset_and_no_config_uses_the_tuned_base_and_flags_win():
    from rigl.experiments.config import load_config
    from rigl.experiments.sweeps.sweep import find_preset
    from rigl.experiments.training.train import config_from_args

    parse = build_parser(["train"]).parse_args
    config = config_from_args(parse(["train", "--dataset", "mnist5k", "--quiet", "--lr", "0.05"]))
    assert config == load_config(find_preset("mnist5k_lenet"), {"lr": 0.05})
    assert config_from_args(parse(["train", "--quiet"])) == load_config(find_preset("mnist1d_mlp"))
    # a dataset without a tuned config keeps the generic defaults
    plain = config_from_args(parse(["train", "--quiet", "--dataset", "fashion_mnist"]))
    assert plain.epochs == 10 and plain.model == "mlp"


def test_every_preset_base_is_the_tuned_config_of_its_dataset():
    from rigl.experiments.configfile import read_mapping
    from rigl.experiments.sweeps.sweep import CONFIG_DIRS, TUNED_CONFIGS, find_preset, tuned_config

    for dataset, name in TUNED_CONFIGS.items():
        assert read_mapping(find_preset(name))["dataset"] == dataset
    presets = {p for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.yaml")}
    bases = [read_mapping(p)["base"] for p in presets if "base" in read_mapping(p)]
    assert bases  # main.yaml, mnist5k.yaml
    for base in bases:  # a preset of the tuned model uses the tuned recipe, not a fork of it
        config = read_mapping(find_preset(Path(base).stem))
        tuned = tuned_config(config["dataset"])
        if read_mapping(tuned).get("model") == config.get("model"):
            assert tuned.name == base
    assert "mnist5k_wrn.yaml" in bases  # another model's recipe (wrn_backends) is its own


# -- item 19: every flag documented; flops help and method names ------------------------------
def test_every_config_flag_has_help_with_its_default_and_choices():
    import dataclasses

    from rigl.experiments.config import ExperimentConfig

    parser = build_parser(["train"])
    train = parser._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(ExperimentConfig):
        action = actions[f.name]
        assert action.help and "(default: " in action.help, f.name
        assert action.metavar != "VALUE", f.name
    assert actions["optimizer"].metavar == "{sgd,adam,adamw}"
    assert "one of: cifar10, fashion_mnist, mnist, mnist1d" in actions["dataset"].help
    assert "default: 0.75" in actions["end_step"].help and "T_end" in actions["end_step"].help
    text = train.format_help()
    assert "VALUE" not in text


def test_flops_help_is_plain_text_and_methods_are_the_registry():
    import rigl
    from rigl.flops_train import TRAIN_METHODS

    report = run_cli(["flops", "--help"], ["flops", "--model", "mlp", "--method", "pruning"])
    text, pruning = report["results"][0]["out"], report["results"][1]
    assert "``" not in text and "::" not in text and "\\\\" not in text  # no RST markup
    assert "rigl flops --model resnet50" in text  # the example keeps its lines
    assert "{" + ",".join(rigl.list_methods()) + "}" in text
    assert pruning["rc"] == 2 and "invalid choice: 'pruning'" in pruning["err"]
    assert set(TRAIN_METHODS) == set(rigl.list_methods())  # one set of names


# -- item 20: tensorboard -------------------------------------------------------------------------
def test_tensorboard_true_without_the_package_names_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    (tmp_path / "data").mkdir()
    config = tiny_run_config(tmp_path, tmp_path / "data", epochs=1)
    args = ["train", "--config", str(config), "--quiet"]
    assert main([*args, "--tensorboard", "true"]) == 2
    err = capsys.readouterr().err
    assert (
        'tensorboard=true, but the tensorboard package is not installed: pip install "rigl[' in err
    )
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir())  # refused before writing anything
    # null (the default): logs where installed, trains without it here
    assert main(args) == 0
    assert (run / "final.json").exists() and not (run / "tb").exists()
