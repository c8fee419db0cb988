"""Compact checkpoints of a sparse model: CSR values and indices in one safetensors file.

For every sparsified weight ``name`` (shape ``(rows, *rest)``, seen as ``(rows, cols)``)
the file holds

- ``{name}.values``  (nnz,)      the active weights, row-major;
- ``{name}.row_ptr`` (rows + 1,) int32, ``{name}.col_idx`` (nnz,) int32: the CSR indices;
- ``{name}.shape``   (ndim,)     int64, the dense shape,

so its size is about ``8 * nnz`` bytes instead of ``4 * rows * cols``. Every other tensor of
the model's state dict (biases, dense layers, norms, buffers) is stored as is. The
metadata holds the rigl version, the method and the per-layer shapes and densities.

:func:`load_sparse` restores a file into either backend: ``SparseLinear`` and
``CondensedLinear`` layers (a condensed layer is saved as the same CSR) take the topology
and values directly; a dense parameter (``nn.Linear``, conv, a masked model) receives the
densified weight, zeros elsewhere, and the sparsifier's masks are set.

Over 300 lines: saving, reading (with the corrupt-file checks) and loading into either
backend share the file layout defined here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rigl._version import __version__
from rigl.config import ConfigError
from rigl.sparse.condensed import CondensedLinear
from rigl.sparse.condensed_ops import CondensedIndex
from rigl.sparse.index import check_csr
from rigl.sparse.linear import SparseLinear

if TYPE_CHECKING:
    from rigl.sparsifier import Sparsifier

FORMAT = "rigl.sparse.csr"
FORMAT_VERSION = "1"
_PARTS = ("values", "row_ptr", "col_idx", "shape")


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as err:  # an optional dependency (the "sparse" extra)
        raise ImportError(
            "save_sparse/load_sparse need safetensors: pip install 'rigl[sparse]'"
        ) from err
    return safetensors.torch


# -- what is sparse in a model ---------------------------------------------------------------
Compressed = SparseLinear | CondensedLinear


def _sparse_modules(model: nn.Module) -> dict[str, Compressed]:
    """{weight name: layer} of every ``SparseLinear`` (``SparseConv2d``/``1d`` included) and
    ``CondensedLinear``; its weight is named ``<module>.weight``, of the dense layer's shape."""
    return {
        (f"{name}.weight" if name else "weight"): m
        for name, m in model.named_modules()
        if isinstance(m, Compressed)
    }


def _module_keys(model: nn.Module, sparse: dict[str, Compressed]) -> set[str]:
    """State-dict keys that belong to the compressed weights (values and index buffers)."""
    keys = set()
    for name, layer in sparse.items():
        prefix = name[: -len("weight")]
        keys |= {prefix + key for key in layer.state_dict() if key != "bias"}
    return keys


def _csr_of_mask(weight: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """CSR of the active entries of a dense ``weight`` viewed as (rows, cols)."""
    rows = weight.shape[0]
    cols = weight.numel() // rows if rows else 0
    flat = mask.reshape(-1).nonzero().squeeze(1)  # sorted: row-major order
    row_of = torch.div(flat, max(cols, 1), rounding_mode="floor")
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(row_of.cpu(), minlength=rows), 0, out=row_ptr[1:])
    return {
        "values": weight.detach().reshape(-1)[flat],
        "row_ptr": row_ptr.to(torch.int32),
        "col_idx": (flat - row_of * cols).to(torch.int32),
        "shape": torch.tensor(weight.shape, dtype=torch.int64),
    }


def _csr_of_layer(layer: Compressed) -> dict[str, Tensor]:
    """The CSR of a compressed layer (a condensed one's CSR is derived from its index: the
    file format is the same, and loads into either layer type)."""
    csr = layer.index.csc if isinstance(layer, CondensedLinear) else layer.index
    return {
        "values": layer.values.detach(),
        "row_ptr": csr.row_ptr,
        "col_idx": csr.col_idx,
        "shape": torch.tensor(layer.weight_shape, dtype=torch.int64),
    }


