"""The four seed rules (bp, lstp, rlstp, dtp) against separately written float64 references.

Each reference below is written from the definitions (docs/rules.md, ../shared/TP_RULES.md; Lee,
Zhang, Fischer, Bengio 2015 for dtp), in float64 NumPy, and imports nothing from ``tp_engine``;
the engine is only built to produce the run compared with it, on both backends:

- forward pass ``a_l = h_{l-1} W_l + b_l``, ``h_l = s(a_l)`` (output affine), softmax
  cross-entropy averaged over the batch;
- bp: backprop by the chain rule (no targets at all); its targets are ``t_l = h_l - (n/2) dL/dh_l``
  and its local gradients must be exactly ``dL/dW_l``, ``dL/db_l``;
- lstp: the target pushed through each op's least-squares inverse (the inverse function after
  clipping; ``- b``; the pseudo-inverse by SVD, closest to the forward input);
- rlstp: through each op's regularized inverse ``argmin |f(x) - y|^2 + gamma |x - x0|^2`` (the
  linear one solved as a stacked least-squares problem, not by the engine's closed form);
- dtp: ``t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)``, ``g_l(h) = tanh(h V_l + c_l)``, and the
  inverse trained on ``mean_i |g_l(f_l(h_{l-1} + e)) - (h_{l-1} + e)|^2``;
- the local loss ``mean_i |s(h_{l-1} W_l + b_l) - t_l|^2`` and its gradient, by hand.

The references check themselves against central finite differences (float64). Each comparison
first asserts that what it compares is far from trivial (targets far from the activations) and
that the nearest wrong formulas (a flipped difference correction, a missing correction, the wrong
anchor ``x0``, an unregularized inverse, ...) land far outside the tolerance, so a test passing
means the formula is right, not that the quantities are too small to tell.

Tolerances as in test_parity.py: the engine runs float32, so ``rtol=1e-4`` with an ``atol`` of
1e-5 times the compared quantity's scale; formula mistakes move results by 1e-3..1 of that scale.
"""
from __future__ import annotations

import numpy as np
import pytest

# The engine side only: building the run that is compared with the references.
from tp_engine.backends.numpy_backend import NumpyBackend
from tp_engine.config import TrialConfig
from tp_engine.engine import Engine

NP = NumpyBackend()
F32, F64 = np.float32, np.float64
RTOL, ATOL = 1e-4, 1e-5
BATCH = 8
# (n_in, hidden, n_out): the narrowing net inverts only wide-to-narrow layers (W with more rows
# than columns); the widening one also a narrow-to-wide layer (the other branch of f_inv).
SHAPES = {"narrowing": (20, [16, 12], 5), "widening": (6, [8, 10], 5)}
SEED_RULES = ["bp", "lstp", "rlstp", "dtp"]
TOPS = ["output", "last_hidden"]
# Non-default hyperparameters, so that a value lost on its way from the config shows.
HP = dict(alpha=0.9, gamma=0.4, inv_threshold=0.05, rinv_steps=3, rinv_lr=0.3)


# == the references: float64 NumPy, nothing from tp_engine ======================================
def _tanh_d(a):
    return 1.0 - np.tanh(a) ** 2


def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def _sig_d(a):
    return _sig(a) * (1.0 - _sig(a))


def _smooth_rinv(f, d, finv):
    """The documented regularized inverse of tanh/sigmoid: from f_inv, ``steps`` gradient steps
    of size ``lr`` on 1/2 |f(x) - y|^2 + gamma/2 |x - x0|^2."""
    def rinv(y, x0, gamma, steps, lr, th):
        x = finv(y, x0, th)
        for _ in range(steps):
            x = x - lr * ((f(x) - y) * d(x) + gamma * (x - x0))
        return x
    return rinv


def _piecewise_rinv(slope):
    """argmin over x of (s(x) - y)^2 + gamma (x - x0)^2 with s(x) = x (x >= 0), slope x (x < 0):
    each branch's quadratic minimized on its own half-line, then the better of the two."""
    def rinv(y, x0, gamma, steps, lr, th):
        right = np.maximum((y + gamma * x0) / (1.0 + gamma), 0.0)
        left = np.minimum((slope * y + gamma * x0) / (slope**2 + gamma), 0.0)
        obj = lambda x: (np.where(x >= 0, x, slope * x) - y) ** 2 + gamma * (x - x0) ** 2  # noqa: E731
        return np.where(obj(right) <= obj(left), right, left)
    return rinv


