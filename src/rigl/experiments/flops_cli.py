"""``rigl flops``: per-layer FLOPs, parameters and training cost of a sparse model.

Example::

    rigl flops --model resnet50 --sparsity 0.8 --distribution uniform --first-layer-dense \\
        --method rigl --multiplier 5

Models are built on the ``meta`` device: no memory, a second or two even for ResNet-50.
This command needs torch only (no optional package).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys

import torch

import rigl
from rigl.errors import ConfigError
from rigl.experiments.models.zoo import build_model, example_input, list_models, model_defaults
from rigl.flops import CONVENTIONS, FlopsReport, count_flops, train_flops_ratio
from rigl.flops_size import SizeReport, model_size
from rigl.registry import find_method, is_dense


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input {text!r}: expected e.g. 3x224x224") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input {text!r}: sizes must be positive")
    return shape


DESCRIPTION = """\
Per-layer FLOPs, parameters and training cost of a model at a given sparsity, counted on
the meta device (no memory, no data, about a second even for ResNet-50).

example:
  rigl flops --model resnet50 --sparsity 0.8 --distribution uniform --first-layer-dense \\
      --method rigl --multiplier 5
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its example keeps its lines); a default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS):  # flags, "the model's"
            return action.help or ""
        return f"{action.help or ''} (default: %(default)s)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``flops`` sub-command's arguments on its parser ``p``."""
    p.description = DESCRIPTION
    p.formatter_class = _Formatter
    p.add_argument("--model", required=True, choices=list_models(), help="model name")
    p.add_argument("--input", type=_shape, metavar="SHAPE", help="input shape without batch, e.g. 3x224x224 "
                   "(default: the model's usual one)")  # fmt: skip
    p.add_argument("--num-classes", type=int, help="output classes (default: the model's)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier")
    p.add_argument("--sparsity", type=float, default=0.9, help="global sparsity S in [0, 1)")
    p.add_argument("--distribution", default="erk", choices=("uniform", "er", "erk"),
                   help="how the sparsity is spread over the layers")  # fmt: skip
    p.add_argument("--erk-power", type=float, default=1.0,
                   help="exponent of ERK's layer scores (< 1 softens ERK towards uniform)")  # fmt: skip
    p.add_argument("--first-layer-dense", action="store_true", help="keep the first layer dense")
    p.add_argument("--last-layer-dense", action="store_true", help="keep the last layer dense")
    p.add_argument(
        "--sparse-depthwise",
        action="store_true",
        help="also sparsify depthwise/grouped convs (dense by default)",
    )
    p.add_argument("--method", default="rigl", choices=rigl.list_methods(),
                   help="training method, for the training FLOPs")  # fmt: skip
    p.add_argument("--multiplier", type=float, default=1.0, help="training length (5 for 5x)")
    p.add_argument("--update-interval", type=int, default=100, help="ΔT, steps between updates")
    p.add_argument("--fact", action="append", default=[], metavar="KEY=VALUE",
                   help="a schedule fact the method's training cost reads (repeatable), e.g. "
                   "backward_ratio=3 for topkast or pruning_end=0.5 for gmp; a run's own "
                   "facts are in its final.json (default: the method's)")  # fmt: skip
    p.add_argument("--convention", default="macs", choices=CONVENTIONS,
                   help="macs: 2 x density x multiply-adds, biases left out; micronet: "
                   "the MicroNet counter of the official RigL FLOPs colabs")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _report(args: argparse.Namespace) -> tuple[FlopsReport, SizeReport, float]:
    defaults = model_defaults(args.model)
    shape = args.input or defaults["input_shape"]
    with torch.device("meta"):
        model = build_model(
            args.model,
            num_classes=args.num_classes or defaults["num_classes"],
            input_shape=shape,
            width=args.width,
        )
    densities = {}
    if not is_dense(args.method) and args.sparsity > 0:
        densities = rigl.layer_densities(
            model,
            args.sparsity,
            args.distribution,
            erk_power=args.erk_power,
            first_layer_dense=args.first_layer_dense,
            last_layer_dense=args.last_layer_dense,
            dense_grouped_convs=not args.sparse_depthwise,
        )
    x = example_input(args.model, shape, device="meta")
    report = count_flops(model, x, densities, convention=args.convention)
    train = train_flops_ratio(
        args.method,
        report.flops_sparse,
        report.flops_dense,
        update_interval=args.update_interval,
        multiplier=args.multiplier,
        **parse_facts(args.method, args.fact),
    )
    return report, model_size(model, densities), train


def parse_facts(method: str, items: list[str]) -> dict[str, float]:
    """``["key=value", ...]`` as numbers, each a keyword of the method's
    ``train_step_flops`` (a ConfigError naming the ones it reads otherwise)."""
    known = [
        name
        for name, param in inspect.signature(
            find_method(method).train_step_flops
        ).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name != "update_interval"
    ]
    facts = {}
    for item in items:
        key, sep, value = item.partition("=")
        if key not in known:
            raise ConfigError(
                f"--fact {item!r}: method {method!r} reads "
                + (", ".join(known) if known else "no schedule facts")
            )
        try:
            facts[key] = float(value)
        except ValueError:
            facts[key] = math.nan  # also for a KEY without "=NUMBER"
        if not sep or not math.isfinite(facts[key]):
            raise ConfigError(f"--fact {item!r}: give KEY=NUMBER, e.g. {key}=0.5")
    return facts


def _table(report: FlopsReport, size: SizeReport, train: float, args: argparse.Namespace) -> str:
    width = max([len(r.name) for r in report.layers] + [5])
    lines = [f"{'layer':<{width}}  {'shape':<20} {'density':>7} {'params':>11} {'FLOPs':>14}"]
    for r in report.layers:
        shape = "x".join(map(str, r.shape)) or "-"
        lines.append(
            f"{r.name:<{width}}  {shape:<20} {r.density:>7.4f} {r.active_params:>11,} "
            f"{r.flops_sparse:>14,.0f}"
        )
    run = f"{args.method} {args.multiplier:g}x"
    lines += [
        "",
        f"params (all):        {size.active_params:,} active of {size.params:,}",
        f"size:                {size.sparse_bytes / 1e6:.3f} MB sparse (CSR), "
        f"{size.dense_bytes / 1e6:.3f} MB dense",
        f"inference FLOPs:     {report.flops_sparse:.4g} of {report.flops_dense:.4g} dense "
        f"= {report.inference_flops_ratio:.2f}x",
        f"training FLOPs:      {train:.2f}x dense ({run}, ΔT={args.update_interval})",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON) for the parsed ``args``; returns the exit status."""
    try:
        report, size, train = _report(args)
    except ValueError as err:  # rigl.ConfigError included: the message names the argument
        print(f"rigl flops: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = {
            "model": args.model,
            "sparsity": args.sparsity,
            "distribution": args.distribution,
            "method": args.method,
            "multiplier": args.multiplier,
            "convention": args.convention,
            "layers": report.to_dict()["layers"],
            "flops_dense": report.flops_dense,
            "flops_sparse": report.flops_sparse,
            "inference_flops_ratio": report.inference_flops_ratio,
            "train_flops_ratio": train,
            "params": {"total": size.params, "active": size.active_params},
            "bytes": {"dense": size.dense_bytes, "csr": size.sparse_bytes},
        }
        print(json.dumps(out))
    else:
        print(_table(report, size, train, args))
    return 0


def main(argv: list[str] | None = None) -> int:
    from rigl.cli import main as rigl_main

    return rigl_main(["flops", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
