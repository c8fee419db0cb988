"""Which storage each sparsified tensor gets: masked dense, or compressed (``SparseLinear``).

``backend="masked"`` masks every target. ``backend="sparse"`` replaces a layer by a
``rigl.sparse.SparseLinear`` only where the replacement computes exactly what the model
computed and trains every parameter it trained: a plain ``nn.Linear``, called by its parent,
with its own untied weight and no hooks. Anything else stays masked, and the reason is
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
            "nn.Linear it can replace); all stay masked, summary_table() says why",
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
    computed = isinstance(module, ParametrizationList) or target.param_name != "weight"
    if not isinstance(module, nn.Linear) and not computed:
        return "masked", f"only nn.Linear layers are compressed, this is a {kind}"
    if computed:
        return "masked", "its weight is computed from this tensor (weight_norm, spectral_norm)"
    if type(module) is not nn.Linear:  # e.g. MultiheadAttention's out_proj, used functionally
        return "masked", f"{kind} subclasses nn.Linear (its forward may differ)"
    if module is model:
        return "masked", "the model is this nn.Linear: it cannot be replaced in place"
    if uses > 1:
        return "masked", "the module is used under several names"
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
        return "masked", "the layer has hooks that a replacement would lose"
    return "sparse", ""


def check_materialised(model: nn.Module, targets: list[Target], placed: list[Placement]) -> None:
    """A model may be built on the ``meta`` device only where backend='sparse' creates
    the layers from their shapes (the compressed ``nn.Linear`` layers)."""
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
            "nn.Linear layers of backend='sparse' are created from their shapes. Build "
            "the other layers on a real device (or pass backend='sparse')."
        )
