"""How the compressed backend scales: step time and peak memory against width at a fixed
number of active weights, and against active weights at a fixed width.

One square layer ``W x W`` built on the meta device and trained by RigL with the sparse
backend (SGD momentum, batch ``--batch`` of random inputs, MSE to a random target). Each
configuration runs in a fresh subprocess, so its peak resident memory (VmHWM) is its own:

- ``step``: median of ordinary training steps (forward, backward, optimizer step);
- ``grow``: one topology update of the layer, timed apart: exact RigL (the full
  ``W x W`` gradient, scanned in row blocks) and RigL from ``--candidates``x sampled
  candidates (``grow_candidates``); both include drop and the index rebuild;
- memory: resident set before the model exists, peak after the steps, peak after the
  updates.

    python benchmarks/bench_scaling.py [--batch 32] [--threads 2]

writes ``benchmarks/results/scaling.json`` and ``scaling.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see big_sparse.py: shared machine

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

import rigl
from big_sparse import peak_rss_mb, rss_mb
from rigl.topology import update_generator
from stamp import RESULTS, write_result

WIDTHS = (4096, 8192, 16384, 32768, 65536)  # (a), at ACTIVE_A active weights
ACTIVE_A = 1 << 22
WIDTH_B = 16384  # (b), at these active weights
ACTIVES_B = (1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 23)


def one(width: int, n_active: int, batch: int, candidates: float, steps: int) -> dict[str, Any]:
    rss_base = rss_mb()
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(width, width))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    t0 = time.perf_counter()
    sp = rigl.create(
        "rigl", model, opt, sparsity=1 - n_active / width**2, distribution="uniform",
        total_steps=1000, update_interval=100, backend="sparse",
    )  # fmt: skip
    build_s = time.perf_counter() - t0
    weight = sp.weights[0]
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(batch, width, generator=g), torch.randn(batch, width, generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (model(x) - target).square().mean().backward()
        sp.step()

    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step()
        if i >= 2:  # warm-up: kernels loaded, optimizer state created
            times.append(time.perf_counter() - t0)
    peak_steps = peak_rss_mb()
    weight.prepare_step(True)  # an update is due: keep the next backward's inputs
    opt.zero_grad(set_to_none=True)
    (model(x) - target).square().mean().backward()
    grow = {}
    for label, c in (("exact", None), ("sampled", candidates)):  # exact first: its peak
        sp.grow_candidates = c
        t0 = time.perf_counter()
        with torch.no_grad():
            plan = sp.plan_layer(0, weight, 100, update_generator(0, 100, 0))
            weight.install(plan, opt)
        grow[f"{label}_grow_s"] = time.perf_counter() - t0
        grow[f"peak_rss_{label}_mb"] = peak_rss_mb()
    return {
        "width": width,
        "n_active": weight.n_active,
        "density": weight.density,
        "batch": batch,
        "build_s": build_s,
        "step_s": statistics.median(times),
        **grow,
        "grow_candidates": candidates,
        "n_update": math.floor(sp.schedule.fraction(100) * weight.n_active),
        "rss_base_mb": rss_base,
        "peak_rss_steps_mb": peak_steps,
        "dense_sgd_momentum_mb": 3 * 4 * width**2 / 2**20,
    }


def in_subprocess(width: int, n_active: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--one", str(width), str(n_active), "--batch", str(args.batch),
        "--threads", str(args.threads), "--candidates", str(args.candidates),
        "--steps", str(args.steps),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    print(
        f"W={width:>6} active={row['n_active']:>9,}: step {row['step_s'] * 1e3:7.1f} ms, "
        f"exact grow {row['exact_grow_s']:6.2f} s, sampled {row['sampled_grow_s']:5.2f} s, "
        f"peak {row['peak_rss_steps_mb']:.0f}/{row['peak_rss_exact_mb']:.0f}/"
        f"{row['peak_rss_sampled_mb']:.0f} MiB (base {row['rss_base_mb']:.0f})",
        flush=True,
    )
    return row


def markdown(rows_a: list[dict], rows_b: list[dict], args: argparse.Namespace) -> str:
    head = (
        "| width | active | density | step | exact grow | sampled grow | peak RSS above base: "
        "steps / + exact grow / + sampled grow | dense W+grad+momentum |\n"
        "|---|---|---|---|---|---|---|---|"
    )

    def line(r: dict) -> str:
        return (
            f"| {r['width']:,} | {r['n_active']:,} | {r['density']:.2e} | "
            f"{r['step_s'] * 1e3:.0f} ms | {r['exact_grow_s']:.2f} s | {r['sampled_grow_s']:.2f} s"
            f" | {r['peak_rss_steps_mb'] - r['rss_base_mb']:.0f} / "
            f"{r['peak_rss_exact_mb'] - r['rss_base_mb']:.0f} / "
            f"{r['peak_rss_sampled_mb'] - r['rss_base_mb']:.0f} MiB | "
            f"{r['dense_sgd_momentum_mb'] / 1024:.1f} GiB |"
        )

    return "\n".join(
        [
            "# Scaling of the compressed backend",
            "",
            f"One W x W RigL layer, batch {args.batch}, {args.threads} threads, SGD momentum; "
            f"sampled grow from {args.candidates:g}x candidates. Peak RSS is above the "
            "process's resident set before the model was built (torch + kernels).",
            "",
            f"## (a) width at {ACTIVE_A:,} active weights",
            "",
            head,
            *map(line, rows_a),
            "",
            f"## (b) active weights at width {WIDTH_B:,}",
            "",
            head,
            *map(line, rows_b),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--one", nargs=2, type=int, metavar=("WIDTH", "ACTIVE"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        row = one(*args.one, args.batch, args.candidates, args.steps)
        print(json.dumps(row))
        return
    rows_a = [in_subprocess(w, ACTIVE_A, args) for w in WIDTHS]
    rows_b = [in_subprocess(WIDTH_B, n, args) for n in ACTIVES_B]
    payload = {"args": vars(args), "width_at_fixed_active": rows_a, "active_at_fixed_width": rows_b}
    path = write_result("scaling", payload)
    (RESULTS / "scaling.md").write_text(markdown(rows_a, rows_b, args))
    print(f"wrote {path} and scaling.md")


if __name__ == "__main__":
    main()
