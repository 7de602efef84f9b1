"""The NumPy backend's fused paths against the formulas they replace, bit for bit.

- elementwise chains (``Op.vjp`` / ``vjp_diff`` / ``step_back``): numba kernels vs the ops'
  NumPy expressions;
- ``FusedOptimizer`` (every parameter of an optimizer in one call) vs the per-parameter kernels
  and vs the optimizer table's float32 array expressions (``array_step``);
- whole engine steps of every rule with all fusion on vs all fusion off.
"""
from __future__ import annotations

import numpy as np
import pytest

from tp_engine.backends import numpy_kernels as K
from tp_engine.backends.numpy_backend import NumpyBackend
from tp_engine.config import OptimizerConfig, TrialConfig
from tp_engine.engine import Engine
from tp_engine.ops import OPS
from tp_engine.optimizers import Optimizer, array_step
from tp_engine.rules import RULES

F32 = np.float32
B = NumpyBackend()


class PlainBackend(NumpyBackend):
    """The NumPy backend with every fusion off: the ops' expressions, and the optimizer kernels
    called one parameter at a time through optimizer_step (the path before FusedOptimizer)."""

    fused_vjp_y = None
    fused_vjp_diff = None
    fused_step_back = None

    def fused_optimizer(self, name, params, slots, hp):
        return None


PLAIN = PlainBackend()


def _arrays(rng, shape, k):
    out = []
    for _ in range(k):
        a = rng.standard_normal(shape).astype(F32)
        a.flat[:4] = [0.0, -0.0, 1.0, -1.0]  # exact edges of tanh's 1 - y^2
        out.append(a)
    return out


def _squash(name, y):
    return np.tanh(y) if name == "tanh" else (1 / (1 + np.exp(-y))).astype(F32) if name == "sigmoid" else y


# -- elementwise chains ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(100, 240), (7, 3), (1, 1)])
@pytest.mark.parametrize("name", ["tanh", "sigmoid", "linear_act"])
def test_vjp_and_vjp_diff_equal_the_expressions(name, shape):
    op = OPS[name]
    rng = np.random.default_rng(hash((name, shape)) % 2**32)
    a, b, x = _arrays(rng, shape, 3)
    y = _squash(name, x)
    for scale in (1.0, 2.0, 0.37):
        want = op.df_y(PLAIN, scale * (a - b) if scale != 1.0 else a - b, y)
        got = op.vjp_diff(B, a, b, x, y, scale)
        assert got.dtype == F32
        np.testing.assert_array_equal(got, want, err_msg=f"{name} scale {scale}")
        np.testing.assert_array_equal(op.vjp_diff(PLAIN, a, b, x, y, scale), want)
    np.testing.assert_array_equal(op.vjp(B, a, x, y), op.df_y(PLAIN, a, y))
    if name != "linear_act":  # the identity's vjp needs no kernel
        assert B.fused_vjp_y(name, a, y) is not None  # the kernel ran, not the fallback


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "linear_act", "add"])
def test_step_back_equals_the_expression(name):
    op = OPS[name]
    rng = np.random.default_rng(len(name))
    x0, y, p = _arrays(rng, (50, 30), 3)
    y0 = _squash(name, x0)
    want = x0 - op.vjp(PLAIN, y0 - y, x0, y0, p[0])
    got = op.step_back(B, x0, y0, y, p[0])
    assert B.fused_step_back(name, x0, y0, y) is not None  # the kernel ran, not the fallback
    np.testing.assert_array_equal(got, want)


def test_kernels_decline_what_they_do_not_cover():
    rng = np.random.default_rng(0)
    a, b, y = _arrays(rng, (20, 10), 3)
    assert K.vjp_diff("relu", a, b, y, 1.0) is None  # no kernel: relu has no df_y
    assert K.vjp_diff("tanh", a.T, b.T, y.T, 1.0) is None  # not contiguous
    assert K.vjp_diff("tanh", a.astype(np.float64), b, y, 1.0) is None
    assert K.step_back("tanh", a, b[:1], y, ) is None  # broadcasting is NumPy's job
    for dy, yy in ((a.astype(np.float64), y), (a, y.astype(np.float64)), (a, y.T.copy()), (a.T, y.T)):
        assert K.vjp_y("tanh", dy, yy) is None  # float64, another shape, not contiguous
    assert K.vjp_y("relu", a, y) is None
    # ... and the op falls back to its expression
    np.testing.assert_array_equal(OPS["tanh"].vjp_diff(B, a.T, b.T, y.T, np.tanh(y.T)),
                                  OPS["tanh"].vjp_diff(PLAIN, a.T, b.T, y.T, np.tanh(y.T)))
    relu = OPS["relu"]
    np.testing.assert_array_equal(relu.step_back(B, a, b, y), a - relu.df(B, b - y, a, None))


