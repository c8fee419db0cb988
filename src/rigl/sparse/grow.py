"""Grow scores of the compressed layers (RigL's ``|dL/dW|`` at every position, by blocks).

Shared by :class:`~rigl.sparse.SparseLinear` and :class:`~rigl.sparse.CondensedLinear`:
while an update step is due, the layer keeps every backward call's input ``xt`` and
output gradient ``dyt`` (:class:`~rigl.sparse.function.GrowInputs`); the dense gradient
``dW = sum_i dyt_i @ xt_i^T`` is then computed a block of rows at a time
(:meth:`GrowScores.grad_rows`) or at given positions only (:meth:`GrowScores.grad_at`).
A layer provides ``_grow`` (GrowInputs), ``values``, ``in_features``, ``out_features``
and ``kernels`` (set up by :meth:`GrowScores._init_parameters`, ``nn.Linear``'s
initialisation); the counts both layers report (``shape``, ``n_active``, ``density``) are
here too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rigl.sparse import kernels
from rigl.sparse.function import GrowInputs
from rigl.sparse.index import SparseIndex


class GrowScores:
    """Mixin of the grow-score methods and counts of a compressed linear layer."""

    def _init_parameters(
        self,
        n_values: int,
        bias: bool,
        generator: torch.Generator | None,
        dtype: torch.dtype | None,
    ) -> None:
        """``values`` (``n_values``, from ``generator``) and ``bias`` uniform in
        ``±1/sqrt(in_features)`` as ``nn.Linear``'s; kernels chosen at run time; no grow
        inputs kept yet."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        values = torch.empty(n_values, dtype=dtype).uniform_(-bound, bound, generator=generator)
        self.values = nn.Parameter(values)
        self.bias = (
            nn.Parameter(torch.empty(self.out_features, dtype=dtype).uniform_(-bound, bound))
            if bias
            else None
        )
        self.kernels: str | None = None  # None: best available; "cpp" or "torch" to force
        self._grow = GrowInputs()

    def _apply(self, fn, recurse=True):
        """Tensors moved or cast as ``nn.Module._apply`` does, the index kept exact: a
        function that does not preserve the index buffers' contents (``to_empty``, which
        leaves uninitialised memory the kernels would then index with) gets the old index,
        moved to the new device; then the layer's index object follows its buffers."""
        old = {
            n: b for n, b in self._buffers.items() if b is not None and not b.is_floating_point()
        }
        out = super()._apply(fn, recurse)
        for name, before in old.items():
            after = self._buffers.get(name)
            if after is None or before.is_meta or after.is_meta:
                continue
            if after.shape != before.shape or not torch.equal(after.cpu(), before.cpu()):
                self._buffers[name] = before.to(after.device)
        self._refresh_index()
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The dense weight's shape (a convolution's kernel shape in ``SparseConv2d``)."""
        return self.shape

    @property
    def n_active(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        numel = self.out_features * self.in_features
        return self.n_active / numel if numel else 0.0

    def keep_grow_inputs(self, enabled: bool = True) -> None:
        """Keep (or stop keeping) the coming backward calls' ``xt``, ``dyt`` for grow scores.

        Either way, what was kept so far is dropped. The algorithm enables this before the
        backward calls of an update step (one per accumulated micro-batch) and disables it
        after the update; memory cost is the inputs and output gradients of those calls,
        no dense weight-sized tensor.
        """
        self._grow.enabled = enabled
        self._grow.clear()

    def grad_rows(self, row_start: int, row_end: int) -> Tensor:
        """Dense ``dL/dW[row_start:row_end]`` (rows, in), accumulated over the kept batches.

        ``dW = sum_i dy_i^T x_i`` restricted to a block of output rows: one small dense
        GEMM per kept backward call, so a caller can scan the full gradient block by block
        in bounded memory. Summed in backward order, as autograd accumulates ``.grad``.
        """
        if not self._grow.xts:
            raise RuntimeError("no kept batch: call keep_grow_inputs() before backward()")
        # (in, B_i), (out, B_i); a batch kept in panels adds one product per panel
        pieces = (
            (xp, dyp)
            for xt, dyt in zip(self._grow.xts, self._grow.dyts, strict=True)
            for xp, dyp in (zip(xt, dyt, strict=True) if xt.dim() == 3 else [(xt, dyt)])
        )
        xt, dyt = next(pieces)
        # In the dtype of the kept inputs (bf16 under autocast), summed in that of values:
        # the same products and sums as autograd makes for .grad of a dense weight.
        grad = (dyt[row_start:row_end] @ xt.t()).to(self.values.dtype)
        for xt, dyt in pieces:
            grad += dyt[row_start:row_end] @ xt.t()  # not addmm_: same rounding as .grad
        return grad

    def grad_at(self, flat: Tensor, chunk: int = 1 << 22) -> Tensor:
        """``dL/dW`` at the flat positions ``flat`` (any order, no repeats), accumulated over
        the kept batches: an SDDMM over just those positions, ``chunk`` positions at a time
        (each chunk gets its own index: about 100 bytes per position while it is built)."""
        if not self._grow.xts:
            raise RuntimeError("no kept batch: call keep_grow_inputs() before backward()")
        flat = flat.reshape(-1)
        return torch.cat([self._grad_at(flat[i : i + chunk]) for i in range(0, len(flat), chunk)])

    def _grad_at(self, flat: Tensor) -> Tensor:
        index, order = SparseIndex.from_flat(flat, self.shape)
        sorted_grad = torch.zeros(index.nnz, dtype=self.values.dtype, device=self.values.device)
        for xt, dyt in zip(self._grow.xts, self._grow.dyts, strict=True):
            zeros = torch.zeros(index.nnz, dtype=xt.dtype, device=xt.device)  # as kept
            _, dw = kernels.backward(zeros, index, xt, dyt, False, True, use=self.kernels)
            sorted_grad += dw
        grad = torch.empty_like(sorted_grad)
        grad[order] = sorted_grad  # back to the order of ``flat``
        return grad
