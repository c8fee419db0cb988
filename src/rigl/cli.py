"""The ``rigl`` command: ``rigl train | compare | flops | report ...``.

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``;
adding one is one line in :data:`COMMANDS`. Only the module of the command being run is
imported: ``rigl --help`` and ``rigl --version`` import neither torch nor any optional
package, and a command whose optional packages are missing says which extra to install
(``pip install "rigl[experiments]"``) in one line instead of a traceback.

Under ``torchrun`` (``torchrun --nproc-per-node N -m rigl.cli train ...``) every rank runs
the command; ``main`` leaves the process group on the way out, and an error that every
rank raises is printed once, by rank 0.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence

from rigl._extras import missing_package_message
from rigl._version import __version__
from rigl.config import ConfigError
from rigl.errors import RunError

COMMANDS: dict[str, tuple[str, str]] = {  # name -> (module, one-line summary)
    "train": (
        "rigl.experiments.training.train",
        "train one model (a config file, flags override it)",
    ),
    "compare": (
        "rigl.experiments.sweeps.compare",
        "train a grid of methods x sparsities x seeds and tabulate the results",
    ),
    "flops": (
        "rigl.experiments.flops_cli",
        "per-layer FLOPs, parameters and training cost of a sparse model",
    ),
    "report": (
        "rigl.experiments.reports.report",
        "figures and an HTML page for one or more run folders",
    ),
}


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser. Only the modules of ``commands`` (default: all) are imported and get
    their full arguments; the others are listed with their summary, which is all that
    ``rigl --help`` shows."""
    parser = argparse.ArgumentParser(
        prog="rigl",
        description="Sparse training with RigL and its baselines (Evci et al. 2020).",
        epilog="Run 'rigl COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"rigl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, summary) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=summary, description=summary, allow_abbrev=False)
        if commands is None or name in commands:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run, command=name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the first word that is not an option names the command (`rigl` has no option
    # that takes a value)
    command = next((a for a in argv if not a.startswith("-")), None)
    # torch warns at import when numpy is missing; `rigl flops` needs only torch
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    try:
        args = build_parser([command] if command else []).parse_args(argv)
        args.argv = argv
        try:
            return int(args.handler(args) or 0)
        except (ConfigError, FileNotFoundError) as exc:  # bad config, missing data files
            _report(args.command, exc)
            return 2
        except RunError as exc:  # e.g. failed runs of a sweep, the others kept
            _report(args.command, exc)
            return 1
        except KeyboardInterrupt:
            print(f"rigl {args.command}: interrupted (finished runs are kept)", file=sys.stderr)
            return 130
    except ConfigError as exc:  # while building the parser, e.g. a bad RIGL_PLUGINS module
        _report(command or "", exc)
        return 2
    except ModuleNotFoundError as exc:  # an optional package of this command
        message = missing_package_message(exc)
        if message is None:
            raise
        print(f"rigl {command}: error: this command {message}", file=sys.stderr)
        return 2
    finally:
        distributed = sys.modules.get("rigl.distributed")
        if distributed is not None:
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
