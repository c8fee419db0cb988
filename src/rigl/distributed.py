"""Data-parallel sparse training (``torchrun`` + DistributedDataParallel).

Why no extra communication is needed: every rank runs the same sparsifier on the same
state, and every decision it takes is a function of replicated data only.

- Initial masks come from a generator seeded by ``(seed, -1, layer)``
  (:func:`rigl.topology.update_generator`): equal on every rank given the same seed.
- Topology updates read ``param.grad`` after ``backward()``; DDP has all-reduced it by then,
  so every rank sees the same averaged gradient (RigL's grow score, SNFS's momentum).
- Ties are broken by priorities drawn from the generator of ``(seed, step, layer)``, not
  from the global RNG, so the ranking is identical on every rank.
- A GradScaler finds inf/NaN in the synced gradient, so every rank skips the same steps.

Gradient accumulation with ``ddp_model.no_sync()``: only the last micro-batch's backward
all-reduces, so call ``sparsifier.step()`` after that synced backward, never inside
``no_sync`` (a rank would otherwise grow from its local gradient and diverge).

The usual order::

    env = rigl.distributed.init_from_env()           # reads torchrun's variables
    model = build_model().to(env.device)
    sparsifier = rigl.create("rigl", model, optimizer, ...)  # on the unwrapped model
    ddp_model = rigl.distributed.wrap_model(model, env)
    rigl.distributed.sync_sparsifier(sparsifier)      # optional: catches per-rank seeds
    rigl.distributed.add_consistency_check(sparsifier, every=10)  # optional

A model sharded with FSDP2 (``fully_shard``) is the other way: see :mod:`rigl.fsdp`
(the consistency check works there too; ``sync_sparsifier`` does not).

Over 300 lines: the data-parallel helpers (setup, wrapping, seed sync, the consistency
check and its divergence finder) form one user-facing API, documented in one place.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rigl.errors import ConfigError, warn
from rigl.sharding import is_sharded
from rigl.sparsifier import Sparsifier

F = TypeVar("F", bound=Callable[..., Any])


# -- process group ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (``world_size == 1``: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(backend: str | None = None, device: str | None = None) -> DistEnv:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); a no-op without those variables.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise; with CUDA each
    process uses ``cuda:LOCAL_RANK``. ``device`` overrides the device ("cpu", "cuda", ...).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    where = torch.device("cuda", local_rank) if use_cuda else torch.device(device or "cpu")
    if use_cuda:
        torch.cuda.set_device(where)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    return DistEnv(rank, world_size, local_rank, where)


def current_env() -> DistEnv:
    """The :class:`DistEnv` of an already initialised process group (or a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def wrap_model(model: nn.Module, env: DistEnv | None = None, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` when distributed, else ``model`` unchanged.

    Create the sparsifier on the unwrapped ``model`` first: parameter names then carry no
    ``module.`` prefix, and checkpoints of the unwrapped model load anywhere.
    """
    env = env or current_env()
    if not env.enabled:
        return model
    if env.device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [env.device.index])
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- data and outputs ---------------------------------------------------------------------------
def shard(batch: Tensor, env: DistEnv | None = None) -> Tensor:
    """This rank's contiguous slice of a global batch (or of a batch's indices).

    Every rank draws the same global order (e.g. a permutation seeded by (seed, epoch)) and
    keeps its slice, like ``DistributedSampler`` but per batch: when the batch size divides
    by the world size, DDP's mean of the per-rank mean losses is the global batch's mean
    loss, so the run matches a single-process run with the same global batch.
    """
    env = env or current_env()
    if not env.enabled:
        return batch
    if len(batch) < env.world_size:
        raise ValueError(
            f"a batch of {len(batch)} examples cannot be split over {env.world_size} ranks"
        )
    return torch.tensor_split(batch, env.world_size)[env.rank]


def is_main_process() -> bool:
    return current_env().is_main


def main_process_only(fn: F) -> F:
    """Decorator: run ``fn`` on rank 0 only (other ranks return None); for writing files."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper  # type: ignore[return-value]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float | Tensor) -> float:
    """Mean of a scalar over the ranks (metrics such as the training loss)."""
    env = current_env()
    if not env.enabled:
        return float(value)
    tensor = torch.as_tensor(value, dtype=torch.float64, device=env.device).reshape(1)
    dist.all_reduce(tensor)
    return float(tensor) / env.world_size


# -- consistency of the sparsifier across ranks ----------------------------------------------------
def _digest(tensor: Tensor) -> str:
    """SHA-256 of a tensor's bytes: equal iff the tensors are bitwise equal (in practice)."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()[:16]


def _tensors(state: Any, prefix: str) -> dict[str, Tensor]:
    """Every tensor in a nested dict/list, by path (``ema/fc1.weight``)."""
    if isinstance(state, Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        items = list(state.items())
    elif isinstance(state, list | tuple):
        items = list(enumerate(state))
    else:
        return {}
    found: dict[str, Tensor] = {}
    for key, value in items:
        found.update(_tensors(value, f"{prefix}/{key}" if prefix else str(key)))
    return found


def fingerprint(sparsifier: Sparsifier, *, weights: bool = False) -> dict[str, str]:
    """{what: digest} of everything that must agree across ranks: counters, seed, masks,
    the method's state (SNFS momentum) and, with ``weights``, every model parameter."""
    state = sparsifier.state_dict()  # plain data, whatever the weights' storage
    found = {key: str(state[key]) for key in ("step", "update_count", "seed")}
    for weight in sparsifier.weights:
        # FSDP: each rank holds other rows, compared with what the last update installed
        own = getattr(weight, "shard_state", None)
        found[f"mask {weight.name}"] = own() if own else _digest(state["masks"][weight.name])
    found.update({f"state {k}": _digest(v) for k, v in _tensors(state["extra"], "").items()})
    if weights:  # a sharded parameter (FSDP) is each rank's own: not compared
        found.update(
            {
                f"weight {n}": _digest(p)
                for n, p in sparsifier.model.named_parameters()
                if not is_sharded(p)
            }
        )
    return found


def _ranks(process_group: Any) -> list[int]:
    if process_group is None:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(process_group)


def find_divergence(
    sparsifier: Sparsifier, process_group: Any = None, *, weights: bool = False
) -> dict[str, list[int]]:
    """{item: ranks whose value differs from the group's first rank}; empty when consistent.
    A collective: every rank of the group must call it."""
    if not (dist.is_available() and dist.is_initialized()):
        return {}
    local = fingerprint(sparsifier, weights=weights)
    ranks = _ranks(process_group)
    gathered: list[Any] = [None] * len(ranks)
    dist.all_gather_object(gathered, local, group=process_group)
    reference = gathered[0]
    diverging: dict[str, list[int]] = {}
    for rank, theirs in zip(ranks[1:], gathered[1:], strict=True):
        for key in sorted(set(reference) | set(theirs)):
            if reference.get(key) != theirs.get(key):
                diverging.setdefault(key, []).append(rank)
    return diverging


def check_consistency(
    sparsifier: Sparsifier, process_group: Any = None, *, weights: bool = False
) -> None:
    """Raise ``RuntimeError`` naming the layers and ranks whose masks (method state,
    counters and, with ``weights``, parameters) differ from the group's first rank.

    A collective (every rank must call it at the same point); a no-op in a single process.
    Weights are compared bitwise, which holds for DDP on identical devices.
    """
    diverging = find_divergence(sparsifier, process_group, weights=weights)
    if diverging:
        _raise_divergence(diverging, _ranks(process_group)[0])


def _raise_divergence(diverging: dict[str, list[int]], first: int) -> None:
    lines = [f"  {key}: ranks {ranks}" for key, ranks in diverging.items()]
    raise RuntimeError(
        f"sparsifier state differs across data-parallel ranks (compared with rank {first}):\n"
        + "\n".join(lines)
        + "\nDid every rank use the same seed, and is sparsifier.step() called after the "
        "synced backward (not inside no_sync())? rigl.distributed.sync_sparsifier() "
        "copies rank 0's state to every rank."
    )


def add_consistency_check(
    sparsifier: Sparsifier,
    every: int = 1,
    *,
    weights: bool = False,
    process_group: Any = None,
) -> None:
    """Run :func:`check_consistency` after every ``every``-th topology update."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} must be an int >= 1")

    def hook(s: Sparsifier) -> None:
        if s.update_count % every == 0:
            check_consistency(s, process_group, weights=weights)

    sparsifier.update_hooks.append(hook)


@torch.no_grad()
def broadcast_sparsifier(sparsifier: Sparsifier, src: int = 0, process_group: Any = None) -> None:
    """Copy rank ``src``'s model parameters and sparsifier state (seed, counters, masks,
    method state) to every rank of the group (a collective)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if any(is_sharded(p) for p in sparsifier.model.parameters()):
        raise ConfigError(
            "the model is sharded (FSDP): each rank holds other rows, so rank 0's state "
            "cannot be copied to the others; create the sparsifier with the same seed on "
            "every rank (rigl.fsdp)"
        )
    for param in sparsifier.model.parameters():
        dist.broadcast(param.data, src=src, group=process_group)
    state = [sparsifier.state_dict()]  # plain data, masks on the CPU
    dist.broadcast_object_list(state, src=src, group=process_group)
    sparsifier.seed = int(state[0]["seed"])  # first: the state then matches this sparsifier
    sparsifier.load_state_dict(state[0])


def sync_sparsifier(
    sparsifier: Sparsifier, process_group: Any = None, *, src: int = 0, fix: bool = True
) -> bool:
    """Make sure every rank starts from the same sparse model; returns whether it had to.

    Call it once after wrapping the model in DDP (which broadcast rank 0's weights). When
    masks, seed or weights differ (e.g. the sparsifier was seeded by rank), ``fix=True``
    copies rank ``src``'s state and parameters to every rank with a warning; ``fix=False``
    raises the ``RuntimeError`` of :func:`check_consistency`.
    """
    diverging = find_divergence(sparsifier, process_group, weights=True)
    if not diverging:
        return False
    if not fix:
        _raise_divergence(diverging, _ranks(process_group)[0])
    warn(
        f"sparsifier state differed across ranks ({', '.join(diverging)}); "
        f"copied rank {src}'s masks, seed and weights to every rank"
    )
    broadcast_sparsifier(sparsifier, src, process_group)
    return True
