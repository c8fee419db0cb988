"""The ``rigl`` command: ``rigl train | compare | flops | report ...``.

Each subcommand is a module with ``add_parser(subparsers)`` and ``run(args) -> int``;
adding one is one line in :data:`SUBCOMMANDS`. A listed module that is not installed
(yet) is skipped, so the list may name commands that land later.

Under ``torchrun`` (``torchrun --nproc-per-node N -m rigl.cli train ...``) every rank runs
the command; ``main`` leaves the process group on the way out, and an error that every
rank raises is printed once, by rank 0.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from rigl._version import __version__

SUBCOMMANDS: dict[str, str] = {
    "train": "rigl.experiments.train",
    "compare": "rigl.experiments.compare",
    "flops": "rigl.experiments.flops_cli",
    "report": "rigl.experiments.report",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rigl",
        description="Sparse training with RigL and its baselines (Evci et al. 2020).",
    )
    parser.add_argument("--version", action="version", version=f"rigl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise  # the module exists but one of its imports is missing
            continue
        sub = module.add_parser(subparsers)
        sub.set_defaults(handler=module.run, command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from rigl import distributed
    from rigl.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        try:
            return int(args.handler(args) or 0)
        except (ConfigError, FileNotFoundError) as exc:  # bad config, missing data files
            _report(args.command, exc)
            return 2
        except KeyboardInterrupt:
            print(f"rigl {args.command}: interrupted (finished runs are kept)", file=sys.stderr)
            return 130
    finally:
        distributed.cleanup()  # leave the torchrun process group, if one was joined


def _report(command: str, exc: BaseException) -> None:
    """The error message, from rank 0 only when every rank raised it (under torchrun)."""
    rank = int(os.environ.get("RANK", "0"))
    if rank and getattr(exc, "rigl_every_rank", False):
        return
    where = f" (rank {rank})" if rank else ""
    print(f"rigl {command}{where}: error: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
