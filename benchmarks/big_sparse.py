"""Big-Sparse beyond memory: RigL trains an MLP whose dense form cannot exist on this machine.

The model is built on the ``meta`` device (shapes only) and ``backend="sparse"`` creates
every Linear layer directly as a ``SparseLinear`` from its ERK active count, so no tensor
of a layer's dense shape is ever allocated. Beside it, the Small-Dense baseline (a dense
MLP of the same depth with the same number of parameters) is trained the same way. Each
run is a fresh subprocess, so its peak resident memory (VmHWM) is its own.

    python benchmarks/big_sparse.py --config configs/big_sparse.yaml

writes ``benchmarks/results/big_sparse.json`` and ``.md``. Also timed, in its own
subprocess: one exact RigL grow step of the largest layer (the full ``out x in``
gradient, scanned in blocks) against the sampled-candidate grow that the run uses.

``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads: on a machine shared with other
jobs, spinning OpenMP threads get descheduled at every barrier and a 2-thread sort of
55K numbers takes 0.3 s instead of 2 ms.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import rigl
from rigl.experiments.configfile import read_mapping
from rigl.experiments.data.datasets import load_dataset
from rigl.experiments.models.zoo import MLP
from rigl.experiments.training.batches import epoch_order, iterate_batches
from rigl.topology import update_generator
from stamp import RESULTS, stamp, write_result


@dataclasses.dataclass(frozen=True)
class BigSparseConfig:
    """One Big-Sparse experiment (``configs/big_sparse.yaml``); every default is here."""

    dataset: str = "mnist5k"
    hidden: tuple[int, ...] = (65536, 65536)
    sparsity: float = 0.999
    distribution: str = "erk"
    method: str = "rigl"
    grow_candidates: float | None = 10.0  # None: exact RigL
    sparse_init: str = "fan_in"  # "fan_in": values * sqrt(numel / n_active); "dense": as nn.Linear
    batch_size: int = 100
    epochs: int = 6
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    update_interval: int = 50
    end_step: float = 0.75
    drop_fraction: float = 0.3
    seed: int = 0
    threads: int = 2
    small_dense: bool = True
    exact_grow_probe: bool = True

    @classmethod
    def load(cls, path: str | Path) -> BigSparseConfig:
        data = read_mapping(path)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SystemExit(f"{path}: unknown keys {unknown}; allowed: {sorted(known)}")
        if "hidden" in data:
            data["hidden"] = tuple(data["hidden"])
        return cls(**data)


# -- memory ------------------------------------------------------------------------------------
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM), MiB."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    return _status_mb("VmRSS")


# -- models ------------------------------------------------------------------------------------
def meta_mlp(n_in: int, hidden: tuple[int, ...], n_out: int) -> nn.Module:
    with torch.device("meta"):
        return MLP(n_in, list(hidden), n_out)


def sparse_kwargs(cfg: BigSparseConfig, total_steps: int) -> dict[str, Any]:
    extra = {"grow_candidates": cfg.grow_candidates} if cfg.method == "rigl" else {}
    return dict(
        sparsity=cfg.sparsity,
        distribution=cfg.distribution,
        total_steps=total_steps,
        update_interval=cfg.update_interval,
        end_step=cfg.end_step,
        drop_fraction=cfg.drop_fraction,
        seed=cfg.seed,
        backend="sparse",
        **extra,
    )


def rescale_to_active_fan_in(sparsifier: rigl.Sparsifier) -> None:
    """Multiply each layer's values by ``1/sqrt(density)``: a unit with ``d * in`` inputs
    then starts with the output variance a dense unit has (nn.Linear's bound assumes all
    ``in`` inputs; at density 0.0006 the signal would shrink ~40x per layer)."""
    with torch.no_grad():
        for w in sparsifier.weights:
            w.param.mul_(1.0 / math.sqrt(w.density))


def small_dense_hidden(cfg: BigSparseConfig, n_in: int, n_out: int, params: int) -> tuple:
    """Hidden sizes of the dense MLP of the same depth with ``params`` parameters."""

    def build(width: float) -> nn.Module:
        return MLP(n_in, [max(1, round(h * width)) for h in cfg.hidden], n_out)

    width = rigl.small_dense_width(build, params, lo=1e-4, hi=1.0, tol=1e-7)
    return tuple(max(1, round(h * width)) for h in cfg.hidden)


def dense_bytes(n_params: int) -> dict[str, float]:
    """GiB for weights + gradients + optimizer state of a dense model of ``n_params``."""
    gib = 4 * n_params / 2**30
    return {"sgd_momentum_gib": 3 * gib, "adam_gib": 4 * gib}


# -- training ----------------------------------------------------------------------------------
def lr_at(cfg: BigSparseConfig, step: int, total: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * step / total))


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, batch: int) -> float:
    """Test accuracy, in training-sized batches (activations are batch x width)."""
    x, y = dataset.tensors
    correct = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(y), batch)
    )
    return correct / len(y)


def train(
    cfg: BigSparseConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: rigl.Sparsifier | None,
    data: Any,
) -> dict[str, Any]:
    """SGD with warm-up + cosine learning rate; times every step (updates apart)."""
    steps_per_epoch = len(data.train) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    step_times, update_times, losses = [], [], []
    start = time.perf_counter()
    step = 0
    for epoch in range(cfg.epochs):
        order = epoch_order(cfg.seed, epoch, len(data.train))
        for x, y in iterate_batches(data.train, order, cfg.batch_size, 0, steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step, total)
            t0 = time.perf_counter()
            updates = sparsifier.update_count if sparsifier is not None else 0
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            (sparsifier or optimizer).step()
            dt = time.perf_counter() - t0
            updated = sparsifier is not None and sparsifier.update_count > updates
            (update_times if updated else step_times).append(dt)
            losses.append(loss.item())
            step += 1
        print(f"  epoch {epoch + 1}/{cfg.epochs}: loss {statistics.mean(losses[-20:]):.3f} "
              f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    train_s = time.perf_counter() - start
    return {
        "steps": total,
        "train_s": train_s,
        "step_s_median": statistics.median(step_times),
        "update_step_s_mean": statistics.mean(update_times) if update_times else None,
        "n_updates": len(update_times),
        "final_train_loss": statistics.mean(losses[-steps_per_epoch:]),
        "test_accuracy": evaluate(model, data.test, cfg.batch_size),
    }


# -- the three runs ----------------------------------------------------------------------------
def run_big_sparse(cfg: BigSparseConfig) -> dict[str, Any]:
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    n_in, n_out = math.prod(data.input_shape), data.num_classes
    rss_before = rss_mb()
    torch.manual_seed(cfg.seed)
    model = meta_mlp(n_in, cfg.hidden, n_out)
    densities = rigl.layer_densities(model, cfg.sparsity, cfg.distribution)
    flops = rigl.count_flops(model, torch.zeros(1, n_in, device="meta"), densities)
    size = rigl.model_size(model, densities)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )  # fmt: skip
    total = len(data.train) // cfg.batch_size * cfg.epochs
    t0 = time.perf_counter()
    sparsifier = rigl.create(cfg.method, model, optimizer, **sparse_kwargs(cfg, total))
    build_s = time.perf_counter() - t0
    if cfg.sparse_init == "fan_in":
        rescale_to_active_fan_in(sparsifier)
    print(sparsifier.summary_table(), file=sys.stderr, flush=True)
    metrics = train(cfg, model, optimizer, sparsifier, data)
    return {
        "name": "Big-Sparse (RigL)",
        "hidden": list(cfg.hidden),
        "layers": [dataclasses.asdict(s) for s in sparsifier.summary()],
        "params_dense": size.params,
        "params_active": size.active_params,
        "dense_equivalent": dense_bytes(size.params),
        "flops_per_example": flops.flops_sparse,
        "build_s": build_s,
        **metrics,
        "rss_before_model_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_small_dense(cfg: BigSparseConfig) -> dict[str, Any]:
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    n_in, n_out = math.prod(data.input_shape), data.num_classes
    big = meta_mlp(n_in, cfg.hidden, n_out)
    target = rigl.model_size(big, rigl.layer_densities(big, cfg.sparsity, cfg.distribution))
    hidden = small_dense_hidden(cfg, n_in, n_out, target.active_params)
    rss_before = rss_mb()
    torch.manual_seed(cfg.seed)
    model = MLP(n_in, list(hidden), n_out)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )  # fmt: skip
    flops = rigl.count_flops(model, torch.zeros(1, n_in))
    metrics = train(cfg, model, optimizer, None, data)
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "name": "Small-Dense",
        "hidden": list(hidden),
        "params_dense": n_params,
        "params_active": n_params,
        "dense_equivalent": dense_bytes(n_params),
        "flops_per_example": flops.flops_dense,
        **metrics,
        "rss_before_model_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_exact_grow_probe(cfg: BigSparseConfig) -> dict[str, Any]:
    """One RigL grow step of the largest layer on one batch: exact (the full gradient,
    scanned in blocks of rows) and from sampled candidates, timed separately."""
    data = load_dataset(cfg.dataset, seed=cfg.seed)
    n_in, n_out = math.prod(data.input_shape), data.num_classes
    model = meta_mlp(n_in, cfg.hidden, n_out)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    kwargs = {**sparse_kwargs(cfg, 1000), "grow_candidates": None, "method": "rigl"}
    sparsifier = rigl.create(kwargs.pop("method"), model, optimizer, **kwargs)
    x, y = data.train.tensors[0][: cfg.batch_size], data.train.tensors[1][: cfg.batch_size]
    for w in sparsifier.weights:
        w.prepare_step(True)  # keep this backward's inputs for the grow scores
    F.cross_entropy(model(x), y).backward()
    index = max(range(len(sparsifier.weights)), key=lambda i: sparsifier.weights[i].numel)
    weight = sparsifier.weights[index]
    step = cfg.update_interval
    result: dict[str, Any] = {"layer": weight.name, "shape": list(weight.shape)}
    result["n_active"] = weight.n_active
    result["n_update"] = math.floor(sparsifier.schedule.fraction(step) * weight.n_active)
    result["rss_before_grow_mb"] = rss_mb()
    for label, candidates in (("exact", None), ("sampled", cfg.grow_candidates or 10.0)):
        sparsifier.grow_candidates = candidates
        t0 = time.perf_counter()
        with torch.no_grad():
            plan = sparsifier.plan_layer(index, weight, step, update_generator(0, step, index))
        result[f"{label}_grow_s"] = time.perf_counter() - t0
        result[f"{label}_candidates"] = candidates
        result[f"{label}_peak_rss_mb"] = peak_rss_mb()  # the exact grow's peak comes first
        print(f"  {label} grow: {result[f'{label}_grow_s']:.1f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    weight.install(plan, optimizer)
    result["set_topology_s"] = time.perf_counter() - t0
    result["gradient_macs"] = weight.numel * cfg.batch_size
    result["peak_rss_mb"] = peak_rss_mb()
    return result


RUNS = {
    "big_sparse": run_big_sparse,
    "small_dense": run_small_dense,
    "exact_grow": run_exact_grow_probe,
}


# -- driver ------------------------------------------------------------------------------------
def in_subprocess(config: Path, run: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--config", str(config), "--run", run, "--json", out.name]
        print(f"[{run}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(Path(out.name).read_text())


def markdown(cfg: BigSparseConfig, runs: dict[str, dict[str, Any]]) -> str:
    meta = stamp()
    lines = [
        "# Big-Sparse beyond memory",
        "",
        f"{cfg.dataset}, MLP {'-'.join(map(str, cfg.hidden))}, {cfg.method} {cfg.distribution} "
        f"sparsity {cfg.sparsity}, "
        + (
            "exact growth"
            if cfg.grow_candidates is None
            else f"grow_candidates {cfg.grow_candidates}"
        )
        + f", batch "
        f"{cfg.batch_size}, {cfg.epochs} epochs; git {meta['git']}, torch {meta['torch']}, "
        f"{meta['threads']} threads, {meta['cpu']}.",
        "",
        "| model | hidden | params (active) | dense form: weights+grads+SGD-m / +Adam | "
        "peak RSS | median step | update step | train time | test acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("big_sparse", "small_dense"):
        r = runs.get(key)
        if r is None:
            continue
        d = r["dense_equivalent"]
        lines.append(
            f"| {r['name']} | {'-'.join(map(str, r['hidden']))} | {r['params_active']:,} | "
            f"{d['sgd_momentum_gib']:.1f} / {d['adam_gib']:.1f} GiB | "
            f"{r['peak_rss_mb'] / 1024:.2f} GiB | {r['step_s_median'] * 1000:.0f} ms | "
            + (f"{r['update_step_s_mean']:.1f} s" if r["update_step_s_mean"] else "-")
            + f" | {r['train_s']:.0f} s | {100 * r['test_accuracy']:.1f}% |"
        )
    probe = runs.get("exact_grow")
    if probe is not None:
        lines += [
            "",
            f"One grow step of {probe['layer']} ({'x'.join(map(str, probe['shape']))}, "
            f"{probe['n_active']:,} active, {probe['n_update']:,} grown): exact RigL "
            f"{probe['exact_grow_s']:.1f} s ({probe['gradient_macs']:.2e} multiply-adds for "
            f"the dense gradient), sampled from {probe['sampled_candidates']:g}x candidates "
            f"{probe['sampled_grow_s']:.2f} s; peak RSS of that process: before the grow "
            f"{probe['rss_before_grow_mb'] / 1024:.2f} GiB, after the exact grow "
            f"{probe['exact_peak_rss_mb'] / 1024:.2f} GiB, after the sampled one "
            f"{probe['sampled_peak_rss_mb'] / 1024:.2f} GiB.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/big_sparse.yaml"))
    parser.add_argument("--run", choices=sorted(RUNS), help="one run, in this process")
    parser.add_argument("--json", type=Path, help="with --run: write its result here")
    parser.add_argument("--name", default="big_sparse", help="result file name")
    args = parser.parse_args()
    cfg = BigSparseConfig.load(args.config)
    torch.set_num_threads(cfg.threads)
    if args.run:
        result = RUNS[args.run](cfg)
        text = json.dumps(result, indent=2)
        args.json.write_text(text) if args.json else print(text)
        return
    wanted = ["big_sparse"] + ["small_dense"] * cfg.small_dense
    wanted += ["exact_grow"] * cfg.exact_grow_probe
    runs = {run: in_subprocess(args.config, run) for run in wanted}
    path = write_result(args.name, {"config": dataclasses.asdict(cfg), "runs": runs})
    (RESULTS / f"{args.name}.md").write_text(markdown(cfg, runs))
    print(f"wrote {path} and {args.name}.md")


if __name__ == "__main__":
    main()
