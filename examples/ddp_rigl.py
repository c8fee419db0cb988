"""RigL with DistributedDataParallel, in a plain training loop.

    torchrun --nproc-per-node 2 examples/ddp_rigl.py        # 2 processes (gloo on CPU, NCCL on GPUs)
    python examples/ddp_rigl.py                              # the same run in one process

Every rank draws the same global batch order and trains on its slice of each batch; DDP
averages the gradients, so the ranks take identical topology updates (no extra
communication) and the run matches the single-process one up to float rounding. On a GPU,
`--amp` adds fp16 autocast with a GradScaler: `sparsifier.step(scaler=scaler)` skips the
steps the scaler skips.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import rigl
from rigl import distributed


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, x[:, :4].argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over ranks")
    parser.add_argument("--amp", action="store_true", help="fp16 autocast + GradScaler (CUDA)")
    args = parser.parse_args()

    env = distributed.init_from_env()  # reads torchrun's RANK, WORLD_SIZE, ...; no-op otherwise
    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts rank 0's)
    model = nn.Sequential(
        nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)
    ).to(env.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sparsifier = rigl.create(
        "rigl", model, optimizer, sparsity=0.9, total_steps=args.steps, update_interval=25
    )  # on the unwrapped model, with the same seed on every rank
    ddp_model = distributed.wrap_model(model, env)
    distributed.sync_sparsifier(sparsifier)  # catches (and fixes) a per-rank seed
    distributed.add_consistency_check(sparsifier, every=4, weights=True)  # cheap insurance

    use_amp = args.amp and env.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    x, y = synthetic(args.steps * args.batch_size, seed=1)
    for t in range(args.steps):
        xb = distributed.shard(x[t * args.batch_size : (t + 1) * args.batch_size], env)
        yb = distributed.shard(y[t * args.batch_size : (t + 1) * args.batch_size], env)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(env.device.type, dtype=torch.float16, enabled=use_amp):
            loss = F.cross_entropy(ddp_model(xb.to(env.device)), yb.to(env.device))
        scaler.scale(loss).backward()  # DDP all-reduces the gradients here
        sparsifier.step(scaler=scaler)  # after the synced backward
        if t % 100 == 0:
            mean_loss = distributed.all_reduce_mean(loss.detach())
            if env.is_main:
                print(f"step {t}: loss {mean_loss:.4f}")

    distributed.check_consistency(sparsifier, weights=True)
    test_x, test_y = synthetic(2048, seed=2)
    with torch.no_grad():  # the unwrapped model: identical on every rank, no collective
        accuracy = (model(test_x.to(env.device)).argmax(dim=1).cpu() == test_y).float().mean()
    if env.is_main:
        print(sparsifier.summary_table())
        print(
            f"{env.world_size} rank(s), {sparsifier.update_count} topology updates, "
            f"test accuracy {accuracy:.3f}"
        )
    distributed.cleanup()


if __name__ == "__main__":
    main()