# name -> (s, s', least-squares inverse f_inv(y, x0, th), regularized inverse)
ACT = {
    "tanh": (np.tanh, _tanh_d, lambda y, x0, th: np.arctanh(np.clip(y, -1 + th, 1 - th)),
             None),
    "sigmoid": (_sig, _sig_d, lambda y, x0, th: np.log(np.clip(y, th, 1 - th) / (1 - np.clip(y, th, 1 - th))),
                None),
    # relu: every x <= 0 maps to 0; of those, the one closest to x0 is min(x0, 0).
    "relu": (lambda a: np.maximum(a, 0.0), lambda a: (a > 0).astype(F64),
             lambda y, x0, th: np.where(y > 0, y, np.minimum(x0, 0.0)), _piecewise_rinv(0.0)),
    "leaky_relu": (lambda a: np.where(a > 0, a, 0.01 * a), lambda a: np.where(a > 0, 1.0, 0.01),
                   lambda y, x0, th: np.where(y > 0, y, y / 0.01), _piecewise_rinv(0.01)),
    "identity": (lambda a: a, lambda a: np.ones_like(a), lambda y, x0, th: y,
                 lambda y, x0, gamma, steps, lr, th: (y + gamma * x0) / (1.0 + gamma)),
}
for _name in ("tanh", "sigmoid"):
    _f, _d, _inv, _ = ACT[_name]
    ACT[_name] = (_f, _d, _inv, _smooth_rinv(_f, _d, _inv))


def act_of(act, l, L):
    return ACT["identity" if l == L else act]


def ref_forward(P, x, act):
    W, b = P["W"], P["b"]
    L = len(W)
    hs, as_ = [np.asarray(x, F64)], [None]
    for l in range(1, L + 1):
        as_.append(hs[-1] @ W[l] + b[l])
        hs.append(act_of(act, l, L)[0](as_[-1]))
    return hs, as_


def ref_loss(P, x, y, act):
    z = ref_forward(P, x, act)[0][-1]
    z = z - z.max(1, keepdims=True)
    return float(np.mean(-np.sum(y * (z - np.log(np.exp(z).sum(1, keepdims=True))), 1)))


def ref_softmax_grad(hL, y):
    """Per-example d loss_i / d logits of softmax cross-entropy."""
    p = np.exp(hL - hL.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True) - y


def ref_backprop(P, x, y, act):
    """dL/dW_l, dL/db_l and dL/dh_l of the batch-mean loss, by the chain rule."""
    hs, as_ = ref_forward(P, x, act)
    L, n = len(P["W"]), len(x)
    dh = {L: ref_softmax_grad(hs[L], y) / n}
    dW, db = {}, {}
    for l in range(L, 0, -1):
        da = dh[l] * act_of(act, l, L)[1](as_[l])
        dW[l], db[l] = hs[l - 1].T @ da, da.sum(0)
        dh[l - 1] = da @ P["W"][l].T
    return dW, db, dh


def ref_linear_inv(y, x0, W):
    """The x closest to x0 among the least-squares solutions of x W = y: x0 + (y - x0 W) W^+."""
    return x0 + (y - x0 @ W) @ np.linalg.pinv(W)


def ref_linear_rinv(y, x0, W, gamma):
    """argmin_x |x W - y|^2 + gamma |x - x0|^2, as the stacked least-squares problem
    x [W, sqrt(gamma) I] = [y, sqrt(gamma) x0]."""
    n_in = W.shape[0]
    M = np.concatenate([W, np.sqrt(gamma) * np.eye(n_in)], axis=1)
    z = np.concatenate([y, np.sqrt(gamma) * x0], axis=1)
    return np.linalg.lstsq(M.T, z.T, rcond=None)[0].T


