"""Reading a run folder for the report: config, logs, mask dynamics, densities.

Every file is optional: a run without ``dynamics.csv`` (recorder off) or without a
checkpoint still gives the figures it has data for.
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from rigl.registry import is_dense


@dataclass
class RunData:
    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, str]] = field(default_factory=list)
    dynamics: list[dict[str, str]] = field(default_factory=list)
    lifetimes: list[dict[str, str]] = field(default_factory=list)
    alive: list[dict[str, str]] = field(default_factory=list)
    first_layer: dict[str, np.ndarray] | None = None
    densities: dict[str, float] = field(default_factory=dict)  # {layer: density}
    tag: str = ""  # tells apart runs whose config gives the same label (see unique_labels)

    @property
    def method(self) -> str:
        return str(find_key(self.config, "method") or "?")

    @property
    def distribution(self) -> str:
        return str(find_key(self.config, "distribution") or "?")

    @property
    def sparsity(self) -> float | None:
        value = find_key(self.config, "sparsity")
        return float(value) if isinstance(value, int | float) else None

    @property
    def label(self) -> str:
        """``rigl erk 98%`` from the config (or the folder name), plus :attr:`tag`."""
        return f"{self.base_label} ({self.tag})" if self.tag else self.base_label

    @property
    def base_label(self) -> str:
        if not self.config:
            return self.path.name
        parts = [self.method]
        if not is_dense(self.method):
            parts.append(self.distribution)
            if self.sparsity is not None:
                parts.append(f"{100 * self.sparsity:g}%")
        return " ".join(parts)


def unique_labels(runs: list[RunData]) -> None:
    """Tag runs that share a label: by their training length when that tells them apart
    (a 1x and a 5x run), else by their folder (seeds, other settings)."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        run.tag = ""
        groups.setdefault(run.base_label, []).append(run)
    for same in groups.values():
        if len(same) < 2:
            continue
        steps = [run.final.get("total_steps") for run in same]
        by_steps = None not in steps and len(set(steps)) == len(steps)
        names = [run.path.name for run in same]
        for run, step in zip(same, steps, strict=True):
            if by_steps:
                run.tag = f"{step} steps"
            else:
                run.tag = run.path.name if len(set(names)) == len(names) else str(run.path)


