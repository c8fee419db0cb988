"""FLOPs accounting for sparse models, with the RigL paper's conventions (Evci et al. 2020).

Inference cost (:func:`count_flops`): one forward pass with hooks records, for every
weight matrix, its multiply-accumulates (MACs); FLOPs = 2 * MACs (a multiply and an add),
per example, biases, norms and activations omitted. A layer's FLOPs are scaled by the
density of its weight (MicroNet-style counting: only the non-zero weights are multiplied)::

    Linear           rows * in * out                 rows = every leading dim of the input
                     (also Hugging Face Conv1D, whose weight is stored (in, out))
    Conv{1,2,3}d     out_elements * k^d * c_in/groups   (so depthwise costs k^d per output)
    ConvTranspose    in_elements * k^d * c_out/groups
    RNN/GRU/LSTM     tokens * numel(W) for every W in weight_ih_l*, weight_hh_l*, weight_hr_l*
                     (all gates, layers and directions; tokens = batch * sequence length)
    MultiheadAttn    Lq*E*E (q) + Lk*E*kdim (k) + Lv*E*vdim (v) + Lq*E*E (out_proj), scaled;
                     plus QK^T and AV, 2 * Lq * S * E, activations by activations, unscaled
    Embedding        0 (a lookup)

Training cost (:func:`train_flops_ratio`, REFERENCE section 4): a dense step costs
``3 f_D`` (forward, gradient w.r.t. activations, gradient w.r.t. weights); the methods
differ in which of the three products are sparse. Ratios are relative to dense training
of the same length, times the length multiplier of extended runs ("RigL 5x").

Published numbers (paper Table 2, official README), reproduced to two decimals by
tests/test_flops.py for ResNet-50 at 224x224, 1000 classes, ΔT = 100::

    RigL uniform 80%  0.23x test, 0.23x train, 5x: 1.14x   (pruning 0.56x)
    RigL ERK 80%      0.42x test, 0.42x train, 5x: 2.09x   (SNFS ERK 0.61x)
    RigL uniform 90%  0.13x test, 0.13x train, 5x: 0.66x   (README; pruning 0.51x)
    RigL ERK 90%      0.24x test, 0.25x train, 5x: 1.23x   (SNFS ERK 0.50x)

Conventions that give them: uniform keeps the first conv dense and the final FC sparse;
ERK sparsifies every conv and the FC; counting is ``convention="micronet"`` (the MicroNet
counter of the official colabs, which adds one bias add and one activation per output
element and counts the Keras stem's conv on its zero-padded 230x230 input). Plain
``"macs"`` counting gives ratios about 0.001 lower (0.22x / 1.13x for uniform 80%).
The paper's Table 2 value for uniform 90% (0.10x, 5x 0.52x) is the count with the first
layer sparse too. The paper's MobileNet-v1 figures (uniform 0.27x / 0.12x, ERK 0.52x /
0.27x at 75% / 90%) come out only with depthwise convolutions sparse
(``dense_grouped_convs=False``); with them dense, as the official training code does,
they are 0.29x / 0.15x / 0.53x / 0.29x.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from rigl.flops_train import pruning_flops_fraction, train_flops_ratio
from rigl.layers import is_hf_conv1d

__all__ = [
    "CONVENTIONS",
    "FlopsReport",
    "LayerFlops",
    "count_flops",
    "pruning_flops_fraction",
    "train_flops_ratio",
]


@dataclass(frozen=True)
class LayerFlops:
    """One weight parameter's share of the per-example forward cost.

    ``name`` is the full parameter name (``layer1.0.conv1.weight``), or
    ``<module>.attention`` for the activation-by-activation products of attention.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    density: float
    params: int
    active_params: int
    flops_dense: float
    flops_sparse: float


@dataclass(frozen=True)
class FlopsReport:
    """Per-layer rows in call order and their totals (FLOPs per example)."""

    layers: tuple[LayerFlops, ...]

    @property
    def flops_dense(self) -> float:
        return sum(r.flops_dense for r in self.layers)

    @property
    def flops_sparse(self) -> float:
        return sum(r.flops_sparse for r in self.layers)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def active_params(self) -> int:
        return sum(r.active_params for r in self.layers)

    @property
    def inference_flops_ratio(self) -> float:
        """Sparse over dense inference FLOPs (the paper's "FLOPs (Test)" column)."""
        return self.flops_sparse / self.flops_dense if self.flops_dense else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [asdict(r) for r in self.layers],
            "flops_dense": self.flops_dense,
            "flops_sparse": self.flops_sparse,
            "params": self.params,
            "active_params": self.active_params,
            "inference_flops_ratio": self.inference_flops_ratio,
        }


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_RNNS = (nn.RNN, nn.GRU, nn.LSTM)


