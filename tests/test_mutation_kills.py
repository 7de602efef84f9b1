"""Tests written to kill mutants that survived the mutation run (scripts/mutation.sh,
docs/testing.md). Each names the behaviour it pins down; all are NumPy-only and quick."""
from __future__ import annotations

import numpy as np
import pytest

from tp_engine.backends.numpy_backend import NumpyBackend
from tp_engine.config import TrialConfig
from tp_engine.engine import Engine, engine_state, load_engine_state
from tp_engine.ops import OPS

B = NumpyBackend()
F32 = np.float32


def test_relu_f_inv_of_an_exact_zero_is_the_closest_preimage():
    """Every x <= 0 maps to 0, so f_inv(0) is the one closest to x0: x0 itself when x0 < 0 (a
    unit that is off and whose target stays 0 keeps its pre-activation), 0 when x0 > 0."""
    x0 = np.array([[-1.5, -0.2, 0.7, 2.0]], F32)
    y = np.zeros_like(x0)
    np.testing.assert_array_equal(OPS["relu"].f_inv(B, y, x0, None), np.array([[-1.5, -0.2, 0.0, 0.0]], F32))


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_squashing_f_inv_default_margin_is_one_percent(name):
    """The documented default clip margin (docs/rules.md, TP_RULES.md: th = 1e-2)."""
    op = OPS[name]
    lo, hi = (-1.0, 1.0) if name == "tanh" else (0.0, 1.0)
    y = np.array([[lo - 5.0, hi + 5.0]], F32)
    x = op.f_inv(B, y, np.zeros_like(y), None)
    np.testing.assert_allclose(op.f(B, x), [[lo + 1e-2, hi - 1e-2]], rtol=1e-5)


@pytest.mark.parametrize("rule,opt", [("dtp", "rmsprop_centered"), ("bp", "adam"), ("lstp", "sgd")])
def test_engine_state_round_trip_continues_the_same_trajectory(rule, opt):
    """engine_state / load_engine_state carry the optimizer's slots and step count: an engine
    loaded from another's state after two steps takes the same third step (Adam's step depends on
    t, RMSprop's and momentum SGD's on their slots), for forward and feedback optimizers alike."""
    cfg = TrialConfig(rule=rule, hidden=[6, 5], batch_size=4, seed=2, top_target="output",
                      optimizer={"name": opt, "lr": 0.01, "momentum": 0.9},
                      inverse_optimizer={"name": opt, "lr": 0.01, "momentum": 0.9})
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((3, 4, 7)).astype(F32)
    ys = np.eye(3, dtype=F32)[rng.integers(0, 3, (3, 4))]
    noise = [[(0.3 * rng.standard_normal((4, n))).astype(F32) for n in (6, 5)] for _ in range(3)]
    a = Engine(B, cfg, 7, 3, "softmax_ce")

    def step(eng, k):
        if eng.inv_opt is not None:
            eng.inverse_step(xs[k], noise[k][: len(eng.trained_feedback_layers)])
        eng.forward_step(xs[k], ys[k])

    step(a, 0)
    step(a, 1)
    st = engine_state(a)
    assert float(st["opt/t"]) == 2.0
    assert any(np.any(v != 0) for k, v in st.items() if k.startswith("opt/") and k != "opt/t")
    b = Engine(B, cfg.model_copy(update={"seed": 99}), 7, 3, "softmax_ce")  # other weights
    load_engine_state(b, st)
    for k, v in engine_state(b).items():
        np.testing.assert_array_equal(v, st[k], err_msg=k)
    step(a, 2)
    step(b, 2)
    for k, v in engine_state(a).items():
        np.testing.assert_array_equal(engine_state(b)[k], v, err_msg=k)
