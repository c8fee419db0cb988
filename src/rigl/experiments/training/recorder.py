"""Mask dynamics recorder: a training callback that writes how the topology moves.

Written into the run folder, appended and flushed as training goes so that a killed
run keeps what it recorded:

``dynamics.csv``     one row per layer at every topology update (and at the start):
                     active count, connections dropped and grown, the schedule's drop
                     fraction f_decay(t), the fraction of weights ever active
                     ("exploration") and the mean lifetime of the connections dropped.
``lifetimes.csv``    histogram of lifetimes (steps between birth and drop) of the
                     connections dropped at each update, split by origin: ``initial``
                     (in the mask at the start) or ``grown`` (grown by an update).
``alive.csv``        connections still active at the last record, by birth step
                     (rewritten atomically): the censored part of the survival curve.
``first_layer.npz``  every ``snapshot_every`` steps, the first sparsified layer's active
                     connections per input feature (``mask.sum`` over output units):
                     ``steps`` (T,), ``counts`` (T, n_inputs) (rewritten atomically).

Steps: an update is labelled with the index of the optimizer step during which it
happened (``sparsifier.step_count - 1`` right after it), as in the schedule
(``t % ΔT == 0``); snapshots are labelled with the number of steps completed.

Longer than ~300 lines: nearly all of it is one class, whose per-layer state (birth steps,
origins, ever-active masks) feeds all four files; split, that state would be shared
between modules.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rigl.experiments.runio import CsvLog, atomic_write_bytes, atomic_write_text

DYNAMICS_FIELDS = [
    "step",
    "layer",
    "n_active",
    "n_total",
    "density",
    "updates",
    "n_dropped",
    "n_grown",
    "drop_fraction",
    "realized_drop_fraction",
    "explored",
    "dropped_lifetime_mean",
]
LIFETIME_FIELDS = ["step", "layer", "origin", "lifetime", "count"]
ALIVE_FIELDS = ["step", "layer", "origin", "birth_step", "count"]


class _LayerState:
    """Bookkeeping of one layer, flat tensors on the mask's device."""

    def __init__(self, mask: Tensor, step: int, track_lifetimes: bool) -> None:
        flat = mask.detach().flatten().clone()
        self.prev = flat  # mask at the last record
        self.ever = flat.clone()  # ever active since recording began
        self.birth: Tensor | None = None
        self.initial: Tensor | None = None
        if track_lifetimes:
            # the step each connection was born (int32: half the memory of int64)
            self.birth = torch.full_like(flat, step, dtype=torch.int32)
            self.initial = flat.clone()  # still the connection of the starting mask


