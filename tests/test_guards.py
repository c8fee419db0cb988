"""Guard rails (issue 13 item 4, issue 12 item 15): each misuse that used to train silently
wrong now fails with the fix in the message, and the invariants can be checked on demand."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import rigl
from conftest import TinyMLP, batch, train_steps

OPTIONS = dict(sparsity=0.8, total_steps=20, update_interval=4, drop_fraction=0.5)


def _setup(backend: str = "masked"):
    torch.manual_seed(0)
    model = TinyMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, optimizer, rigl.create("rigl", model, optimizer, backend=backend, **OPTIONS)


def _backward(model: nn.Module, step: int = 0) -> None:
    x, y = batch(step)
    nn.functional.cross_entropy(model(x), y).backward()


# -- optimizer steps taken behind the sparsifier's back ------------------------------------------
def test_optimizer_step_instead_of_sparsifier_step_is_refused():
    model, optimizer, _ = _setup()
    _backward(model)
    with pytest.raises(rigl.UsageError, match=r"Call sparsifier\.step\(\) instead of optimizer"):
        optimizer.step()


def test_the_torch_ao_habit_of_stepping_both_is_refused():
    model, optimizer, _ = _setup()
    _backward(model)
    with pytest.raises(rigl.UsageError, match=r"drop the optimizer\.step\(\) call"):
        optimizer.step()  # `optimizer.step(); sparsifier.step()`


def test_two_optimizer_steps_in_one_sparsifier_step_are_refused():
    model, optimizer, sparsifier = _setup()
    _backward(model)
    assert sparsifier.pre_optimizer_step()
    optimizer.step()
    with pytest.raises(rigl.UsageError, match="called twice"):
        optimizer.step()


def test_steps_through_the_sparsifier_and_its_hooks_are_allowed():
    model, optimizer, sparsifier = _setup()
    train_steps(model, optimizer, sparsifier, 5)
    for t in range(5, 9):  # the framework way: the caller takes the step
        optimizer.zero_grad()
        _backward(model, t)
        if sparsifier.pre_optimizer_step():
            optimizer.step()
        sparsifier.post_optimizer_step()
    assert sparsifier.step_count == 9 and sparsifier.update_count == 2
    sparsifier.check()


# -- one sparsifier per model --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_second_sparsifier_on_the_same_model_is_refused_until_the_first_is_removed(backend):
    model, optimizer, first = _setup(backend)
    with pytest.raises(rigl.ConfigError, match=r"already has a sparsifier.*first\.remove\(\)"):
        rigl.create("set", model, optimizer, **OPTIONS)
    first.remove()
    with pytest.raises(rigl.UsageError, match="was removed"):
        first.step()
    if backend == "sparse":
        return  # the model holds SparseLinear layers now: rigl.sparse.convert.to_dense first
    optimizer.zero_grad()
    optimizer.step()  # released: the first sparsifier no longer guards the optimizer
    second = rigl.create("static", model, optimizer, **OPTIONS)
    train_steps(model, optimizer, second, 3)
    second.check()


def test_a_garbage_collected_sparsifier_releases_its_model():
    model, optimizer, sparsifier = _setup()
    del sparsifier  # dropped without remove()
    gc.collect()
    rigl.create("rigl", model, optimizer, **OPTIONS)


def test_sparsifiers_on_separate_parts_of_one_model_are_fine():
    model = nn.ModuleDict({"a": TinyMLP(), "b": TinyMLP()})
    rigl.create("rigl", model["a"], None, **OPTIONS)
    rigl.create("set", model["b"], None, **OPTIONS)


# -- measured density and the invariant check ---------------------------------------------------
def test_summary_shows_the_measured_density_beside_the_target():
    model, _, sparsifier = _setup()
    rows = sparsifier.summary()
    assert all(r.measured_density <= r.density for r in rows)
    with torch.no_grad():
        model.fc1.weight.fill_(0.5)  # dense again, behind the sparsifier's back
    row = sparsifier.summary()[0]
    assert row.name == "fc1.weight" and row.measured_density == 1.0 and row.density < 0.5
    table = sparsifier.summary_table()
    assert "measured" in table.splitlines()[0] and "1.0000" in table.splitlines()[1]


def test_check_names_the_layer_and_what_is_broken():
    model, optimizer, sparsifier = _setup()
    train_steps(model, optimizer, sparsifier, 6)
    sparsifier.check()
    weight = sparsifier.weights[1]
    inactive = (~weight.mask).nonzero()[0].tolist()
    with torch.no_grad():
        model.fc2.weight[tuple(inactive)] = 1.0
    with pytest.raises(rigl.InvariantError, match="fc2.weight: 1 inactive weights are non-zero"):
        sparsifier.check()
    with torch.no_grad():
        model.fc2.weight[tuple(inactive)] = 0.0
        optimizer.state[model.fc2.weight]["momentum_buffer"][tuple(inactive)] = 1.0
    with pytest.raises(rigl.InvariantError, match="fc2.weight: optimizer state 'momentum_buffer'"):
        sparsifier.check()
    optimizer.state[model.fc2.weight]["momentum_buffer"][tuple(inactive)] = 0.0
    sparsifier.check()
    weight.mask[tuple(inactive)] = True  # a mask out of step with its count
    with pytest.raises(rigl.InvariantError, match="fc2.weight: its mask has"):
        sparsifier.check()


def test_check_on_the_compressed_backend():
    model, optimizer, sparsifier = _setup("sparse")
    train_steps(model, optimizer, sparsifier, 6)
    sparsifier.check()
    values = model.fc1.values
    optimizer.state[values]["momentum_buffer"] = torch.zeros(values.numel() + 1)
    with pytest.raises(rigl.InvariantError, match="fc1.weight: optimizer state 'momentum_buffer'"):
        sparsifier.check()


# -- include / exclude patterns that match nothing ----------------------------------------------
@pytest.mark.parametrize(
    ("option", "pattern"), [("exclude", "ot.*"), ("include", "Conv9d"), ("exclude", "fc3")]
)
def test_patterns_that_match_nothing_list_the_names_that_exist(option, pattern):
    with pytest.raises(rigl.ConfigError, match=rf"{option} pattern '{pattern}' matches no") as err:
        rigl.create("rigl", TinyMLP(), None, **OPTIONS, **{option: (pattern,)})
    assert "fc1.weight" in str(err.value) and "Linear" in str(err.value)


def test_patterns_that_match_still_work():
    sparsifier = rigl.create("rigl", TinyMLP(), None, exclude=("out.*",), **OPTIONS)
    assert list(sparsifier.masks) == ["fc1.weight", "fc2.weight"]


# -- loading a state saved with other settings --------------------------------------------------
@pytest.mark.parametrize("backend", ["masked", "sparse"])
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"sparsity": 0.5}, "sparsity=0.8 (here 0.5)"),
        ({"distribution": "uniform"}, "distribution='erk' (here 'uniform')"),
        ({"seed": 3}, "seed=0 (here 3)"),
    ],
)
def test_a_state_saved_with_other_settings_loads_with_a_warning_naming_them(backend, change, named):
    """Loading another run's masks is allowed (another sparsity's, a masked run's into a
    compressed one), but not silently: the masks keep the saved counts while summary() and
    later updates follow this sparsifier's settings and seed."""
    model, optimizer, sp = _setup(backend)
    train_steps(model, optimizer, sp, 5)
    state, saved = sp.state_dict(), {w.name: w.mask.clone() for w in sp.weights}
    sp.remove()
    torch.manual_seed(0)
    model2 = TinyMLP()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    other = rigl.create("rigl", model2, opt2, backend=backend, **{**OPTIONS, **change})
    with pytest.warns(UserWarning, match=rf"saved by a sparsifier with {_re(named)}: its masks"):
        other.load_state_dict(state)
    assert all(torch.equal(w.mask, saved[w.name]) for w in other.weights)  # as they were
    assert other.step_count == 5
    other.remove()
    torch.manual_seed(0)
    model3 = TinyMLP()
    opt3 = torch.optim.SGD(model3.parameters(), lr=0.1, momentum=0.9)
    same = rigl.create("rigl", model3, opt3, backend=backend, **OPTIONS)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings load without a word
        same.load_state_dict(state)
    assert same.step_count == 5


