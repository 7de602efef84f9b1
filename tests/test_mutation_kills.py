"""Tests written to kill mutants that survived the mutation run (scripts/mutation.sh,
docs/testing.md). Each names the behaviour it pins down; all are NumPy-only and quick."""
from __future__ import annotations

import numpy as np
import pytest

from tp_engine.backends.numpy_backend import NumpyBackend
from tp_engine.config import TrialConfig
from tp_engine.engine import Engine, engine_state, load_engine_state
from tp_engine.ops import OPS, RinvOpts

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


@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_iterative_f_rinv_starts_from_f_inv_at_its_own_margin(name):
    """RinvOpts.th is the clip margin of the f_inv that the iterations start from (rlstp passes
    inv_threshold): with no steps, f_rinv is f_inv at that margin, not at f_inv's default 1e-2."""
    op = OPS[name]
    lo, hi = (-1.0, 1.0) if name == "tanh" else (0.0, 1.0)
    mid = (lo + hi) / 2
    y = np.array([[lo - 1.0, mid, hi + 1.0]], F32)
    x = op.f_rinv(B, y, np.zeros_like(y), None, 0.5, RinvOpts(steps=0, lr=0.5, th=0.2))
    np.testing.assert_allclose(op.f(B, x), [[lo + 0.2, mid, hi - 0.2]], rtol=1e-5, atol=1e-6)


def _xor_batch(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3)).astype(F32)
    return x, np.eye(2, dtype=F32)[(x[:, 0] * x[:, 1] > 0).astype(int)]


def test_last_hidden_top_target_with_a_single_hidden_layer():
    """top_target last_hidden puts the first target on the last hidden layer; with one hidden
    layer that is layer 1, so nothing is sent further down and dtp has no inverse to train, but
    both layers still learn (the output layer from the loss gradient)."""
    cfg = TrialConfig(rule="dtp", hidden=[5], top_target="last_hidden", batch_size=8, seed=1,
                      optimizer={"name": "sgd", "lr": 0.1})
    eng = Engine(B, cfg, 3, 2, "softmax_ce")
    assert eng.top == 1 and eng.trained_feedback_layers == []
    before = {k: v.copy() for k, v in engine_state(eng).items() if k.startswith("net/")}
    eng.forward_step(*_xor_batch())
    after = engine_state(eng)
    for k in ("net/W1", "net/W2"):
        assert k in before, sorted(before)
        assert np.all(np.isfinite(after[k])) and np.any(after[k] != before[k]), k


def test_lr_scale_multiplies_the_learning_rate_of_both_optimizers():
    """lr_scale (a sweep axis) scales every learning rate: lr 0.4 at scale 0.25 takes exactly the
    steps of lr 0.1 at scale 1, for the forward weights and dtp's trained inverses alike."""
    def run(lr, scale):
        cfg = TrialConfig(rule="dtp", hidden=[6, 5], top_target="output", batch_size=8, seed=4, lr_scale=scale,
                          optimizer={"name": "sgd", "lr": lr}, inverse_optimizer={"name": "sgd", "lr": lr / 2})
        eng = Engine(B, cfg, 3, 2, "softmax_ce")
        x, y = _xor_batch()
        noise = [(0.3 * np.random.default_rng(l).standard_normal((8, eng.noise_width(l)))).astype(F32)
                 for l in eng.trained_feedback_layers]
        for _ in range(2):
            eng.inverse_step(x, noise)
            eng.forward_step(x, y)
        return engine_state(eng)

    scaled, plain, unscaled = run(0.4, 0.25), run(0.1, 1.0), run(0.4, 1.0)
    assert any(k.startswith("net/V") for k in scaled), sorted(scaled)
    for k, v in plain.items():
        np.testing.assert_array_equal(scaled[k], v, err_msg=k)
    assert all(np.any(unscaled[k] != plain[k]) for k in plain if k.startswith("net/"))


def test_diagnose_compares_with_backprop_for_a_rule_whose_top_target_is_the_output():
    """The angle diagnostics of a rule other than bp compare its local gradients with backprop's
    at the same weights, also when its top target is the output (only bp from the output may
    reuse its own gradients as the reference): dtp's bp norms are those of a bp engine loaded with
    dtp's forward weights, and its first layer's gradient is not backprop's."""
    cfg = TrialConfig(rule="dtp", hidden=[6, 5], top_target="output", batch_size=8, seed=2)
    dtp = Engine(B, cfg, 3, 2, "softmax_ce")
    bp = Engine(B, cfg.model_copy(update={"rule": "bp"}), 3, 2, "softmax_ce")
    bp.net.load_state({k: v for k, v in dtp.net.state().items() if k[0] in "Wb"})
    x, y = _xor_batch()
    noise = [np.zeros((8, dtp.noise_width(l)), F32) for l in dtp.trained_feedback_layers]
    d, ref = dtp.diagnose(x, y, noise), bp.diagnose(x, y, [])
    for l in (1, 2, 3):
        np.testing.assert_allclose(d[f"norm_bp/{l}"], ref[f"norm_rule/{l}"], rtol=1e-6, err_msg=str(l))
    cos = d["dot/1"] / (d["norm_rule/1"] * d["norm_bp/1"])
    assert cos < 0.999, cos


