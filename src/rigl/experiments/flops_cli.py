"""``rigl flops``: per-layer FLOPs, parameters and training cost of a sparse model.

Example::

    rigl flops --model resnet50 --sparsity 0.8 --distribution uniform --first-layer-dense \\
        --method rigl --multiplier 5

Models are built on the ``meta`` device: no memory, a second or two even for ResNet-50.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

import rigl
from rigl.experiments.models import build_model, example_input, list_models, model_defaults
from rigl.flops import CONVENTIONS, TRAIN_METHODS, FlopsReport, count_flops, train_flops_ratio
from rigl.flops_size import SizeReport, model_size


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input {text!r}: expected e.g. 3x224x224") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input {text!r}: sizes must be positive")
    return shape


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``flops`` sub-command on ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "flops",
        help="per-layer FLOPs, parameters and training cost of a sparse model",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, choices=list_models())
    p.add_argument("--input", type=_shape, help="input shape without batch, e.g. 3x224x224")
    p.add_argument("--num-classes", type=int, help="output classes (default: the model's)")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier")
    p.add_argument("--sparsity", type=float, default=0.9, help="global sparsity S in [0, 1)")
    p.add_argument("--distribution", default="erk", choices=("uniform", "er", "erk"))
    p.add_argument("--erk-power", type=float, default=1.0)
    p.add_argument("--first-layer-dense", action="store_true")
    p.add_argument("--last-layer-dense", action="store_true")
    p.add_argument(
        "--sparse-depthwise",
        action="store_true",
        help="also sparsify depthwise/grouped convs (dense by default)",
    )
    p.add_argument("--method", default="rigl", choices=(*TRAIN_METHODS, "pruning"))
    p.add_argument("--multiplier", type=float, default=1.0, help="training length (5 for 5x)")
    p.add_argument("--update-interval", type=int, default=100, help="ΔT, steps between updates")
    p.add_argument("--convention", default="macs", choices=CONVENTIONS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


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
    if args.method != "dense" and args.sparsity > 0:
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
    )
    return report, model_size(model, densities), train


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
    parser = argparse.ArgumentParser(prog="rigl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["flops", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
