"""Cost of one training step of each masked-backend method against the dense step.

SR-STE and Top-KAST re-choose their masks from the dense values after every step (a
top-k of ``|θ|`` over every position, the reserve parked and unparked), so their step
costs more than RigL's, whose topology changes every ΔT steps only. This measures it:
a 4096-4096-10 MLP (16.8M weights in the first layer), batch 128, SGD with momentum,
90% sparsity (ERK), steps between topology updates, methods round-robin in one process,
median after warm-up; the ratio is against the dense step measured beside it.

    python benchmarks/bench_method_step.py [--threads 2] [--repeats 9]

Results: ``benchmarks/results/method_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import rigl

METHODS = ("dense", "rigl", "set", "srste", "topkast")
WIDTH, BATCH = 4096, 128


def step_fn(method: str) -> Callable[[], None]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    stepper = opt
    if method != "dense":
        stepper = rigl.create(method, model, opt, sparsity=0.9, total_steps=10_000)
    x, y = torch.randn(BATCH, WIDTH), torch.randint(0, 10, (BATCH,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        stepper.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import stamp

    clock = stamp.threads_and_clock(parser, args)
    steps = {m: step_fn(m) for m in METHODS}  # two warm-up steps each: no update is timed
    ms = stamp.time_round_robin(steps, args.repeats, clock, scale=1e3)
    if any(isinstance(t, str) for t in ms.values()):
        parser.error(f"a method failed: {ms}")
    lines = ["| method | ms per step | vs dense |", "|---|---:|---:|"]
    lines += [f"| {m} | {ms[m]:.1f} | {ms[m] / ms['dense']:.2f}x |" for m in METHODS]
    print("\n".join(lines))
    meta = stamp.stamp()
    path = stamp.write_result(
        "method_step",
        {"setup": {"width": WIDTH, "batch": BATCH, "repeats": args.repeats}, "ms": ms},
    )
    header = (
        f"# One training step per method (masked backend) vs dense\n\n4096-4096-10 MLP, batch "
        f"{BATCH}, 90% ERK, SGD momentum, {meta['threads']} threads, git {meta['git']}, torch "
        f"{meta['torch']}, {meta['cpu']}, {meta['date']}.\n\n"
    )
    path.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