def ref_targets(rule, P, x, y, act, top, hp, variant=None):
    """Every layer's target. ``variant`` names a wrong formula (for the power checks only)."""
    W, b = P["W"], P["b"]
    hs, as_ = ref_forward(P, x, act)
    L, n = len(W), len(x)
    dW, db, dh = ref_backprop(P, x, y, act)
    t = {}
    if rule == "bp":  # t_l = h_l - (n/2) dL/dh_l at every layer: no alpha, no inverses
        for l in range(1, L + 1):
            t[l] = hs[l] - n / 2 * dh[l]
        return t
    if top == "output":
        t[L] = hs[L] - hp["alpha"] * dh[L]
        first = L
    else:  # Lee: exact target on the output, alpha step on the last hidden layer
        t[L] = hs[L] - n / 2 * dh[L]
        t[L - 1] = hs[L - 1] - hp["alpha"] * dh[L - 1]
        first = L - 1
    for l in range(first, 1, -1):
        s = act_of(act, l, L)
        u = hs[l - 1] @ W[l]  # the linear op's output; the addition gives a_l
        if rule == "dtp":
            V, c = P["V"][l], P["c"][l]
            g = lambda h: np.tanh(h @ V + c)  # noqa: E731
            if variant == "flipped":
                t[l - 1] = hs[l - 1] - g(t[l]) + g(hs[l])
            elif variant == "uncorrected":
                t[l - 1] = g(t[l])
            else:
                t[l - 1] = hs[l - 1] + g(t[l]) - g(hs[l])
        elif rule == "lstp":
            x0_lin = np.zeros_like(hs[l - 1]) if variant == "x0_zero" else hs[l - 1]
            t_a = s[2](t[l], as_[l], hp["inv_threshold"])
            t[l - 1] = ref_linear_inv(t_a - b[l], x0_lin, W[l])
        elif rule == "rlstp":
            gamma = 1e-9 if variant == "gamma_zero" else hp["gamma"]
            t_a = s[3](t[l], as_[l], gamma, hp["rinv_steps"], hp["rinv_lr"], hp["inv_threshold"])
            t_u = (t_a - b[l] + gamma * u) / (1.0 + gamma)  # argmin |x + b - y|^2 + gamma |x - u|^2
            t[l - 1] = ref_linear_rinv(t_u, hs[l - 1], W[l], gamma)
        else:
            raise ValueError(rule)
    return t


def ref_local_loss(Wl, bl, h_in, t_l, s):
    d = s(h_in @ Wl + bl) - t_l
    return float(np.sum(d * d) / len(h_in))


def ref_local_grads(P, x, t, act):
    """d/dW_l, d/db_l of mean_i |s(h_{l-1} W_l + b_l) - t_l|^2 with h_{l-1}, t_l held constant."""
    hs, as_ = ref_forward(P, x, act)
    L, n = len(P["W"]), len(x)
    out = {}
    for l in range(1, L + 1):
        delta = 2.0 * (hs[l] - t[l]) * act_of(act, l, L)[1](as_[l]) / n
        out[l] = (hs[l - 1].T @ delta, delta.sum(0))
    return out


def ref_lee_loss(P, x, l, e, act):
    """Lee et al.'s inverse loss of layer l: mean_i |g_l(f_l(h_{l-1} + e)) - (h_{l-1} + e)|^2."""
    hs, _ = ref_forward(P, x, act)
    L = len(P["W"])
    xc = hs[l - 1] + e
    z = act_of(act, l, L)[0](xc @ P["W"][l] + P["b"][l])
    d = np.tanh(z @ P["V"][l] + P["c"][l]) - xc
    return float(np.sum(d * d) / len(x))


def ref_lee_grads(P, x, l, e, act):
    hs, _ = ref_forward(P, x, act)
    L, n = len(P["W"]), len(x)
    xc = hs[l - 1] + e
    z = act_of(act, l, L)[0](xc @ P["W"][l] + P["b"][l])
    r = np.tanh(z @ P["V"][l] + P["c"][l])
    delta = 2.0 * (r - xc) * (1.0 - r * r) / n
    return z.T @ delta, delta.sum(0)


def fd(fun, arr, idx, h=1e-6):
    old = arr[idx]
    arr[idx] = old + h
    up = fun()
    arr[idx] = old - h
    down = fun()
    arr[idx] = old
    return (up - down) / (2 * h)