def test_diagnose_local_loss_is_the_batch_mean_of_the_squared_target_distance():
    """local_loss/l (logged every epoch) = mean over examples of |h_l - t_l|^2, summed over units,
    from the rule's own targets; checked in float64 from the engine's forward pass and targets."""
    cfg = TrialConfig(rule="dtp", hidden=[6, 5], batch_size=8, seed=3)
    eng = Engine(B, cfg, 3, 2, "softmax_ce")
    x, y = _xor_batch()
    noise = [np.zeros((8, eng.noise_width(l)), F32) for l in eng.trained_feedback_layers]
    d = eng.diagnose(x, y, noise)
    fwd = eng.net.forward(x)
    t = eng.targets(fwd, y)
    for l in (1, 2, 3):
        diff = fwd.hs[l].astype(np.float64) - t[l].astype(np.float64)
        want = np.sum(diff * diff) / len(x)
        assert want > 1e-8  # a target that differs from the activation: the check can fail
        np.testing.assert_allclose(d[f"local_loss/{l}"], want, rtol=1e-5, err_msg=str(l))


def test_fused_optimizer_rounds_a_float64_gradient_to_float32_first():
    """The fused step works in float32 like the table's float32 variables: a float64 gradient is
    rounded once on the way in, never carried through the kernel's arithmetic in float64."""
    from tp_engine.config import OptimizerConfig
    from tp_engine.optimizers import Optimizer

    rng = np.random.default_rng(4)
    g64 = rng.standard_normal((40, 30)) * 0.1
    runs = []
    for g in (g64, g64.astype(F32)):
        w = B.variable(np.full((40, 30), 0.5, F32))
        opt = Optimizer(B, OptimizerConfig(name="rmsprop_centered", lr=0.01), [w])
        assert opt._fused is not None
        for _ in range(3):
            opt.apply([g])
        runs.append(w)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_engine_refuses_last_hidden_without_a_hidden_layer():
    """TrialConfig requires a hidden layer; the engine says why on its own too (a config built
    without validation, as a library caller may)."""
    cfg = TrialConfig.model_construct(**{**TrialConfig(rule="dtp").model_dump(), "hidden": []})
    with pytest.raises(ValueError, match="^top_target last_hidden needs at least one hidden layer$"):
        Engine(B, cfg, 3, 2, "softmax_ce")


@pytest.mark.parametrize("rule,top_target", [("dfa", "output"), ("ddtp_linear", "output"), ("ddtp_linear", "last_hidden")])
def test_direct_feedback_reaches_every_hidden_layer_below_the_top_and_not_the_input(rule, top_target):
    cfg = TrialConfig(rule=rule, hidden=[6, 5, 4], top_target=top_target, batch_size=8, seed=1)
    eng = Engine(B, cfg, 3, 2, "softmax_ce")
    want = list(range(1, eng.top))  # hidden layers under the top target; layer 0 is the input
    assert eng.net.inverse_layers == want
    assert sorted(eng.net.V) == want
    for l in want:  # from the output (2 units) to layer l
        assert eng.net.V[l].shape == (2, cfg.hidden[l - 1])


def test_weight_decay_pulls_the_weights_toward_zero():
    """weight_decay adds wd * p to the gradient (PyTorch's coupled L2, as the drl and ddtp_linear
    authors use on feedback weights): with a zero gradient, plain SGD shrinks p by lr * wd."""
    from tp_engine.config import OptimizerConfig
    from tp_engine.optimizers import Optimizer

    p = B.variable(np.array([[2.0, -4.0], [0.5, 0.0]], F32))
    opt = Optimizer(B, OptimizerConfig(name="sgd", lr=0.1, momentum=0.0, weight_decay=0.5), [p])
    opt.apply([np.zeros((2, 2), F32)])
    np.testing.assert_allclose(p, np.array([[2.0, -4.0], [0.5, 0.0]]) * 0.95, rtol=1e-6)


def test_an_unknown_rule_is_refused_with_the_choices():
    from tp_engine.rules import RULES, get_rule

    with pytest.raises(ValueError, match="^unknown rule 'nope'; choose one of " + ", ".join(RULES) + "$"):
        get_rule("nope")
    assert get_rule("dtp") is RULES["dtp"]
