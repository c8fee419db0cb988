"""The character-level GPT on the compressed backend against the dense model, one run.

One training step (forward, backward, optimizer step through the sparsifier) of
``CharGPT`` (pre-LayerNorm, tied embeddings) at d_model 512, 2 blocks, context 128 and
batch 32 (4,096 characters per step), 2 threads: dense PyTorch, RigL on the masked
backend, and RigL on the compressed backend (``backend="sparse"``: every block projection
is a ``SparseLinear``; the tied embedding and readout stay dense) at each sparsity (ERK).
Ordinary steps are timed (the median after warm-up, the variants interleaved round by
round so that a noisy neighbour hits them all); one topology update is timed apart and
reported amortised over ΔT = 100. Then a short training run of each backend on the
``pydoc`` corpus (same seeds, same batches) compares bits per character.

Every variant runs with glibc told to reuse big blocks (``--allocator reuse``, see
``stamp.reuse_big_allocations``): otherwise each activation of 32 MiB or more (the MLP's,
at these sizes) page-faults anew on every step, in dense and compressed steps alike.

    python benchmarks/bench_char_gpt_backends.py [--threads 2] [--sparsities 0.9 0.98]
        [--allocator reuse|default]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F

import rigl
from rigl.experiments.data.datasets import load_dataset
from rigl.experiments.models.char_gpt import CharGPT
from stamp import reuse_big_allocations, threads_and_clock, write_result

VOCAB = 103


def build(d_model: int, n_layer: int, context: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return CharGPT(VOCAB, context, d_model, n_layer, n_head=8, mlp_ratio=4)


def variant(kind: str, sparsity: float, d_model: int, args: argparse.Namespace, *,
            seed: int = 0, update_at: int, total_steps: int):  # fmt: skip
    """(model, optimizer, sparsifier or None) for 'dense', 'masked' or 'sparse'; RigL's
    updates start at step ``update_at`` and come every ``update_at`` steps."""
    model = build(d_model, args.n_layer, args.context, seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    if kind == "dense":
        return model, opt, None
    sp = rigl.create(
        "rigl", model, opt, sparsity=sparsity, distribution="erk", backend=kind, seed=seed,
        total_steps=total_steps, update_interval=update_at, end_step=0.75,
    )  # fmt: skip
    return model, opt, sp


def one_step(model, opt, sp, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1)).backward()
    if sp is None:
        opt.step()
    else:
        sp.step()


def time_steps(variants: dict, x, y, clock, rounds: int) -> dict[str, list[float]]:
    """Seconds of every step per variant, the variants interleaved round by round."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, (model, opt, sp) in variants.items():
            t0 = clock()
            one_step(model, opt, sp, x, y)
            times[name].append(clock() - t0)
    return times


def short_run(kind: str, sparsity: float, args: argparse.Namespace, seed: int) -> float:
    """Test bits per character after ``args.train_steps`` steps on the pydoc corpus
    (d_model 64, batch 16, ΔT 25; the same batches for both backends)."""
    data = load_dataset("pydoc", seq_len=args.context)
    xs, ys = data.train.tensors
    xt, yt = data.test.tensors
    model, opt, sp = variant(
        kind, sparsity, 64, args, seed=seed, update_at=25, total_steps=args.train_steps
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.train_steps):
        i = torch.randint(0, len(xs), (16,), generator=gen)
        one_step(model, opt, sp, xs[i], ys[i])
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(xt).reshape(-1, VOCAB), yt.reshape(-1)).item()
    return loss / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98])
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--n_layer", type=int, default=2)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--update_interval", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--train_steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="char_gpt_backends")
    parser.add_argument(
        "--allocator", choices=("reuse", "default"), default="reuse",
        help="reuse: glibc keeps big blocks for reuse (stamp.reuse_big_allocations), for "
        "every variant alike; default: glibc as it comes (a fresh mmap per block >= 32 MiB)",
    )  # fmt: skip
    args = parser.parse_args()
    clock = threads_and_clock(parser, args)
    args.allocator_set = args.allocator == "reuse" and reuse_big_allocations()
    if args.allocator == "reuse" and not args.allocator_set:
        print("glibc refused the allocator settings: timing with the default allocator")

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (args.batch, args.context), generator=gen)
    y = torch.randint(0, VOCAB, (args.batch, args.context), generator=gen)
    # every sparse variant updates its topology once, on the last round (step `rounds - 1`)
    last = args.warmup + args.rounds
    made = {"update_at": last, "total_steps": 10 * last}
    variants = {"dense": variant("dense", 0.0, args.d_model, args, **made)}
    for s in args.sparsities:
        for kind in ("masked", "sparse"):
            variants[f"{kind}_{s:g}"] = variant(kind, s, args.d_model, args, **made)
    times = time_steps(variants, x, y, clock, last + 1)
    step = {k: statistics.median(v[args.warmup : last]) for k, v in times.items()}
    rows = []
    for name, seconds in step.items():
        sp = variants[name][2]
        if sp is not None and sp.update_count != 1:
            raise RuntimeError(f"{name}: {sp.update_count} topology updates, expected 1")
        update = None if sp is None else times[name][last]
        row = {
            "variant": name,
            "step_ms": 1000 * seconds,
            "speedup_vs_dense": step["dense"] / seconds,
            "update_step_ms": None if update is None else 1000 * update,
            "update_amortised_pct": (
                None if update is None else 100 * update / (args.update_interval * seconds)
            ),
        }
        rows.append(row)
        print(
            f"{name:>12}: step {row['step_ms']:8.1f} ms  {row['speedup_vs_dense']:5.2f}x dense"
            + ("" if update is None else f"  update step {row['update_step_ms']:.0f} ms "
               f"({row['update_amortised_pct']:.1f}% amortised over ΔT={args.update_interval})"),
            flush=True,
        )  # fmt: skip

    accuracy = []
    for s in args.sparsities:
        for kind in ("masked", "sparse"):
            bpc = [short_run(kind, s, args, seed) for seed in args.seeds]
            accuracy.append(
                {"sparsity": s, "backend": kind, "test_bpc": bpc,
                 "mean": statistics.mean(bpc), "std": statistics.stdev(bpc)}
            )  # fmt: skip
            print(f"{kind:>6} {s:g}: test bpc {statistics.mean(bpc):.3f} ± "
                  f"{statistics.stdev(bpc):.3f} over seeds {args.seeds}", flush=True)  # fmt: skip
    path = write_result(args.name, {"args": vars(args), "steps": rows, "short_runs": accuracy})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
