"""The experiment configuration: one typed, validated dataclass with every default.

A config file (YAML or JSON) is a flat mapping of these fields; command-line flags
``--key value`` override it. Everything is checked before any data is loaded or any
step is taken: an unknown key, a wrong type, a bad value or a missing data folder
raises :class:`rigl.ConfigError` naming the key (or path), the value and what is allowed.

Training length: ``steps`` (if set) or ``epochs`` times the batches per epoch, all
multiplied by ``multiplier`` (the paper's "RigL 2x / 5x"). The multiplier stretches
every point of the schedule given as an absolute step (``end_step``, ``lr_milestones``,
``begin_step``); fractions of training stretch by themselves. ΔT (``update_interval``)
is a frequency and is not stretched, as in the paper's extended runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rigl.errors import ConfigError, check_real
from rigl.experiments.configfile import check_type, read_mapping
from rigl.experiments.flags import choices_of, setting
from rigl.registry import dense_baseline, is_dense

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "step", "cosine")
WIDTH_RULES = ("fixed", "small_dense", "big_sparse")
AUGMENTS = ("none", "crop_flip")
SYNONYMS = {  # names an unknown key probably meant: the paper's symbols, common spellings
    "learning_rate": "lr",
    "delta_t": "update_interval",
    "alpha": "drop_fraction",
    "t_end": "end_step",
    "wd": "weight_decay",
    "batch": "batch_size",
    "distribution_type": "distribution",
}
DISTRIBUTIONS = ("uniform", "er", "erk")
DECAYS = ("cosine", "linear", "constant")
BACKENDS = ("masked", "sparse")


@dataclass
class ExperimentConfig:
    """Everything that decides one training run (defaults: a quick MNIST-1D MLP; a
    dataset's tuned config, ``configs/*.yaml``, sets most keys for real runs)."""

    # -- data ------------------------------------------------------------------------
    dataset: str = setting("mnist1d", "dataset", "rigl.experiments.data.datasets:list_datasets")
    data_root: str | None = setting(
        None, "folder of the dataset files (null: $RIGL_DATA_DIR, else ~/.cache/rigl)"
    )
    dataset_options: dict[str, Any] = setting(
        {}, "the dataset's own options, e.g. {num_samples: 8000}; all take train_size, test_size"
    )
    augment: str = setting(
        "none", "crop_flip: random crops of the 4-pixel-padded image, horizontal flips", AUGMENTS
    )
    # -- model -----------------------------------------------------------------------
    model: str = setting("mlp", "model", "rigl.experiments.models.zoo:list_models")
    width: float = setting(1.0, "multiplier of the model's hidden widths")
    width_rule: str = setting(
        "fixed",
        "small_dense: a dense net with the sparse one's parameter count; big_sparse: a "
        "sparse net with the dense one's FLOPs (widths from rigl.flops solvers)",
        WIDTH_RULES,
    )
    model_options: dict[str, Any] = setting(
        {}, "the model's own options, e.g. {hidden_sizes: [256, 256]} for mlp"
    )
    # -- sparsity (arguments of rigl.create) ----------------------------------------
    method: str = setting("rigl", "sparse-training method", "rigl.registry:list_methods")
    sparsity: float = setting(0.9, "S: fraction of the sparsified weights that are zero, [0, 1)")
    distribution: str = setting("erk", "how the sparsity is spread over the layers", DISTRIBUTIONS)
    first_layer_dense: bool = setting(False, "keep the first sparsifiable layer dense")
    last_layer_dense: bool = setting(False, "keep the last sparsifiable layer dense")
    pattern: str = setting(
        "unstructured", 'mask structure: unstructured, fanin, N:M (e.g. "2:4"), block:RxC'
    )
    update_interval: int = setting(100, "ΔT: steps between topology updates")
    end_step: int | float = setting(
        0.75, "T_end: last topology update, a step (int) or a fraction of training (float)"
    )
    drop_fraction: float = setting(0.3, "α: fraction of active weights replaced at first")
    decay: str = setting("cosine", "f_decay: how the drop fraction decays until T_end", DECAYS)
    method_options: dict[str, Any] = setting(
        {}, "other keyword arguments of rigl.create, e.g. {grow_candidates: 10}"
    )
    backend: str = setting(
        "masked",
        "sparse: Linear layers as compressed SparseLinear (methods that start sparse)",
        BACKENDS,
    )
    # -- optimisation ----------------------------------------------------------------
    optimizer: str = setting("sgd", "optimizer", OPTIMIZERS)
    lr: float = setting(0.1, "learning rate (the peak, after warm-up)")
    momentum: float = setting(0.9, "SGD momentum (SGD only)")
    nesterov: bool = setting(True, "Nesterov momentum (SGD only)")
    weight_decay: float = setting(0.0, "L2 weight decay")
    lr_schedule: str = setting(
        "constant",
        "step: times lr_gamma at each of lr_milestones; cosine: to 0 at the end",
        LR_SCHEDULES,
    )
    lr_milestones: list[int | float] = setting(
        [], "steps (ints) or fractions of training (floats) of the step schedule"
    )
    lr_gamma: float = setting(0.1, "factor of the step schedule at each milestone")
    warmup_steps: int = setting(0, "steps of linear learning-rate warm-up")
    batch_size: int = setting(128, "global batch size (under torchrun: split over the ranks)")
    epochs: int = setting(10, "training length in epochs, unless steps is set")
    steps: int | None = setting(None, "training length in optimizer steps at 1x (wins over epochs)")
    multiplier: float = setting(
        1.0, "training-length multiplier (the paper's 2x, 5x); stretches absolute steps"
    )
    seed: int = setting(0, "seed of the weights, masks, data order and tie-breaks")
    # -- bookkeeping -----------------------------------------------------------------
    eval_every: int = setting(1, "epochs between test-set evaluations (and the last epoch)")
    log_every: int = setting(10, "steps between rows of metrics.csv")
    checkpoint_every: int = setting(0, "steps between checkpoints (0: only at the end)")
    parallel: str = setting(
        "ddp",
        "under torchrun: ddp (every rank holds the model) or fsdp (fully_shard: every rank "
        "holds its rows of each layer; the methods that declare supports_sharding; backend "
        "masked)",
        ("ddp", "fsdp"),
    )
    check_consistency_every: int = setting(
        0, "under torchrun: compare the masks across ranks every N updates (0: never)"
    )
    recorders: list[str] = setting(
        ["topology"],
        "logs: topology (topology.csv), dynamics (what rigl report draws)",
        "rigl.experiments.training.callbacks:list_recorders",
    )
    tensorboard: bool | None = setting(
        None,
        'scalars under <out>/tb: true (needs pip install "rigl[tensorboard]"), false, or '
        "null: where the tensorboard package is installed",
    )
    out: str = setting("runs/default", "run folder")
    device: str = setting("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_type(f.name, getattr(self, f.name), hints[f.name]))
        self._check_values()

    def _check_values(self) -> None:
        import rigl
        from rigl.experiments.models.zoo import check_options

        for f in dataclasses.fields(self):  # names from a fixed set or a registry
            allowed = choices_of(f)
            if allowed is not None:
                value = getattr(self, f.name)
                for item in value if isinstance(value, list) else [value]:
                    _choice(f.name, item, allowed)
        check_options(self.model, self.model_options)
        if self.backend == "sparse" and not rigl.get_method(self.method).supports_sparse_backend:
            runs = [m for m in rigl.list_methods() if rigl.get_method(m).supports_sparse_backend]
            raise ConfigError(
                f"backend='sparse' with method={self.method!r}: the compressed backend runs "
                f"{', '.join(runs)} (the others keep dense state); use backend: masked"
            )
        if self.parallel == "fsdp":
            from rigl.fsdp import check_method

            check_method(self.method, self.backend)
            others = [name for name in self.recorders if name != "topology"]
            if others:
                raise ConfigError(
                    f"recorders {others} read whole masks on rank 0, and with parallel: fsdp "
                    "each rank holds only its rows; use recorders: [topology] (--recorders "
                    "'[topology]')"
                )
        if "backend" in self.method_options:
            raise ConfigError("method_options.backend: set the backend with the key 'backend'")
        _range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        _range("drop_fraction", self.drop_fraction, 0.0, 1.0)
        _range("momentum", self.momentum, 0.0, 1.0, high_open=True)
        for name in ("width", "lr", "multiplier", "lr_gamma"):
            _positive(name, getattr(self, name))
        for name in ("update_interval", "batch_size", "epochs", "log_every", "eval_every"):
            _positive(name, getattr(self, name))
        for name in ("weight_decay", "checkpoint_every", "warmup_steps", "seed"):
            _range(name, getattr(self, name), 0.0, float("inf"))
        _range("check_consistency_every", self.check_consistency_every, 0.0, float("inf"))
        if self.steps is not None:
            _positive("steps", self.steps)
        _step_or_fraction("end_step", self.end_step)
        for i, milestone in enumerate(self.lr_milestones):
            _step_or_fraction(f"lr_milestones[{i}]", milestone)
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise ConfigError(
                f"data_root={self.data_root!r}: no such folder (put the dataset files there, "
                "or leave data_root unset for the loader's default location)"
            )
        small_dense = self.width_rule == "small_dense"
        if small_dense != is_dense(self.method) and self.width_rule != "fixed":
            raise ConfigError(
                f"width_rule={self.width_rule!r} with method={self.method!r}: Small-Dense "
                f"trains method {dense_baseline()!r} at the parameter count of `sparsity`; "
                "Big-Sparse trains a sparse method"
            )
        if self.width_rule != "fixed" and self.sparsity == 0:
            raise ConfigError(
                f"width_rule={self.width_rule!r} needs sparsity > 0: the width is solved to "
                "match a sparse network's parameters (small_dense) or a dense one's FLOPs "
                "(big_sparse)"
            )

    # -- derived quantities ------------------------------------------------------------
    def scaled_step(self, value: int | float) -> int | float:
        """An absolute step of the 1x schedule, stretched by ``multiplier``."""
        if isinstance(value, float):
            return value
        return round(value * self.multiplier)

    def total_steps(self, steps_per_epoch: int) -> int:
        base = self.steps if self.steps is not None else self.epochs * steps_per_epoch
        return max(1, round(base * self.multiplier))

    # -- round trips ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def replace(self, **changes: Any) -> ExperimentConfig:
        return from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> None:
        from rigl.experiments.runio import atomic_write_text

        text = self.to_json() if str(path).endswith(".json") else self.to_yaml()
        atomic_write_text(path, text)


# -- building configs -------------------------------------------------------------------
def from_dict(data: Mapping[str, Any], *, source: str = "config") -> ExperimentConfig:
    """Validated config from a mapping; unknown keys are an error naming them."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must be a mapping of config keys, got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(ExperimentConfig)]
    for key in data:
        if key not in known:
            close = (
                [SYNONYMS[key]]
                if key in SYNONYMS
                else difflib.get_close_matches(str(key), known, n=1)
            )
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r} in {source}{hint}; allowed: {', '.join(known)}")
    return ExperimentConfig(**data)


def load_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Defaults, then the file at ``path``, then ``overrides`` (command-line flags win)."""
    data = read_mapping(path) if path is not None else {}
    source = f"config file {str(path)!r}" if path is not None else "config"
    from_dict(data, source=source)  # name the file in errors that come from it
    return from_dict({**data, **(overrides or {})}, source="command-line overrides")


# -- value checks -------------------------------------------------------------------------
def _choice(name: str, value: str, allowed: typing.Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is unknown; allowed: {', '.join(allowed)}")


def _range(name: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    check_real(value, name, low=low, high=high, high_open=high_open)  # NaN and inf refused


def _positive(name: str, value: float) -> None:
    check_real(value, name, low=0.0, low_open=True)


def _step_or_fraction(name: str, value: int | float) -> None:
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ConfigError(
            f"{name}={value!r}: a float is a fraction of training and must be in [0, 1]; "
            "write an int for an absolute step"
        )
    if value < 0:
        raise ConfigError(f"{name}={value!r} must be >= 0")
