"""What a comparison runs: a base config and a list of runs (method x sparsity x seed ...).

A sweep file (``configs/main.yaml``) holds::

    base: mnist1d_mlp.yaml      # a training config: a path (relative to this file) or a mapping
    overrides: {epochs: 20}      # optional changes to the base
    sweep:
      sparsities: [0.9, 0.95]
      seeds: 3                   # a count (0, 1, 2) or a list of seeds
      methods: [static, set, rigl]      # the grid: methods x distributions x multipliers,
      distributions: [erk]              # plus dense once per seed
      multipliers: [1]
      runs:                      # or an explicit list; each entry may set any config key
        - {method: dense}
        - {method: rigl, distribution: uniform}
        - {method: rigl, multiplier: 5}

Dense runs once per seed, not once per sparsity.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rigl.config import ConfigError
from rigl.experiments.config import ExperimentConfig, from_dict
from rigl.experiments.configfile import read_mapping
from rigl.registry import dense_baseline, is_dense, method_label

SWEEP_KEYS = ("sparsities", "seeds", "methods", "distributions", "multipliers", "runs")
CONFIG_DIRS = (
    Path.cwd() / "configs",
    Path(__file__).resolve().parents[4] / "configs",  # the repository's configs/ (editable install)
    Path(__file__).resolve().parents[2] / "configs",  # configs shipped inside the package
)


@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep."""

    method: str
    sparsity: float
    distribution: str
    seed: int
    multiplier: float = 1.0
    extra: tuple[tuple[str, Any], ...] = ()  # other config keys of this run

    @property
    def name(self) -> str:
        """Run folder name, e.g. ``rigl-erk-s0.9-1x-seed0`` or ``dense-1x-seed0``."""
        mult = f"{self.multiplier:g}x"
        extra = "".join(f"-{k}={v}" for k, v in self.extra)
        if self.sparsity == 0:
            return f"{self.method}-{mult}{extra}-seed{self.seed}"
        return f"{self.method}-{self.distribution}-s{self.sparsity:g}-{mult}{extra}-seed{self.seed}"

    def row(self, show_distribution: bool) -> str:
        """Row label of the results table: ``RigL``, ``RigL 5x``, ``RigL (uniform)``."""
        extra = dict(self.extra)
        rule = extra.pop("width_rule", "fixed")
        label = method_label(self.method)
        if rule == "small_dense":
            label = "Small-Dense"
        elif rule == "big_sparse":
            label = f"Big-Sparse {label}"
        if self.multiplier != 1:
            label += f" {self.multiplier:g}x"
        if show_distribution and not is_dense(self.method):
            label += f" ({'ERK' if self.distribution == 'erk' else self.distribution})"
        label += "".join(f" {k}={v}" for k, v in extra.items())
        return label

    def config(self, base: ExperimentConfig, out: Path) -> ExperimentConfig:
        return base.replace(
            method=self.method,
            sparsity=self.sparsity,
            distribution=self.distribution,
            seed=self.seed,
            multiplier=self.multiplier,
            out=str(out / "runs" / self.name),
            **dict(self.extra),
        )


@dataclass
class Sweep:
    base: ExperimentConfig
    runs: list[RunSpec] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)  # the sweep section, resolved

    @property
    def sparsities(self) -> list[float]:
        return sorted({r.sparsity for r in self.runs if r.sparsity > 0})