# == the engine side ============================================================================
@pytest.fixture(scope="module")
def tfb():
    from tp_engine.backends.tf_backend import TensorflowBackend

    return TensorflowBackend(device="auto", jit_compile=False)


def make_cfg(rule, shape="narrowing", act="tanh", top="output", optimizer=None, **kw):
    n_in, hidden, n_out = SHAPES[shape]
    sgd = {"name": "sgd", "lr": 1.0, "momentum": 0.0}
    base = dict(rule=rule, hidden=hidden, activation=act, top_target=top, batch_size=BATCH, seed=11,
                optimizer=optimizer or sgd, inverse_optimizer=sgd, noise=0.3, **HP)
    base.update(kw)
    return TrialConfig(**base)


def make_engine(B, cfg, shape="narrowing"):
    """An engine with non-zero biases (b_l, and dtp's c_l) and, for dtp, inverses V_l that are
    not the forward init, so every parameter enters the compared numbers."""
    n_in, _, n_out = SHAPES[shape]
    eng = Engine(B, cfg, n_in, n_out, "softmax_ce")
    rng = np.random.default_rng([5, n_in])
    st = eng.net.state()
    for k in sorted(st):
        if k[0] in "bc":
            st[k] = (0.3 * rng.standard_normal(st[k].shape)).astype(F32)
        elif k[0] == "V":
            st[k] = (st[k] + 0.3 * rng.standard_normal(st[k].shape)).astype(F32)
    eng.net.load_state(st)
    return eng


def params64(eng):
    st = eng.net.state()
    L = eng.net.L
    P = {"W": {l: st[f"W{l}"].astype(F64) for l in range(1, L + 1)},
         "b": {l: st[f"b{l}"].astype(F64) for l in range(1, L + 1)}, "V": {}, "c": {}}
    for l in eng.net.inverse_layers:
        P["V"][l], P["c"][l] = st[f"V{l}"].astype(F64), st[f"c{l}"].astype(F64)
    return P


def batch(shape="narrowing", seed=1234):
    n_in, _, n_out = SHAPES[shape]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, n_in)).astype(F32)
    y = np.eye(n_out, dtype=F32)[rng.integers(0, n_out, BATCH)]
    return x, y


def to64(B, a):
    return np.asarray(B.to_numpy(a), F64)


def assert_close(got, ref, what, rtol=RTOL, atol=ATOL):
    scale = max(float(np.max(np.abs(ref))), 1e-3)
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * scale, err_msg=what)


def assert_far(wrong, ref, what):
    """``wrong`` would fail ``assert_close`` against ``ref`` by a wide margin (100x)."""
    scale = max(float(np.max(np.abs(ref))), 1e-3)
    excess = np.max(np.abs(wrong - ref) / (ATOL * scale + RTOL * np.abs(ref)))
    assert excess > 100, f"{what}: a wrong formula is within {excess:.1f}x of the tolerance"


# == 1. the references check themselves ==========================================================
@pytest.mark.parametrize("act", ["tanh", "sigmoid", "leaky_relu"])
def test_reference_backprop_and_local_gradients_equal_finite_differences(act):
    rng = np.random.default_rng(0)
    P = {"W": {1: rng.standard_normal((6, 8)) * 0.5, 2: rng.standard_normal((8, 7)) * 0.5,
               3: rng.standard_normal((7, 4)) * 0.5},
         "b": {1: rng.standard_normal(8) * 0.3, 2: rng.standard_normal(7) * 0.3, 3: rng.standard_normal(4) * 0.3},
         "V": {2: rng.standard_normal((7, 8)) * 0.5}, "c": {2: rng.standard_normal(8) * 0.3}}
    x = rng.standard_normal((5, 6))
    y = np.eye(4)[rng.integers(0, 4, 5)]
    dW, db, _ = ref_backprop(P, x, y, act)
    hs, _ = ref_forward(P, x, act)
    t = {l: hs[l] + 0.2 * rng.standard_normal(hs[l].shape) for l in range(1, 4)}
    lg = ref_local_grads(P, x, t, act)
    e = 0.3 * rng.standard_normal((5, 8))
    dV, dc = ref_lee_grads(P, x, 2, e, act)
    for _ in range(8):
        for l in (1, 2, 3):
            for key, grad, lgrad in (("W", dW[l], lg[l][0]), ("b", db[l], lg[l][1])):
                idx = tuple(rng.integers(0, s) for s in P[key][l].shape)
                num = fd(lambda: ref_loss(P, x, y, act), P[key][l], idx)
                assert grad[idx] == pytest.approx(num, rel=1e-5, abs=1e-8)
                s = act_of(act, l, 3)[0]
                num = fd(lambda: ref_local_loss(P["W"][l], P["b"][l], hs[l - 1], t[l], s), P[key][l], idx)
                assert lgrad[idx] == pytest.approx(num, rel=1e-5, abs=1e-8)
        for key, grad in (("V", dV), ("c", dc)):
            idx = tuple(rng.integers(0, s) for s in P[key][2].shape)
            num = fd(lambda: ref_lee_loss(P, x, 2, e, act), P[key][2], idx)
            assert grad[idx] == pytest.approx(num, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "relu", "leaky_relu", "identity"])