def _re(text: str) -> str:
    import re

    return re.escape(text)


# -- a layer that gets no gradient on an update step ---------------------------------------------
class _WithUnusedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.aux = nn.Linear(16, 32), nn.Linear(32, 4), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))  # aux: no part in this forward


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_layer_without_gradient_keeps_its_topology_and_the_others_update(backend):
    """An unused head (an expert that got no tokens) used to fail every update step with a
    message telling the user to call backward(), which they had done."""
    torch.manual_seed(0)
    model = _WithUnusedHead()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = rigl.create("rigl", model, optimizer, backend=backend, sparsity=0.5, total_steps=100,
                     update_interval=5)  # fmt: skip
    before = {w.name: w.mask.clone() for w in sp.weights}
    with pytest.warns(
        UserWarning, match=r"no gradient for aux\.weight at the topology update of step 5"
    ):
        for _ in range(6):
            optimizer.zero_grad()
            model(torch.randn(8, 16)).sum().backward()
            sp.step()
    assert sp.update_count == 1
    changed = {w.name: not torch.equal(w.mask, before[w.name]) for w in sp.weights}
    assert changed == {"a.weight": True, "b.weight": True, "aux.weight": False}
    sp.check()  # exact counts everywhere


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_no_gradient_anywhere_on_an_update_step_says_to_call_backward(backend):
    model, optimizer, sp = _setup(backend)
    train_steps(model, optimizer, sp, 3)
    optimizer.zero_grad()
    with pytest.raises(RuntimeError, match=r"needed on update steps; call loss\.backward\(\)"):
        for _ in range(OPTIONS["update_interval"]):  # an update step comes among these
            sp.step()
    assert sp.update_count == 0


