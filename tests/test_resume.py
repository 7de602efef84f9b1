"""Exact resume in the engine: training N epochs straight and training k epochs, stopping, then
resuming from the epoch-k checkpoint to N give the same run. Weights, optimizer slots (and step
counts) and every logged metric but seconds_per_epoch are bit-identical on NumPy, and agree to
the parity tolerance on TensorFlow.

A resume that restarted from fresh weights, dropped an optimizer slot, or redrew a random stream
(batch order, inverse-training noise, the diagnostics' noise) changes these numbers, so each of
those mistakes fails here; counting epochs, as the worker tests do, catches none of them.

The interrupted run is stopped from its ``on_epoch`` callback, as a killed Ray trial is, and the
checkpoint it hands over goes through the worker's own checkpoint files before the resume.
"""
from __future__ import annotations

import numpy as np
import pytest

from tp_engine.config import TrialConfig
from tp_engine.data import load_dataset
from tp_engine.rules import RULES
from tp_engine.train import train

N_EPOCHS = 3
# MNIST rows through a small net: real data, a second or so per rule.
BASE = dict(dataset="mnist", subset=600, hidden=[32, 32], epochs=N_EPOCHS, batch_size=100, diag_size=200)
# Variants that touch more state: Adam's bias correction reads the step count t; dtp's per_batch
# schedule with decaying noise draws inverse noise per step.
VARIANTS = {
    **{rule: dict(rule=rule) for rule in RULES},
    "bp_adam": dict(rule="bp", optimizer={"name": "adam", "lr": 0.003}),
    "dtp_per_batch_noise_decay": dict(rule="dtp", schedule="per_batch", noise_decay=True,
                                      inverse_optimizer={"name": "adam", "lr": 0.001}),
}


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", seed=0, subset=600)


def _without_time(history):
    return [{k: v for k, v in h.items() if k != "seconds_per_epoch"} for h in history]


def _stop_after(k: int):
    """An on_epoch that keeps epoch k's checkpoint and history, then kills the run."""
    kept: dict = {"history": []}

    def on_epoch(m, checkpoint):
        kept["history"].append(dict(m))
        if int(m["epoch"]) == k:
            kept["checkpoint"] = {name: np.array(v, copy=True) for name, v in checkpoint.items()}
            raise _Killed

    return kept, on_epoch


def _through_trial_files(tmp_path, epoch: int, history, state):
    """The checkpoint as the Ray trial writes and reads it (npz + JSON meta)."""
    from ray import tune

    from worker.trainable import _read_checkpoint, _save_checkpoint

    _save_checkpoint(tmp_path, {"epoch": epoch, "history": history, "run_id": "r"}, state)
    meta, loaded = _read_checkpoint(tune.Checkpoint.from_directory(str(tmp_path)))
    return meta, loaded


def _straight_and_resumed(cfg, data, k: int, tmp_path=None):
    # Epoch k's checkpoint from the straight run is the one a run killed after epoch k leaves
    # (test_resume_from_a_later_epoch_and_twice kills runs for real).
    kept: dict = {}

    def on_epoch(m, checkpoint):
        if int(m["epoch"]) == k:
            kept["state"] = {name: np.array(v, copy=True) for name, v in checkpoint.items()}

    straight = train(cfg, on_epoch, data=data)
    state, history = kept["state"], [dict(h) for h in straight.history[:k]]
    if tmp_path is not None:
        meta, state = _through_trial_files(tmp_path, k, history, state)
        assert meta["epoch"] == k
        history = meta["history"]
    resumed = train(cfg, data=data, resume=state, start_epoch=k, history=history)
    return straight, resumed


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resumed_numpy_run_is_bit_identical(mnist, variant, tmp_path):
    cfg = TrialConfig(**BASE, **VARIANTS[variant])
    straight, resumed = _straight_and_resumed(cfg, mnist, k=1, tmp_path=tmp_path)
    assert straight.status == resumed.status == "completed"
    assert len(straight.history) == N_EPOCHS
    # Every metric, every epoch, exactly (== on floats: bit for bit, NaN aside).
    assert _without_time(resumed.history) == _without_time(straight.history)
    # The final state: weights, feedback weights, optimizer slots and step counts.
    assert sorted(resumed.checkpoint) == sorted(straight.checkpoint)
    assert any(k.startswith("opt/") for k in straight.checkpoint)
    for name, value in straight.checkpoint.items():
        np.testing.assert_array_equal(resumed.checkpoint[name], value, err_msg=name)
    s = {k: v for k, v in straight.summary.items() if k != "seconds_per_epoch"}
    assert {k: v for k, v in resumed.summary.items() if k != "seconds_per_epoch"} == s


