"""RigL on a model sharded with FSDP2 (``fully_shard``), with a DCP checkpoint.

    torchrun --nproc-per-node 2 examples/fsdp_rigl.py       # 2 processes, each holds half the rows

Order: shard the model, then create the optimizer and the sparsifier. Each rank holds
its rows of every weight and of its mask; topology updates agree on the global drop and
grow thresholds with small collectives, so the masks are those of one process with the
same global batch. Halfway, every rank writes its shards with DCP (``rigl.fsdp.save``);
the second half runs on a fresh model loaded from them and ends where the first ran on.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

import rigl
import rigl.fsdp
from rigl import distributed


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, x[:, :4].argmax(dim=1)


def build(steps: int) -> tuple[nn.Module, torch.optim.Optimizer, rigl.Sparsifier]:
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(
        nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4)
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)  # first shard ...
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sparsifier = rigl.create(  # ... then the optimizer and the sparsifier
        "rigl", model, optimizer, sparsity=0.9, total_steps=steps, update_interval=25
    )
    return model, optimizer, sparsifier


def train(model, optimizer, sparsifier, env, data, start: int, stop: int, batch: int) -> None:
    x, y = data
    for t in range(start, stop):
        xb = distributed.shard(x[t * batch : (t + 1) * batch], env)
        yb = distributed.shard(y[t * batch : (t + 1) * batch], env)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()  # FSDP reduce-scatters: each rank gets its rows of the mean gradient
        sparsifier.step()
        if t % 100 == 0:
            mean_loss = distributed.all_reduce_mean(loss.detach())
            if env.is_main:
                print(f"step {t}: loss {mean_loss:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split over ranks")
    args = parser.parse_args()

    env = distributed.init_from_env(device="cpu")  # gloo here; fully_shard on GPUs uses NCCL
    data = synthetic(args.steps * args.batch_size, seed=1)
    model, optimizer, sparsifier = build(args.steps)
    distributed.add_consistency_check(sparsifier, every=4)
    half = args.steps // 2
    train(model, optimizer, sparsifier, env, data, 0, half, args.batch_size)

    folder = [tempfile.mkdtemp(prefix="fsdp_rigl_")]  # one folder for every rank
    if env.enabled:
        torch.distributed.broadcast_object_list(folder, src=0)
    rigl.fsdp.save(folder[0], model, optimizer, sparsifier)
    del model, optimizer, sparsifier
    model, optimizer, sparsifier = build(args.steps)  # a fresh job would do this
    rigl.fsdp.load(folder[0], model, optimizer, sparsifier)
    train(model, optimizer, sparsifier, env, data, half, args.steps, args.batch_size)

    test_x, test_y = synthetic(2048, seed=2)
    with torch.no_grad():  # a forward of a sharded model is a collective: every rank runs it
        accuracy = (model(test_x).argmax(dim=1) == test_y).float().mean()
    table = sparsifier.summary_table()  # a collective too (measured densities)
    if env.is_main:
        print(table)
        print(
            f"{env.world_size} rank(s), {sparsifier.update_count} topology updates, "
            f"resumed from {folder[0]} at step {half}, test accuracy {accuracy:.3f}"
        )
    distributed.cleanup()


if __name__ == "__main__":
    main()
