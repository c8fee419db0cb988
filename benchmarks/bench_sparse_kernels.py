"""Training step of rigl.sparse.SparseLinear against dense PyTorch and the sparse peers.

One step = forward + both backward products (dx and dW), no optimizer step, batch 128:

- ``layer``: one 4096x4096 linear layer (input requires grad, so dx is computed);
- ``mlp``: a 3-layer MLP 4096-4096-4096-4096 with ReLUs, every layer sparse at the same
  density (the first layer computes no dx, as in real training).

Methods, timed round-robin in one process (median over repeats after warm-up):
dense ``nn.Linear`` (MKL), ours with the compiled kernels (``cpp``), ours with the
torch.sparse fallback (``torch``), SparseProp (``pip install --no-build-isolation
sparseprop``). SparseLab bundles its own OpenMP runtime and needs
``OMP_WAIT_POLICY=PASSIVE``, which would slow everything else, so it runs in a child
process that times dense too; its figures are compared through the ratio to that dense.
Memory: bytes of weights + gradients + Adam state (+ index buffers and kernel scratch for
ours) after one Adam step, against the dense layer.

    python benchmarks/bench_sparse_kernels.py [--threads 2] [--repeats 11]

On a shared, oversubscribed machine wall-clock medians of 2-thread runs are distorted
(OpenMP barriers wait for descheduled threads); ``--threads 1 --clock thread`` measures
per-thread CPU time instead, which is robust to other load (results file
``sparse_kernels_1thread.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from rigl.sparse import SparseLinear, kernels

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.01)
WIDTH, BATCH, DEPTH = 4096, 128, 3


def mask_of(density: float, gen: torch.Generator) -> torch.Tensor:
    numel = WIDTH * WIDTH
    flat = torch.randperm(numel, generator=gen)[: round(density * numel)]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[flat] = True
    return mask.reshape(WIDTH, WIDTH)


def build(method: str, density: float, n_layers: int, seed: int = 0) -> nn.Module | None:
    """``n_layers`` linear layers of width 4096 (ReLU between), or None if unavailable."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(n_layers):
        dense = nn.Linear(WIDTH, WIDTH)
        if method == "dense":
            layers.append(dense)
            continue
        if method == "sparselab":
            import sparselab

            layers.append(sparselab.SparseLinear(WIDTH, WIDTH, sparsity=1.0 - density))
            continue
        mask = mask_of(density, gen)
        if method in ("cpp", "torch"):
            layer = SparseLinear.from_dense(dense, mask)
            layer.kernels = method
            layers.append(layer)
        elif method == "sparseprop":
            from sparseprop.modules import SparseLinear as SparsePropLinear

            with torch.no_grad():
                dense.weight.mul_(mask)
            layers.append(SparsePropLinear.from_dense(dense))
    mods: list[nn.Module] = []
    for i, layer in enumerate(layers):
        mods += [layer] if i == 0 else [nn.ReLU(), layer]
    return nn.Sequential(*mods)


