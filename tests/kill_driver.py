"""Runs ``rigl`` commands in forked children that may SIGKILL themselves at a kill point.

A fault-injection test kills and resumes a run many times; starting a Python interpreter
with torch for each of them costs seconds. This driver pays it once: it imports rigl,
then reads one JSON job per line on stdin, ``{"args": [...], "kill": "POINT:N" | null}``,
forks a child that runs ``rigl.cli.main(args)`` with ``RIGL_TEST_KILL_AT`` set to
``kill`` (see :func:`rigl.experiments.runio.kill_point`), and prints the child's exit code
(``-9`` when it killed itself) as one line. The child dies exactly as under ``kill -9``:
no ``finally``, no atexit, no flush.

Use :class:`KillDriver` from a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


class KillDriver:
    """The driver as a subprocess: ``driver.run(args, kill=...) -> exit code``."""

    def __init__(self, log: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def run(self, args: list[str], kill: str | None = None) -> int:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"args": args, "kill": kill}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the kill driver died; see {self.log.name}")
        return int(line)

    def __enter__(self) -> KillDriver:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


def _child(args: list[str], kill: str | None) -> None:  # pragma: no cover - forked
    from rigl.cli import main
    from rigl.experiments.runio import KILL_AT

    os.environ.pop(KILL_AT, None)
    if kill:
        os.environ[KILL_AT] = kill
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stdout is the driver's answer channel
    code = 99
    try:
        code = main(args)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:  # pragma: no cover - the driver process
    import torch

    import rigl.cli
    import rigl.experiments.training.train  # noqa: F401  (imported once, before the forks)

    torch.set_num_threads(1)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports torch._dynamo
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job["args"], job["kill"])
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    _serve()
