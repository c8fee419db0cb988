"""``SparseLinear``: an ``nn.Linear`` whose weight is stored compressed (CSR + CSC, int32).

Only the ``nnz`` active weights exist: the parameter ``values`` has shape ``(nnz,)``, so
its gradient and every optimizer state tensor are ``nnz``-sized too. No dense weight, mask
or gradient is built during ordinary steps; a dense gradient block exists only when the
grow step of RigL (Evci et al. 2020, "Rigging the Lottery") asks for one
(:meth:`SparseLinear.grad_rows`, scanned block by block in :mod:`rigl.sparse.storage`).

Layout: the kernels work on feature-major activations. For a batch of up to
``rigl.sparse.kernels.ONE_PANEL_UP_TO`` (256) rows the output of :meth:`forward` is a
transposed view (``y.t()`` is contiguous); element-wise ops keep that layout, so a
following ``SparseLinear`` reads it without a copy. Use ``.reshape``/``.contiguous()``
rather than ``.view`` on it. A larger batch (a transformer's batch x tokens) is cut into
panels of 64 rows, each transposed on its own, so that the rows a kernel gathers stay
close together; the output and the input gradient then come back row-major, as
``nn.Linear``'s, written so by the kernels, which is what attention and the ops after it
read fastest.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rigl.config import ConfigError
from rigl.sparse.function import (  # noqa: F401 (SparseLinearFunction, sparse_linear: re-exported)
    GrowInputs,
    SparseLinearFunction,
    apply_sparse_linear,
    sparse_linear,
)
from rigl.sparse.grow import GrowScores
from rigl.sparse.index import SparseIndex, check_csr
from rigl.topology import random_indices


class SparseLinear(GrowScores, nn.Module):
    """A linear layer with a compressed sparse weight of fixed active count.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: whether to learn an additive bias.
        density: fraction of weights active; exactly ``round(density * out * in)``
            positions drawn uniformly at random (use :meth:`from_dense` for a given mask).
    """

    uses_csc = True  # whether the products read the blocked CSC (the convolutions' do not)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        density: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density={density}; allowed: 0 <= density <= 1")
        self.in_features, self.out_features = in_features, out_features
        numel = in_features * out_features
        n_active = round(density * numel)
        flat = random_indices(numel, n_active, generator)  # O(n_active) for huge layers
        self._init_parameters(n_active, bias, generator, dtype)
        self._index: SparseIndex
        self._set_index(flat, self.values.detach())

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Tensor) -> SparseLinear:
        """The active entries ``linear.weight[mask]`` of a dense layer, bias copied."""
        weight = linear.weight.detach()
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight {tuple(weight.shape)}")
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, density=0.0
        ).to(weight.dtype)
        flat = mask.reshape(-1).nonzero().squeeze(1)
        layer.set_topology(flat, weight.reshape(-1)[flat])
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same function (inactive weights zero)."""
        dense = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, dtype=self.values.dtype
        )
        with torch.no_grad():
            dense.weight.zero_()
            dense.weight.view(-1)[self._index.flat()] = self.values.detach()
            if self.bias is not None:
                dense.bias.copy_(self.bias.detach())
        return dense

    def set_topology(self, new_indices: Tensor, new_values: Tensor) -> Tensor:
        """Rebuild the indices after a topology update (every ΔT steps).

        ``new_indices``: flat positions ``row * in_features + col`` (nnz,) or
        coordinates (2, nnz), any order; ``new_values`` in the same order. The values are
        stored row-major; the returned ``order`` says how (``stored = new_values[order]``)
        so that the caller can reorder optimizer state the same way. When ``nnz`` is
        unchanged the same ``values`` Parameter object is kept (the optimizer still
        points at it).
        """
        if new_indices.dim() == 2:
            new_indices = new_indices[0].to(torch.int64) * self.in_features + new_indices[1]
        return self._set_index(new_indices, new_values.detach())

    def set_sorted_topology(self, flat: Tensor, values: Tensor) -> None:
        """:meth:`set_topology` for positions already sorted row-major (no sort needed)."""
        self._set_index(flat, values.detach(), presorted=True)

    def _set_index(self, flat: Tensor, values: Tensor, presorted: bool = False) -> Tensor | None:
        if values.shape != (flat.numel(),):
            raise ValueError(
                f"{flat.numel()} positions but values of shape {tuple(values.shape)}: one "
                "value per position is needed"
            )
        index, order = SparseIndex.from_flat(
            flat,
            (self.out_features, self.in_features),
            presorted=presorted,
            use=self.kernels,
            csc=self.uses_csc,
        )
        stored = values.to(self.values.dtype)
        stored = stored if order is None else stored[order]
        if stored.numel() == self.values.numel():
            self.values.data.copy_(stored)
        else:
            self.values.data = stored
        self._install(index)
        return order

    def _install(self, index: SparseIndex) -> None:
        self._index = index
        for name, tensor in index.tensors().items():
            self.register_buffer(name, tensor)

    def _refresh_index(self) -> None:
        self._index = SparseIndex(
            (self.out_features, self.in_features),
            self.row_ptr,
            self.col_idx,
            self.block_rows,
            self.col_ptr,
            self.row_idx,
            self.perm,
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The kernels index memory with the index tensors, so a checkpoint's are not trusted:
        # its CSR (row_ptr, col_idx) is checked and the CSC built from it again, before
        # anything changes. Its topology may differ in nnz: the layer is resized first.
        index_keys = [prefix + name for name in self._index.tensors()]
        if any(key in state_dict for key in index_keys):
            needed = [prefix + name for name in ("values", "row_ptr", "col_idx")]
            missing = [key for key in needed if key not in state_dict]
            if missing:
                raise ConfigError(f"state dict of SparseLinear {prefix!r} lacks {missing}")
            values, row_ptr, col_idx = (state_dict[key] for key in needed)
            where = "state dict tensor "
            if values.dim() != 1:
                raise ConfigError(f"{where}'{prefix}values' has shape {tuple(values.shape)}")
            flat = check_csr(
                row_ptr, col_idx, values.numel(), self.shape, where=where, prefix=prefix
            )
            index, _ = SparseIndex.from_flat(
                flat, self.shape, presorted=True, use=self.kernels, csc=self.uses_csc
            )
            state_dict = {**state_dict, **{prefix + k: t for k, t in index.tensors().items()}}
            if values.numel() != self.values.numel():
                self.values.data = self.values.new_empty(values.numel())
            self._install(index)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_index()

    # -- properties ------------------------------------------------------------------
    @property
    def index(self) -> SparseIndex:
        return self._index

    def active_indices(self) -> Tensor:
        """Flat positions ``row * in_features + col`` of ``values`` (int64, nnz)."""
        return self._index.flat()

    @property
    def weight(self) -> Tensor:
        """The dense ``(out_features, in_features)`` weight, built on every access: zeros
        with ``values`` scattered at the active positions, for code written against
        ``nn.Linear`` (PyTorch's transformer fast path in eval, helpers that read
        ``.weight``). It is differentiable w.r.t. ``values``, so computing with it trains
        the right tensor; it is a new tensor each time, so writing into it changes nothing
        (assigning ``layer.weight = ...`` is refused). Cost per access: an ``out * in``
        tensor and a scatter of ``nnz`` values, the memory the compressed layer saves."""
        dense = torch.zeros(
            self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device
        )
        dense = dense.index_put((self._index.flat(),), self.values)
        return dense.view(self.out_features, self.in_features)

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return apply_sparse_linear(x, self.values, self.bias, self._index, self._grow, self.kernels)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, density={self.density:.4f}"
        )