def test_reference_inverses_are_what_they_claim(act):
    """f_inv: exact where s is invertible; f_rinv: no perturbation does better on its objective
    (the piecewise-linear and identity ones are exact minimizers; the smooth ones a few descent
    steps, so they must at least beat their f_inv start); the linear ones by their definitions."""
    rng = np.random.default_rng(1)
    s, _, finv, frinv = ACT[act]
    x0 = rng.standard_normal((6, 5))
    y = s(x0 + 0.4 * rng.standard_normal(x0.shape))
    gamma = 0.4
    obj = lambda z: (s(z) - y) ** 2 + gamma * (z - x0) ** 2  # noqa: E731
    z = frinv(y, x0, gamma, 3, 0.3, 0.01)
    if act in ("tanh", "sigmoid"):
        np.testing.assert_allclose(s(finv(y, x0, 1e-9)), y, rtol=1e-9, atol=1e-9)
        assert np.all(obj(z) <= obj(finv(y, x0, 0.01)) + 1e-12)
    else:
        for d in (1e-3, -1e-3, 0.1, -0.1):
            assert np.all(obj(z) <= obj(z + d) + 1e-12)
    if act == "relu":
        assert np.array_equal(finv(-np.abs(y), x0, 0), np.minimum(x0, 0))
    W = rng.standard_normal((5, 3))
    yl = rng.standard_normal((4, 3))
    x0l = rng.standard_normal((4, 5))
    xi = ref_linear_inv(yl, x0l, W)
    np.testing.assert_allclose(xi @ W, yl, atol=1e-10)  # wide W: an exact fit exists
    assert np.all(np.linalg.norm(xi - x0l, axis=1) <= np.linalg.norm(x0l + yl @ np.linalg.pinv(W) - x0l @ W
                                                                      @ np.linalg.pinv(W) - x0l, axis=1) + 1e-12)
    xr = ref_linear_rinv(yl, x0l, W, gamma)
    grad = 2 * (xr @ W - yl) @ W.T + 2 * gamma * (xr - x0l)  # stationary point of a convex objective
    np.testing.assert_allclose(grad, 0, atol=1e-10)


# == 2. targets: both backends against the reference =============================================
TARGET_CASES = [(r, top, shape) for r in SEED_RULES for top in TOPS for shape in SHAPES
                if not (r == "bp" and top == "last_hidden")]


def _targets_case(B, cfg, shape):
    eng = make_engine(B, cfg, shape)
    x, y = batch(shape)
    if B is NP:
        t = eng.targets(eng.net.forward(x), y)
    else:
        t = eng.targets(eng.net.forward(B.asarray(x)), B.asarray(y))
    return eng, x, y, {l: to64(B, v) for l, v in t.items()}


