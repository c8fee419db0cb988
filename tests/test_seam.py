"""The storage seam: both storages implement it alike, and what a method changes through it
(drop score, grown values, sampled growth) holds on the masked and the compressed backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rigl
from rigl import selection
from rigl.seam import Rewiring, SparseStorage
from rigl.sparse import SparseLinear
from rigl.sparse.storage import SparseWeight
from rigl.storage import MaskedWeight


def _pair(rows=6, cols=10, density=0.4, seed=0):
    """The same weight as a masked and a compressed storage, with one backward done (the
    compressed layer keeps that batch for its dense gradient; the masked one's gradient is
    not masked yet, as on an update that comes before the step)."""
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(cols, rows)
    mask = torch.rand(rows, cols, generator=g) < density
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer = SparseLinear.from_dense(dense, mask)
    layer.keep_grow_inputs(True)
    x, dy = torch.randn(5, cols, generator=g), torch.randn(5, rows, generator=g)
    dense(x).backward(dy)
    layer(x).backward(dy)
    masked = MaskedWeight("w", dense.weight, mask)
    return masked, SparseWeight("w", layer), dense.weight.grad.clone()


def test_both_storages_implement_the_protocol_with_the_same_per_weight_layout():
    masked, compressed, _ = _pair()
    assert isinstance(masked, SparseStorage) and isinstance(compressed, SparseStorage)
    assert masked.holds_dense_gradient and not compressed.holds_dense_gradient
    assert torch.equal(masked.active_positions(), compressed.active_positions())
    assert torch.equal(masked.active_values(), compressed.active_values())
    torch.testing.assert_close(masked.active_gradient(), compressed.active_gradient())
    flat = torch.tensor([0, 7, 13, 59])
    masked.param.grad = None  # the masked storage's dense gradient, unmasked this time
    with pytest.raises(RuntimeError, match="gradient of w is needed"):
        masked.gradient_at(flat)
    assert masked.grid.block_rows is None and compressed.grid.block_rows >= 1


def test_a_masked_gradient_and_the_compressed_dense_gradient_agree_at_any_position():
    g = torch.Generator().manual_seed(1)
    dense = nn.Linear(10, 6)
    mask = torch.rand(6, 10, generator=g) < 0.4
    layer = SparseLinear.from_dense(dense, mask)
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer.keep_grow_inputs(True)
    x, dy = torch.randn(5, 10, generator=g), torch.randn(5, 6, generator=g)
    dense(x).backward(dy)
    layer(x).backward(dy)
    masked, compressed = MaskedWeight("w", dense.weight, mask), SparseWeight("w", layer)
    flat = torch.tensor([0, 7, 13, 59])
    torch.testing.assert_close(masked.gradient_at(flat), compressed.gradient_at(flat))
    torch.testing.assert_close(masked.gradient_rows(2, 5), compressed.gradient_rows(2, 5))


def test_sampled_growth_plans_the_same_on_both_storages():
    """RigL's grow_candidates through the seam: the masked storage can do it too."""
    g = torch.Generator().manual_seed(2)
    dense = nn.Linear(30, 20)
    mask = torch.rand(20, 30, generator=g) < 0.2
    layer = SparseLinear.from_dense(dense, mask)
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer.keep_grow_inputs(True)
    x, dy = torch.randn(8, 30, generator=g), torch.randn(8, 20, generator=g)
    dense(x).backward(dy)
    layer(x).backward(dy)
    plans = []
    for weight in (MaskedWeight("w", dense.weight, mask), SparseWeight("w", layer)):
        plans.append(
            selection.rewire_sampled(
                weight.active_positions(),
                weight.active_values().abs(),
                lambda flat, w=weight: w.gradient_at(flat).abs(),
                weight.grid,
                25,
                60,
                torch.Generator().manual_seed(7),
            )
        )
    assert torch.equal(plans[0].keep, plans[1].keep)
    assert torch.equal(plans[0].grown, plans[1].grown)


