"""FSDP2 (``fully_shard``): two gloo processes on the CPU choose, at every topology
update, exactly the masks one process chooses for the same global batch; DCP checkpoints
resume bit-identically on 2 ranks and load into one process."""

from __future__ import annotations

import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import rigl
import rigl.fsdp
from conftest import batch, spawn_ranks
from rigl import distributed as rd
from rigl.errors import ConfigError
from rigl.guard import UsageError

WORLD, STEPS, TIMEOUT_S = 2, 50, 150
RUNS = ["mlp-rigl", "mlp-set", "mlp-static", "mlp-rigl_ties", "tf-rigl", "tf-set", "tf-static"]


class OddMLP(nn.Module):
    """Row counts that do not split evenly over two ranks (15 = 8 + 7, 9 = 5 + 4), and a
    one-row layer of which rank 1 holds nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(12, 15), nn.Linear(15, 9), nn.Linear(9, 4)
        self.skip = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 12) -> (B, 4)
        # the skip is weighed per class (a plain sum would not change the softmax)
        scale = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=x.dtype)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x))))) + self.skip(x) * scale


class TinyTransformer(nn.Module):
    """An encoder layer on 3 tokens of 4 features: its packed q/k/v weight (48 rows, 3
    blocks of 16) is split at row 24, inside the k block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 12) -> (B, 4)
        return self.head(self.layer(self.embed(x.reshape(-1, 3, 4))).mean(1))


def _build(run: str, shard: bool, seed: int = 3, **options):
    torch.manual_seed(0)
    model = (OddMLP() if run.startswith("mlp") else TinyTransformer()).double()
    if shard:
        from torch.distributed.fsdp import fully_shard

        for module in model.children():
            fully_shard(module)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method = run.split("-")[1].split("_")[0]
    sparsifier = rigl.create(
        method, model, optimizer, sparsity=0.7, distribution="uniform", total_steps=STEPS,
        update_interval=8, drop_fraction=0.5, seed=seed, **options,
    )  # fmt: skip
    return model, optimizer, sparsifier


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _train(model, optimizer, sparsifier, run: str, env: rd.DistEnv, start: int, stop: int):
    """Steps ``start .. stop-1`` on the global batches of conftest, each rank on its
    shard; the full masks after every update (gathered, for the comparison only)."""
    masks = []
    for t in range(start, stop):
        x, y = batch(t, size=16)
        if run.endswith("ties"):  # fc1's gradient is zero but in column 0: ties decide growth
            x[:, 1:] = 0.0
        x, y = rd.shard(x.double(), env), rd.shard(y, env)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        count = sparsifier.update_count
        sparsifier.step()
        if sparsifier.update_count > count:
            masks.append({k: _full(v) for k, v in sparsifier.masks.items()})
    return masks


def _result(model, sparsifier, masks) -> dict:
    return {
        "masks": masks,
        "weights": {k: _full(v) for k, v in model.state_dict().items()},
        "update_count": sparsifier.update_count,
    }