@pytest.mark.parametrize("backend", ["numpy", "tensorflow"])
@pytest.mark.parametrize("rule,top,shape", TARGET_CASES)
def test_targets_equal_the_reference(request, backend, rule, top, shape):
    B = NP if backend == "numpy" else request.getfixturevalue("tfb")
    cfg = make_cfg(rule, shape, top=top)
    eng, x, y, t = _targets_case(B, cfg, shape)
    P = params64(eng)
    ref = ref_targets(rule, P, x, y.astype(F64), "tanh", top, HP)
    hs, _ = ref_forward(P, x, "tanh")
    assert sorted(t) == sorted(ref) == list(range(1, len(P["W"]) + 1))
    for l in ref:
        assert_far(hs[l], ref[l], f"{rule} layer {l}: the target is the activation")
        assert_close(t[l], ref[l], f"{backend} {rule} {top} {shape} target {l}")


@pytest.mark.parametrize("act", ["sigmoid", "relu", "leaky_relu"])
@pytest.mark.parametrize("rule", ["bp", "lstp", "rlstp"])
def test_op_by_op_targets_with_other_activations(rule, act):
    """The op-by-op rules go through the activation's own inverses; the other activations (on
    NumPy, whose ops TensorFlow shares: the formulas in ops.py are written once)."""
    for shape in SHAPES:
        cfg = make_cfg(rule, shape, act=act)
        eng, x, y, t = _targets_case(NP, cfg, shape)
        P = params64(eng)
        ref = ref_targets(rule, P, x, y.astype(F64), act, "output", HP)
        hs, _ = ref_forward(P, x, act)
        for l in ref:
            assert_far(hs[l], ref[l], f"{rule} {act} layer {l}: the target is the activation")
            assert_close(t[l], ref[l], f"{rule} {act} {shape} target {l}")


@pytest.mark.parametrize("rule,variant", [("dtp", "flipped"), ("dtp", "uncorrected"), ("lstp", "x0_zero"),
                                          ("rlstp", "gamma_zero")])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_target_comparison_catches_the_nearest_wrong_formulas(rule, variant, shape):
    """The power of test_targets_equal_the_reference: a flipped dtp difference correction
    (h - g(t) + g(h)), no correction (g(t)), lstp anchored at 0 instead of the forward input, an
    unregularized rlstp: each lands >100x outside the tolerance on the lower layers."""
    cfg = make_cfg(rule, shape)
    eng, x, y, _ = _targets_case(NP, cfg, shape)
    P = params64(eng)
    ref = ref_targets(rule, P, x, y.astype(F64), "tanh", "output", HP)
    wrong = ref_targets(rule, P, x, y.astype(F64), "tanh", "output", HP, variant=variant)
    L = len(P["W"])
    for l in range(1, L):
        assert_far(wrong[l], ref[l], f"{rule} {variant} layer {l}")
    # The same holds on the top target's scale: a wrong alpha, or bp's scale on a TP rule.
    hp2 = dict(HP, alpha=HP["alpha"] * 1.1)
    assert_far(ref_targets(rule, P, x, y.astype(F64), "tanh", "output", hp2)[L], ref[L], "alpha x1.1")


# == 3. one step: gradients and updates on both backends ==========================================
STEP_CASES = [(r, top) for r in SEED_RULES for top in TOPS if not (r == "bp" and top == "last_hidden")]


def _state64(eng):
    return {k: v.astype(F64) for k, v in eng.net.state().items()}


@pytest.mark.parametrize("backend", ["numpy", "tensorflow"])
@pytest.mark.parametrize("rule,top", STEP_CASES)
def test_one_sgd_step_moves_every_weight_by_the_reference_gradient(request, backend, rule, top):
    """SGD with lr 1 and no momentum: W_l changes by minus the reference gradient of its local
    loss; for bp that gradient is backprop's dL/dW_l (checked here against the chain-rule
    reference, not against the target formula). Also the returned loss and correct count."""
    B = NP if backend == "numpy" else request.getfixturevalue("tfb")
    shape = "narrowing"
    eng = make_engine(B, make_cfg(rule, shape, top=top), shape)
    x, y = batch(shape)
    P, before = params64(eng), _state64(eng)
    y64 = y.astype(F64)
    if rule == "bp":
        dW, db, _ = ref_backprop(P, x, y64, "tanh")
        ref = {l: (dW[l], db[l]) for l in dW}
    else:
        ref = ref_local_grads(P, x, ref_targets(rule, P, x, y64, "tanh", top, HP), "tanh")
    xb, yb = (x, y) if B is NP else (B.asarray(x), B.asarray(y))
    loss_sum, correct = eng.forward_step(xb, yb)
    assert float(to64(B, loss_sum)) == pytest.approx(BATCH * ref_loss(P, x, y64, "tanh"), rel=1e-5)
    logits = ref_forward(P, x, "tanh")[0][-1]
    assert int(to64(B, correct)) == int(np.sum(logits.argmax(1) == y.argmax(1)))
    after = _state64(eng)
    for l, (gW, gb) in ref.items():
        assert np.max(np.abs(gW)) > 1e-4, f"layer {l}: a vanishing gradient tests nothing"
        assert_close(before[f"W{l}"] - after[f"W{l}"], gW, f"{backend} {rule} {top} dW{l}", atol=1e-4)
        assert_close(before[f"b{l}"] - after[f"b{l}"], gb, f"{backend} {rule} {top} db{l}", atol=1e-4)
    for k in before:  # the forward step leaves dtp's inverses alone
        if k[0] in "Vc":
            assert np.array_equal(before[k], after[k]), k