def test_resume_from_a_later_epoch_and_twice(mnist):
    """dtp killed after epoch 1, resumed and killed again after epoch 2, resumed to the end."""
    cfg = TrialConfig(**BASE, **VARIANTS["dtp_per_batch_noise_decay"])
    straight = train(cfg, data=mnist)
    kept1, stop1 = _stop_after(1)
    with pytest.raises(_Killed):
        train(cfg, stop1, data=mnist)
    kept2, stop2 = _stop_after(2)
    with pytest.raises(_Killed):
        train(cfg, stop2, data=mnist, resume=kept1["checkpoint"], start_epoch=1, history=kept1["history"])
    history = kept1["history"] + kept2["history"]
    assert _without_time(history) == _without_time(straight.history[:2])
    resumed = train(cfg, data=mnist, resume=kept2["checkpoint"], start_epoch=2, history=history)
    assert _without_time(resumed.history) == _without_time(straight.history)
    for name, value in straight.checkpoint.items():
        np.testing.assert_array_equal(resumed.checkpoint[name], value, err_msg=name)


def test_resume_needs_the_saved_state(mnist):
    """The comparison above can fail: resuming at epoch 1 from fresh weights (a resume that
    ignored its checkpoint), or from the saved weights with fresh optimizer slots, gives
    another run."""
    cfg = TrialConfig(**BASE, rule="dtp")
    straight = train(cfg, data=mnist)
    kept, on_epoch = _stop_after(1)
    with pytest.raises(_Killed):
        train(cfg, on_epoch, data=mnist)
    fresh = train(cfg, data=mnist, resume=None, start_epoch=1, history=kept["history"])
    assert _without_time(fresh.history) != _without_time(straight.history)
    no_slots = {k: v if k.startswith("net/") else np.zeros_like(v) for k, v in kept["checkpoint"].items()}
    other = train(cfg, data=mnist, resume=no_slots, start_epoch=1, history=kept["history"])
    assert _without_time(other.history) != _without_time(straight.history)


# ---- TensorFlow: the same, to the parity tolerance ----------------------------------------------

RTOL, ATOL = 1e-4, 1e-5  # tests/test_parity.py explains these


@pytest.mark.parametrize("rule", ["bp", "dtp"])
def test_resumed_tensorflow_run_matches(mnist, rule):
    pytest.importorskip("tensorflow")
    # Eager TensorFlow: XLA's compile time would dominate (resume restores the same variables).
    cfg = TrialConfig(**{**BASE, "epochs": 2}, rule=rule, backend="tensorflow", jit_compile=False)
    straight, resumed = _straight_and_resumed(cfg, mnist, k=1)
    assert [sorted(h) for h in resumed.history] == [sorted(h) for h in straight.history]
    for a, b in zip(_without_time(straight.history), _without_time(resumed.history)):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=ATOL), key
    for name, value in straight.checkpoint.items():
        np.testing.assert_allclose(resumed.checkpoint[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


# ---- the trial's checkpoint files: pruning and the fallback to the newest whole one -------------


def test_pruned_and_torn_checkpoints_fall_back_to_the_newest_whole_one(tmp_path):
    """What worker.sweep's _PruneCheckpoints leaves and what a resumed trial then loads: older
    checkpoints keep their directory (the experiment state may name one) but not their state;
    a checkpoint torn while being overwritten is skipped; the newest whole one is loaded."""
    from ray import tune

    from worker.trainable import (
        _newest_whole_checkpoint, _read_checkpoint, _save_checkpoint, prune_checkpoints,
    )

    def ckpt(i):
        return tune.Checkpoint(str(tmp_path / f"checkpoint_{i:06d}"))

    for i in range(4):  # checkpoint_00000i holds epoch i + 1
        d = tmp_path / f"checkpoint_{i:06d}"
        d.mkdir()
        _save_checkpoint(d, {"epoch": i + 1, "history": [{"epoch": e} for e in range(1, i + 2)]},
                         {"w": np.full(3, i, np.float32)})
    (tmp_path / "checkpoint_x").mkdir()  # not Tune's: ignored
    prune_checkpoints(ckpt(2))  # Tune registered checkpoint_000002
    for i in range(4):
        assert (tmp_path / f"checkpoint_{i:06d}" / "meta.json").exists()
        assert (_read_checkpoint(ckpt(i)) is None) == (i < 2), i  # 3 may be being written: kept
    # The experiment state names checkpoint_000000 (pruned): the newest whole one is loaded.
    meta, state = _newest_whole_checkpoint(ckpt(0))
    assert meta["epoch"] == 4 and state["w"].tolist() == [3, 3, 3]
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3, 4]
    # checkpoint_000003 torn mid-overwrite (a resumed trial rewrites indices after the named one).
    path = tmp_path / "checkpoint_000003" / "state.npz"
    path.write_bytes(path.read_bytes()[:100])
    assert _read_checkpoint(ckpt(3)) is None
    meta, state = _newest_whole_checkpoint(ckpt(0))
    assert meta["epoch"] == 3 and state["w"].tolist() == [2, 2, 2]
    # A checkpoint from before the meta went into state.npz still loads.
    old = tmp_path / "old" / "checkpoint_000000"
    old.mkdir(parents=True)
    np.savez(old / "state.npz", w=np.ones(2, np.float32))
    (old / "meta.json").write_text('{"epoch": 7, "history": []}')
    meta, state = _read_checkpoint(tune.Checkpoint(str(old)))
    assert meta["epoch"] == 7 and state["w"].tolist() == [1, 1]