# -- optimizers ------------------------------------------------------------------------------------
class TableBackend(NumpyBackend):
    """The NumPy backend with no optimizer kernel at all: the table's array expressions
    (``tp_engine.optimizers.array_step``), which the kernels must equal bit for bit."""

    optimizer_step = array_step

    def fused_optimizer(self, name, params, slots, hp):
        return None


TABLE = TableBackend()


OPT_CASES = [
    ("sgd", dict(momentum=0.9)),
    ("rmsprop", dict(momentum=0.9, rho=0.9)),
    ("rmsprop", dict(momentum=0.0, rho=0.9, clip_norm=0.5)),
    ("rmsprop_centered", dict(momentum=0.9, rho=0.95)),
    ("rmsprop_centered", dict(momentum=0.9, rho=0.95, clip_norm=0.3, weight_decay=1e-3)),
    ("adam", dict(beta1=0.9, beta2=0.99)),
    ("adam", dict(beta1=0.99, beta2=0.999, eps=1e-4, clip_norm=1.0)),
]


@pytest.mark.parametrize("name,kw", OPT_CASES)
def test_fused_optimizer_equals_per_parameter_kernels_and_the_table(name, kw):
    """Three paths, five steps each, bit for bit: FusedOptimizer (training's), the kernels one
    parameter at a time, and the table's float32 array expressions."""
    rng = np.random.default_rng(len(name) + len(kw))
    shapes = [(30, 20), (20,), (20, 7), (7,)]
    p0 = [rng.standard_normal(s).astype(F32) for s in shapes]
    cfg = OptimizerConfig(name=name, lr=0.01, **kw)
    runs = {}
    for label, backend in (("fused", B), ("plain", PLAIN), ("table", TABLE)):
        params = [backend.variable(p) for p in p0]
        opt = Optimizer(backend, cfg, params)
        assert (opt._fused is not None) == (label == "fused")
        r = np.random.default_rng(7)
        for _ in range(5):
            opt.apply([r.standard_normal(s).astype(F32) * F32(0.3) for s in shapes])
        runs[label] = (params, opt)
    for other in ("plain", "table"):
        for a, b in zip(runs["fused"][0], runs[other][0]):
            np.testing.assert_array_equal(a, b, err_msg=other)
        for slot in runs["fused"][1].slots:
            for a, b in zip(runs["fused"][1].slots[slot], runs[other][1].slots[slot]):
                np.testing.assert_array_equal(a, b, err_msg=f"{other} {slot}")
    assert not np.array_equal(runs["fused"][0][0], p0[0])  # the steps did move the parameters


def test_the_kernels_round_like_the_table_not_in_float64():
    """One centered RMSprop step where float64 intermediates (the kernels before 2026-12) and the
    table's float32 disagree in the last bit: the kernel must give the table's value."""
    rng = np.random.default_rng(0)
    n = 4096
    p, g = rng.standard_normal(n).astype(F32), rng.standard_normal(n).astype(F32)
    slots = {"ms": (rng.random(n) + 1).astype(F32), "mg": (rng.random(n) * 0.1).astype(F32),
             "mom": (rng.random(n) * 0.01).astype(F32)}
    hp = {"lr": 0.01489, "rho": 0.95, "momentum": 0.9, "eps": 1e-3, "clip_norm": None}
    got = {k: v.copy() for k, v in slots.items()}
    pk = p.copy()
    assert K.optimizer_step("rmsprop_centered", pk, g, got, hp, 1.0)
    want = {k: v.copy() for k, v in slots.items()}
    pt = p.copy()
    array_step(TABLE, "rmsprop_centered", pt, g, want, hp, np.float32(1.0))
    np.testing.assert_array_equal(got["ms"], want["ms"])
    np.testing.assert_array_equal(pk, pt)
    f64 = (np.float32(0.95) * slots["ms"]).astype(np.float64) + (1.0 - np.float64(np.float32(0.95))) * g.astype(np.float64) ** 2
    assert (f64.astype(F32) != want["ms"]).any()  # the case does tell the two apart