def _errors(fn) -> str:
    try:
        fn()
    except (RuntimeError, ConfigError, UsageError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _selection_trials(rank: int, trials: int = 40) -> list[tuple[int, bool]]:
    """Sharded drop-and-grow on random vectors (integer scores: many exact ties), split at
    a random point (a piece may be empty, or cut a block), against one process's
    :func:`rigl.selection.drop_and_grow`; (trial, equal) for each."""
    from rigl.selection import drop_and_grow
    from rigl.sharding import per_block, sharded_drop_and_grow
    from rigl.topology import update_generator

    found = []
    for trial in range(trials):
        g = torch.Generator().manual_seed(trial)
        blocks = 3 if trial % 2 else 1
        n = blocks * int(torch.randint(1, 12, (1,), generator=g))
        mask = torch.rand(n, generator=g) < 0.5
        drop = torch.randint(0, 3, (n,), generator=g).double()
        grow = torch.randint(0, 3, (n,), generator=g).float()
        n_update = int(torch.randint(0, n + 1, (1,), generator=g))
        cut = int(torch.randint(0, n + 1, (1,), generator=g))
        expected = drop_and_grow(mask, drop, grow, n_update, update_generator(trial, 1, 2), blocks)
        piece = slice(0, cut) if rank == 0 else slice(cut, n)
        tie = update_generator(trial, 1, 2)

        def update(m, d, gr, k, tie=tie):
            return sharded_drop_and_grow(m, d, gr, k, tie, None)

        mine = per_block(
            update, piece.start, n, blocks, n_update, mask[piece], drop[piece], grow[piece]
        )
        found.append((trial, torch.equal(mine, expected[piece])))
    return found


def _scenarios(rank: int, env: rd.DistEnv, out: Path) -> dict:
    result = {"selection": _selection_trials(rank)}
    for run in RUNS:
        model, optimizer, sparsifier = _build(run, shard=True)
        rd.add_consistency_check(sparsifier, every=1)
        masks = _train(model, optimizer, sparsifier, run, env, 0, STEPS)
        sparsifier.check()  # counts, zeros and optimizer state over both shards
        result[run] = _result(model, sparsifier, masks)
    # DCP: save at step 20, go on to 40; a fresh job loads step 20 and goes on alike
    model, optimizer, sparsifier = _build("tf-rigl", shard=True)
    _train(model, optimizer, sparsifier, "tf-rigl", env, 0, 20)
    rigl.fsdp.save(out / "dcp", model, optimizer, sparsifier)
    result["saved"] = _result(model, sparsifier, [])
    result["saved"]["momentum"] = {
        n: _full(optimizer.state[p]["momentum_buffer"]) for n, p in model.named_parameters()
    }
    result["straight"] = _result(
        model, sparsifier, _train(model, optimizer, sparsifier, "tf-rigl", env, 20, 40)
    )
    model, optimizer, sparsifier = _build("tf-rigl", shard=True, seed=99)  # seed: loaded
    rigl.fsdp.load(out / "dcp", model, optimizer, sparsifier)
    result["resumed"] = _result(
        model, sparsifier, _train(model, optimizer, sparsifier, "tf-rigl", env, 20, 40)
    )
    # a corrupted shard on rank 1 and a rank seeded differently are reported by rank
    if rank == 1:
        sparsifier.weights[1].local_mask.view(-1)[0] ^= True
    result["corrupt"] = _errors(lambda: rd.check_consistency(sparsifier))
    _, _, seeded = _build("mlp-set", shard=True, seed=10 + rank)
    result["seeded"] = _errors(lambda: rd.check_consistency(seeded))
    result["broadcast"] = _errors(lambda: rd.sync_sparsifier(seeded))
    # refused: sharding after rigl.create, the compressed backend, an unsupported method
    model, optimizer, sparsifier = _build("mlp-rigl", shard=False)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model)
    result["order"] = _errors(sparsifier.step)
    result["sparse"] = _errors(lambda: _build("mlp-rigl", shard=True, backend="sparse"))
    result["snfs"] = _errors(lambda: _build("mlp-snfs", shard=True))
    return result


def _worker(rank: int, port: int, out: str) -> None:
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
        env = rd.init_from_env(device="cpu")
        torch.save(_scenarios(rank, env, Path(out)), Path(out) / f"rank{rank}.pt")
    except Exception:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        rd.cleanup()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    """Results of the two-process run (run once for the module), and its folder."""
    out = tmp_path_factory.mktemp("fsdp")
    return spawn_ranks(_worker, out, WORLD, TIMEOUT_S), out


def _single(run: str) -> dict:
    model, optimizer, sparsifier = _build(run, shard=False)
    masks = _train(model, optimizer, sparsifier, run, rd.DistEnv(), 0, STEPS)
    return _result(model, sparsifier, masks)


def _assert_same(mine: dict, theirs: dict) -> None:
    assert mine["update_count"] == theirs["update_count"]
    assert len(mine["masks"]) == len(theirs["masks"])
    for after, expected in zip(mine["masks"], theirs["masks"], strict=True):
        for name, mask in expected.items():
            assert torch.equal(after[name], mask), name
    for name, tensor in theirs["weights"].items():
        torch.testing.assert_close(mine["weights"][name], tensor, rtol=0, atol=1e-10)


