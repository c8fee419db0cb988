"""Small-Dense against Big-Sparse at equal active parameters (the RigL paper's Big-Sparse
comparison, here at equal parameters rather than equal FLOPs).

A dense MLP 784-H-H-10 (``--base``, H = 256 by default) sets the parameter budget; RigL
(ERK, exact growth, the sparse backend) trains MLPs of widths 2H, 4H, ... with the sparsity
at which they have the same number of active parameters (biases included). Every run
uses the recipe of ``benchmarks/big_sparse.py`` (``BigSparseConfig``: SGD Nesterov,
warm-up + cosine learning rate, values scaled to the active fan-in) for ``--epochs``.

    python benchmarks/bench_equal_params.py [--seeds 3] [--epochs 10]

writes ``benchmarks/results/equal_params.json`` and ``equal_params.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see big_sparse.py: shared machine

import argparse
import dataclasses
import math
import statistics
from typing import Any

import torch

import rigl
from big_sparse import BigSparseConfig, meta_mlp, rescale_to_active_fan_in, sparse_kwargs, train
from rigl.experiments.data.datasets import load_dataset
from rigl.experiments.models.zoo import MLP
from stamp import RESULTS, write_result


def active_params(cfg: BigSparseConfig, n_in: int, n_out: int, sparsity: float) -> int:
    model = meta_mlp(n_in, cfg.hidden, n_out)
    if sparsity == 0.0:
        return rigl.model_size(model).active_params
    return rigl.model_size(model, rigl.layer_densities(model, sparsity, "erk")).active_params


def sparsity_for(cfg: BigSparseConfig, n_in: int, n_out: int, target: int) -> float:
    """The ERK sparsity at which ``cfg.hidden`` has ``target`` active parameters."""
    lo, hi = 0.0, 1.0 - 1e-9  # active parameters fall as the sparsity rises
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if active_params(cfg, n_in, n_out, mid) > target else (lo, mid)
    return hi


def one_run(cfg: BigSparseConfig, data: Any, sparse: bool) -> dict[str, Any]:
    n_in, n_out = math.prod(data.input_shape), data.num_classes
    torch.manual_seed(cfg.seed)
    model = meta_mlp(n_in, cfg.hidden, n_out) if sparse else MLP(n_in, list(cfg.hidden), n_out)
    densities = rigl.layer_densities(model, cfg.sparsity, "erk") if sparse else {}
    x = torch.zeros(1, n_in, device="meta" if sparse else "cpu")
    flops = rigl.count_flops(model, x, densities)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )  # fmt: skip
    sparsifier = None
    if sparse:
        total = len(data.train) // cfg.batch_size * cfg.epochs
        sparsifier = rigl.create("rigl", model, optimizer, **sparse_kwargs(cfg, total))
        rescale_to_active_fan_in(sparsifier)
    metrics = train(cfg, model, optimizer, sparsifier, data)
    size = rigl.model_size(meta_mlp(n_in, cfg.hidden, n_out), densities)
    return {"flops_per_example": flops.flops_sparse, "params_active": size.active_params,
            "hidden_density": densities.get("hidden.2.weight", 1.0), **metrics}  # fmt: skip


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# Small-Dense vs Big-Sparse at equal active parameters",
        "",
        f"MNIST-5k (4,000 train / 1,000 test), MLP 784-W-W-10, {args.epochs} epochs, batch "
        f"100, seeds {args.seeds}; W = {args.base} dense (Small-Dense), wider ones RigL ERK "
        "(exact growth, sparse backend). Accuracy: mean ± std over seeds.",
        "",
        "| width | model | sparsity | W-W density | active params | FLOPs/example | "
        "median step | train time | test acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = [100 * a for a in r["test_accuracy"]]
        spread = f" ± {statistics.stdev(acc):.1f}" if len(acc) > 1 else ""
        lines.append(
            f"| {r['width']:,} | {r['model']} | {r['sparsity']:.4f} | {r['hidden_density']:.4f} "
            f"| {r['params_active']:,} | {r['flops_per_example'] / 1e6:.2f} M | "
            f"{1e3 * r['step_s_median']:.1f} ms | {r['train_s']:.0f} s | "
            f"{statistics.mean(acc):.2f}{spread}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=256)
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = BigSparseConfig(hidden=(args.base, args.base), epochs=args.epochs, grow_candidates=None)
    data = load_dataset(base.dataset, seed=0)
    n_in, n_out = math.prod(data.input_shape), data.num_classes
    budget = active_params(base, n_in, n_out, 0.0)
    rows = []
    for factor in args.factors:
        width = args.base * factor
        cfg = dataclasses.replace(base, hidden=(width, width))
        sparsity = 0.0 if factor == 1 else sparsity_for(cfg, n_in, n_out, budget)
        cfg = dataclasses.replace(cfg, sparsity=sparsity)
        runs = []
        for seed in range(args.seeds):
            runs.append(one_run(dataclasses.replace(cfg, seed=seed), data, sparse=factor > 1))
            print(f"W={width} seed {seed}: {100 * runs[-1]['test_accuracy']:.2f}%", flush=True)
        rows.append({
            "width": width, "model": "Small-Dense" if factor == 1 else "RigL",
            "sparsity": sparsity, "runs": runs,
            **{k: runs[0][k] for k in ("params_active", "flops_per_example", "hidden_density")},
            "test_accuracy": [r["test_accuracy"] for r in runs],
            "step_s_median": statistics.median(r["step_s_median"] for r in runs),
            "train_s": statistics.mean(r["train_s"] for r in runs),
        })  # fmt: skip
    path = write_result("equal_params", {"args": vars(args), "budget": budget, "rows": rows})
    (RESULTS / "equal_params.md").write_text(markdown(rows, args))
    print(f"wrote {path} and equal_params.md")


if __name__ == "__main__":
    main()
