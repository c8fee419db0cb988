"""Metadata stamped on every benchmark result: git hash, versions, machine, threads."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import rigl

RESULTS = Path(__file__).resolve().parent / "results"


def threads_and_clock(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Callable:
    """Apply ``--threads``; the clock ``--clock`` asks for: ``wall`` (perf_counter) or
    ``thread`` (CPU time of this thread: robust on a shared machine, with one thread)."""
    torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if args.threads != 1:
            parser.error("--clock thread measures one thread: use --threads 1")
        return time.thread_time
    return time.perf_counter


def time_round_robin(
    steps: dict[str, Callable[[], None]],
    repeats: int,
    clock: Callable[[], float],
    scale: float = 1.0,
) -> dict[str, float | str]:
    """Median time per method (seconds times ``scale``), the methods interleaved in every
    repeat after two warm-up calls each; a method that fails is reported as
    ``"error: ..."`` (a peer's bug must not stop the comparison)."""
    failed: dict[str, str] = {}
    for name, fn in steps.items():  # warm-up: kernels built, caches and allocator settled
        try:
            for _ in range(2):
                fn()
        except Exception as err:
            failed[name] = f"error: {type(err).__name__}: {err}"[:300]
    live = {n: f for n, f in steps.items() if n not in failed}
    times: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(repeats):
        for name, fn in live.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {**{n: scale * statistics.median(t) for n, t in times.items()}, **failed}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_hash() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stamp() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": _git_hash(),
        "rigl": rigl.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": stamp(), **payload}, indent=2) + "\n")
    return path