def find_key(data: Any, key: str) -> Any:
    """First value of ``key`` in a nested dict (breadth first), or None."""
    queue = [data]
    while queue:
        item = queue.pop(0)
        if isinstance(item, dict):
            if key in item:
                return item[key]
            queue += [v for v in item.values() if isinstance(v, dict)]
    return None


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def sparsifier_state(checkpoint: dict[str, Any] | None) -> dict[str, Any] | None:
    """The sparsifier's state dict inside a checkpoint (the dict holding ``masks``)."""
    if checkpoint is None:
        return None
    queue = [checkpoint]
    while queue:
        item = queue.pop(0)
        if isinstance(item, dict):
            if "masks" in item and isinstance(item["masks"], dict):
                return item
            queue += [v for v in item.values() if isinstance(v, dict)]
    return None


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model's state dict inside a checkpoint."""
    for key in ("model", "model_state", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ValueError(f"no model state in checkpoint (keys: {sorted(checkpoint)})")


# what a report reads from a run folder (rigl train's files, or a MaskRecorder's alone)
RUN_DATA = ("config.yaml", "final.json", "metrics.csv", "checkpoint.pt", "dynamics.csv",
            "lifetimes.csv", "alive.csv", "first_layer.npz")  # fmt: skip


def load_run(path: str | Path) -> RunData:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run folder {path} does not exist")
    if not any((path / name).exists() for name in RUN_DATA):
        from rigl.config import ConfigError

        raise ConfigError(
            f"{str(path)!r} is not a rigl run folder (none of {', '.join(RUN_DATA)}); give "
            "the folders that rigl train wrote (e.g. results/main/runs/*)"
        )
    run = RunData(path=path)
    if (path / "config.yaml").exists():
        run.config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    if (path / "final.json").exists():
        run.final = json.loads((path / "final.json").read_text(encoding="utf-8"))
    run.metrics = read_rows(path / "metrics.csv")
    run.dynamics = read_rows(path / "dynamics.csv")
    run.lifetimes = read_rows(path / "lifetimes.csv")
    run.alive = read_rows(path / "alive.csv")
    if (path / "first_layer.npz").exists():
        with np.load(path / "first_layer.npz") as data:
            run.first_layer = {k: data[k] for k in data.files}
    run.densities = _densities(run)
    return run


def _densities(run: RunData) -> dict[str, float]:
    """Final per-layer densities: the checkpoint's masks, else the last dynamics rows."""
    try:
        state = sparsifier_state(load_checkpoint(run.path / "checkpoint.pt"))
    except Exception:  # an unreadable checkpoint only costs the density figure
        state = None
    if state is not None:
        return {name: float(m.float().mean()) for name, m in state["masks"].items()}
    last: dict[str, float] = {}
    for row in run.dynamics:
        last[row["layer"]] = float(row["density"])
    return last


# -- derived series -------------------------------------------------------------------------


def column(rows: list[dict[str, str]], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows where both ``x`` and ``y`` are filled, as float arrays."""
    pairs = [
        (r[x], r[y]) for r in rows if r.get(x) not in (None, "") and r.get(y) not in (None, "")
    ]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    arr = np.asarray(pairs, dtype=float)
    return arr[:, 0], arr[:, 1]


def layer_series(run: RunData, y: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{layer: (steps, values)} of a ``dynamics.csv`` column."""
    layers = dict.fromkeys(r["layer"] for r in run.dynamics)
    return {
        name: column([r for r in run.dynamics if r["layer"] == name], "step", y) for name in layers
    }


def survival_curve(run: RunData, origin: str = "grown") -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier survival of connections of ``origin``, pooled over layers.

    Events are drops (``lifetimes.csv``); connections still active at the last record are
    censored at their age then (``alive.csv``). Returns (lifetimes, S(lifetime)) as a
    step function starting at (0, 1).
    """
    events: dict[int, int] = {}
    for r in run.lifetimes:
        if r["origin"] == origin:
            events[int(r["lifetime"])] = events.get(int(r["lifetime"]), 0) + int(r["count"])
    censored: dict[int, int] = {}
    for r in run.alive:
        if r["origin"] == origin:
            age = int(r["step"]) - int(r["birth_step"])
            censored[age] = censored.get(age, 0) + int(r["count"])
    times = sorted(set(events) | set(censored))
    at_risk = sum(events.values()) + sum(censored.values())
    xs, ys, surv = [0.0], [1.0], 1.0
    for t in times:
        d = events.get(t, 0)
        if at_risk > 0 and d:
            surv *= 1.0 - d / at_risk
            xs.append(float(t))
            ys.append(surv)
        at_risk -= d + censored.get(t, 0)
    if times:
        xs.append(float(times[-1]))
        ys.append(surv)
    return np.asarray(xs), np.asarray(ys)


def constant_inputs(config: dict[str, Any]) -> np.ndarray | None:
    """Bool (n_inputs,): input features with one value over the whole training split
    (MNIST's always-blank border pixels), or None when the dataset cannot be loaded."""
    if "dataset" not in config:
        return None
    key = json.dumps(
        [config["dataset"], config.get("data_root"), config.get("dataset_options") or {}],
        sort_keys=True,
    )
    return _constant_inputs(key)


@functools.lru_cache(maxsize=4)
def _constant_inputs(key: str) -> np.ndarray | None:
    from rigl.experiments.data.datasets import load_dataset

    name, root, options = json.loads(key)
    try:
        x = load_dataset(name, root=root, **options).train.tensors[0]
    except Exception:  # no data on this machine: the report just leaves the column out
        return None
    flat = x.reshape(len(x), -1)  # (N, n_inputs)
    return (flat == flat[:1]).all(dim=0).numpy()


def share_on(counts: np.ndarray, where: np.ndarray) -> float:
    """Share of the first layer's connections that sit on the inputs ``where``."""
    total = counts.sum()
    return float(counts[where].sum() / total) if total else float("nan")
