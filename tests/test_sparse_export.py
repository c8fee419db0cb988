"""save_sparse/load_sparse: compact CSR checkpoints that load into either backend."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import rigl
from conftest import TinyCNN, TinyMLP, batch, make_optimizer, train_steps
from rigl.sparse import SparseLinear, load_sparse, save_sparse


def _trained(backend: str, model: nn.Module | None = None, steps: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    model = model or TinyMLP()
    opt = make_optimizer("sgd", model)
    sp = rigl.create(
        "rigl",
        model,
        opt,
        sparsity=0.8,
        total_steps=40,
        update_interval=4,
        # a dense layer beside the sparse ones (a pattern must match: TinyCNN has no "out")
        exclude=("out.weight",) if isinstance(model, TinyMLP) else (),
        backend=backend,
        seed=seed,
    )
    train_steps(model, opt, sp, steps)
    return model, sp


def _fresh(backend: str, model: nn.Module | None = None):
    return _trained(backend, model, steps=0, seed=7)  # other masks and weights


@pytest.mark.parametrize(("saved", "loaded"), [("sparse", "masked"), ("masked", "sparse")])
def test_round_trip_between_backends(tmp_path, saved, loaded):
    model, sp = _trained(saved)
    save_sparse(model, tmp_path / "m.safetensors", sp)
    model2, sp2 = _fresh(loaded)
    assert any(sp2.masks[k].ne(sp.masks[k]).any() for k in sp.masks)
    meta = load_sparse(tmp_path / "m.safetensors", model2, sp2)
    assert meta["method"] == "rigl" and meta["rigl_version"] == rigl.__version__
    for k in sp.masks:
        assert torch.equal(sp.masks[k], sp2.masks[k]), k
    x, _ = batch(99)
    torch.testing.assert_close(model2(x), model(x), rtol=1e-5, atol=1e-6)
    assert isinstance(model2.fc1, SparseLinear) == (loaded == "sparse")
    assert not isinstance(model2.out, SparseLinear)  # the dense last layer is stored as is
    train_steps(model2, sp2.optimizer, sp2, 5, start=12)  # training goes on from there


def test_plain_model_without_a_sparsifier_gets_the_dense_weights(tmp_path):
    model, sp = _trained("sparse")
    save_sparse(model, tmp_path / "m.safetensors")  # the SparseLinear layers are found
    plain = TinyMLP()
    load_sparse(tmp_path / "m.safetensors", plain)
    for name, mask in sp.masks.items():
        weight = plain.get_parameter(name)
        assert torch.equal(weight != 0, mask)
    x, _ = batch(5)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)


def test_conv_weights_of_a_masked_model(tmp_path):
    model, sp = _trained("masked", TinyCNN())
    save_sparse(model, tmp_path / "c.safetensors", sp)
    model2, sp2 = _fresh("masked", TinyCNN())
    load_sparse(tmp_path / "c.safetensors", model2, sp2)
    assert all(torch.equal(sp.masks[k], sp2.masks[k]) for k in sp.masks)
    model.eval(), model2.eval()
    x, _ = batch(3)
    torch.testing.assert_close(model2(x), model(x))  # BatchNorm statistics came along


def test_file_size_scales_with_density(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = rigl.create(
        "rigl", model, opt, sparsity=0.9, distribution="uniform", total_steps=1000, backend="sparse"
    )
    assert sp.summary()[0].density == pytest.approx(0.1, abs=1e-3)
    sparse_file = save_sparse(model, tmp_path / "s.safetensors", sp)
    rigl.sparse.convert.to_dense(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "d.st")
    ratio = sparse_file.stat().st_size / (tmp_path / "d.st").stat().st_size
    assert ratio < 0.22  # values + int32 column indices: 8 bytes per non-zero vs 4 per weight
    with safe_open(str(sparse_file), framework="pt") as f:
        layers = json.loads(f.metadata()["layers"])
        assert f.get_tensor("0.weight.col_idx").dtype == torch.int32
    assert layers["0.weight"]["shape"] == [1024, 1024]


def test_errors_name_the_file_and_the_problem(tmp_path):
    model, sp = _trained("sparse")
    path = save_sparse(model, tmp_path / "m.safetensors", sp)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_sparse(tmp_path / "nope.safetensors", TinyMLP())
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(rigl.ConfigError, match="junk.safetensors: not a readable safetensors"):
        load_sparse(tmp_path / "junk.safetensors", TinyMLP())
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(rigl.ConfigError, match="cut.safetensors: not a readable"):
        load_sparse(tmp_path / "cut.safetensors", TinyMLP())
    save_file({"w": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(rigl.ConfigError, match="other.safetensors: not a rigl sparse checkpoint"):
        load_sparse(tmp_path / "other.safetensors", TinyMLP())
    wider = nn.Sequential()
    wider.fc1, wider.fc2, wider.out = nn.Linear(12, 32), nn.Linear(32, 20), nn.Linear(20, 4)
    with pytest.raises(
        rigl.ConfigError,
        match=r"m.safetensors was saved from a different model: .*fc2.weight has shape \(16, 32\), the model's is \(20, 32\)",
    ):
        load_sparse(path, wider)
    with pytest.raises(rigl.ConfigError, match="different model: missing 0.bias; missing 0.weight"):
        load_sparse(path, nn.Sequential(nn.Linear(12, 4)))


def test_loading_another_sparsity_into_a_training_model_resizes_its_optimizer_state(
    tmp_path, sparse_kernels
):
    model, sp = _trained("sparse")
    path = save_sparse(model, tmp_path / "m.safetensors", sp)
    torch.manual_seed(3)
    model2 = TinyMLP()
    opt2 = make_optimizer("adam", model2)
    sp2 = rigl.create(
        "rigl", model2, opt2, sparsity=0.5, total_steps=40, update_interval=4, backend="sparse"
    )
    train_steps(model2, opt2, sp2, 3)  # Adam state sized for density 0.5
    load_sparse(path, model2, sp2)
    for k in sp.masks:
        assert torch.equal(sp.masks[k], sp2.masks[k]), k
    for weight in sp2.weights:
        for value in opt2.state[weight.param].values():
            assert value.dim() == 0 or value.shape == weight.param.shape
    x, _ = batch(99)
    torch.testing.assert_close(model2(x), model(x), rtol=1e-5, atol=1e-6)
    train_steps(model2, opt2, sp2, 3, start=3)


def _rewrite(path, out, change):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    change(tensors)
    save_file(tensors, out, metadata=metadata)
    return out


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.__setitem__("fc1.weight.col_idx", t["fc1.weight.col_idx"].float()), "dtype"),
        (lambda t: t["fc1.weight.col_idx"].__setitem__(0, 12), "outside"),
        (lambda t: t["fc1.weight.col_idx"].__setitem__(1, t["fc1.weight.col_idx"][0]), "duplicate"),
        (lambda t: t["fc2.weight.row_ptr"].__setitem__(3, 10_000), "row_ptr"),
    ],
    ids=["float", "out_of_range", "duplicate", "row_ptr"],
)
def test_corrupt_indices_in_a_file_are_refused_before_anything_changes(tmp_path, change, match):
    model, sp = _trained("sparse")
    path = save_sparse(model, tmp_path / "m.safetensors", sp)
    bad = _rewrite(path, tmp_path / "bad.safetensors", change)
    model2, sp2 = _fresh("sparse")
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(rigl.ConfigError, match=f"bad.safetensors: .*{match}"):
        load_sparse(bad, model2, sp2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_dense_weight_in_the_file_loads_into_a_sparse_linear(tmp_path):
    """A layer saved dense (excluded, or a model without a sparsifier) and compressed in the
    model receives every weight (it was silently left as it was)."""
    torch.manual_seed(0)
    dense = TinyMLP()
    path = save_sparse(dense, tmp_path / "dense.safetensors")
    model, sp = _fresh("sparse")
    load_sparse(path, model, sp)
    assert all(w.density == 1.0 for w in sp.weights)
    x, _ = batch(1)
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["masked", "sparse"])
@pytest.mark.parametrize("pattern", ["2:4", "fanin", "block:2x2"])
def test_a_file_that_breaks_the_sparsifiers_pattern_is_refused_before_anything_changes(
    tmp_path, backend, pattern
):
    """An unstructured file into a structured sparsifier: it used to load, then fail deep
    in the next update (N:M, fan-in) or train on with broken blocks."""
    model, sp = _trained("masked")  # unstructured, 80%
    save_sparse(model, tmp_path / "m.safetensors", sp)
    torch.manual_seed(7)
    model2 = TinyMLP()
    opt = make_optimizer("sgd", model2)
    sp2 = rigl.create("rigl", model2, opt, sparsity=0.5 if pattern == "2:4" else 0.75,
                      pattern=pattern, total_steps=40, update_interval=4,
                      exclude=("out.weight",), backend=backend)  # fmt: skip
    masks = {k: m.clone() for k, m in sp2.masks.items()}
    condensed = backend == "sparse" and pattern != "block:2x2"  # its layout says it first
    match = "does not fit its CondensedLinear" if condensed else (
        rf"fc1\.weight: the loaded topology breaks the sparsifier's pattern {pattern}")  # fmt: skip
    with pytest.raises(rigl.ConfigError, match=rf"m\.safetensors: .*{match}"):
        load_sparse(tmp_path / "m.safetensors", model2, sp2)
    assert all(torch.equal(masks[k], sp2.masks[k]) for k in masks)


@pytest.mark.parametrize("backend", ["masked", "sparse"])
def test_a_file_of_another_sparsity_moves_the_targets_so_the_invariants_hold(tmp_path, backend):
    model, sp = _trained(backend)  # 80%
    save_sparse(model, tmp_path / "m.safetensors", sp)
    torch.manual_seed(7)
    model2 = TinyMLP()
    opt = make_optimizer("sgd", model2)
    sp2 = rigl.create("rigl", model2, opt, sparsity=0.5, total_steps=40, update_interval=4,
                      exclude=("out.weight",), backend=backend)  # fmt: skip
    with pytest.warns(UserWarning, match=r"other active counts than this sparsifier's targets"):
        load_sparse(tmp_path / "m.safetensors", model2, sp2)
    assert sp2.target_counts == [w.n_active for w in sp.weights]
    sp2.check()
    train_steps(model2, opt, sp2, 8, start=12)  # through two updates: the counts hold
    sp2.check()
    assert "requested sparsity 0.5000" in sp2.summary_table()  # the budget line tells
