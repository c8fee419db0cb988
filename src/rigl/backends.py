"""Which storage each sparsified tensor gets: masked dense, or compressed (``SparseLinear``,
``SparseConv2d``, ``SparseConv1d``).

``backend="masked"`` masks every target. ``backend="sparse"`` replaces a layer by its
compressed form only where the replacement computes exactly what the model computed and
trains every parameter it trained: a plain ``nn.Linear``, ``nn.Conv2d`` or ``nn.Conv1d``
(``groups=1``, zero padding, symmetric), called by its parent, with its own untied weight
and no hooks. Anything else stays masked, and the reason is
kept for ``summary()``; the compressed backend never unties a weight and never leaves a
parameter outside the optimizer or the forward pass.
"""

from __future__ import annotations

import warnings
from collections import Counter

from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from rigl.config import ConfigError
from rigl.targets import Target

Placement = tuple[str, str]  # ("masked" | "sparse", why it is not compressed)


def choose_backends(model: nn.Module, targets: list[Target], backend: str) -> list[Placement]:
    """(backend, why) per target."""
    if backend != "sparse":
        return [("masked", "")] * len(targets)
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    placed = [_placement(model, t, uses[id(t.module)]) for t in targets]
    if all(b == "masked" for b, _ in placed):
        warnings.warn(
            "backend='sparse' compresses none of the sparsified layers (none is a plain "
            "nn.Linear or convolution it can replace); all stay masked, summary_table() says why",
            stacklevel=4,
        )
    return placed


def _placement(model: nn.Module, target: Target, uses: int) -> Placement:
    """``uses``: how many names the target's module has in ``model``."""
    module, kind = target.module, target.module_type
    if target.aliases:
        return "masked", "a tied weight: converting would untie it"
    if kind == "Conv1D":
        return "masked", "HF Conv1D (weight stored (in, out)) is not converted"
    if isinstance(module, ParametrizationList):
        return "masked", "its weight is computed from this tensor (weight_norm, spectral_norm)"
    if not isinstance(module, _COMPRESSIBLE):
        return "masked", f"only nn.Linear and nn.Conv1d/2d layers are compressed, this is a {kind}"
    if target.param_name != "weight":  # e.g. torch.nn.utils.weight_norm's weight_v
        return "masked", f"its weight is computed from {target.param_name!r} (weight_norm)"
    if type(module) not in _COMPRESSIBLE:  # e.g. MultiheadAttention's out_proj, used functionally
        return "masked", f"{kind} subclasses {_base(module)} (its forward may differ)"
    if isinstance(module, nn.Conv1d | nn.Conv2d) and (why := _conv_reason(module)):
        return "masked", why
    if module is model:
        return "masked", "the model is this nn.Linear: it cannot be replaced in place"
    if uses > 1:
        return "masked", "the module is used under several names"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return "masked", "the layer has hooks that a replacement would lose"
    return "sparse", ""


_COMPRESSIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _base(module: nn.Module) -> str:
    return next(f"nn.{t.__name__}" for t in _COMPRESSIBLE if isinstance(module, t))


def _conv_reason(conv: nn.Conv1d | nn.Conv2d) -> str:
    """Why a convolution stays masked ("" if it can be compressed)."""
    if conv.groups != 1:
        return f"a grouped convolution (groups={conv.groups}) is not compressed"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: only zero padding is compressed"
    if conv.padding == "same" and any(
        d * (k - 1) % 2 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
    ):
        return "padding='same' pads this kernel unevenly: only symmetric padding is compressed"
    return ""


def check_materialised(model: nn.Module, targets: list[Target], placed: list[Placement]) -> None:
    """A model may be built on the ``meta`` device only where backend='sparse' creates
    the layers from their shapes (the compressed ``nn.Linear`` and convolution layers)."""
    created = {
        id(p)
        for t, (backend, _) in zip(targets, placed, strict=True)
        if backend == "sparse"
        for p in t.module.parameters()
    }
    named = (*model.named_parameters(), *model.named_buffers())
    on_meta = [name for name, t in named if t.is_meta and id(t) not in created]
    if on_meta:
        raise ConfigError(
            f"parameters/buffers {on_meta} are on the meta device; only the sparsified "
            "nn.Linear/Conv1d/Conv2d layers of backend='sparse' are created from their shapes. Build "
            "the other layers on a real device (or pass backend='sparse')."
        )
