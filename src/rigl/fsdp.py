"""Dynamic sparse training of a model sharded with FSDP2 (``fully_shard``).

Supported order: shard first, then create the optimizer and the sparsifier::

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters())
    sparsifier = rigl.create("rigl", model, optimizer, ...)

A sparsified weight is then a DTensor sharded by rows (``Shard(0)``), and its mask is
sharded the same way (:class:`~rigl.sharded_storage.ShardedMaskedWeight`): each rank holds the rows it owns,
masks its local weights, gradients and optimizer state, and no rank ever holds a layer's
dense mask or gradient. Creating the sparsifier before ``fully_shard`` is refused at the
first step (the sharding replaces the parameters the sparsifier holds).

Every decision equals one process's for the same seed and global batch, bit for bit:
initial masks are drawn as one process draws them (:meth:`Sparsifier.initial_indices`,
O(n_active) memory above 2^24 positions; below, the permutation one process draws) and
each rank keeps its rows; updates select with :mod:`rigl.sharding`. Supported methods:
the methods whose class declares ``supports_sharding`` (dense, static, set, rigl), on the
masked backend (the compressed one is refused).

Checkpoints: under FSDP ``sparsifier.state_dict()`` holds the masks as DTensors, so it
is a sharded state dict for ``torch.distributed.checkpoint`` (DCP); :func:`save` and
:func:`load` write and read model, optimizer and sparsifier together, on any number of
ranks (a single process loads it into an unsharded model).

Consistency (:func:`rigl.distributed.add_consistency_check`): the ranks compare the
replicated state (step, update count, seed, method state), and each rank its mask shards
with what the last update installed there (a rank's shard has no copy elsewhere to
compare with); :meth:`Sparsifier.check` counts over every rank.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from rigl.errors import ConfigError
from rigl.sharded_storage import ShardedMaskedWeight, local_rows

if TYPE_CHECKING:
    from rigl.sparsifier import Sparsifier
    from rigl.targets import Target


# -- creation ---------------------------------------------------------------------------
def check_method(method: str, backend: str) -> None:
    """ConfigError unless ``method`` on ``backend`` can train a model sharded with FSDP2."""
    from rigl.registry import get_method, list_methods

    if not get_method(method).supports_sharding:  # a method declares it (its class)
        supported = [m for m in list_methods() if get_method(m).supports_sharding]
        raise ConfigError(
            f"method {method!r} is not supported on a model sharded with fully_shard; "
            f"supported: {', '.join(supported)} (or train it with DDP)"
        )
    if backend != "masked":
        raise ConfigError(
            f"backend={backend!r} is not supported on a model sharded with fully_shard (its "
            "compressed layers are not DTensors); use backend='masked', or DDP for the "
            "compressed backend"
        )


def shard_model(model: Any) -> Any:
    """``fully_shard`` every direct child module that holds parameters, then the model
    (the usual FSDP2 wrapping: one all-gather per child). A child whose parameters its
    parent reads directly, not through the child's forward, needs its own wrapping."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def sharded_weight(
    sparsifier: Sparsifier, index: int, target: Target, n_active: int
) -> ShardedMaskedWeight:
    """The storage of a target whose parameter is an FSDP2 DTensor, after checking that
    the method and backend are supported; the initial mask is drawn as in one process and
    each rank keeps its rows (no dense mask is built)."""
    check_method(sparsifier.name, sparsifier.backend)
    if getattr(sparsifier, "grow_init", "zeros") != "zeros":  # the growth methods' option
        raise ConfigError(
            f"grow_init={sparsifier.grow_init!r} is not supported on a model sharded with "
            "fully_shard (grown weights start at zero there); use grow_init='zeros'"
        )
    if sparsifier.patterns[index].structured:
        raise ConfigError(
            f"{target.name}: pattern={str(sparsifier.patterns[index])!r} is not supported on a "
            "model sharded with fully_shard (the sharded selection is unstructured); use "
            "pattern='unstructured', or DDP for structured patterns"
        )
    param = target.param
    local = param.to_local()
    row0, rows = local_rows(param)
    cols = param.numel() // param.shape[0]
    local_mask = torch.zeros(local.numel(), dtype=torch.bool)
    if sparsifier.dense_start:
        local_mask[:] = True
    else:
        flat = sparsifier.initial_indices(index, target, n_active)  # global positions
        start, stop = row0 * cols, (row0 + rows) * cols
        local_mask[flat[(flat >= start) & (flat < stop)] - start] = True
    return ShardedMaskedWeight(target.name, param, local_mask, target.blocks)


# -- checkpoints (torch.distributed.checkpoint) -------------------------------------------
def checkpoint_state(model: Any, optimizer: Any, sparsifier: Sparsifier) -> dict[str, Any]:
    """Model, optimizer and sparsifier state as one (sharded, under FSDP) state dict, keyed
    by parameter names, so that DCP can save it on N ranks and load it on M."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    guard = getattr(sparsifier, "_guard", None)
    if guard is not None:  # torch creates an empty optimizer state by a step with lr 0
        guard.open()
    try:
        model_state, optimizer_state = get_state_dict(model, optimizer)
    finally:
        if guard is not None:
            guard.close()
    return {
        "model": model_state,
        "optimizer": optimizer_state,
        "sparsifier": sparsifier.state_dict(),
    }


def save(path: Any, model: Any, optimizer: Any, sparsifier: Sparsifier, **extra: Any) -> None:
    """Write a DCP checkpoint folder ``path`` (a collective: every rank calls it);
    ``extra`` values (tensors or picklable objects) are saved beside."""
    import torch.distributed.checkpoint as dcp

    state = {**checkpoint_state(model, optimizer, sparsifier), **extra}
    with warnings.catch_warnings():  # one process on purpose: no warning about it
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(path), no_dist=not _distributed())


def load(path: Any, model: Any, optimizer: Any, sparsifier: Sparsifier, **extra: Any) -> dict:
    """Load what :func:`save` wrote into ``model``, ``optimizer`` and ``sparsifier``
    (sharded or not, on any number of ranks; the sparsifier takes the saved seed too);
    ``extra`` are templates of the other entries
    to read, returned filled in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = {**checkpoint_state(model, optimizer, sparsifier), **extra}
    with warnings.catch_warnings():  # one process on purpose: no warning about it
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )
    sparsifier.load_state_dict(state["sparsifier"])
    sparsifier.seed = int(state["sparsifier"]["seed"])  # later tie-breaks draw as saved
    return {key: state[key] for key in extra}


def _distributed() -> bool:
    """Whether a process group exists (else DCP runs in this one process)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()
