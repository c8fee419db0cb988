"""Tiny shared models and helpers for the test suite."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
from torch import nn


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 12) -> (B, 4)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    """Conv + depthwise conv (dense by default) + BatchNorm + Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 12) -> (B, 4)
        img = x.repeat(1, 2)[:, :16].reshape(-1, 1, 4, 4)  # (B, 1, 4, 4)
        h = torch.relu(self.bn(self.conv1(img)))
        h = torch.relu(self.conv2(self.depthwise(h)))
        return self.head(h.flatten(1))


class TinyGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 12) -> (B, 4)
        out, _ = self.gru(x.reshape(-1, 4, 3))  # (B, 4 steps, 3 features)
        return self.head(out[:, -1])


MODELS = {"mlp": TinyMLP, "cnn": TinyCNN, "gru": TinyGRU}


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4
        )
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    raise ValueError(name)


def batch(step: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic data: batch ``step`` of a fixed synthetic task."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, 12, generator=g)
    y = (x[:, :4].argmax(dim=1) + (x[:, 4] > 0).long()) % 4
    return x, y


def train_steps(model, optimizer, sparsifier, steps, start=0, on_step=None):
    for t in range(start, start + steps):
        x, y = batch(t)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        sparsifier.step()
        if on_step is not None:
            on_step(t)


@pytest.fixture
def mlp() -> TinyMLP:
    torch.manual_seed(0)
    return TinyMLP()


def tiny_run_config(folder, data_root, **changes):
    """A `rigl train` config file of a few dozen steps: 240 MNIST-1D training examples, a
    32-32 MLP, RigL at 80%, batch 24, 3 epochs; ``changes`` override any key."""
    import yaml

    config = {
        "dataset": "mnist1d",
        "dataset_options": {"num_samples": 300},
        "data_root": str(data_root),
        "model": "mlp",
        "model_options": {"hidden_sizes": [32, 32]},
        "method": "rigl",
        "sparsity": 0.8,
        "update_interval": 4,
        "batch_size": 24,
        "epochs": 3,
        "log_every": 5,
        "checkpoint_every": 7,
        "out": str(folder / "run"),
        **changes,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def assert_sparsity_invariants(sparsifier) -> None:
    """Exact active counts; inactive weights and their weight-shaped optimizer state zero
    (a compressed weight has no inactive entries: its values and state are nnz long)."""
    for weight, n_active in zip(sparsifier.weights, sparsifier.target_counts, strict=True):
        assert int(weight.mask.sum()) == weight.n_active == n_active, weight.name
        if weight.param.shape != weight.mask.shape:  # compressed: values (nnz,)
            assert weight.param.numel() == n_active, weight.name
            continue
        assert bool((weight.param[~weight.mask] == 0).all()), weight.name
        for value in sparsifier.optimizer.state[weight.param].values():
            if torch.is_tensor(value) and value.shape == weight.param.shape:
                assert bool((value[~weight.mask] == 0).all()), weight.name


@pytest.fixture(params=["cpp", "torch"])
def sparse_kernels(request, monkeypatch) -> str:
    """Run a test on the compiled sparse kernels and on the torch fallback (as with
    RIGL_SPARSE_KERNELS=torch, for this test only)."""
    from rigl.sparse import kernels

    if request.param == "torch":
        monkeypatch.setattr(kernels, "_tried", True)
        monkeypatch.setattr(kernels, "_ext", None)
    elif kernels.extension() is None:
        pytest.skip("the C++ kernels did not build")
    return request.param


@pytest.fixture
def one_thread():
    """One torch thread for the test (torchrun workers run with one; tiny models run
    fastest on one, and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, out: Path, world: int, timeout_s: float) -> list[dict]:
    """Run ``worker(rank, port, out)`` in ``world`` processes; each saves ``rank{r}.pt`` in
    ``out`` (or writes ``rank{r}.err`` and raises). Returns the ranks' results; fails the
    test naming the failing rank's traceback, or on timeout (no process is left behind)."""
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=(free_port(), str(out)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process run timed out")
    except Exception:
        errors = [p.read_text() for p in sorted(out.glob("*.err"))]
        pytest.fail("a rank failed:\n" + "\n".join(errors))
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]