@pytest.mark.parametrize("grown_gradient", [False, True])
def test_install_gives_the_same_weights_on_both_storages_with_grown_values(grown_gradient):
    masked, compressed, _ = _pair()
    active = masked.active_positions()
    keep = torch.ones(active.numel(), dtype=torch.bool)
    keep[[0, 3]] = False
    free = (~masked.mask.reshape(-1)).nonzero().squeeze(1)
    grown = torch.cat([free[[4, 1]], active[[3]]])  # two new ones and one dropped-and-regrown
    values = torch.tensor([0.25, -0.5, 9.0])
    plan = Rewiring(keep, grown, values)
    opt_m = torch.optim.Adam([masked.param], lr=0.1)
    opt_c = torch.optim.Adam([compressed.param], lr=0.1)
    opt_m.step()
    opt_c.step()
    regrown_value = float(masked.param.detach().reshape(-1)[active[3]])
    stats = [
        w.install(plan, opt, grown_gradient) for w, opt in ((masked, opt_m), (compressed, opt_c))
    ]
    assert stats[0].n_grown == 2 and stats[1].n_grown == 2  # the regrown one is no change
    assert torch.equal(masked.mask, compressed.mask)
    torch.testing.assert_close(masked.active_values(), compressed.active_values())
    by_position = dict(
        zip(masked.active_positions().tolist(), masked.active_values().tolist(), strict=True)
    )
    assert by_position[int(free[4])] == 0.25 and by_position[int(free[1])] == -0.5
    assert by_position[int(active[3])] == pytest.approx(regrown_value)  # kept its value
    for key in ("exp_avg", "exp_avg_sq"):  # fresh state at the grown weights, on both
        state_m = opt_m.state[masked.param][key].reshape(-1)[masked.active_positions()]
        torch.testing.assert_close(state_m, opt_c.state[compressed.param][key])
        assert float(state_m.reshape(-1)[masked.active_positions() == free[4]].abs().sum()) == 0
    grad_m = masked.param.grad.reshape(-1)[masked.active_positions()]
    torch.testing.assert_close(grad_m, compressed.param.grad)


def test_a_plan_of_another_topology_is_refused_by_the_compressed_storage():
    _, compressed, _ = _pair()
    plan = Rewiring(torch.ones(compressed.n_active + 1, dtype=torch.bool), torch.zeros(0).long())
    with pytest.raises(ValueError, match="planned on another topology"):
        compressed.install(plan, None)


class _MagnitudeAndGradient(rigl.SET):
    """MEST's drop score ``|θ| + λ|∇θ|`` (Yuan et al., 2021) as a toy method: the only change
    is the hook; with the gradient needed, the update comes before the step."""

    update_before_step = True

    def drop_score(self, weight):
        return weight.active_values().abs() + 0.5 * weight.active_gradient().abs()


class _GrowAtHalf(rigl.RigL):
    """RigL whose grown weights start at 0.5 (a method post-processing the plan)."""

    def plan_layer(self, index, weight, step, generator):
        plan = super().plan_layer(index, weight, step, generator)
        return None if plan is None else plan.with_values(torch.full(plan.grown.shape, 0.5))


def _run(cls, backend, steps=40):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = cls(
        model, opt, sparsity=0.8, total_steps=steps, update_interval=5, backend=backend, seed=1
    )
    g = torch.Generator().manual_seed(0)
    grown_values = []
    for _ in range(steps):
        x, y = torch.randn(16, 24, generator=g), torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = {w.name: w.mask.clone() for w in sp.weights}
        sp.step()
        for w in sp.weights:
            new = w.mask & ~before[w.name]
            grown_values.append(_dense(w)[new])
        sp.check()
    return sp, torch.cat(grown_values)


def _dense(weight):
    if isinstance(weight, SparseWeight):
        return weight.layer.to_dense().weight.detach()
    return weight.param.detach()


def test_a_changed_drop_score_gives_the_same_masks_on_both_backends():
    masked, _ = _run(_MagnitudeAndGradient, "masked")
    compressed, _ = _run(_MagnitudeAndGradient, "sparse")
    plain, _ = _run(rigl.SET, "masked")
    assert masked.update_count == compressed.update_count > 3
    for name, mask in masked.masks.items():
        assert torch.equal(mask, compressed.masks[name]), name
    assert any(not torch.equal(m, plain.masks[k]) for k, m in masked.masks.items())


def test_grown_values_start_the_grown_weights_on_both_backends():
    masked, grown_m = _run(_GrowAtHalf, "masked")
    compressed, grown_c = _run(_GrowAtHalf, "sparse")
    assert masked.update_count == compressed.update_count > 3
    for name, mask in masked.masks.items():
        assert torch.equal(mask, compressed.masks[name]), name
    # RigL skips the optimizer step on update steps: grown weights are exactly 0.5
    assert grown_m.numel() > 10 and bool((grown_m == 0.5).all())
    assert torch.equal(grown_m, grown_c)
