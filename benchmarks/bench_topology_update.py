"""Cost of one topology update as a fraction of a dense training step, amortised over ΔT.

For an MLP (LeNet-300-100 on 784 inputs) and a small conv net (CIFAR-sized), measures
side by side in one process: the dense training step (forward, backward, SGD step) and
one topology update of each method (RigL, SET, SNFS; drop + grow + optimizer-state
reset on every layer), and reports ``update / (ΔT * dense step)``. Target: <= 3%.

    python benchmarks/bench_topology_update.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import rigl
from stamp import write_result


def mlp() -> tuple[nn.Module, torch.Size]:
    model = nn.Sequential(
        nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    return model, torch.Size([784])


def convnet() -> tuple[nn.Module, torch.Size]:
    def block(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
        )

    model = nn.Sequential(
        block(3, 32),
        block(32, 64),
        nn.MaxPool2d(2),
        block(64, 128),
        nn.MaxPool2d(2),
        block(128, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    return model, torch.Size([3, 32, 32])


def median_time(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, build, method: str, batch: int, repeats: int, interval: int) -> dict:
    torch.manual_seed(0)
    model, input_shape = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, *input_shape)
    y = torch.randint(0, 10, (batch,))

    def dense_step() -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    dense = median_time(dense_step, repeats)
    dense_step()  # gradients and optimizer state in place (creating the sparsifier keeps them)
    sparsifier = rigl.create(
        method,
        model,
        optimizer,
        sparsity=0.9,
        distribution="erk",
        total_steps=10_000,
        update_interval=interval,
    )
    sparsifier.observe_gradients()  # SNFS's gradient average, as after any ordinary step
    update = median_time(lambda: sparsifier._update_topology(interval), repeats)
    return {
        "model": name,
        "method": method,
        "batch": batch,
        "dense_step_ms": dense * 1e3,
        "update_ms": update * 1e3,
        "update_over_dense_step": update / dense,
        "amortised_fraction": update / (interval * dense),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--interval", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [
        measure(name, build, method, 128, args.repeats, args.interval)
        for name, build in (("mlp_784_300_100_10", mlp), ("convnet_cifar", convnet))
        for method in ("rigl", "set", "snfs")
    ]
    print(
        f"{'model':<20} {'method':<6} {'dense step':>11} {'update':>9} {'amortised':>10}  (target <= 3%)"
    )
    for r in rows:
        print(
            f"{r['model']:<20} {r['method']:<6} {r['dense_step_ms']:>9.2f}ms {r['update_ms']:>7.2f}ms "
            f"{100 * r['amortised_fraction']:>9.2f}%"
        )
    path = write_result(
        "topology_update",
        {"interval": args.interval, "target_amortised_fraction": 0.03, "rows": rows},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