def step_fn(model: nn.Module, x_grad: bool) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, WIDTH, generator=gen).requires_grad_(x_grad)
    dy = torch.randn(BATCH, WIDTH, generator=gen)
    params = list(model.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        model(x).backward(dy)

    return step


def available(method: str) -> str | None:
    """None if the method can run here, else why not."""
    try:
        if method == "cpp" and kernels.extension() is None:
            return "C++ kernels failed to build"
        if method == "sparseprop":
            import sparseprop.modules  # noqa: F401
        if method == "sparselab":
            import sparselab  # noqa: F401
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


CLOCK = time.perf_counter


def run_timings(methods: list[str], repeats: int, densities) -> dict:
    from stamp import time_round_robin

    out: dict = {}
    for case, n_layers in (("layer", 1), ("mlp", DEPTH)):
        out[case] = {}
        for density in densities:
            steps = {}
            for method in methods:
                model = build(method, density, n_layers)
                steps[method] = step_fn(model, x_grad=(case == "layer"))
            med = time_round_robin(steps, repeats, CLOCK)
            out[case][str(density)] = {
                m: t * 1e3 if isinstance(t, float) else t for m, t in med.items()
            }
            print(f"  {case} d={density}: {out[case][str(density)]}", flush=True, file=sys.stderr)
    return out


def training_bytes(model: nn.Module) -> int:
    """Weights + gradients + Adam state (+ buffers) after one Adam step."""
    opt = torch.optim.Adam(model.parameters())
    step_fn(model, x_grad=False)()
    opt.step()
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def memory(densities) -> dict:
    dense = training_bytes(build("dense", 1.0, 1))
    out = {"dense_bytes": dense}
    for density in densities:
        model = build("cpp", density, 1)
        ours = training_bytes(model)
        # Per-step scratch of the fused backward: values in CSC order + partial dW sums.
        scratch = 2 * model[0].n_active * 4
        out[str(density)] = {
            "ours_bytes": ours,
            "scratch_bytes": scratch,
            "ratio": (ours + scratch) / dense,
        }
    return out


def child_sparselab(repeats: int, densities) -> dict:
    env = {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    cmd = [
        sys.executable,
        __file__,
        "--child-sparselab",
        "--repeats",
        str(repeats),
        "--clock",
        "thread" if CLOCK is time.thread_time else "wall",
        "--threads",
        str(torch.get_num_threads()),
        "--densities",
        *map(str, densities),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio_table(timing: dict, sparselab: dict) -> list[str]:
    lines = []
    for case, per_density in timing.items():
        lines.append(f"\n{case}: speed-up over dense (dense ms in brackets); ours/best peer")
        lines.append(
            "density | dense ms | ours cpp | ours torch | SparseProp | SparseLab | cpp vs best peer"
        )
        for d, t in per_density.items():
            dense = t["dense"]
            sp = {m: dense / t[m] for m in t if m != "dense" and isinstance(t[m], float)}
            lab = sparselab.get(case, {}).get(d)
            if lab and isinstance(lab.get("sparselab"), float):
                sp["sparselab"] = lab["dense"] / lab["sparselab"]
            peers = [sp[m] for m in ("sparseprop", "sparselab") if m in sp]
            vs = f"{sp['cpp'] / max(peers):.2f}x" if peers and "cpp" in sp else "n/a"
            cell = {
                m: f"{sp[m]:.2f}x" if m in sp else "n/a"
                for m in ("cpp", "torch", "sparseprop", "sparselab")
            }
            lines.append(
                f"{d} | {dense:.1f} | {cell['cpp']} | {cell['torch']} | {cell['sparseprop']} | {cell['sparselab']} | {vs}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--child-sparselab", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from stamp import threads_and_clock, write_result

    global CLOCK
    CLOCK = threads_and_clock(parser, args)
    if args.child_sparselab:
        print(json.dumps(run_timings(["dense", "sparselab"], args.repeats, args.densities)))
        return

    methods = ["dense", "cpp", "torch", "sparseprop"]
    skipped = {m: why for m in [*methods, "sparselab"] if (why := available(m))}
    methods = [m for m in methods if m not in skipped]
    print(f"threads={args.threads}, batch={BATCH}, width={WIDTH}; skipped: {skipped or 'none'}")
    timing = run_timings(methods, args.repeats, args.densities)
    lab = {} if "sparselab" in skipped else child_sparselab(args.repeats, args.densities)
    if "error" in lab:
        skipped["sparselab"] = lab.pop("error")
    mem = memory(args.densities)
    lines = ratio_table(timing, lab)
    lines.append("\nmemory (weights + grads + Adam + indices + scratch) / dense:")
    lines += [f"  d={d}: {m['ratio']:.3f}" for d, m in mem.items() if d != "dense_bytes"]
    print("\n".join(lines))
    name = "sparse_kernels" + ("_1thread" if args.clock == "thread" else "")
    path = write_result(
        name,
        {
            "setup": {
                "width": WIDTH,
                "batch": BATCH,
                "mlp_layers": DEPTH,
                "repeats": args.repeats,
                "clock": args.clock,
                "step": "forward + dx + dW, no optimizer",
                "backend": kernels.backend(),
            },
            "skipped": skipped,
            "times_ms": timing,
            "sparselab_times_ms (child process, OMP_WAIT_POLICY=PASSIVE)": lab,
            "memory": mem,
            "table": lines,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