# -- converting to the compressed backend draws nothing from the global generator ---------------
@pytest.mark.parametrize("pattern", ["unstructured", "fanin", "2:4"])
def test_the_compressed_backend_leaves_the_global_rng_as_the_masked_one_does(pattern):
    """Dropout and data order after create() are then the same on both backends."""
    draws = {}
    for backend in ("masked", "sparse"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.Conv1d(4, 4, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = rigl.create("rigl", model, optimizer, backend=backend, sparsity=0.5,
                         pattern=pattern, total_steps=100, update_interval=10)  # fmt: skip
        draws[backend] = torch.rand(4)
        sp.remove()
    torch.testing.assert_close(draws["masked"], draws["sparse"], rtol=0, atol=0)


def test_the_summary_names_the_real_reason_a_layer_stays_masked():
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn, self.rnn = nn.MultiheadAttention(16, 2), nn.GRU(16, 16)
            self.norm = torch.nn.utils.weight_norm(nn.Linear(16, 16))
            self.plain = nn.Linear(16, 16)

    model = Mixed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = rigl.create("rigl", model, optimizer, backend="sparse", sparsity=0.5, total_steps=100)
    rows = {line.split()[0]: line for line in sp.summary_table().splitlines()[1:]}
    assert "this is a MultiheadAttention" in rows["attn.in_proj_weight"]
    assert "this is a GRU" in rows["rnn.weight_hh_l0"]
    assert "computed from 'weight_v'" in rows["norm.weight_v"]
    assert "weight_norm" not in rows["attn.in_proj_weight"] + rows["rnn.weight_hh_l0"]
    assert rows["plain.weight"].rstrip().endswith("sparse")


def test_sparsifying_a_model_that_is_already_sparse_warns_that_its_masks_are_redrawn():
    """A trained sparse model loaded again and given to create(): fresh random masks cut
    its trained weights; the warning names the layers and the way to keep its masks."""
    model, optimizer, sp = _setup()
    sp.remove()
    with pytest.warns(UserWarning, match=r"fc1\.weight, fc2\.weight already hold "
                      r"mostly exact zeros.*sparsifier\.load_state_dict"):  # fmt: skip
        rigl.create("rigl", model, optimizer, **OPTIONS)
    import warnings

    torch.manual_seed(0)
    fresh = TinyMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a freshly initialised model: not a word
        rigl.create("rigl", fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), **OPTIONS)
