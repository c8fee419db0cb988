"""`rigl compare`: a sweep of training runs in parallel processes, then a table and plots.

Each run trains in its own folder ``<out>/runs/<name>/`` in a worker process with one
torch thread; a run whose ``final.json`` exists is not trained again, and one with a
checkpoint is resumed, so an interrupted sweep continues where it stopped. The results
are ``results.json`` (one record per run), ``results.md`` (mean ± std over seeds, rows =
methods, columns = sparsities, as in the paper) and the plots of :mod:`plots`.

Under ``torchrun`` (``torchrun --nproc-per-node N -m rigl.cli compare ...``) there is no
process pool: every rank trains the runs one after another, each data-parallel over all
ranks (``--jobs`` is ignored), and rank 0 writes every file. A run that fails stops the
sweep (the ranks could not go on in step); run the command again to continue it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rigl import distributed
from rigl.config import ConfigError
from rigl.distributed import DistEnv
from rigl.errors import RunError
from rigl.experiments.config import ExperimentConfig, from_dict
from rigl.experiments.runio import claim_output_folder, provenance, read_json, write_json
from rigl.experiments.sweeps import results, sweep
from rigl.experiments.sweeps.sweep import RunSpec, Sweep
from rigl.experiments.training.folder import FINAL, check_same_config
from rigl.registry import is_dense

RECORD_KEYS = (
    "test_accuracy", "test_loss", "test_bpc", "train_accuracy", "params", "params_dense", "density",
    "inference_flops_ratio", "train_flops_ratio", "total_steps", "wall_time_s", "cpu_time_s",
    "width",
)  # fmt: skip


def _outcome(final: dict[str, Any]) -> str:
    """A finished run in one phrase: its test metric and wall time."""
    return f"test {results.metric_of([final]).text(final)} ({final['wall_time_s']:.0f} s)"


def _worker_init(parent: int) -> None:
    import torch

    torch.set_num_threads(1)  # one core per run; --jobs runs side by side
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Make this worker die with the compare process ``parent``, even when that is killed
    by ``kill -9`` (no cleanup runs then): an orphan would train on, beside the runs of a
    re-run. Linux: the kernel sends SIGKILL (PR_SET_PDEATHSIG); elsewhere a thread polls."""
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _train_one(item: tuple[int, dict[str, Any]]) -> tuple[int, dict[str, Any] | None, str]:
    """Train one run in a worker: (index, final.json or None, error message)."""
    from rigl.experiments.training.train import train

    index, config_dict = item
    try:
        return index, train(from_dict(config_dict), resume=True, quiet=True), ""
    except Exception as exc:  # reported by the parent; the other runs go on
        return index, None, f"{type(exc).__name__}: {exc}"


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM: leave the pool's `with`, which terminates the workers