@pytest.mark.parametrize("run", RUNS)
def test_sharded_masks_equal_one_process(ranks, run):
    results, _ = ranks
    single = _single(run)
    expected_updates = 0 if run.endswith("static") else 4
    assert single["update_count"] == expected_updates
    for result in results:  # both ranks gathered the same full masks and weights
        _assert_same(result[run], single)


def test_sharded_selection_equals_one_process_on_random_ties(ranks):
    for result in ranks[0]:
        assert [trial for trial, equal in result["selection"] if not equal] == []


def test_ties_were_broken_by_priority(ranks):
    """Most of fc1's gradient is exactly zero: growth there chose among ties."""
    single = _single("mlp-rigl_ties")
    grown = single["masks"][0]["fc1.weight"]
    assert grown[:, 1:].any()  # a weight of zero gradient was grown
    assert torch.equal(ranks[0][0]["mlp-rigl_ties"]["masks"][0]["fc1.weight"], grown)


def test_dcp_resume_two_ranks_is_bit_identical(ranks):
    results, _ = ranks
    for result in results:
        straight, resumed = result["straight"], result["resumed"]
        assert resumed["update_count"] == straight["update_count"] == 4
        for one, two in zip(straight["masks"], resumed["masks"], strict=True):
            assert all(torch.equal(one[k], two[k]) for k in one)
        for name, tensor in straight["weights"].items():
            assert torch.equal(resumed["weights"][name], tensor), name


def test_dcp_checkpoint_of_two_ranks_loads_into_one_process(ranks):
    """The sharded checkpoint fills an unsharded model, optimizer and sparsifier; one
    process then goes on to the masks the two ranks reached."""
    results, out = ranks
    model, optimizer, sparsifier = _build("tf-rigl", shard=False, seed=99)
    rigl.fsdp.load(out / "dcp", model, optimizer, sparsifier)
    saved = results[0]["saved"]
    assert sparsifier.step_count == 20 and sparsifier.seed == 3
    for name, tensor in saved["weights"].items():
        assert torch.equal(model.state_dict()[name], tensor), name
    for name, param in model.named_parameters():
        assert torch.equal(optimizer.state[param]["momentum_buffer"], saved["momentum"][name])
    masks = _train(model, optimizer, sparsifier, "tf-rigl", rd.DistEnv(), 20, 40)
    _assert_same(_result(model, sparsifier, masks), results[0]["straight"])


def test_consistency_check_names_the_diverging_rank(ranks):
    results, _ = ranks
    for result in results:
        assert "mask layer.self_attn.in_proj_weight: ranks [1]" in result["corrupt"]
        assert "layer.linear1.weight" not in result["corrupt"]
        assert "seed: ranks [1]" in result["seeded"]
        assert "rank 0's state cannot be copied" in result["broadcast"]


def test_unsupported_uses_are_refused(ranks):
    result = ranks[0][0]
    assert result["order"].startswith("UsageError")
    assert "was replaced after rigl.create" in result["order"] and "Shard first" in result["order"]
    assert "backend='sparse' is not supported on a model sharded" in result["sparse"]
    assert "method 'snfs' is not supported on a model sharded with fully_shard" in result["snfs"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"grow_init": "random_normal"}, "grow_init='random_normal' is not supported"),
        ({"pattern": "fanin"}, "pattern='fanin' is not supported"),
    ],
)
def test_sharded_weights_refuse_what_the_sharded_selection_cannot_do(options, message):
    """Checked before any shard is touched: a growth initialisation other than zeros and a
    structured pattern are refused with the fix, not silently trained unstructured."""
    from types import SimpleNamespace

    from rigl import fsdp
    from rigl.errors import ConfigError
    from rigl.patterns import UNSTRUCTURED, parse_pattern

    pattern = parse_pattern(options.get("pattern", "unstructured"))
    sparsifier = SimpleNamespace(
        name="rigl",
        backend="masked",
        grow_init=options.get("grow_init", "zeros"),
        patterns=[pattern if pattern.structured else UNSTRUCTURED],
    )
    target = SimpleNamespace(name="fc.weight", param=None)
    with pytest.raises(ConfigError, match=message):
        fsdp.sharded_weight(sparsifier, 0, target, 1)
