"""What a layer computes with: the weight tensors of each layer type, and where they live.

The rules behind :func:`rigl.find_targets` (the README's table "What is sparsified"):

==========================  =================================================  ==============
layer                       tensor(s)                                          by default
==========================  =================================================  ==============
``nn.Linear`` (+subclasses)  ``weight`` (out, in)                               sparse
HF ``Conv1D`` (GPT-2)       ``weight`` stored (in, out)                        sparse
``Conv1d/2d/3d``            ``weight`` (out, in/groups, *k)                    sparse; grouped
                                                                               and depthwise
                                                                               dense
``RNN/GRU/LSTM``            ``weight_ih_l*``, ``weight_hh_l*``, ``weight_hr_l*``  sparse
``MultiheadAttention``      packed ``in_proj_weight`` (3 blocks q, k, v), or   sparse
                            ``q/k/v_proj_weight``; ``out_proj`` is a Linear
``Embedding``               ``weight``                                         dense
==========================  =================================================  ==============

A weight computed by a parametrization is sparsified through the tensor it is computed
from, where that keeps the zeros: weight_norm (``w = g v / ||v||``) through ``v``,
spectral_norm (``w = W / sigma``) through ``W``, old-style (hook) and
``torch.nn.utils.parametrizations`` style alike. (With weight_norm an output row left with
no active weight has no direction: 0 / 0 gives NaN, so keep rows wide enough for the
sparsity.) Any other parametrization (orthogonal, user-defined) need not keep zeros, so it
is refused with a clear error.

Nothing here imports ``transformers``: its ``Conv1D`` is recognised by class name and module.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
RNNS = (nn.RNN, nn.GRU, nn.LSTM)

# Rule kinds: "default" weights are sparsified by default, "embedding" ones only with
# sparse_embeddings=True (a tied embedding/unembedding follows this rule), "include" ones
# only when an include pattern names them.
DEFAULT, EMBEDDING, INCLUDE = "default", "embedding", "include"


@dataclass(frozen=True)
class LayerWeight:
    """One weight tensor of a layer, by its attribute name on the layer."""

    attr: str
    kind: str
    blocks: int = 1  # equal row blocks that keep their own exact count (packed q/k/v: 3)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2 family): a linear layer with its weight stored
    ``(in, out)``, ``y = x @ W + b``. Recognised without importing transformers."""
    return any(
        cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
        for cls in type(module).__mro__
    )


def layer_weights(module: nn.Module, dense_grouped_convs: bool) -> list[LayerWeight]:
    """The weight tensors ``module`` multiplies its input by (see the module table)."""
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return [LayerWeight("weight", DEFAULT)]
    if isinstance(module, CONVS):
        grouped = module.groups > 1 and dense_grouped_convs
        return [LayerWeight("weight", INCLUDE if grouped else DEFAULT)]
    if isinstance(module, RNNS):
        names = [n for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]
        return [LayerWeight(n, DEFAULT) for n in names]
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            # q, k and v are three maps packed in one tensor: each keeps its own exact count,
            # so an update cannot move connections from one of them to another
            return [LayerWeight("in_proj_weight", DEFAULT, blocks=3)]
        return [
            LayerWeight(n, DEFAULT) for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        ]
    if isinstance(module, nn.Embedding):
        return [LayerWeight("weight", EMBEDDING)]
    return [LayerWeight("weight", INCLUDE)]  # only if an include pattern names it


@dataclass(frozen=True)
class Source:
    """Where the values of a layer's weight live: ``owner.attr`` is the Parameter to
    sparsify (the weight itself, or what a parametrization computes it from)."""

    owner: nn.Module
    attr: str
    note: str = ""
    error: str = ""  # set when the weight cannot be kept sparse: raised if it is chosen


def resolve(module: nn.Module, attr: str, layer: str) -> Source | None:
    """The Parameter behind ``module.<attr>``; None if there is no such tensor (or it has
    fewer than 2 dimensions). ``layer`` names the module in errors."""
    if parametrize.is_parametrized(module, attr):
        return _parametrized(module, attr, layer)
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == attr:
            return Source(module, f"{attr}_v", "weight_norm: its direction v is sparsified")
        if isinstance(hook, SpectralNorm) and hook.name == attr:
            return Source(module, f"{attr}_orig", "spectral_norm: W before the norm is sparsified")
    # registered parameters only: a property (SparseLinear.weight builds a dense tensor) or a
    # tensor computed elsewhere is not a weight to sparsify
    value = module._parameters.get(attr)
    if value is not None and value.dim() >= 2:
        return Source(module, attr)
    return None


def _parametrized(module: nn.Module, attr: str, layer: str) -> Source:
    chain = module.parametrizations[attr]
    kinds = [type(p).__name__ for p in chain]
    # Both keep zeros: w = g * v / ||v|| (per output row) and w = W / sigma.
    if kinds == ["_WeightNorm"]:
        return Source(chain, "original1", "weight_norm: its direction v is sparsified")
    if kinds == ["_SpectralNorm"]:
        return Source(chain, "original", "spectral_norm: W before the norm is sparsified")
    return Source(
        module,
        attr,
        error=(
            f"{layer}.{attr} is computed by the parametrization(s) {kinds}, which need not "
            "keep zeros at the masked positions, so it cannot be sparsified. Exclude it "
            f"(exclude=('{layer}.{attr}',)) or remove the parametrization "
            "(torch.nn.utils.parametrize.remove_parametrizations); weight_norm and "
            "spectral_norm are supported"
        ),
    )