def _on_sigterm(handler: Any) -> Any:
    """Install a SIGTERM handler; returns the previous one (None off the main thread)."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def finished(config: ExperimentConfig) -> dict[str, Any] | None:
    """The ``final.json`` of a finished run with this config, else None."""
    out = Path(config.out)
    if not (out / FINAL).exists():
        return None
    check_same_config(config, out / "config.yaml")  # raises if the config changed
    return read_json(out / FINAL)


def run_sweep(
    plan: Sweep, out: Path, jobs: int, quiet: bool, env: DistEnv | None = None
) -> list[dict[str, Any]]:
    """Train every run not yet finished; returns one record per run (in plan order).
    With a distributed ``env``, every rank trains the runs in turn (no process pool)."""
    from rigl.experiments.training.ranks import main_first

    env = env or DistEnv()
    configs = {spec: spec.config(plan.base, out) for spec in plan.runs}
    found = main_first(env, lambda: [finished(configs[spec]) for spec in plan.runs])
    finals = dict(zip(plan.runs, found, strict=True))
    todo = [s for s in plan.runs if finals[s] is None]
    todo.sort(key=lambda s: -s.multiplier)  # longest first: better packing of the workers
    quiet = quiet or not env.is_main
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    how = f"{env.world_size} data-parallel processes" if env.enabled else f"{jobs} jobs"
    say(f"{len(plan.runs)} runs, {len(plan.runs) - len(todo)} already finished, {how}")
    failures = []
    if todo and env.enabled:
        from rigl.experiments.training.train import train

        for done, spec in enumerate(todo, start=1):
            final = train(configs[spec], resume=True, quiet=True)  # every rank, in step
            finals[spec] = final
            say(f"[{done}/{len(todo)}] {spec.name}: {_outcome(final)}")
    elif todo:
        _warm_data([configs[s] for s in todo])
        items = [(i, configs[s].to_dict()) for i, s in enumerate(todo)]
        previous = _on_sigterm(_interrupt)
        context = multiprocessing.get_context("spawn")
        try:
            pool = context.Pool(jobs, initializer=_worker_init, initargs=(os.getpid(),))
            with pool:  # exit: terminate()
                results = pool.imap_unordered(_train_one, items)
                for done, (index, final, error) in enumerate(results, start=1):
                    spec = todo[index]
                    if final is None:
                        failures.append(f"{spec.name}: {error}")
                        say(f"[{done}/{len(todo)}] {spec.name} FAILED: {error}")
                        continue
                    finals[spec] = final
                    say(f"[{done}/{len(todo)}] {spec.name}: {_outcome(final)}")
        finally:
            _on_sigterm(previous)
    if failures:
        raise RunError(
            f"{len(failures)} of {len(plan.runs)} runs failed (the others are kept; run the "
            "same command again to retry only these):\n  " + "\n  ".join(failures)
        )
    return [record(spec, finals[spec], out, plan) for spec in plan.runs]


def _warm_data(configs: list[ExperimentConfig]) -> None:
    """Load each dataset once here, so that workers read the cache instead of all
    generating it at the same time (MNIST-1D is generated on first use)."""
    from rigl.experiments.data.datasets import load_dataset

    seen = set()
    for c in configs:
        key = (c.dataset, c.data_root, repr(sorted(c.dataset_options.items())))
        if key not in seen:
            seen.add(key)
            load_dataset(c.dataset, root=c.data_root, **c.dataset_options)


def record(spec: RunSpec, final: dict[str, Any], out: Path, plan: Sweep) -> dict[str, Any]:
    several = len({r.distribution for r in plan.runs if not is_dense(r.method)}) > 1
    return {
        "name": spec.name,
        "row": spec.row(show_distribution=several),
        "method": spec.method,
        "sparsity": spec.sparsity,
        "distribution": None if is_dense(spec.method) else spec.distribution,
        "seed": spec.seed,
        "multiplier": spec.multiplier,
        **{k: final.get(k) for k in RECORD_KEYS},
        "run_dir": str(Path("runs") / spec.name),
    }


def compare(plan: Sweep, out: Path, *, jobs: int, quiet: bool, argv: list[str] | None = None):
    """Run the sweep and write results.json, results.md and the plots; returns the table."""
    from rigl.experiments.sweeps import plots
    from rigl.experiments.training.builders import make_device
    from rigl.experiments.training.ranks import main_first

    make_device(plan.base.device)  # a clear error before CUDA is touched
    env = distributed.init_from_env(device=plan.base.device)  # no-op in a single process
    main_first(env, lambda: claim_output_folder(out, "compare", _written_by_compare))
    start = time.perf_counter()
    records = run_sweep(plan, out, jobs, quiet, env)
    wall = time.perf_counter() - start
    rows = results.summarise(records, plan.sparsities)
    metric = results.metric_of(records)
    table = results.markdown(rows, plan.sparsities, metric)
    if env.is_main:  # only rank 0 writes
        meta = {
            **provenance(argv),
            "wall_time_s": wall,
            "cpu_time_s": sum(r["cpu_time_s"] or 0.0 for r in records),
            "jobs": 1 if env.enabled else jobs,
            "world_size": env.world_size,  # > 1: each run data-parallel under torchrun
            "base": plan.base.to_dict(),
            "sweep": plan.settings,
            "metric": metric.name,
        }
        write_json(out / "results.json", {"meta": meta, "records": records, "summary": rows})
        results.write_markdown(out / "results.md", table, plan, meta, records, metric)
        plots.plot_all(records, rows, plan.sparsities, out, metric)
    distributed.barrier()
    return table


def _written_by_compare(out: Path) -> bool:
    """A compare folder from before the marker: its ``runs/`` holds marked run folders and
    everything beside it is a name compare writes."""
    from rigl.experiments.training.folder import MARKER

    runs = out / "runs"
    if not (runs.is_dir() and any((r / MARKER).exists() for r in runs.iterdir())):
        return False
    known = {"runs", "results.json", "results.md"}
    return all(p.name in known or p.suffix == ".png" for p in out.iterdir())


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rigl.experiments.flags import add_config_flags

    parser.description = (
        "Sweep methods, sparsities, distributions, seeds and training-length multipliers; "
        "dense runs once per seed; finished runs are skipped on re-runs. The base config is "
        "--preset or --config, else the tuned config of --dataset (configs/<name>.yaml, as "
        "the presets use); flags override it."
    )
    parser.add_argument("--preset", help="a sweep file configs/<NAME>.yaml, e.g. main, mnist5k")
    parser.add_argument("--config", help="a sweep file, or a training config used as the base")
    parser.add_argument("--methods", type=_names, help="e.g. static,set,rigl")
    parser.add_argument("--sparsities", type=_numbers, help="e.g. 0.9,0.95")
    parser.add_argument("--distributions", type=_names, help="e.g. erk,uniform")
    parser.add_argument("--seeds", type=int, help="number of seeds (0 .. N-1)")
    parser.add_argument("--multipliers", type=_numbers, help="training lengths, e.g. 1,2,5")
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel runs (ignored under torchrun: the runs take turns on every rank)",
    )
    parser.add_argument("--out", default="results/compare", help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    add_config_flags(
        parser, skip=("out", "method", "sparsity", "distribution", "seed", "multiplier")
    )


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _numbers(text: str) -> list[float]:
    return [float(t) for t in _names(text)]


def plan_from_args(args: argparse.Namespace) -> Sweep:
    if args.preset and args.config:
        raise ConfigError("give either --preset or --config, not both")
    fields = ExperimentConfig.__dataclass_fields__
    overrides = {k: v for k, v in vars(args).items() if k in fields and k != "out"}
    path = sweep.find_preset(args.preset) if args.preset else args.config
    if path is None:
        path = sweep.tuned_base(overrides, quiet=args.quiet)
    base, settings = sweep.read_sweep_file(Path(path) if path else None)
    grid = {k: getattr(args, k) for k in sweep.SWEEP_KEYS if getattr(args, k, None) is not None}
    if {"methods", "distributions", "multipliers"} & set(grid):
        settings.pop("runs", None)  # command-line grid replaces the file's run list
    base_config = from_dict({**base, **overrides}, source=str(path or "command line"))
    return sweep.expand(base_config, {**settings, **grid})


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ConfigError(f"--jobs={args.jobs} must be >= 1")
    plan = plan_from_args(args)
    table = compare(plan, Path(args.out), jobs=args.jobs, quiet=args.quiet, argv=args.argv)
    if distributed.is_main_process():
        print(table)
    return 0