# -- save ----------------------------------------------------------------------------------
def save_sparse(model: nn.Module, path: str | Path, sparsifier: Sparsifier | None = None) -> Path:
    """Write ``model`` to ``path`` (safetensors) with its sparse weights in CSR form.

    Sparse weights are the ``SparseLinear`` and ``CondensedLinear`` layers of the model
    and, given a ``sparsifier``, its masked weights too (without it, a masked model is
    saved dense).
    Returns the path.
    """
    sparse = _sparse_modules(model)
    entries = {name: _csr_of_layer(layer) for name, layer in sparse.items()}
    for weight in getattr(sparsifier, "weights", []):
        if weight.name not in entries:
            entries[weight.name] = _csr_of_mask(weight.param, weight.mask)
    skip = _module_keys(model, sparse) | set(entries)
    tensors = {k: v for k, v in model.state_dict().items() if k not in skip}
    for name, parts in entries.items():
        for part, tensor in parts.items():
            key = f"{name}.{part}"
            if key in tensors:
                raise ConfigError(f"cannot save {name}: the model has a tensor named {key!r} too")
            tensors[key] = tensor
    layers = {
        name: {"shape": p["shape"].tolist(), "nnz": p["values"].numel()}
        for name, p in entries.items()
    }
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rigl_version": __version__,
        "method": getattr(sparsifier, "name", "none"),
        "layers": json.dumps(layers),
    }
    path = Path(path)
    _safetensors().save_file(_plain(tensors), str(path), metadata=metadata)
    return path


