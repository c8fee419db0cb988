"""Training step of the condensed (constant fan-in, N:M) layer against our unstructured
compressed layer and dense PyTorch (issue 14, item 6).

One step = forward + both backward products (dx and dW) + an SGD step, batch 128:

- ``layer``: one 4096x4096 linear layer (the input requires grad, so dx is computed);
- ``mlp``: a 3-layer MLP 4096-4096-4096-4096 with ReLUs, every layer sparse at the same
  density (the first layer computes no dx, as in real training).

Methods, timed round-robin in one process (median over repeats after warm-up), so that
every ratio is measured side by side: dense ``nn.Linear`` (MKL); ``unstructured``:
``SparseLinear`` (CSR, compiled kernels) with the same number of active weights at
uniformly random positions; ``fanin``: ``CondensedLinear`` with ``k = round(density * in)``
inputs in every row (compiled kernels). Then 2:4 (``CondensedLinear(nm="2:4")``, k = in/2)
against dense, with the unstructured layer at density 0.5 beside it.

Targets of the issue, checked in the printed table: at density 0.1 the fan-in step is
>= 1.3x faster than the unstructured step and >= 6x faster than dense; 2:4 is at least as
fast as dense on the CPU.

    python benchmarks/bench_condensed.py [--threads 2] [--repeats 11]
    python benchmarks/bench_condensed.py --quick   # tiny sizes: checks that it runs

Results: ``benchmarks/results/condensed.{json,md}`` (``--quick`` writes to a temporary
folder instead, so the committed figures are never replaced by tiny-size ones).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rigl.sparse import CondensedLinear, SparseLinear, kernels

DENSITIES = (0.3, 0.1, 0.05, 0.01)
SIZE = {"width": 4096, "batch": 128, "depth": 3}
QUICK = {"width": 256, "batch": 16, "depth": 3}
TARGETS = {"fanin_vs_unstructured": 1.3, "fanin_vs_dense": 6.0, "two_four_vs_dense": 1.0}
CLOCK = time.perf_counter


def make_layer(method: str, width: int, density: float, gen: torch.Generator) -> nn.Module:
    """One ``width x width`` layer: dense, unstructured (CSR), fan-in or 2:4 (condensed)."""
    dense = nn.Linear(width, width)
    if method == "dense":
        return dense
    if method == "two_four":
        layer = CondensedLinear(width, width, nm="2:4", generator=gen)
    else:
        layer = CondensedLinear(width, width, density=density, generator=gen)
    if method == "unstructured":  # the same active count, at uniformly random positions
        flat = torch.randperm(width * width, generator=gen)[: layer.n_active]
        mask = torch.zeros(width * width, dtype=torch.bool)
        mask[flat] = True
        layer = SparseLinear.from_dense(dense, mask.reshape(width, width))
    layer.kernels = "cpp"
    return layer


def build(method: str, density: float, n_layers: int, width: int) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    mods: list[nn.Module] = []
    for i in range(n_layers):
        mods += ([] if i == 0 else [nn.ReLU()]) + [make_layer(method, width, density, gen)]
    return nn.Sequential(*mods)


def step_fn(model: nn.Module, x_grad: bool, width: int, batch: int) -> Callable[[], None]:
    """forward + backward + SGD step on fixed data."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, width, generator=gen).requires_grad_(x_grad)
    dy = torch.randn(batch, width, generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x.grad = None
        model(x).backward(dy)
        opt.step()

    return step


def time_round_robin(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median milliseconds per method, the methods interleaved in every repeat."""
    for fn in steps.values():  # warm-up: kernels loaded, caches and allocator settled
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = CLOCK()
            fn()
            times[name].append(CLOCK() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def run(size: dict, densities, repeats: int) -> dict:
    out: dict = {}
    cases = (("layer", 1), ("mlp", size["depth"]))
    for case, n_layers in cases:
        out[case] = {}
        for density in densities:
            steps = {
                m: step_fn(
                    build(m, density, n_layers, size["width"]),
                    case == "layer",
                    size["width"],
                    size["batch"],
                )
                for m in ("dense", "unstructured", "fanin")
            }
            out[case][str(density)] = time_round_robin(steps, repeats)
            print(f"  {case} d={density}: {out[case][str(density)]}", file=sys.stderr, flush=True)
        steps = {
            m: step_fn(
                build(m, 0.5, n_layers, size["width"]),
                case == "layer",
                size["width"],
                size["batch"],
            )
            for m in ("dense", "unstructured", "two_four")
        }
        out[case]["2:4"] = time_round_robin(steps, repeats)
        print(f"  {case} 2:4: {out[case]['2:4']}", file=sys.stderr, flush=True)
    return out


def table(timing: dict) -> list[str]:
    lines = []
    for case, rows in timing.items():
        lines += [
            f"\n**{case}**: median ms per step (forward + backward + SGD); speed-ups",
            "",
            "| density | dense ms | unstructured ms | fan-in ms | fan-in vs unstructured | fan-in vs dense | unstructured vs dense |",
            "|---|---|---|---|---|---|---|",
        ]
        for d, t in rows.items():
            if d == "2:4":
                continue
            lines.append(
                f"| {d} | {t['dense']:.1f} | {t['unstructured']:.1f} | {t['fanin']:.1f} | "
                f"{t['unstructured'] / t['fanin']:.2f}x | {t['dense'] / t['fanin']:.2f}x | "
                f"{t['dense'] / t['unstructured']:.2f}x |"
            )
        t = rows["2:4"]
        lines.append(
            f"\n2:4 (condensed, k = in/2): {t['two_four']:.1f} ms, dense {t['dense']:.1f} ms "
            f"({t['dense'] / t['two_four']:.2f}x); unstructured at 0.5: {t['unstructured']:.1f} ms"
        )
    return lines


def targets(timing: dict) -> list[str]:
    """The issue's targets, measured on the single layer."""
    lines = ["\ntargets (single layer):"]
    t = timing["layer"].get("0.1")
    if t is not None:
        for name, ratio in (
            ("fanin_vs_unstructured", t["unstructured"] / t["fanin"]),
            ("fanin_vs_dense", t["dense"] / t["fanin"]),
        ):
            mark = "met" if ratio >= TARGETS[name] else "NOT met"
            lines.append(f"  {name} at 0.1: {ratio:.2f}x (target >= {TARGETS[name]}x): {mark}")
    t = timing["layer"]["2:4"]
    ratio = t["dense"] / t["two_four"]
    mark = "met" if ratio >= TARGETS["two_four_vs_dense"] else "NOT met"
    lines.append(f"  two_four_vs_dense: {ratio:.2f}x (target >= 1.0x): {mark}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES))
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, results to a temp dir")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stamp

    global CLOCK
    CLOCK = stamp.threads_and_clock(parser, args)
    if kernels.extension() is None:
        parser.error("the compiled rigl.sparse kernels did not build: nothing to compare")
    size, repeats = (QUICK, 3) if args.quick else (SIZE, args.repeats)
    densities = [0.1] if args.quick else args.densities
    print(f"threads={args.threads}, {size}, repeats={repeats}", flush=True)
    timing = run(size, densities, repeats)
    lines = table(timing) + targets(timing)
    print("\n".join(lines))
    if args.quick:
        stamp.RESULTS = Path(tempfile.mkdtemp(prefix="rigl_bench_condensed_"))
    meta = stamp.stamp()
    path = stamp.write_result(
        "condensed",
        {
            "setup": {**size, "repeats": repeats, "clock": args.clock, "quick": args.quick},
            "step": "forward + dx + dW + SGD step",
            "times_ms": timing,
            "targets": TARGETS,
            "table": lines,
        },
    )
    header = (
        f"# Condensed (fan-in, 2:4) vs unstructured vs dense\n\n{size['width']}-wide, batch "
        f"{size['batch']}, {meta['threads']} threads, git {meta['git']}, torch {meta['torch']}, "
        f"{meta['cpu']}, {meta['date']}.\n"
    )
    path.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
