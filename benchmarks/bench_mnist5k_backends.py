"""MNIST-5k, LeNet-300-100, RigL: the masked and the compressed backend side by side.

Runs ``rigl train --config configs/mnist5k_lenet.yaml --backend {masked,sparse}`` for each
seed, alternating the backends (each run in its own process, pinned to the same thread
count), and reads ``final.json``: test accuracy, wall time and CPU time of training.

    python benchmarks/bench_mnist5k_backends.py [--seeds 0 1 2] [--threads 1] [--sparsity 0.98]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from stamp import write_result

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "mnist5k_lenet.yaml"
BACKENDS = ("masked", "sparse")


def train(backend: str, seed: int, sparsity: float, threads: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "rigl.cli", "train", "--config", str(CONFIG), "--quiet"]
    cmd += ["--backend", backend, "--seed", str(seed), "--sparsity", str(sparsity)]
    cmd += ["--out", str(out), "--tensorboard", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    final = json.loads((out / "final.json").read_text())
    keys = ("test_accuracy", "wall_time_s", "cpu_time_s", "density", "total_steps")
    return {"backend": backend, "seed": seed, **{k: final[k] for k in keys}}


def summary(rows: list[dict]) -> dict:
    out = {}
    for backend in BACKENDS:
        runs = [r for r in rows if r["backend"] == backend]
        out[backend] = {
            f"{key}_{stat}": fn([r[key] for r in runs])
            for key in ("test_accuracy", "wall_time_s", "cpu_time_s")
            for stat, fn in (("mean", statistics.mean), ("std", _std))
        }
    for key in ("wall_time_s", "cpu_time_s"):
        out[f"sparse_over_masked_{key}"] = (
            out["sparse"][f"{key}_mean"] / out["masked"][f"{key}_mean"]
        )
    return out


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--name", default="mnist5k_backends")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for backend in BACKENDS:
                rows.append(
                    train(
                        backend, seed, args.sparsity, args.threads, Path(tmp) / f"{backend}{seed}"
                    )
                )
                print(rows[-1], file=sys.stderr, flush=True)
    stats = summary(rows)
    command = (
        "python benchmarks/bench_mnist5k_backends.py "
        f"--seeds {' '.join(map(str, args.seeds))} --threads {args.threads} "
        f"--sparsity {args.sparsity}"
    )
    setup = {"config": "configs/mnist5k_lenet.yaml", "method": "rigl", "sparsity": args.sparsity}
    setup |= {"threads_per_run": args.threads, "command": command}
    path = write_result(args.name, {"setup": setup, "runs": rows, "summary": stats})
    print(json.dumps(stats, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
