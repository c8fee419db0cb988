"""Training step of rigl.sparse.SparseConv2d against dense PyTorch (oneDNN) and SparseProp.

- ``layer``: one 3x3 convolution (stride 1, padding 1, no bias) shaped like the CIFAR stages
  of WRN-22-2 / ResNet-18: 64->64 at 32x32, 128->128 at 16x16, 256->256 at 8x8, batch 128.
  One step = forward + backward (dx and dW; the input requires grad) + an SGD step with
  momentum. Densities 0.3 / 0.1 / 0.05 / 0.02.
- ``wrn``: a whole WRN-22-2 training step on CIFAR-shaped data (batch 128: forward, cross
  entropy, backward, ``sparsifier.step()`` = SGD step), uniform 90% and 95% sparsity with
  the first convolution dense as in the paper, backend='sparse' against the dense model
  and the masked backend.

Methods, timed round-robin in one process (median over repeats after warm-up): dense
``nn.Conv2d``; ours with the compiled kernels (``cpp``) and the torch fallback
(``torch``, which densifies: a correctness path, timed for reference); SparseProp's
``SparseConv2d`` (both of its vectorisation variants) when ``sparseprop`` imports. Run it
where SparseProp is installed, its own venv (it builds with ``--no-build-isolation``):

    python3 -m venv .benchvenv && .benchvenv/bin/pip install torch numpy
    .benchvenv/bin/pip install --no-build-isolation sparseprop
    PYTHONPATH=src .benchvenv/bin/python benchmarks/bench_sparse_conv.py [--threads 2] [--repeats 7]
        [--allocator default|reuse]
    python benchmarks/bench_sparse_conv.py --quick      # tiny sizes: does it run?

Memory: bytes of weights + gradients + SGD momentum (+ index buffers for ours) of each
layer after one step, against the dense layer. Results: results/sparse_conv.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

import rigl
from rigl.experiments.models.zoo import build_model
from rigl.sparse import SparseConv2d, kernels

DENSITIES = (0.3, 0.1, 0.05, 0.02)
LAYERS = ((64, 32), (128, 16), (256, 8))  # (channels, height = width)
BATCH = 128
WRN_SPARSITIES = (0.9, 0.95)
METHODS = ("dense", "cpp", "torch", "sparseprop", "sparseprop_on")
CLOCK = time.perf_counter


def conv_layer(method: str, channels: int, density: float, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    dense = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
    if method == "dense":
        return dense
    numel = dense.weight.numel()
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=gen)[: round(density * numel)]] = True
    mask = mask.reshape(dense.weight.shape)
    if method in ("cpp", "torch"):
        layer = SparseConv2d.from_dense(dense, mask)
        layer.kernels = method
        return layer
    from sparseprop.modules import SparseConv2d as SparsePropConv

    weight = (dense.weight * mask).detach()
    return SparsePropConv(weight, padding=1, stride=1, vectorizing_over_on=method.endswith("_on"))


def layer_step(layer: nn.Module, channels: int, size: int, batch: int) -> Callable[[], None]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=gen).requires_grad_()
    dy = torch.randn(batch, channels, size, size, generator=gen)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(dy)
        opt.step()

    return step


def wrn_step(method: str, sparsity: float, batch: int, quick: bool) -> Callable[[], None]:
    """One WRN-22-2 training step: ``method`` dense, masked or sparse (the backend)."""
    torch.manual_seed(0)
    size = 8 if quick else 32
    model = build_model(
        "wrn", num_classes=10, input_shape=(3, size, size), width=0.25 if quick else 1.0
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sp = None
    if method != "dense":
        sp = rigl.create(
            "static", model, opt, sparsity=sparsity, distribution="uniform",
            first_layer_dense=True, backend=method, total_steps=10**6,
        )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        (sp or opt).step()

    return step


def available(method: str) -> str | None:
    try:
        if method == "cpp" and kernels.extension() is None:
            return "C++ kernels failed to build"
        if method.startswith("sparseprop"):
            import sparseprop.modules  # noqa: F401
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


def training_bytes(layer: nn.Module, channels: int) -> int:
    """Weights + gradients + SGD momentum (+ index buffers) after one step (batch 2)."""
    layer_step(layer, channels, 8, 2)()
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3, momentum=0.9)
    opt.step()
    tensors = [*layer.parameters(), *layer.buffers()]
    tensors += [p.grad for p in layer.parameters() if p.grad is not None]
    tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_layers(methods, layers, densities, batch, repeats) -> tuple[dict, dict]:
    from stamp import time_round_robin

    times, memory = {}, {}
    for channels, size in layers:
        case = f"{channels}->{channels} at {size}x{size}"
        times[case], memory[case] = (
            {},
            {"dense_bytes": training_bytes(conv_layer("dense", channels, 1), channels)},
        )
        for density in densities:
            steps = {
                m: layer_step(conv_layer(m, channels, density), channels, size, batch)
                for m in methods
            }
            times[case][str(density)] = time_round_robin(steps, repeats, CLOCK, scale=1e3)
            ours = training_bytes(
                conv_layer("cpp" if "cpp" in methods else "torch", channels, density), channels
            )
            memory[case][str(density)] = ours / memory[case]["dense_bytes"]
            print(f"  {case} d={density}: {times[case][str(density)]}", file=sys.stderr, flush=True)
    return times, memory


def run_wrn(sparsities, batch, repeats, quick: bool) -> dict:
    from stamp import time_round_robin

    out = {}
    for sparsity in sparsities:
        steps = {m: wrn_step(m, sparsity, batch, quick) for m in ("dense", "masked", "sparse")}
        out[str(sparsity)] = time_round_robin(steps, repeats, CLOCK, scale=1e3)
        print(f"  wrn s={sparsity}: {out[str(sparsity)]}", file=sys.stderr, flush=True)
    return out


def tables(layer_times: dict, memory: dict, wrn: dict) -> list[str]:
    def speedup(t: dict, m: str) -> str:
        return f"{t['dense'] / t[m]:.2f}x" if isinstance(t.get(m), float) else "n/a"

    lines = ["layer: speed-up over dense (dense ms); ours / best SparseProp; memory / dense"]
    lines.append(
        "layer | density | dense ms | ours cpp | ours torch | SparseProp (best) | cpp vs SparseProp | memory"
    )
    for case, per_density in layer_times.items():
        for d, t in per_density.items():
            peers = [t[m] for m in ("sparseprop", "sparseprop_on") if isinstance(t.get(m), float)]
            best = min(peers) if peers else None
            peer = f"{t['dense'] / best:.2f}x" if best else "n/a"
            vs = f"{best / t['cpp']:.2f}x" if best and isinstance(t.get("cpp"), float) else "n/a"
            lines.append(
                f"{case} | {d} | {t['dense']:.1f} | {speedup(t, 'cpp')} | {speedup(t, 'torch')} | "
                f"{peer} | {vs} | {memory[case][d]:.3f}"
            )
    lines.append(
        "\nWRN-22-2 training step (uniform, first layer dense): ms and speed-up over dense"
    )
    lines.append("sparsity | dense ms | masked | sparse")
    for s, t in wrn.items():
        lines.append(f"{s} | {t['dense']:.1f} | {speedup(t, 'masked')} | {speedup(t, 'sparse')}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument(
        "--allocator", choices=("default", "reuse"), default="default",
        help="default: glibc as it comes (each block of 32 MiB or more, as the 64->64 layer's "
        "activations, a fresh mmap whose pages fault on first touch, in every method's "
        "outputs); reuse: glibc keeps big blocks for reuse (stamp.reuse_big_allocations), "
        "for every method alike; results/sparse_conv_reuse.json",
    )  # fmt: skip
    args = parser.parse_args()
    from stamp import reuse_big_allocations, threads_and_clock, write_result

    global CLOCK
    CLOCK = threads_and_clock(parser, args)
    if args.allocator == "reuse" and not reuse_big_allocations():
        parser.error("glibc refused the allocator settings (--allocator reuse)")
    skipped = {m: why for m in METHODS if (why := available(m))}
    methods = [m for m in METHODS if m not in skipped]
    layers, densities, batch = LAYERS, DENSITIES, BATCH
    if args.quick:
        layers, densities, batch, args.repeats = ((16, 8),), (0.1,), 4, 1
    print(
        f"threads={args.threads}, batch={batch}, allocator={args.allocator}; "
        f"skipped: {skipped or 'none'}"
    )
    layer_times, memory = run_layers(methods, layers, densities, batch, args.repeats)
    wrn = run_wrn(WRN_SPARSITIES, batch, args.repeats, args.quick)
    lines = tables(layer_times, memory, wrn)
    print("\n".join(lines))
    if args.quick:
        return  # tiny sizes: nothing worth keeping
    path = write_result(
        "sparse_conv"
        + ("_1thread" if args.clock == "thread" else "")
        + ("_reuse" if args.allocator == "reuse" else ""),
        {
            "setup": {
                "layers": layers, "batch": batch, "repeats": args.repeats, "clock": args.clock,
                "allocator": args.allocator,
                "step": "forward + dx + dW + SGD momentum step", "backend": kernels.backend(),
            },
            "skipped": skipped,
            "layer_times_ms": layer_times,
            "memory_ratio": memory,
            "wrn_times_ms": wrn,
            "table": lines,
        },
    )  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
