"""``CondensedLinear``: a compressed linear layer whose every output row keeps ``k`` inputs.

The constant fan-in layout of SRigL (Lasby et al. 2024, "Dynamic Sparse Training with
Structured Sparsity"): values ``(out * k,)`` (a 1-D Parameter viewed as ``(out, k)``,
row-major, columns sorted within a row: the flat-index order of
:class:`~rigl.sparse.SparseLinear`, so :class:`~rigl.sparse.storage.SparseWeight` and the
optimizer see the same layout) and int32 column indices ``(out, k)``: no row pointers,
equal work per row (:mod:`rigl.sparse.condensed_ops`). N:M sparsity (``N`` active in
every group of ``M`` consecutive inputs) is the same layout with ``k = N * in / M``; the
per-group count is checked whenever a topology is installed or loaded.

The layer interface is SparseLinear's (``active_indices``, ``grad_rows``, ``grad_at``,
``keep_grow_inputs``, ``set_topology``, ``set_sorted_topology``, ``weight``,
``from_dense``/``to_dense``), so a SparseWeight drives RigL on it unchanged as long as
every topology it installs keeps the same count in every row (the fan-in and N:M
selection does). The output is a transposed view, as SparseLinear's.

(About 330 lines: the whole layer interface SparseWeight drives, checkpoint validation
included, beside the pattern arguments; the products live in ``condensed_ops``.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rigl.config import ConfigError
from rigl.sparse.condensed_ops import CondensedIndex
from rigl.sparse.function import apply_sparse_linear
from rigl.sparse.grow import GrowScores
from rigl.sparse.index import SparseIndex, _sort

_RANDOM_ELEMENTS = 1 << 22  # random keys drawn per block of rows at initialisation


def parse_nm(nm: str | tuple[int, int]) -> tuple[int, int]:
    """``(N, M)`` of ``"N:M"`` or a pair, or a ConfigError: ``0 < N <= M``."""
    try:
        n, m = (int(p) for p in nm.split(":")) if isinstance(nm, str) else (int(nm[0]), int(nm[1]))
    except (ValueError, TypeError, IndexError):
        raise ConfigError(f"nm={nm!r}; expected 'N:M' such as '2:4'") from None
    if not 0 < n <= m:
        raise ConfigError(f"nm={nm!r}; N:M needs 0 < N <= M (such as '2:4', '1:8')")
    return n, m


def fan_in_of(
    in_features: int, fan_in: int | None, density: float | None, nm: str | tuple | None
) -> tuple[int, tuple[int, int] | None]:
    """``(k, (N, M) or None)`` from at most one of ``fan_in``, ``density``, ``nm`` (none:
    dense)."""
    given = [
        name for name, v in (("fan_in", fan_in), ("density", density), ("nm", nm)) if v is not None
    ]
    if len(given) > 1:
        raise ConfigError(f"give one of fan_in, density and nm, not {' and '.join(given)}")
    if nm is not None:
        n, m = parse_nm(nm)
        if in_features % m:
            raise ConfigError(
                f"nm='{n}:{m}' needs in_features divisible by {m}; this layer has {in_features}"
            )
        return n * in_features // m, (n, m)
    if density is not None:
        if not 0.0 <= density <= 1.0:
            raise ConfigError(f"density={density}; allowed: 0 <= density <= 1")
        return round(density * in_features), None
    k = in_features if fan_in is None else int(fan_in)
    if not 0 <= k <= in_features:
        raise ConfigError(f"fan_in={fan_in}; allowed: 0 <= fan_in <= in_features ({in_features})")
    return k, None


def random_cols(
    n_out: int, n_in: int, k: int, group: int | None, generator: torch.Generator | None
) -> Tensor:
    """``(out, k)`` sorted columns drawn uniformly per row (per group of ``group`` inputs
    for N:M), a block of rows at a time: O(block) memory beside the result."""
    step = max(1, _RANDOM_ELEMENTS // max(n_in, 1))
    blocks = []
    for r0 in range(0, n_out, step):
        rows = min(n_out, r0 + step) - r0
        if group is None:
            keys = torch.rand(rows, n_in, generator=generator)
            blocks.append(torch.sort(torch.topk(keys, k, dim=1).indices, dim=1).values)
            continue
        keys = torch.rand(rows, n_in // group, group, generator=generator)
        picked = torch.sort(torch.topk(keys, k * group // max(n_in, 1), dim=2).indices, dim=2)
        starts = torch.arange(0, n_in, group)[None, :, None]
        blocks.append((picked.values + starts).reshape(rows, k))
    return torch.cat(blocks) if blocks else torch.zeros(0, k, dtype=torch.int64)


class CondensedLinear(GrowScores, nn.Module):
    """A linear layer whose every output row keeps exactly ``fan_in`` active inputs.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        fan_in: active inputs per row; or ``density`` (``fan_in = round(density * in)``);
            or ``nm`` (``"2:4"``: N active in every group of M inputs). At most one; none
            gives a dense layer. Positions are drawn uniformly per row (per group).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        fan_in: int | None = None,
        density: float | None = None,
        nm: str | tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        k, self._nm = fan_in_of(in_features, fan_in, density, nm)
        cols = random_cols(out_features, in_features, k, self.group, generator)
        self._init_parameters(cols.numel(), bias, generator, dtype)
        self._index: CondensedIndex
        self._install(CondensedIndex.from_cols(cols, self.shape, self.group))

    # -- construction ----------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, linear: nn.Linear, mask: Tensor, nm: str | tuple[int, int] | None = None
    ) -> CondensedLinear:
        """The active entries ``linear.weight[mask]`` (the same count in every row, and N
        in every group of M with ``nm``), bias copied."""
        weight = linear.weight.detach()
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight {tuple(weight.shape)}")
        bias = linear.bias is not None
        layer = cls.unset(linear.in_features, linear.out_features, bias, nm=nm, dtype=weight.dtype)
        flat = mask.reshape(-1).nonzero().squeeze(1)
        layer.set_sorted_topology(flat, weight.reshape(-1)[flat])
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @classmethod
    def unset(
        cls,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        nm: str | tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> CondensedLinear:
        """A layer with no active input yet, for :meth:`set_topology` to fill (an N:M layer
        then checks its pattern); O(out) memory, nothing drawn for positions."""
        layer = cls(in_features, out_features, bias, fan_in=0, dtype=dtype)
        layer._nm = None if nm is None else fan_in_of(in_features, None, None, nm)[1]
        return layer

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same function (inactive weights zero)."""
        dense = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, dtype=self.values.dtype
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight)
            if self.bias is not None:
                dense.bias.copy_(self.bias.detach())
        return dense

    def set_topology(self, new_indices: Tensor, new_values: Tensor) -> Tensor:
        """Install the active positions ``new_indices`` (flat ``row * in + col`` or (2, nnz)
        coordinates, any order) with ``new_values`` in the same order; every row must get
        the same count (it may differ from the current ``fan_in``: the layer is resized)
        and, for N:M, N in every group. Returns ``order``: ``stored = new_values[order]``.
        """
        if new_indices.dim() == 2:
            new_indices = new_indices[0].to(torch.int64) * self.in_features + new_indices[1]
        flat, order = _sort(new_indices.reshape(-1).to(torch.int64), max(self.numel, 1))
        if new_values.shape != (flat.numel(),):
            raise ValueError(
                f"{flat.numel()} positions but values of shape {tuple(new_values.shape)}: one "
                "value per position is needed"
            )
        self._set_index(flat, new_values.detach()[order])
        return order

    def set_sorted_topology(self, flat: Tensor, values: Tensor) -> None:
        """:meth:`set_topology` for positions already sorted row-major (no sort needed)."""
        self._set_index(flat, values.detach())

    def _set_index(self, flat: Tensor, values: Tensor) -> None:
        if values.shape != (flat.numel(),):
            raise ValueError(
                f"{flat.numel()} positions but values of shape {tuple(values.shape)}: one "
                "value per position is needed"
            )
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.numel):
            raise ValueError(f"indices out of range for shape {self.shape}")
        index = CondensedIndex.from_flat(flat.cpu(), self.shape, self.group, use=self.kernels)
        self._check_fan_in(index.k, "the positions")
        stored = values.to(self.values.dtype)
        if stored.numel() == self.values.numel():
            self.values.data.copy_(stored)
        else:
            self.values.data = stored.to(self.values.device)
        self._install(index.to(self.values.device))

    def _install(self, index: CondensedIndex) -> None:
        self._index = index
        self.register_buffer("col_idx", index.col_idx)
        for name, tensor in index.derived().items():
            self.register_buffer(name, tensor, persistent=False)

    def _refresh_index(self) -> None:
        csc = SparseIndex(
            self.shape,
            self.csc_row_ptr,
            self.col_idx.view(-1),
            self.csc_block_rows,
            self.csc_col_ptr,
            self.csc_row_idx,
            self.csc_perm,
        )
        self._index = CondensedIndex(self.shape, self.col_idx, csc, self.group)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The kernels index memory with col_idx: a checkpoint's is checked (range, sorted
        # rows, N:M groups) and the CSC rebuilt from it before anything changes; its fan-in
        # may differ from this layer's (the layer is resized, as SparseLinear's nnz).
        if prefix + "col_idx" in state_dict:
            if prefix + "values" not in state_dict:
                raise ConfigError(f"state dict of CondensedLinear {prefix!r} lacks values")
            values, cols = state_dict[prefix + "values"], state_dict[prefix + "col_idx"]
            where = "state dict tensor "
            index = CondensedIndex.from_cols(
                cols.cpu(), self.shape, self.group, where=where + prefix, use=self.kernels
            )
            self._check_fan_in(index.k, f"{where}'{prefix}col_idx'")
            if values.dim() != 1 or values.numel() != cols.numel():
                raise ConfigError(
                    f"{where}'{prefix}values' has shape {tuple(values.shape)}, "
                    f"'{prefix}col_idx' {tuple(cols.shape)}: one value per index is needed"
                )
            if values.numel() != self.values.numel():
                self.values.data = self.values.new_empty(values.numel())
            self._install(index.to(self.values.device))
            state_dict = {**state_dict, prefix + "col_idx": self.col_idx}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_index()

    def _check_fan_in(self, k: int, what: str) -> None:
        """An N:M layer keeps ``N * in / M`` inputs per row; a fan-in layer may change k."""
        if self._nm is not None and k * self._nm[1] != self._nm[0] * self.in_features:
            n, m = self._nm
            raise ConfigError(
                f"{what} give {k} active inputs per row; this {n}:{m} layer keeps "
                f"{n * self.in_features // m} ({n} in every group of {m})"
            )

    # -- properties ------------------------------------------------------------------
    @property
    def index(self) -> CondensedIndex:
        return self._index

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def fan_in(self) -> int:
        """Active inputs of every output row (``k``)."""
        return self._index.k

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` of an N:M layer, else None."""
        return self._nm

    @property
    def group(self) -> int | None:
        """M of an N:M layer (the inputs of a group), else None."""
        return None if self._nm is None else self._nm[1]

    def active_indices(self) -> Tensor:
        """Flat positions ``row * in_features + col`` of ``values`` (int64, nnz, sorted)."""
        return self._index.flat()

    @property
    def weight(self) -> Tensor:
        """The dense ``(out_features, in_features)`` weight, built on every access (see
        ``SparseLinear.weight``): differentiable w.r.t. ``values``, a new tensor each time."""
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        values = self.values.view(self.out_features, self.fan_in)
        return dense.scatter(1, self.col_idx.to(torch.int64), values)

    # -- forward ---------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        return apply_sparse_linear(x, self.values, self.bias, self._index, self._grow, self.kernels)

    def extra_repr(self) -> str:
        pattern = f"nm='{self.nm[0]}:{self.nm[1]}'" if self.nm else f"fan_in={self.fan_in}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {pattern}, density={self.density:.4f}"
        )
