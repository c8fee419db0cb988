"""Metadata stamped on every benchmark result: git hash, versions, machine, threads."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
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


def reuse_big_allocations() -> bool:
    """Ask glibc's malloc to serve allocations up to 1 GiB from its heap and to keep freed
    memory (``mallopt`` ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD``), for every variant of
    the benchmark alike. By default an allocation of 32 MiB or more is a fresh ``mmap``
    whose every page faults on first touch: about 14 ms per 32 MiB on these VMs, paid again
    by every such activation of every step (a (4096, 2048) float32 tensor is exactly 32
    MiB). PyTorch's CPU tuning guide recommends an allocator that reuses memory (jemalloc,
    tcmalloc) for the same reason. Returns whether glibc took both settings."""
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    libc = ctypes.CDLL(path)
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


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
