"""Cost of a RigL topology update on the compressed backend, amortised over ΔT steps.

Cases (as in ``bench_sparse_kernels.py``): ``layer``, one 4096x4096 linear layer with an
input that needs its gradient; ``mlp``, three 4096-wide layers with ReLUs; batch 128,
uniform densities 0.1 / 0.05 / 0.01, every layer ``SparseLinear`` through
``rigl.create("rigl", ..., backend="sparse")``, SGD with Nesterov momentum.

Timed side by side in one process, alternating, median over repeats after warm-up:

- ``step``: one sparse training step (zero_grad, forward, backward, optimizer step);
- ``update``: the extra work of an update step, ``Sparsifier._update_topology`` (the grow
  scores ``|dy^T x|`` block by block, drop, blockwise top-k, new indices, optimizer state
  moved), at the first update (α = 0.3); of it, ``gradient`` is the GEMMs alone.

Reported: ``update / (ΔT * step)``, the fraction an update adds to the steps it is
amortised over (target: at most 5% at ΔT = 100), beside the floor any exact RigL update
has in multiply-adds: the dense gradient (one dense product) over ΔT sparse steps (three
products at the density), ``1 / (3 * density * ΔT)``, 3.3% at density 0.1 but 33% at
0.01. ``sampled update``: RigL with ``grow_candidates`` (the gradient only at that many
random candidates per grown weight; an approximation for layers too large to scan). With
``--masked`` the masked backend's update of the same layers is timed too, for reference.

    python benchmarks/bench_sparse_update.py [--threads 2] [--repeats 9] [--masked]
    python benchmarks/bench_sparse_update.py --threads 1 --clock thread --name sparse_update_1thread

On a shared, oversubscribed machine 2-thread wall-clock times are inflated unevenly;
``--threads 1 --clock thread`` measures CPU time of the one working thread instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import rigl
from rigl.blockwise import row_blocks
from stamp import threads_and_clock, write_result

WIDTH, BATCH, INTERVAL, TARGET = 4096, 128, 100, 0.05
DENSITIES = (0.1, 0.05, 0.01)
CASES = {"layer": 1, "mlp": 3}
CLOCK = time.perf_counter  # --clock thread: CPU time of this thread (with --threads 1)


def build(n_layers: int, density: float, backend: str, grow_candidates: float | None = None):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [nn.ReLU()] if i else []
        layers.append(nn.Linear(WIDTH, WIDTH))
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(
        model.parameters(), lr=1e-6, momentum=0.9, nesterov=True
    )  # tiny: no blow-up
    sp = rigl.create(
        "rigl",
        model,
        opt,
        sparsity=1.0 - density,
        distribution="uniform",
        total_steps=100 * INTERVAL,
        update_interval=INTERVAL,
        backend=backend,
        grow_candidates=grow_candidates,
    )
    sp._guard.remove()  # the benchmark times bare optimizer steps on purpose
    return model, opt, sp


def closures(
    case: str, density: float, backend: str, grow_candidates: float | None = None
) -> dict[str, Callable[[], None]]:
    model, opt, sp = build(CASES[case], density, backend, grow_candidates)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, WIDTH, generator=gen).requires_grad_(case == "layer")
    dy = torch.randn(BATCH, WIDTH, generator=gen)

    def backward(keep: bool) -> None:
        for w in sp.weights:
            w.prepare_step(keep)  # what the sparsifier does before an update step
        opt.zero_grad()
        x.grad = None
        model(x).backward(dy)

    def step() -> None:
        backward(False)
        opt.step()

    def update() -> None:
        backward(True)  # untimed: the update step's own forward/backward
        start = CLOCK()
        assert sp._update_topology(INTERVAL)
        return CLOCK() - start

    def gradient() -> None:
        backward(True)
        start = CLOCK()
        for w in sp.weights:
            for r0, r1 in row_blocks(w.rows, w.grid.block_rows):
                w.gradient_rows(r0, r1).abs()
        return CLOCK() - start

    assert sp.schedule.fraction(INTERVAL) > 0.29
    return {"step": step, "update": update, "gradient": gradient}


def time_alternating(fns: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median ms; a closure returning a float reports its own (partial) time."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats + 2):
        for name, fn in fns.items():
            start = CLOCK()
            own = fn()
            if i >= 2:  # warm-up
                times[name].append(own if own is not None else CLOCK() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def measure(case: str, density: float, repeats: int, masked: bool, sampled: float) -> dict:
    fns = closures(case, density, "sparse")
    if masked:
        fns["masked_update"] = closures(case, density, "masked")["update"]
    if sampled:
        fns["sampled_update"] = closures(case, density, "sparse", sampled)["update"]
    ms = time_alternating(fns, repeats)
    row = {"case": case, "density": density, **{f"{k}_ms": v for k, v in ms.items()}}
    row["update_over_step"] = ms["update"] / ms["step"]
    row["amortised_fraction"] = ms["update"] / (INTERVAL * ms["step"])
    row["gradient_share_of_update"] = ms["gradient"] / ms["update"]
    # the floor of an exact update: the dense gradient's multiply-adds over the sparse
    # step's (3 products at the density), as in the paper's FLOPs count of RigL
    row["dense_gradient_flops_fraction"] = 1 / (3 * density * INTERVAL)
    if sampled:
        row["sampled_amortised_fraction"] = ms["sampled_update"] / (INTERVAL * ms["step"])
    print(
        f"{case:<6} d={density:<5} step {ms['step']:7.1f} ms  update {ms['update']:7.1f} ms "
        f"(gradient {ms['gradient']:6.1f})  amortised {100 * row['amortised_fraction']:5.2f}%"
        + (f"  masked update {ms['masked_update']:7.1f} ms" if masked else "")
        + (f"  sampled update {ms['sampled_update']:7.1f} ms" if sampled else ""),
        file=sys.stderr,
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--masked", action="store_true", help="also time the masked update")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument(
        "--sampled",
        type=float,
        default=10.0,
        help="also time RigL's sampled grow from this many candidates per grown weight "
        "(grow_candidates; 0: off)",
    )
    parser.add_argument("--name", default="sparse_update", help="results file name")
    args = parser.parse_args()
    global CLOCK
    CLOCK = threads_and_clock(parser, args)
    rows = [
        measure(case, density, args.repeats, args.masked, args.sampled)
        for case in CASES
        for density in DENSITIES
    ]
    setup = {"width": WIDTH, "batch": BATCH, "interval": INTERVAL, "drop_fraction": 0.3}
    setup |= {"optimizer": "SGD nesterov", "repeats": args.repeats, "clock": args.clock}
    setup |= {"sampled_grow_candidates": args.sampled or None}
    table = [
        f"{'case':<6} {'density':>7} {'step ms':>8} {'update ms':>9} {'amortised':>9} "
        f"{'gradient FLOPs floor':>20}" + (f" {'sampled grow':>12}" if args.sampled else "")
    ]
    table += [
        f"{r['case']:<6} {r['density']:>7} {r['step_ms']:>8.1f} {r['update_ms']:>9.1f} "
        f"{100 * r['amortised_fraction']:>8.2f}% "
        f"{100 * r['dense_gradient_flops_fraction']:>19.2f}%"
        + (f" {100 * r['sampled_amortised_fraction']:>11.2f}%" if args.sampled else "")
        for r in rows
    ]
    print("\n".join(table))
    payload = {"setup": setup, "target_amortised_fraction": TARGET, "rows": rows, "table": table}
    print(f"wrote {write_result(args.name, payload)}")


if __name__ == "__main__":
    main()