def test_fused_optimizer_follows_a_loaded_state():
    """Loading a state assigns into the same arrays, so the prepared views see it."""
    p = B.variable(np.ones((4, 3), F32))
    opt = Optimizer(B, OptimizerConfig(name="rmsprop_centered", lr=0.1, momentum=0.9), [p])
    B.assign(opt.slots["mom"][0], np.full((4, 3), 0.5, F32))
    B.assign(p, np.zeros((4, 3), F32))
    opt.apply([np.zeros((4, 3), F32)])
    np.testing.assert_array_equal(p, np.full((4, 3), -0.45, F32))


# -- whole steps -------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu"])
@pytest.mark.parametrize("rule", list(RULES))
def test_engine_steps_are_bit_identical_with_and_without_fusion(rule, act):
    cfg = TrialConfig(rule=rule, hidden=[24, 20, 16], activation=act, batch_size=32, seed=1)
    rng = np.random.default_rng(3)
    x = rng.random((32, 30), dtype=F32)
    y = np.eye(5, dtype=F32)[rng.integers(0, 5, 32)]
    states = []
    for backend in (B, PLAIN):
        eng = Engine(backend, cfg, 30, 5, "softmax_ce")
        nr = np.random.default_rng(5)
        for _ in range(3):
            noise = [nr.standard_normal((32, eng.noise_width(l))).astype(F32) * F32(0.1)
                     for l in eng.trained_feedback_layers]
            if eng.inv_opt is not None:
                eng.inverse_step(x, noise)
            loss, correct = eng.forward_step(x, y)
        d = eng.diagnose(x, y, noise if eng.inv_opt is not None else [])
        states.append((eng.net.state(), float(loss), int(correct), {k: float(v) for k, v in d.items()}))
    (s1, l1, c1, d1), (s2, l2, c2, d2) = states
    assert (l1, c1, d1) == (l2, c2, d2)
    for k in s1:
        np.testing.assert_array_equal(s1[k], s2[k], err_msg=k)


@pytest.mark.parametrize("shape", [(100, 240), (1, 5), (3, 1), (1000, 17)])
def test_column_sums_and_means_equal_numpy(shape):
    x = np.random.default_rng(shape[0]).standard_normal(shape).astype(F32) * F32(3)
    x[0, 0] = -0.0
    np.testing.assert_array_equal(B.sum(x, axis=0), np.sum(x, axis=0))
    np.testing.assert_array_equal(B.mean(x, axis=0), np.mean(x, axis=0))
    z = np.full((3, 2), -0.0, F32)
    for a in (x[:1], z, z[:1]):
        np.testing.assert_array_equal(np.signbit(B.sum(a, axis=0)), np.signbit(np.sum(a, axis=0)))
        np.testing.assert_array_equal(np.signbit(B.mean(a, axis=0)), np.signbit(np.mean(a, axis=0)))
    # what the kernel does not take goes to NumPy
    np.testing.assert_array_equal(B.sum(x.T, axis=0), np.sum(x.T, axis=0))
    np.testing.assert_array_equal(B.sum(x, axis=0, keepdims=True), np.sum(x, axis=0, keepdims=True))
    np.testing.assert_array_equal(B.mean(x.astype(np.float64), axis=0), np.mean(x.astype(np.float64), axis=0))


def test_fused_optimizer_only_for_the_optimizers_it_knows():
    p = np.zeros(3, F32)
    hp = {"lr": 0.1, "momentum": 0.0, "clip_norm": None, "eps": 1e-3}
    assert K.make_fused("nadam", [p], {"m": [np.zeros(3, F32)]}, hp) is None
    assert K.make_fused("sgd", [p.astype(np.float64)], {"mom": [np.zeros(3)]}, hp) is None  # not float32
    assert K.make_fused("sgd", [p], {"mom": [np.zeros(3, F32)]}, hp) is not None