CONVENTIONS = ("macs", "micronet")


class _Counter:
    """Accumulates, per weight parameter, MACs and output elements over one forward.

    A module called several times (or weights tied across modules) adds up in one row.
    """

    def __init__(self, model: nn.Module, convention: str) -> None:
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.module_names = {id(m): n for n, m in model.named_modules()}
        # compressed layers (backend="sparse"): counted as the dense layer they stand for,
        # under its weight's name ("fc1.weight", as the sparsifier names it)
        from rigl.sparse.grow import GrowScores  # SparseLinear/Conv, CondensedLinear

        self.compressed = {
            id(m): (f"{n}.weight" if n else "weight", m)
            for n, m in model.named_modules()
            if isinstance(m, GrowScores)
        }
        self.same_padding = convention == "micronet"
        self.rows: dict[str, list[Any]] = {}  # name -> [type, shape, numel, macs, outputs]

    def add(self, module, weight, macs: float, outputs: float = 0.0, name=None) -> None:
        if name is None:
            name = self.names.get(id(weight))
            if name is None:  # a weight that is not a registered parameter: skip
                return
        shape = tuple(weight.shape) if weight is not None else ()
        numel = weight.numel() if weight is not None else 0
        row = self.rows.setdefault(name, [type(module).__name__, shape, numel, 0.0, 0.0])
        row[3] += macs
        row[4] += outputs

    def weight_names(self) -> set[str]:
        return set(self.names.values()) | {name for name, _ in self.compressed.values()}

    def compressed_densities(self) -> dict[str, float]:
        """Each compressed layer's density: its active values over its dense size."""
        return {
            name: m.values.numel() / max(math.prod(m.weight_shape), 1)
            for name, m in self.compressed.values()
        }

    def hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if id(module) in self.compressed:  # a matrix (out, in[*kh*kw]) whatever the layer
            name, _ = self.compressed[id(module)]
            weight = torch.empty(module.weight_shape, device="meta")
            self.add(module, weight, output.numel() * module.in_features, output.numel(), name)
        elif isinstance(module, nn.Linear):
            # MHA's out_proj is a Linear that MHA applies functionally: counted there.
            self.add(module, module.weight, output.numel() * module.in_features, output.numel())
        elif is_hf_conv1d(module):  # weight stored (in, out): the fan-in is shape[0]
            self.add(module, module.weight, output.numel() * module.weight.shape[0], output.numel())
        elif isinstance(module, _CONVS):
            self._conv(module, args[0], output)
        elif isinstance(module, _TRANSPOSED):
            # weight (in, out/groups, *k): every input element meets numel(weight) / in.
            in_channels = module.weight.shape[0]
            self.add(module, module.weight, args[0].numel() * module.weight.numel() / in_channels)
        elif isinstance(module, _RNNS):
            self._rnn(module, args[0])
        elif isinstance(module, nn.MultiheadAttention):
            self._attention(module, args, kwargs)
        elif isinstance(module, nn.Embedding):
            self.add(module, module.weight, 0.0)

    def _conv(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> None:
        # weight (out, in/groups, *k): every output element is a dot product of length
        # numel(weight) / out, i.e. k^d * in/groups.
        weight = module.weight
        length = weight.numel() / weight.shape[0]
        outputs = output.numel()
        if self.same_padding:  # MicroNet: out size ceil(in / stride), whatever the padding
            spatial = x.shape[-(weight.dim() - 2) :]
            per_map = math.prod(
                math.ceil(s / st) for s, st in zip(spatial, module.stride, strict=True)
            )
            outputs = x.numel() // (x.shape[-weight.dim() + 1] * math.prod(spatial))
            outputs *= per_map * weight.shape[0]
        self.add(module, weight, outputs * length, outputs)

    def _rnn(self, module: nn.RNNBase, x: Any) -> None:
        if isinstance(x, nn.utils.rnn.PackedSequence):
            tokens = x.data.shape[0]
        else:
            tokens = x.numel() // module.input_size  # batch * seq_len, whatever the layout
        for attr in module._flat_weights_names:
            if attr.startswith("weight"):
                weight = getattr(module, attr)
                self.add(module, weight, tokens * weight.numel())

    def _attention(self, module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
        names = ("query", "key", "value")
        q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))
        e, kdim, vdim = module.embed_dim, module.kdim, module.vdim
        lq, lk, lv = q.numel() // e, k.numel() // kdim, v.numel() // vdim  # tokens
        if module._qkv_same_embed_dim:
            self.add(module, module.in_proj_weight, e * (e * lq + kdim * lk + vdim * lv))
        else:
            self.add(module, module.q_proj_weight, lq * e * e)
            self.add(module, module.k_proj_weight, lk * e * kdim)
            self.add(module, module.v_proj_weight, lv * e * vdim)
        self.add(module, module.out_proj.weight, lq * e * e)
        batch = (q.shape[0] if module.batch_first else q.shape[1]) if q.dim() == 3 else 1
        # Q K^T and softmax(.) V: two (Lq x E) by (E x S) products per batch element,
        # summed over heads; activations by activations, so never scaled by a density.
        prefix = self.module_names.get(id(module), "")
        name = f"{prefix}.attention" if prefix else "attention"
        self.add(module, None, 2 * lq * (lk // batch) * e, name=name)


def _batch_size(example_input: Any) -> int:
    if isinstance(example_input, torch.Tensor):
        return example_input.shape[0] if example_input.dim() else 1
    values = example_input.values() if isinstance(example_input, Mapping) else example_input
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim():
            return v.shape[0]
    return 1


def count_flops(
    model: nn.Module,
    example_input: Any,
    densities: Mapping[str, float] | None = None,
    *,
    batch_size: int | None = None,
    convention: str = "macs",
) -> FlopsReport:
    """Per-example inference FLOPs of ``model`` on ``example_input``, dense and sparse.

    Args:
        model: any module; Linear, Conv, ConvTranspose, RNN/GRU/LSTM, MultiheadAttention
            and Embedding layers are counted (see the module docstring for the formulas).
        example_input: one batch: a tensor, a tuple of positional arguments or a dict of
            keyword arguments for ``model``.
        densities: {full parameter name: density in [0, 1]}, e.g. from
            ``rigl.layer_densities``; missing names are dense, except the layers of
            ``backend="sparse"`` (``SparseLinear``, ``SparseConv2d``, ``CondensedLinear``),
            counted as the dense layer they stand for (``fc1.weight``) at their own density.
        batch_size: examples in ``example_input``; by default the first dimension of its
            first tensor (pass it for sequence-first inputs).
        convention: "macs" (default): 2 * density * MACs, biases omitted. "micronet": the
            MicroNet-challenge counter of the official RigL FLOPs colabs: each output of a
            Linear/Conv costs ``2 * density * K + 1`` FLOPs (K multiplies, K - 1 adds, one
            bias add, one activation, whether or not the layer has a bias or activation)
            and conv outputs are counted as ``ceil(in / stride)`` per spatial dimension,
            as with 'same' padding. Other layer types count as in "macs".
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}; valid: {', '.join(CONVENTIONS)}")
    counter = _Counter(model, convention)
    densities = {**counter.compressed_densities(), **(densities or {})}
    unknown = sorted(set(densities) - counter.weight_names())
    if unknown:
        raise ValueError(f"densities name parameters that {type(model).__name__} lacks: {unknown}")
    handles = [m.register_forward_hook(counter.hook, with_kwargs=True) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, Mapping):
                model(**example_input)
            elif isinstance(example_input, tuple | list):
                model(*example_input)
            else:
                model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    n = batch_size or _batch_size(example_input)
    overhead = 1.0 if convention == "micronet" else 0.0
    rows = []
    for name, (kind, shape, numel, macs, outputs) in counter.rows.items():
        d = float(densities.get(name, 1.0))
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"density of {name} is {d!r}; must be in [0, 1]")
        dense = (2.0 * macs + overhead * outputs) / n
        sparse = (2.0 * d * macs + overhead * outputs) / n
        rows.append(LayerFlops(name, kind, shape, d, numel, round(d * numel), dense, sparse))
    return FlopsReport(tuple(rows))
