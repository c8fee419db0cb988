"""The numbers of ``final.json`` (active parameters, FLOPs relative to dense) and the
Small-Dense / Big-Sparse widths, all from ``rigl.flops`` with the paper's conventions."""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import nn

import rigl
from rigl.experiments.config import ExperimentConfig


def make_model(config: ExperimentConfig, data: Any, width: float) -> nn.Module:
    from rigl.experiments.training.builders import make_model as build

    return build(config, data, width)


def solve_width(config: ExperimentConfig, data: Any) -> float:
    """``config.width``, or the Small-Dense / Big-Sparse width solved by ``rigl.flops_size``.

    Small-Dense: the dense model with as many parameters as the sparse model at
    ``config.width``; Big-Sparse: the sparse model with the FLOPs of the dense one.
    """
    if config.width_rule == "fixed":
        return config.width
    from rigl.flops import count_flops
    from rigl.flops_size import big_sparse_width, model_size, small_dense_width

    def build(width: float) -> nn.Module:
        return make_model(config, data, width)

    def densities(model: nn.Module) -> dict[str, float]:
        options = {"first_layer_dense": config.first_layer_dense,
                   "last_layer_dense": config.last_layer_dense,
                   "pattern": config.pattern}  # fmt: skip
        return rigl.layer_densities(model, config.sparsity, config.distribution, **options)

    reference = build(config.width)
    example = data.train[:2][0]
    if config.width_rule == "small_dense":
        target = model_size(reference, densities(reference)).active_params
        return float(small_dense_width(build, target, hi=config.width))
    target = count_flops(reference, example).flops_dense
    return float(
        big_sparse_width(build, example, target, densities, lo=config.width, hi=8 * config.width)
    )


def _dense_equivalent(model: nn.Module) -> nn.Module:
    """``model``, or with backend='sparse' a copy whose SparseLinear and CondensedLinear
    layers are nn.Linear again (zeros at inactive weights): the counters know the dense
    layer types."""
    from rigl.sparse import CondensedLinear, SparseLinear
    from rigl.sparse.convert import to_dense

    if not any(isinstance(m, SparseLinear | CondensedLinear) for m in model.modules()):
        return model
    return to_dense(copy.deepcopy(model))


def bits_per_character(data: Any, test_loss: float | None) -> dict[str, float]:
    """``{"test_bpc": ...}`` for character-level data (its info has a vocabulary): the mean
    cross-entropy in bits, ``loss / ln 2``; nothing for other data."""
    if test_loss is None or "vocab" not in data.info:
        return {}
    return {"test_bpc": test_loss / math.log(2)}


def final_numbers(run: Any) -> dict[str, Any]:
    """Test accuracy, active parameters and FLOPs relative to the dense model."""
    from rigl.flops import count_flops, train_flops_ratio

    config, model = run.config, _dense_equivalent(run.model)
    densities = {s.name: s.density for s in run.sparsifier.summary()}
    example = run.data.test[:2][0].to(run.device)
    report = count_flops(model, example, densities)
    f_reference = report.flops_dense
    if run.width != 1.0:  # relative to the dense model at width 1
        f_reference = count_flops(
            make_model(config, run.data, 1.0).to(run.device), example
        ).flops_dense
    train_ratio = train_flops_ratio(
        config.method,
        report.flops_sparse,
        report.flops_dense,
        update_interval=config.update_interval,
        multiplier=config.multiplier,
        **run.sparsifier.train_flops_facts(),  # the method's own schedule facts
    ) * (report.flops_dense / f_reference)
    n_params = sum(p.numel() for p in model.parameters())
    inactive = sum(w.numel - w.n_active for w in run.sparsifier.weights)
    last = run.last_eval or {}
    return {
        "test_accuracy": last.get("test_accuracy"),
        "test_loss": last.get("test_loss"),
        **bits_per_character(run.data, last.get("test_loss")),
        "train_accuracy": last.get("train_accuracy"),
        "train_loss": last.get("train_loss"),
        "params": n_params - inactive,
        "params_dense": n_params,
        "density": run.density(),
        "inference_flops": report.flops_sparse,
        "dense_inference_flops": f_reference,
        "inference_flops_ratio": report.flops_sparse / f_reference,
        "train_flops_ratio": train_ratio,
        "skipped_updates": run.sparsifier.skipped_updates,
    }