def find_preset(name: str) -> Path:
    """``configs/<name>.yaml`` from the working directory, the repository or the package."""
    for folder in CONFIG_DIRS:
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    available = sorted({p.stem for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(f"preset={name!r} not found; available: {', '.join(available) or 'none'}")


# dataset -> its tuned training config in configs/, the base its presets use (a test
# checks that a preset of the same dataset and model uses it as its base; a preset of
# another model, e.g. wrn_backends's WRN on mnist5k, has that model's own config)
TUNED_CONFIGS = {
    "mnist1d": "mnist1d_mlp",
    "mnist5k": "mnist5k_lenet",
    "cifar10": "cifar10_wrn22_2",
    "pydoc": "pydoc_char_gpt",
}


def tuned_config(dataset: str) -> Path | None:
    """``configs/<name>.yaml`` tuned for ``dataset``, or None when it has none."""
    name = TUNED_CONFIGS.get(dataset)
    return find_preset(name) if name else None


def tuned_base(overrides: Mapping[str, Any], *, quiet: bool = False) -> Path | None:
    """The base config of a command given no config file: the tuned config of the dataset
    in ``overrides`` (or of the default dataset), announced on stderr unless ``quiet``.
    Generic defaults train far below the tuned recipe (MNIST-1D dense: 62% against 86%)."""
    dataset = overrides.get("dataset", ExperimentConfig.__dataclass_fields__["dataset"].default)
    path = tuned_config(dataset) if isinstance(dataset, str) else None
    if path is not None and not quiet and os.environ.get("RANK", "0") == "0":
        print(f"base config: {path} (tuned for {dataset}; --config FILE for another)",
              file=sys.stderr)  # fmt: skip
    return path


def read_sweep_file(path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base config mapping, sweep section) of a sweep file or of a plain training config."""
    if path is None:
        return {}, {}
    data = read_mapping(path)
    if "sweep" not in data and "base" not in data:
        return data, {}  # a plain training config used as the base
    unknown = set(data) - {"base", "overrides", "sweep"}
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)} in sweep file {str(path)!r}; "
                          "allowed: base, overrides, sweep")  # fmt: skip
    base = data.get("base", {})
    if isinstance(base, str):
        base = read_mapping(Path(path).parent / base)
    sweep = data.get("sweep", {}) or {}
    bad = set(sweep) - set(SWEEP_KEYS)
    if bad:
        raise ConfigError(
            f"unknown sweep key(s) {sorted(bad)} in {str(path)!r}; allowed: {SWEEP_KEYS}"
        )
    return {**base, **(data.get("overrides") or {})}, dict(sweep)


def expand(base: ExperimentConfig, settings: Mapping[str, Any]) -> Sweep:
    """The list of runs of a sweep section (see the module docstring)."""
    sparsities = [float(s) for s in settings.get("sparsities", [base.sparsity])]
    seeds = settings.get("seeds", 1)
    seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    entries = settings.get("runs")
    if entries is None:
        methods = settings.get("methods", ["static", "set", "rigl"])
        dense = dense_baseline()
        entries = [{"method": dense}] if not any(map(is_dense, methods)) else []
        entries += [
            {"method": m, "distribution": d, "multiplier": float(x)}
            for m in methods
            for d in settings.get("distributions", [base.distribution])
            for x in settings.get("multipliers", [1])
            if not (is_dense(m) and x != 1)
        ]
    runs: list[RunSpec] = []
    for entry in entries:
        runs += _entry_runs(base, dict(entry), sparsities, seeds)
    unique = list(dict.fromkeys(runs))  # dense listed under several distributions runs once
    resolved = {"sparsities": sparsities, "seeds": seeds, "runs": [dict(e) for e in entries]}
    return Sweep(base, unique, resolved)


def _entry_runs(
    base: ExperimentConfig, entry: dict[str, Any], sparsities: list[float], seeds: list[int]
) -> list[RunSpec]:
    if "method" not in entry:
        raise ConfigError(f"sweep run {entry!r} has no 'method'")
    method = entry.pop("method")
    distribution = entry.pop("distribution", base.distribution)
    multiplier = float(entry.pop("multiplier", 1.0))
    levels = [float(s) for s in entry.pop("sparsities", sparsities)]
    if is_dense(method) and entry.get("width_rule") != "small_dense":
        levels, distribution = [0.0], base.distribution  # dense: once per seed
    extra = tuple(sorted(entry.items()))
    runs = [
        RunSpec(method, s, distribution, seed, multiplier, extra) for s in levels for seed in seeds
    ]
    for run in runs[:1]:  # validate the keys and values of this entry once, before any training
        from_dict({**base.to_dict(), "method": method, "distribution": distribution,
                   "sparsity": run.sparsity, "multiplier": multiplier, **dict(extra)},
                  source=f"sweep run {run.name}")  # fmt: skip
    return runs
