"""The ``rigl`` command: ``rigl train | compare | flops | report ...``.

Each subcommand is a module with ``add_parser(subparsers)`` and ``run(args) -> int``;
adding one is one line in :data:`SUBCOMMANDS`. A listed module that is not installed
(yet) is skipped, so the list may name commands that land later.
"""

from __future__ import annotations

import argparse
import importlib
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
    from rigl.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, FileNotFoundError) as exc:  # bad config, missing data files
        print(f"rigl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rigl {args.command}: interrupted (finished runs are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