@pytest.mark.parametrize("name", ["sgd", "rmsprop_centered", "adam"])
def test_clipping_a_gradient_far_smaller_than_its_epsilon(name):
    """|g| ~ 2e-13, below clipping's 1e-12 guard: the factor is min(1, clip / (|g| + 1e-12)) = 1,
    on both paths; a guard subtracted instead would flip the gradient and scale it by ~1e12."""
    rng = np.random.default_rng(11)
    p0 = (rng.standard_normal((30, 20)) * 1e-12).astype(F32)  # small enough for the steps to show
    g = (rng.standard_normal((30, 20)) * 1e-14).astype(F32)
    assert 1e-13 < np.sqrt(np.sum(g.astype(np.float64) ** 2)) < 1e-12
    cfg = OptimizerConfig(name=name, lr=0.5, momentum=0.0, clip_norm=1.0)
    out = {}
    for label, backend in (("fused", B), ("table", TABLE)):
        p = backend.variable(p0)
        Optimizer(backend, cfg, [p]).apply([g])
        out[label] = p
    np.testing.assert_array_equal(out["fused"], out["table"])
    if name == "sgd":  # p - lr * g exactly: unclipped, same sign
        np.testing.assert_array_equal(out["fused"], p0 - F32(0.5) * g)
    else:  # a step against the gradient, never along it
        moved = out["fused"] != p0
        assert moved.any()
        assert (np.sign(p0 - out["fused"])[moved] == np.sign(g)[moved]).all()


def test_an_optimizer_without_a_kernel_runs_the_table():
    """Adding an optimizer is one ``defopt``: with no fused kernel for it, the NumPy backend runs
    its array expressions (``optimizer_step`` says it has no kernel; nothing is skipped)."""
    from tp_engine.optimizers import OPTIMIZERS, defopt

    def plain(Bk, p, g, s, hp, t):
        Bk.assign(p, p - hp["lr"] * g)

    defopt("plain_sgd_for_test", (), 0.0, plain)
    try:
        p = np.ones(5, F32)
        assert K.optimizer_step("plain_sgd_for_test", p, np.ones(5, F32), {}, {"lr": 0.1, "clip_norm": None}, 1.0) is False
        np.testing.assert_array_equal(p, np.ones(5, F32))  # the kernel path did not touch it
        cfg = OptimizerConfig.model_construct(**{**OptimizerConfig().model_dump(), "name": "plain_sgd_for_test", "lr": 0.25})
        w = B.variable(np.full((2, 3), 2.0, F32))
        opt = Optimizer(B, cfg, [w])
        assert opt._fused is None
        opt.apply([np.ones((2, 3), F32)])
        np.testing.assert_array_equal(w, np.full((2, 3), 1.75, F32))
    finally:
        OPTIMIZERS.pop("plain_sgd_for_test")


def test_training_steps_take_every_fused_path(monkeypatch):
    """The kernels are only worth having if training reaches them: bp and dtp steps of a tanh
    network call each of them (column sums, vjp_diff, step_back, vjp_y) and none declines. A
    dispatcher that skipped one would give the same numbers, only slower, so the results tests
    cannot see it."""
    from collections import Counter

    calls: Counter = Counter()

    table = {"vjp_diff": K._VJP_DIFF, "step_back": K._STEP_BACK, "vjp_y": K._VJP_Y}

    def counting(name, fn):
        def wrapped(*a):
            out = fn(*a)
            if name == "colsum" or a[0] in table[name]:  # ops with no kernel (linear) go to NumPy
                calls[name, out is not None] += 1
            return out
        return wrapped

    for name in ("colsum", "vjp_diff", "step_back", "vjp_y"):
        monkeypatch.setattr(K, name, counting(name, getattr(K, name)))
    rng = np.random.default_rng(8)
    x = rng.random((16, 12), dtype=F32)
    y = np.eye(4, dtype=F32)[rng.integers(0, 4, 16)]
    for rule in ("bp", "dtp"):
        eng = Engine(B, TrialConfig(rule=rule, hidden=[10, 9, 8], batch_size=16, seed=1), 12, 4, "softmax_ce")
        if eng.inv_opt is not None:
            eng.inverse_step(x, [rng.standard_normal((16, eng.noise_width(l))).astype(F32) * F32(0.3)
                                 for l in eng.trained_feedback_layers])
        eng.forward_step(x, y)
    assert not [k for k in calls if not k[1]], calls  # no kernel declined its operands
    assert {k[0] for k in calls} == {"colsum", "vjp_diff", "step_back", "vjp_y"}, calls


def test_fused_optimizer_names_a_gradient_of_the_wrong_size():
    p = np.zeros((2, 3), F32)
    opt = Optimizer(B, OptimizerConfig(name="adam", lr=0.1), [p])
    with pytest.raises(ValueError, match="gradient of 5 values for a parameter of 6"):
        opt.apply([np.zeros(5, F32)])