@pytest.mark.parametrize("backend", ["numpy", "tensorflow"])
@pytest.mark.parametrize("top", TOPS)
def test_one_dtp_inverse_step_follows_the_reference_lee_gradient(request, backend, top):
    B = NP if backend == "numpy" else request.getfixturevalue("tfb")
    shape = "narrowing"
    eng = make_engine(B, make_cfg("dtp", shape, top=top), shape)
    L = eng.net.L
    assert eng.net.inverse_layers == list(range(2, (L if top == "output" else L - 1) + 1))
    x, _ = batch(shape)
    rng = np.random.default_rng(3)
    noise = [(0.3 * rng.standard_normal((BATCH, eng.net.sizes[l - 1]))).astype(F32)
             for l in eng.trained_feedback_layers]
    P, before = params64(eng), _state64(eng)
    if B is NP:
        eng.inverse_step(x, noise)
    else:
        eng.inverse_step(B.asarray(x), [B.asarray(e) for e in noise])
    after = _state64(eng)
    for l, e in zip(eng.trained_feedback_layers, noise):
        dV, dc = ref_lee_grads(P, x, l, e.astype(F64), "tanh")
        assert np.max(np.abs(dV)) > 1e-3
        assert_close(before[f"V{l}"] - after[f"V{l}"], dV, f"{backend} {top} dV{l}", atol=1e-4)
        assert_close(before[f"c{l}"] - after[f"c{l}"], dc, f"{backend} {top} dc{l}", atol=1e-4)
    for k in before:  # only the inverses move
        if k[0] in "Wb":
            assert np.array_equal(before[k], after[k]), k


@pytest.mark.parametrize("backend", ["numpy", "tensorflow"])
@pytest.mark.parametrize("rule", ["lstp", "rlstp", "dtp"])
def test_one_step_of_lees_rmsprop_matches_the_reference(request, backend, rule):
    """The seed rules' own optimizer, centered RMSprop (Lee et al.): after one step from zero
    slots, ms = (1-rho) g^2, mg = (1-rho) g, and p moves by lr g / sqrt(ms - mg^2 + eps)."""
    B = NP if backend == "numpy" else request.getfixturevalue("tfb")
    lr, rho, eps = 0.01, 0.95, 1e-3
    opt = {"name": "rmsprop_centered", "lr": lr, "rho": rho, "momentum": 0.9, "eps": eps}
    eng = make_engine(B, make_cfg(rule, optimizer=opt, top="last_hidden"))
    x, y = batch()
    P, before = params64(eng), _state64(eng)
    ref = ref_local_grads(P, x, ref_targets(rule, P, x, y.astype(F64), "tanh", "last_hidden", HP), "tanh")
    eng.forward_step(*((x, y) if B is NP else (B.asarray(x), B.asarray(y))))
    after = _state64(eng)
    for l, gs in ref.items():
        for name, g in zip("Wb", gs):
            ms, mg = (1 - rho) * g * g, (1 - rho) * g
            step = lr * g / np.sqrt(ms - mg * mg + eps)
            assert_close(before[f"{name}{l}"] - after[f"{name}{l}"], step, f"{backend} {rule} {name}{l}",
                         atol=1e-3)
