"""Loss and accuracy along the line between two solutions (RigL paper, Figure 5 right).

``θ(a) = (1 - a) θ_A + a θ_B`` for ``a`` in [-0.2, 1.2]: every floating-point tensor of
the two state dicts is interpolated (buffers that are not floats are taken from B).
The two sparse solutions have different masks, so every interpolated point between them
is denser than either end: that is expected and is what the paper plots too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rigl.config import ConfigError

ALPHAS = tuple(np.round(np.linspace(-0.2, 1.2, 29), 4))  # steps of 0.05


@dataclass(frozen=True)
class InterpPoint:
    alpha: float
    split: str  # "train" / "test"
    loss: float
    accuracy: float


def interpolate_state(
    a: dict[str, Tensor], b: dict[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """``(1 - alpha) a + alpha b`` on floating tensors; other entries from ``b``."""
    if a.keys() != b.keys():
        raise ValueError(f"state dicts differ in keys: {sorted(set(a) ^ set(b))}")
    out = {}
    for name, tb in b.items():
        ta = a[name]
        if ta.shape != tb.shape:
            raise ValueError(f"{name}: shapes {tuple(ta.shape)} and {tuple(tb.shape)} differ")
        out[name] = (1 - alpha) * ta + alpha * tb if tb.is_floating_point() else tb.clone()
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on (inputs (N, ...), targets (N,))."""
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        logits = model(inputs[start : start + batch_size])  # (b, classes)
        y = targets[start : start + batch_size]
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return loss / len(inputs), correct / len(inputs)


def interpolation_curve(
    model: nn.Module,
    state_a: dict[str, Tensor],
    state_b: dict[str, Tensor],
    splits: dict[str, tuple[Tensor, Tensor]],
    alphas: Sequence[float] = ALPHAS,
) -> list[InterpPoint]:
    """Evaluate ``model`` at every ``θ(alpha)`` on each split {name: (inputs, targets)}."""
    points = []
    for alpha in alphas:
        model.load_state_dict(interpolate_state(state_a, state_b, float(alpha)))
        for split, (x, y) in splits.items():
            loss, acc = evaluate(model, x, y)
            points.append(InterpPoint(float(alpha), split, loss, acc))
    return points


def interpolation_figure(points: list[InterpPoint], labels: tuple[str, str], path) -> None:
    from matplotlib.figure import Figure

    from rigl.experiments.reports.figures import _plain_log_labels, _save

    fig = Figure(figsize=(9, 3.3), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for split, style in (("train", "-"), ("test", "--")):
        rows = [p for p in points if p.split == split]
        if not rows:
            continue
        a = [p.alpha for p in rows]
        ax_loss.plot(a, [p.loss for p in rows], style, marker=".", label=split)
        ax_acc.plot(a, [100 * p.accuracy for p in rows], style, marker=".", label=split)
    for ax, name in ((ax_loss, "loss (cross-entropy)"), (ax_acc, "accuracy (%)")):
        ax.axvline(0, color="grey", lw=0.6)
        ax.axvline(1, color="grey", lw=0.6)
        ax.set_xlabel(f"a   (0: {labels[0]},  1: {labels[1]})", fontsize=8)
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    ax_loss.set_yscale("log")
    _plain_log_labels(ax_loss)
    fig.suptitle(
        f"Linear interpolation θ(a) = (1-a) θ[{labels[0]}] + a θ[{labels[1]}]", fontsize=10
    )
    _save(fig, path)


def pick_pair(runs: list) -> tuple | None:
    """Static and RigL runs of the same dataset, model and sparsity (same distribution
    preferred), or None."""
    best = None
    for a in runs:
        for b in runs:
            if a.method != "static" or b.method != "rigl" or a.sparsity != b.sparsity:
                continue
            same = ("dataset", "dataset_options", "model", "model_options", "width")
            if any(a.config.get(k) != b.config.get(k) for k in same):
                continue
            if a.distribution == b.distribution:
                return a, b
            best = best or (a, b)
    return best


def load_pair(run_a, run_b, max_examples: int | None = None):
    """Model (built from ``run_b``'s config), both final states and the train/test tensors."""
    from rigl.experiments.config import from_dict
    from rigl.experiments.data.datasets import load_dataset
    from rigl.experiments.reports.rundata import load_checkpoint, model_state
    from rigl.experiments.training.builders import make_model

    config = from_dict(run_b.config)
    data = load_dataset(config.dataset, root=config.data_root, **config.dataset_options)
    width = float(run_b.final.get("width", config.width))
    model = make_model(config, data, width)
    states = []
    for run in (run_a, run_b):
        try:
            checkpoint = load_checkpoint(run.path / "checkpoint.pt")
        except Exception as exc:  # truncated, not a torch file: name it, not torch's trace
            raise ConfigError(
                f"{str(run.path / 'checkpoint.pt')!r} cannot be read ({type(exc).__name__}): "
                "it is damaged; leave this run out, or pass --no-interpolation"
            ) from exc
        if checkpoint is None:
            raise FileNotFoundError(f"{run.path} has no checkpoint.pt to interpolate")
        states.append(model_state(checkpoint))
    mismatched = _shape_mismatch(*states)
    if mismatched:
        raise ConfigError(
            f"{run_a.path} and {run_b.path} are different models ({mismatched}): give a "
            "--pair of runs of the same model, or pass --no-interpolation"
        )
    splits = {}
    for split in ("train", "test"):
        x, y = getattr(data, split).tensors
        splits[split] = (x[:max_examples], y[:max_examples])
    return model, states[0], states[1], splits


def _shape_mismatch(state_a: dict, state_b: dict) -> str:
    """The first tensor whose shape differs between two model states, or ''."""
    for name, ta in state_a.items():
        tb = state_b.get(name)
        if tb is None or tuple(ta.shape) != tuple(tb.shape):
            other = None if tb is None else tuple(tb.shape)
            return f"{name}: {tuple(ta.shape)} and {other}"
    return ""


def write_points(points: list[InterpPoint], path) -> None:
    from rigl.experiments.runio import atomic_write_text

    lines = ["alpha,split,loss,accuracy"]
    lines += [f"{p.alpha:g},{p.split},{p.loss:.6g},{p.accuracy:.6g}" for p in points]
    atomic_write_text(path, "\n".join(lines) + "\n")