def _plain(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, and no two tensors sharing memory (tied weights are copied)."""
    out, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if tensor.numel() and storage in seen:
            tensor = tensor.clone()
        seen.add(storage)
        out[key] = tensor
    return out


# -- load ----------------------------------------------------------------------------------
def read_sparse(path: str | Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], dict]:
    """``(sparse entries {name: {values, row_ptr, col_idx, shape}}, other tensors, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such sparse checkpoint")
    st = _safetensors()
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = st.load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ConfigError(f"{path}: not a readable safetensors file ({err})") from err
    if metadata.get("format") != FORMAT:
        raise ConfigError(
            f"{path}: not a rigl sparse checkpoint (metadata format={metadata.get('format')!r}, "
            f"expected {FORMAT!r}; write it with rigl.sparse.save_sparse)"
        )
    try:
        names = list(json.loads(metadata["layers"]))
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{path}: corrupt metadata 'layers' ({err})") from err
    entries = {}
    for name in names:
        missing = [p for p in _PARTS if f"{name}.{p}" not in tensors]
        if missing:
            raise ConfigError(f"{path}: sparse weight {name} lacks {', '.join(missing)}")
        entries[name] = {p: tensors.pop(f"{name}.{p}") for p in _PARTS}
        _check_csr(path, name, entries[name])
    return entries, tensors, metadata


def _check_csr(path: Path, name: str, entry: dict[str, Tensor]) -> None:
    """Shape, values and CSR of one sparse weight of a file, or a ConfigError naming both."""
    shape = entry["shape"]
    if shape.dtype != torch.int64 or shape.dim() != 1 or shape.numel() < 2 or (shape < 0).any():
        raise ConfigError(f"{path}: tensor '{name}.shape' is not a weight shape ({shape.tolist()})")
    rows = int(shape[0])
    cols = math.prod(shape.tolist()) // rows if rows else 0
    values = entry["values"]
    if values.dim() != 1 or not values.is_floating_point():
        raise ConfigError(
            f"{path}: tensor '{name}.values' has dtype {values.dtype} and shape "
            f"{tuple(values.shape)}; expected 1-D floating point"
        )
    where = f"{path}: tensor "
    check_csr(
        entry["row_ptr"],
        entry["col_idx"],
        values.numel(),
        (rows, cols),
        where=where,
        prefix=f"{name}.",
    )


def _flat_indices(entry: dict[str, Tensor]) -> Tensor:
    """Flat positions ``row * cols + col`` (int64, row-major) of a CSR entry."""
    shape = entry["shape"].tolist()
    cols = math.prod(shape) // shape[0]
    counts = (entry["row_ptr"][1:] - entry["row_ptr"][:-1]).to(torch.int64)
    rows = torch.repeat_interleave(torch.arange(shape[0]), counts)
    return rows * cols + entry["col_idx"].to(torch.int64)


def load_sparse(
    path: str | Path, model: nn.Module, sparsifier: Sparsifier | None = None
) -> dict[str, Any]:
    """Restore a :func:`save_sparse` file into ``model`` (either backend); returns the metadata.

    ``SparseLinear`` and ``CondensedLinear`` layers take the saved topology and values
    (their active count follows the file; a condensed layer needs the same count in every
    row). Any other parameter receives the densified weight (zeros at inactive
    positions); given a ``sparsifier`` of the model, its masks are set to the saved
    topology, and the optimizer state of a compressed layer follows it (positions that stay
    active keep theirs, new ones start at zero; without the sparsifier, load the optimizer
    state saved with the file too when the active count changes). Raises
    :class:`rigl.ConfigError` naming the file if it is not a rigl sparse checkpoint, belongs
    to a different model, or holds corrupt indices; nothing is changed then.
    """
    path = Path(path)
    entries, others, metadata = read_sparse(path)
    sparse = _sparse_modules(model)
    _check_same_model(path, model, sparse, entries, others)
    _check_condensed(path, sparse, entries)
    for name in sparse.keys() & others.keys():  # saved dense: every position is active
        weight = others.pop(name)
        entries[name] = _csr_of_mask(weight, torch.ones_like(weight, dtype=torch.bool))
    weights = {w.name: w for w in getattr(sparsifier, "weights", [])}
    optimizer = getattr(sparsifier, "optimizer", None)
    if sparsifier is not None:  # before anything is loaded
        topologies = {name: _flat_indices(entry) for name, entry in entries.items()}
        sparsifier.check_loaded_patterns(topologies, where=f"{path}: ")
    with torch.no_grad():
        for name, entry in entries.items():
            flat = _flat_indices(entry)  # checked by read_sparse: sorted, in range, unique
            if name in sparse and name in weights:  # the optimizer state follows the topology
                weights[name].load_topology(flat, optimizer)
                sparse[name].values.copy_(entry["values"])
                continue
            if name in sparse:
                sparse[name].set_topology(flat, entry["values"])
                continue
            param = model.get_parameter(name)
            dense = torch.zeros(param.numel(), dtype=param.dtype)
            dense[flat] = entry["values"].to(param.dtype)
            param.copy_(dense.reshape(param.shape))
            if name in weights:
                mask = torch.zeros(param.numel(), dtype=torch.bool)
                mask[flat] = True
                weights[name].load_topology(mask.reshape(param.shape), optimizer)
    model.load_state_dict(others, strict=False)  # the sparse entries are in place already
    if sparsifier is not None:
        sparsifier.adopt_loaded_counts(str(path))
    return metadata


def _check_condensed(
    path: Path, sparse: dict[str, Compressed], entries: dict[str, dict[str, Tensor]]
) -> None:
    """Every ``CondensedLinear`` gets a topology it can hold (the same count in every row,
    its N:M groups), else a ConfigError naming the file, before anything is loaded."""
    for name, layer in sparse.items():
        if not isinstance(layer, CondensedLinear) or name not in entries:
            continue
        try:
            index = CondensedIndex.from_flat(_flat_indices(entries[name]), layer.shape, layer.group)
            layer._check_fan_in(index.k, "its positions")
        except ValueError as err:
            raise ConfigError(
                f"{path}: sparse weight {name} does not fit its CondensedLinear: {err}"
            ) from None


def _check_same_model(
    path: Path,
    model: nn.Module,
    sparse: dict[str, Compressed],
    entries: dict[str, dict[str, Tensor]],
    others: dict[str, Tensor],
) -> None:
    """Same tensor names and shapes in the file as in ``model``, else a ConfigError."""
    state = {k: v for k, v in model.state_dict().items() if k not in _module_keys(model, sparse)}
    expected = {k: tuple(v.shape) for k, v in state.items()}
    expected |= {name: tuple(layer.weight_shape) for name, layer in sparse.items()}
    found = {k: tuple(v.shape) for k, v in others.items()}
    found |= {k: tuple(e["shape"].tolist()) for k, e in entries.items()}
    problems = [f"missing {k}" for k in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {k}" for k in sorted(found.keys() - expected.keys())]
    problems += [
        f"{k} has shape {found[k]}, the model's is {expected[k]}"
        for k in sorted(expected.keys() & found.keys())
        if found[k] != expected[k]
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; ... ({len(problems)} in all)" if problems[5:] else ""
        )
        raise ConfigError(f"{path} was saved from a different model: {shown}")