class MaskRecorder:
    """Training callback recording the mask dynamics of a sparsifier (see module docstring).

    Args:
        run_dir: the run folder; files are created (or appended to, on resume) there.
        every: record every ``every``-th topology update. Default (None): each one, or,
            for a schedule with more than ``MAX_RECORDS`` updates in ``total_steps`` (SR-STE
            and Top-KAST refresh their masks after every step), every ``ceil(n /
            MAX_RECORDS)``-th, so recording stays a small part of the run. Recording
            is O(weights) tensor work done only at updates, through the sparsifier's
            ``update_hooks`` (or, for sparsifiers without them, by comparing
            ``update_count`` at each call); with ``every > 1`` the skipped updates are
            merged into the next row (``updates`` column, net drop/grow counts, and
            lifetimes of connections that lived through a recorded update).
        snapshot_every: steps between first-layer snapshots (0 disables them).
        track_lifetimes: keep a per-weight birth step to measure how long connections
            survive (an int32 per weight; disable on very large models).
        input_shape: shape of one input example, stored with the snapshots so the report
            can draw them as images (e.g. ``(1, 28, 28)``).
        sparsifier: give it to record the exact initial masks now rather than at the
            first call.

    Called as ``recorder(step, model, sparsifier, metrics)`` after every training step
    (extra calls at epoch ends for the same step are ignored); ``close()`` writes a
    last snapshot. Rows are appended and files replaced atomically as they come, so a
    killed run keeps what was recorded; ``state_dict``/``load_state_dict`` continue
    a resumed run (log rows written after its checkpoint are cut).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        every: int | None = None,
        snapshot_every: int = 100,
        track_lifetimes: bool = True,
        input_shape: tuple[int, ...] | None = None,
        sparsifier: Any = None,
    ) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every={every!r} must be an int >= 1 (or None: automatic)")
        if not isinstance(snapshot_every, int) or snapshot_every < 0:
            raise ValueError(f"snapshot_every={snapshot_every!r} must be an int >= 0 (0 = off)")
        self.run_dir = Path(run_dir)
        self.every = every
        self.snapshot_every = snapshot_every
        self.track_lifetimes = track_lifetimes
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self._layers: dict[str, _LayerState] = {}
        self._seen_updates = 0
        self._last_step: int | None = None
        self._snap_steps: list[int] = []
        self._snap_counts: list[np.ndarray] = []
        self._first_name: str | None = None
        self._sparsifier: Any = None
        self._hooked = False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._logs = {
            "dynamics": CsvLog(self.run_dir / "dynamics.csv", DYNAMICS_FIELDS),
            "lifetimes": CsvLog(self.run_dir / "lifetimes.csv", LIFETIME_FIELDS),
        }
        if sparsifier is not None:
            self._attach(sparsifier)

    # -- the callback ---------------------------------------------------------------------
    def __call__(self, step: int, model: Any, sparsifier: Any, metrics: Any = None) -> None:
        del step, model, metrics  # the sparsifier's own counters are the clock
        attached_now = self._sparsifier is not sparsifier
        if attached_now:
            self._attach(sparsifier)
        done = int(sparsifier.step_count)  # optimizer steps completed
        if done == self._last_step:
            return  # the epoch-end call of a step already seen
        self._last_step = done
        # Without update hooks, the update (if any) was in the last step. A hook attached
        # just now missed an update in that step: in a resumed run the first call comes
        # after the first step, which may be an update step (recorded here, not merged
        # into the next update's row).
        if not self._hooked or attached_now:
            self._maybe_record(sparsifier, done - 1)
        if self.snapshot_every and (done % self.snapshot_every == 0 or done == _total(sparsifier)):
            self._snapshot(sparsifier, done)

    def _attach(self, sparsifier: Any) -> None:
        """Follow ``sparsifier``: an update hook when it has them, else polling per call."""
        self._sparsifier = sparsifier
        if self.every is None:
            self.every = _auto_every(sparsifier)
        hooks = getattr(sparsifier, "update_hooks", None)
        self._hooked = isinstance(hooks, list)
        if self._hooked:
            hooks.append(self._on_update)
        if not self._layers:
            self._start(sparsifier)

    def _on_update(self, sparsifier: Any) -> None:
        """Called inside the topology update of step t (``step_count`` is still t)."""
        self._maybe_record(sparsifier, int(sparsifier.step_count))

    def _maybe_record(self, sparsifier: Any, step: int) -> None:
        if int(sparsifier.update_count) - self._seen_updates >= (self.every or 1):
            self._record_update(sparsifier, step)

    def close(self, sparsifier: Any = None) -> None:
        """Write a last first-layer snapshot of the final masks (files are already flushed)."""
        sparsifier = sparsifier if sparsifier is not None else self._sparsifier
        if sparsifier is not None and self.snapshot_every and self._layers:
            done = int(sparsifier.step_count)
            if not self._snap_steps or self._snap_steps[-1] != done:
                self._snapshot(sparsifier, done)

    # -- checkpointing (saved in the run's checkpoint, restored on --resume) ----------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (loadable with ``torch.load(weights_only=True)``)."""
        layers = {
            name: {
                "prev": s.prev.cpu(),
                "ever": s.ever.cpu(),
                "birth": None if s.birth is None else s.birth.cpu(),
                "initial": None if s.initial is None else s.initial.cpu(),
            }
            for name, s in self._layers.items()
        }
        counts = torch.from_numpy(np.stack(self._snap_counts)) if self._snap_counts else None
        return {
            "layers": layers,
            "seen_updates": self._seen_updates,
            "last_step": self._last_step,
            "snap_steps": list(self._snap_steps),
            "snap_counts": counts,
            "first_name": self._first_name,
            "rows": {key: log.rows for key, log in self._logs.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a resumed run: bookkeeping back, log rows written after the checkpoint cut."""
        self._layers = {}
        for name, s in state["layers"].items():
            layer = _LayerState.__new__(_LayerState)
            layer.prev, layer.ever = s["prev"].clone(), s["ever"].clone()
            layer.birth, layer.initial = s["birth"], s["initial"]
            self._layers[name] = layer
        self._seen_updates = int(state["seen_updates"])
        self._last_step = state["last_step"]
        self._snap_steps = [int(x) for x in state["snap_steps"]]
        counts = state["snap_counts"]
        self._snap_counts = [] if counts is None else list(counts.numpy())
        self._first_name = state["first_name"]
        for key, rows in state["rows"].items():
            self._logs[key].truncate(int(rows))

    # -- recording ----------------------------------------------------------------------------
    def _start(self, sparsifier: Any) -> None:
        start = int(sparsifier.step_count)
        if sparsifier.update_count == 0:
            start = 0  # started after a step without update: the masks are still step 0's
        self._seen_updates = int(sparsifier.update_count)
        self._last_step = start
        for w in sparsifier.weights:
            self._layers[w.name] = _LayerState(w.mask, start, self.track_lifetimes)
        if sparsifier.weights:
            self._first_name = sparsifier.weights[0].name
        rows = [
            self._row(w, start, self._layers[w.name], 0, 0, 0, _fraction(sparsifier, start), None)
            for w in sparsifier.weights
        ]
        self._append("dynamics", rows)
        self._write_alive(start)
        if self.snapshot_every:
            self._snapshot(sparsifier, start)

    @torch.no_grad()
    def _record_update(self, sparsifier: Any, step: int) -> None:
        n_updates = int(sparsifier.update_count) - self._seen_updates
        self._seen_updates = int(sparsifier.update_count)
        exact = {s.name: s for s in (sparsifier.last_update or [])} if n_updates == 1 else {}
        rows, lifetime_rows = [], []
        for w in sparsifier.weights:
            state = self._layers[w.name]
            now = w.mask.detach().flatten()
            dropped = state.prev & ~now  # (numel,) active at the last record, not now
            grown = now & ~state.prev
            stats = exact.get(w.name)
            n_dropped = stats.n_dropped if stats else int(dropped.count_nonzero())
            n_grown = stats.n_grown if stats else int(grown.count_nonzero())
            mean_life = None
            if state.birth is not None and state.initial is not None:
                lifetime_rows += _lifetime_rows(step, w.name, state, dropped)
                if bool(dropped.any()):
                    mean_life = float((step - state.birth[dropped]).double().mean())
                state.birth[grown] = step
                state.initial[grown] = False
            state.ever |= now
            state.prev = now.clone()
            frac = _fraction(sparsifier, step)
            rows.append(self._row(w, step, state, n_updates, n_dropped, n_grown, frac, mean_life))
        self._append("dynamics", rows)
        self._append("lifetimes", lifetime_rows)
        self._write_alive(step)

    @staticmethod
    def _row(
        w: Any,
        step: int,
        state: _LayerState,
        updates: int,
        n_dropped: int,
        n_grown: int,
        fraction: float | None,
        mean_life: float | None,
    ) -> dict[str, Any]:
        n_active, numel = int(w.n_active), int(state.prev.numel())
        before = n_active - n_grown + n_dropped
        return {
            "step": step,
            "layer": w.name,
            "n_active": n_active,
            "n_total": numel,
            "density": f"{n_active / numel:.6g}",
            "updates": updates,
            "n_dropped": n_dropped,
            "n_grown": n_grown,
            "drop_fraction": "" if fraction is None else f"{fraction:.6g}",
            "realized_drop_fraction": f"{n_dropped / before:.6g}" if before else "0",
            "explored": f"{int(state.ever.count_nonzero()) / numel:.6g}",
            "dropped_lifetime_mean": "" if mean_life is None else f"{mean_life:.6g}",
        }

    def _write_alive(self, step: int) -> None:
        if not self.track_lifetimes:
            return
        rows = []
        for name, state in self._layers.items():
            assert state.birth is not None and state.initial is not None
            for origin, where in (("initial", state.initial), ("grown", ~state.initial)):
                births = state.birth[state.prev & where]
                values, counts = torch.unique(births, return_counts=True)
                rows += [
                    {
                        "step": step,
                        "layer": name,
                        "origin": origin,
                        "birth_step": int(b),
                        "count": int(c),
                    }
                    for b, c in zip(values.tolist(), counts.tolist(), strict=True)
                ]
        lines = [",".join(ALIVE_FIELDS)] + [",".join(str(r[k]) for k in ALIVE_FIELDS) for r in rows]
        atomic_write_text(self.run_dir / "alive.csv", "\n".join(lines) + "\n")

    def _snapshot(self, sparsifier: Any, step: int) -> None:
        if not sparsifier.weights:
            return
        mask = sparsifier.weights[0].mask.detach()
        # Linear (out, in): connections of each input; conv (out, in, kh, kw): of each input tap.
        counts = mask.sum(dim=0).flatten().to(torch.int32).cpu().numpy()
        if self._snap_steps and self._snap_steps[-1] == step:
            return
        self._snap_steps.append(step)
        self._snap_counts.append(counts)
        extra = {} if self.input_shape is None else {"input_shape": np.asarray(self.input_shape)}
        buffer = io.BytesIO()
        np.savez(
            buffer,
            steps=np.asarray(self._snap_steps, dtype=np.int64),
            counts=np.stack(self._snap_counts),  # (T, n_inputs)
            n_outputs=np.asarray(mask.shape[0]),
            layer=np.asarray(self._first_name or ""),
            **extra,
        )
        atomic_write_bytes(self.run_dir / "first_layer.npz", buffer.getvalue())

    def _append(self, key: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._logs[key].append(row)  # opened, appended and closed: nothing lost if killed


def _lifetime_rows(step: int, name: str, state: _LayerState, dropped: Tensor) -> list[dict]:
    assert state.birth is not None and state.initial is not None
    rows = []
    for origin, where in (("initial", state.initial), ("grown", ~state.initial)):
        lifetimes = step - state.birth[dropped & where]
        values, counts = torch.unique(lifetimes, return_counts=True)
        rows += [
            {"step": step, "layer": name, "origin": origin, "lifetime": int(v), "count": int(c)}
            for v, c in zip(values.tolist(), counts.tolist(), strict=True)
        ]
    return rows


def _fraction(sparsifier: Any, step: int) -> float | None:
    """The schedule's f_decay(t), or None for methods without a drop fraction."""
    fraction = getattr(getattr(sparsifier, "schedule", None), "fraction", None)
    return float(fraction(step)) if callable(fraction) else None


def _total(sparsifier: Any) -> int | None:
    return getattr(sparsifier, "total_steps", None)


MAX_RECORDS = 200  # automatic `every`: at most about this many recorded updates per run


def _auto_every(sparsifier: Any) -> int:
    """1, or the thinning that keeps a run's recorded updates near :data:`MAX_RECORDS`
    (counted from the schedule over ``total_steps``; 1 when either is unknown). The same
    on a resume: a function of the schedule only."""
    total, should_update = _total(sparsifier), getattr(sparsifier, "should_update", None)
    if not total or should_update is None:
        return 1
    n_updates = sum(1 for t in range(total) if should_update(t))
    return max(1, math.ceil(n_updates / MAX_RECORDS))
