"""Arithmetic of the elementary ops (tp_engine.ops) and the losses (tp_engine.losses).

Checks are done in float64 (the NumPy backend keeps the dtype of its inputs), so finite
differences and closed forms can be compared tightly; a few checks repeat on float32, the dtype the
engine trains in, with float32 tolerances.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from tp_engine.backends.numpy_backend import NumpyBackend
from tp_engine.losses import LOSSES
from tp_engine.ops import LEAKY_SLOPE, OPS, RinvOpts, activation

B = NumpyBackend()
ACTS = ["tanh", "sigmoid", "relu", "leaky_relu", "linear_act"]
LINEAR_SHAPES = [(6, 6), (8, 4), (4, 8)]


def rng_for(*key) -> np.random.Generator:
    """A generator seeded from ``key`` (crc32: stable across processes, unlike ``hash``)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def away_from_zero(rng, shape, lo=0.1, hi=2.0):
    """Random values with |x| in [lo, hi]: keeps relu / leaky_relu away from their kink."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(lo, hi, size=shape)


def op_case(name: str, rng: np.random.Generator, batch: int = 5):
    """(x, parameter) for op ``name`` in float64."""
    if name == "linear":
        return rng.standard_normal((batch, 4)), rng.standard_normal((4, 3))
    if name == "add":
        return rng.standard_normal((batch, 4)), rng.standard_normal(4)
    return away_from_zero(rng, (batch, 4)), None


def central_diff(fun, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (fun(xp) - fun(xm)) / (2 * eps)
    return g


# -- df: vector-Jacobian products --------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "add", *ACTS])
def test_df_matches_finite_differences(name):
    rng = rng_for("df", name)
    op = OPS[name]
    x, p = op_case(name, rng)
    r = rng.standard_normal(op.f(B, x, p).shape)
    analytic = op.df(B, r, x, p)
    numeric = central_diff(lambda z: float(np.sum(op.f(B, z, p) * r)), x)
    assert analytic.shape == x.shape
    np.testing.assert_allclose(analytic, numeric, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", ACTS)
def test_deriv_is_elementwise_derivative(name):
    rng = rng_for("deriv", name)
    op = OPS[name]
    x = away_from_zero(rng, (5, 4))
    np.testing.assert_allclose(op.deriv(B, x), op.df(B, np.ones_like(x), x, None), rtol=0, atol=0)
    numeric = (op.f(B, x + 1e-6) - op.f(B, x - 1e-6)) / 2e-6
    np.testing.assert_allclose(op.deriv(B, x), numeric, rtol=1e-7, atol=1e-8)


DF_Y_OPS = [name for name in OPS if OPS[name].df_y is not None]


def test_df_y_ops_are_the_smooth_activations():
    # A new op with df_y joins the checks below by itself; this guards the list from shrinking.
    assert {"tanh", "sigmoid", "linear_act"} <= set(DF_Y_OPS)


@pytest.mark.parametrize("name", DF_Y_OPS)
def test_df_y_matches_finite_differences(name):
    """df_y (the vector-Jacobian product written through the output y = f(x), which local
    gradients use) against central differences of x -> sum(f(x) * r), not against df."""
    rng = rng_for("df_y", name)
    op = OPS[name]
    # Include large |x| (saturated tanh/sigmoid), where 1 - y^2 and y(1 - y) are tiny.
    x = np.concatenate([away_from_zero(rng, (5, 4)), away_from_zero(rng, (2, 4), lo=3.0, hi=6.0)])
    r = rng.standard_normal(x.shape)
    analytic = op.df_y(B, r, op.f(B, x))
    numeric = central_diff(lambda z: float(np.sum(op.f(B, z) * r)), x)
    assert analytic.shape == x.shape
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)
    # vjp, what the engine calls, takes the df_y path when there is one.
    np.testing.assert_array_equal(op.vjp(B, r, x, op.f(B, x)), analytic)


@pytest.mark.parametrize("name", DF_Y_OPS)
def test_df_y_float32_matches_float64(name):
    rng = rng_for("df_y32", name)
    op = OPS[name]
    x = away_from_zero(rng, (5, 4))
    r = rng.standard_normal(x.shape)
    got = op.df_y(B, r.astype(np.float32), op.f(B, x.astype(np.float32)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, op.df_y(B, r, op.f(B, x)), rtol=1e-5, atol=1e-6)


def test_df_float32_matches_float64():
    rng = rng_for("df32")
    for name in ["linear", "add", *ACTS]:
        op = OPS[name]
        x, p = op_case(name, rng)
        r = rng.standard_normal(op.f(B, x, p).shape)
        p32 = None if p is None else p.astype(np.float32)
        got = op.df(B, r.astype(np.float32), x.astype(np.float32), p32)
        assert got.dtype == np.float32, name
        np.testing.assert_allclose(got, op.df(B, r, x, p), rtol=1e-5, atol=1e-6, err_msg=name)


def test_activation_name_mapping():
    assert activation("linear") is OPS["linear_act"]
    assert activation("tanh") is OPS["tanh"]


# -- f_inv: least-squares inverses ---------------------------------------------------------------
def linear_case(shape, seed_key, batch=7):
    rng = rng_for("lin", shape, seed_key)
    W = rng.standard_normal(shape)
    x0 = rng.standard_normal((batch, shape[0]))
    y = rng.standard_normal((batch, shape[1]))
    return rng, W, x0, y


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_f_inv_is_least_squares_fit(shape):
    rng, W, x0, y = linear_case(shape, "fit")
    x = OPS["linear"].f_inv(B, y, x0, W)
    fx = OPS["linear"].f(B, x, W)
    # The fitted values are the unique least-squares projection of y onto the range of x -> x W.
    x_ls = np.linalg.lstsq(W.T, y.T, rcond=None)[0].T
    np.testing.assert_allclose(fx, x_ls @ W, rtol=1e-9, atol=1e-9)
    if shape[0] >= shape[1]:  # W onto: the fit is exact
        np.testing.assert_allclose(fx, y, atol=1e-9)
    # No random perturbation fits better.
    res = np.sum((fx - y) ** 2, axis=1)
    for scale in (1e-3, 1e-1, 1.0):
        for _ in range(50):
            xp = x + scale * rng.standard_normal(x.shape)
            assert np.all(np.sum((xp @ W - y) ** 2, axis=1) >= res - 1e-9)


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_f_inv_is_the_minimizer_closest_to_x0(shape):
    rng, W, x0, y = linear_case(shape, "closest")
    x = OPS["linear"].f_inv(B, y, x0, W)
    ref = x0 + (y - x0 @ W) @ np.linalg.pinv(W)
    np.testing.assert_allclose(x, ref, rtol=1e-9, atol=1e-9)
    # Moving inside the set of minimizers (the left null space of W) only goes away from x0.
    u, s, vt = np.linalg.svd(W)
    null = u[:, int(np.sum(s > 1e-10)):]  # columns n with n^T W = 0
    if null.shape[1]:
        d0 = np.sum((x - x0) ** 2, axis=1)
        for _ in range(50):
            xp = x + rng.standard_normal((x.shape[0], null.shape[1])) @ null.T
            np.testing.assert_allclose(xp @ W, x @ W, atol=1e-9)
            assert np.all(np.sum((xp - x0) ** 2, axis=1) >= d0 - 1e-12)
    else:
        assert shape[0] <= shape[1]


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_f_inv_float32(shape):
    _, W, x0, y = linear_case(shape, "f32")
    # A well-conditioned W keeps float32 errors small and the comparison honest.
    u, _, vt = np.linalg.svd(W, full_matrices=False)
    W = u @ np.diag(np.linspace(1.0, 2.0, len(vt))) @ vt
    x = OPS["linear"].f_inv(B, y.astype(np.float32), x0.astype(np.float32), W.astype(np.float32))
    assert x.dtype == np.float32
    ref = x0 + (y - x0 @ W) @ np.linalg.pinv(W)
    np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("th", [1e-2, 0.1])
def test_tanh_f_inv_inside_and_outside_range(th):
    op = OPS["tanh"]
    y_in = np.linspace(-1 + th + 1e-6, 1 - th - 1e-6, 41)[None, :]
    x0 = np.zeros_like(y_in)
    np.testing.assert_allclose(op.f(B, op.f_inv(B, y_in, x0, None, th)), y_in, rtol=0, atol=1e-12)
    y_out = np.array([[-3.0, -1.0, -1 + th / 2, 1 - th / 2, 1.0, 1.5, 7.0]])
    x = op.f_inv(B, y_out, np.zeros_like(y_out), None, th)
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(op.f(B, x), np.clip(y_out, -1 + th, 1 - th), atol=1e-12)


@pytest.mark.parametrize("th", [1e-2, 0.1])
def test_sigmoid_f_inv_inside_and_outside_range(th):
    op = OPS["sigmoid"]
    y_in = np.linspace(th + 1e-6, 1 - th - 1e-6, 41)[None, :]
    np.testing.assert_allclose(op.f(B, op.f_inv(B, y_in, 0 * y_in, None, th)), y_in, atol=1e-12)
    y_out = np.array([[-2.0, 0.0, th / 3, 1 - th / 3, 1.0, 4.0]])
    x = op.f_inv(B, y_out, 0 * y_out, None, th)
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(op.f(B, x), np.clip(y_out, th, 1 - th), atol=1e-12)


def test_squashing_f_inv_float32_stays_finite():
    for name, y in [("tanh", [-1.0, 1.0, 2.0]), ("sigmoid", [0.0, 1.0, -1.0])]:
        y32 = np.array([y], np.float32)
        x = OPS[name].f_inv(B, y32, 0 * y32, None, 1e-2)
        assert x.dtype == np.float32 and np.all(np.isfinite(x)), name


def test_relu_f_inv():
    rng = rng_for("relu_inv")
    op = OPS["relu"]
    y = rng.uniform(-2, 2, (6, 5))
    x0 = rng.uniform(-2, 2, (6, 5))
    x = op.f_inv(B, y, x0)
    np.testing.assert_array_equal(x, np.where(y > 0, y, np.minimum(x0, 0.0)))
    np.testing.assert_allclose(op.f(B, x), np.maximum(y, 0.0), atol=0)
    # Where y <= 0 every x <= 0 fits equally well; none of them is nearer x0 than min(x0, 0).
    neg = y <= 0
    cands = np.linspace(-3.0, 0.0, 301)
    for i, j in zip(*np.nonzero(neg)):
        assert x[i, j] <= 0
        assert abs(x[i, j] - x0[i, j]) <= np.min(np.abs(cands - x0[i, j])) + 1e-12


def test_leaky_relu_f_inv_is_exact():
    rng = rng_for("leaky_inv")
    op = OPS["leaky_relu"]
    y = rng.uniform(-2, 2, (6, 5))
    x0 = rng.standard_normal((6, 5))
    np.testing.assert_allclose(op.f(B, op.f_inv(B, y, x0)), y, rtol=1e-12, atol=1e-15)
    x = away_from_zero(rng, (6, 5))
    np.testing.assert_allclose(op.f_inv(B, op.f(B, x), x0), x, rtol=1e-12)
    np.testing.assert_allclose(op.f(B, -np.ones(3)), -LEAKY_SLOPE * np.ones(3))


def test_add_and_identity_f_inv():
    rng = rng_for("add_inv")
    y, x0, b = rng.standard_normal((5, 4)), rng.standard_normal((5, 4)), rng.standard_normal(4)
    np.testing.assert_allclose(OPS["add"].f_inv(B, y, x0, b), y - b, atol=0)
    np.testing.assert_allclose(OPS["linear_act"].f_inv(B, y, x0), y, atol=0)


# -- f_rinv: regularized inverses ----------------------------------------------------------------
def rinv_objective(name, x, y, x0, p, gamma):
    """|f(x) - y|^2 + gamma |x - x0|^2: per element for elementwise ops, per row for linear."""
    e = (OPS[name].f(B, x, p) - y) ** 2
    d = gamma * (x - x0) ** 2
    if name == "linear":
        return np.sum(e, axis=1) + np.sum(d, axis=1)
    return e + d


def rinv_case(name, rng):
    """(y, x0, parameter) for an elementwise op's regularized inverse."""
    x0 = rng.uniform(-2.5, 2.5, (8, 6))
    if name == "tanh":
        y = rng.uniform(-0.95, 0.95, x0.shape)
    elif name == "sigmoid":
        y = rng.uniform(0.03, 0.97, x0.shape)
    else:
        y = rng.uniform(-2.5, 2.5, x0.shape)
    p = rng.standard_normal(6) if name == "add" else None
    return y, x0, p


def assert_beats_perturbations(name, x, y, x0, p, gamma, rng, n=200, slack=1e-12):
    j = rinv_objective(name, x, y, x0, p, gamma)
    for scale in (1e-4, 1e-2, 0.3, 2.0):
        for _ in range(n // 4):
            xp = x + scale * rng.standard_normal(x.shape)
            assert np.all(rinv_objective(name, xp, y, x0, p, gamma) >= j - slack)


@pytest.mark.parametrize("gamma", [1e-3, 0.1, 2.0])
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_f_rinv_is_exact_minimizer(shape, gamma):
    rng, W, x0, y = linear_case(shape, ("rinv", gamma))
    x = OPS["linear"].f_rinv(B, y, x0, W, gamma)
    # Stationarity of the convex objective: (x W - y) W^T + gamma (x - x0) = 0.
    grad = (x @ W - y) @ W.T + gamma * (x - x0)
    np.testing.assert_allclose(grad, 0, atol=1e-7)  # float64 solve of a matrix with cond up to ~1e7
    # Independent reference: the stacked least-squares problem [W^T; sqrt(gamma) I] x^T = [y^T; sqrt(gamma) x0^T].
    A = np.vstack([W.T, np.sqrt(gamma) * np.eye(shape[0])])
    ref = np.linalg.lstsq(A, np.vstack([y.T, np.sqrt(gamma) * x0.T]), rcond=None)[0].T
    # W W^T + gamma I has condition number up to ~|W|^2 / gamma (8 x 4: rank 4, gamma 1e-3).
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)
    assert_beats_perturbations("linear", x, y, x0, W, gamma, rng)


def test_linear_f_rinv_tends_to_f_inv_as_gamma_vanishes():
    for shape in LINEAR_SHAPES:
        _, W, x0, y = linear_case(shape, "limit")
        x_inv = OPS["linear"].f_inv(B, y, x0, W)
        x_rinv = OPS["linear"].f_rinv(B, y, x0, W, 1e-9)
        np.testing.assert_allclose(x_rinv, x_inv, atol=1e-6, err_msg=str(shape))


@pytest.mark.parametrize("gamma", [1e-3, 0.1, 2.0])
@pytest.mark.parametrize("name", ["add", "relu", "leaky_relu", "linear_act"])
def test_closed_form_f_rinv_is_exact_minimizer(name, gamma):
    rng = rng_for("rinv", name, gamma)
    y, x0, p = rinv_case(name, rng)
    x = OPS[name].f_rinv(B, y, x0, p, gamma)
    j = rinv_objective(name, x, y, x0, p, gamma)
    # Global minimum per element on a fine 1-D grid (the piecewise objectives are not convex
    # across the kink, so the grid is the honest reference), refined by the grid step.
    grid = np.linspace(-60.0, 60.0, 240_001)  # step 5e-4
    ys, x0s = y.reshape(-1), x0.reshape(-1)
    ps = np.broadcast_to(p, y.shape).reshape(-1) if p is not None else None
    for k in range(ys.size):
        pk = ps[k] if ps is not None else None
        jg = rinv_objective(name, grid, ys[k], x0s[k], pk, gamma)
        assert j.reshape(-1)[k] <= jg.min() + 1e-12, (k, ys[k], x0s[k])
    assert_beats_perturbations(name, x, y, x0, p, gamma, rng)


def test_relu_f_rinv_branch_cases():
    op, g = OPS["relu"], 0.5
    # y > 0, x0 > 0: right branch, (y + g x0)/(1 + g).
    np.testing.assert_allclose(op.f_rinv(B, np.array([1.0]), np.array([2.0]), None, g), [(1 + 1) / 1.5])
    # y < 0, x0 < 0: stay at x0 (f = 0 is the best fit reachable, and costs nothing).
    np.testing.assert_allclose(op.f_rinv(B, np.array([-1.0]), np.array([-3.0]), None, g), [-3.0])
    # y < 0, x0 > 0: (x - y)^2 + g (x - x0)^2 on x >= 0 vs y^2 + g x0^2 at x = 0.
    x = op.f_rinv(B, np.array([-1.0]), np.array([1.0]), None, g)
    np.testing.assert_allclose(x, [0.0], atol=1e-15)
    # y > 0, x0 < 0: jumping to the right branch (cost 0.16 + 0.5 * 0.64 = 0.48 at x = 0.6) beats
    # staying at x0 (cost y^2 = 1)...
    np.testing.assert_allclose(op.f_rinv(B, np.array([1.0]), np.array([-0.2]), None, g), [0.6])
    # ... unless x0 is far left: right branch projected to 0 costs 1 + 0.5 * 9, staying costs 1.
    np.testing.assert_allclose(op.f_rinv(B, np.array([1.0]), np.array([-3.0]), None, g), [-3.0])


def test_closed_form_f_rinv_float32():
    rng = rng_for("rinv32")
    for name in ["add", "relu", "leaky_relu", "linear_act"]:
        y, x0, p = rinv_case(name, rng)
        p32 = None if p is None else p.astype(np.float32)
        got = OPS[name].f_rinv(B, y.astype(np.float32), x0.astype(np.float32), p32, 0.1)
        assert got.dtype == np.float32, name
        np.testing.assert_allclose(got, OPS[name].f_rinv(B, y, x0, p, 0.1), rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("gamma", [1e-3, 0.1, 1.0])
@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_iterative_f_rinv_improves_on_f_inv(name, gamma):
    rng = rng_for("irinv", name, gamma)
    y, x0, _ = rinv_case(name, rng)
    op = OPS[name]
    th = 1e-2
    # steps = 0 is f_inv itself.
    np.testing.assert_array_equal(op.f_rinv(B, y, x0, None, gamma, RinvOpts(steps=0, lr=0.3, th=th)),
                                  op.f_inv(B, y, x0, None, th))
    j_prev = rinv_objective(name, op.f_inv(B, y, x0, None, th), y, x0, None, gamma)
    j0 = j_prev
    for steps in (1, 5, 20):
        x = op.f_rinv(B, y, x0, None, gamma, RinvOpts(steps=steps, lr=0.3, th=th))
        j = rinv_objective(name, x, y, x0, None, gamma)
        # Gradient descent with a small step never makes an element worse...
        assert np.all(j <= j_prev + 1e-12), steps
        j_prev = j
    # ... and does improve where f_inv is not already optimal (x0 away from f_inv's answer).
    moved = np.abs(op.f_inv(B, y, x0, None, th) - x0) > 0.5
    assert np.all(j[moved] < j0[moved])


@pytest.mark.parametrize("gamma", [0.1, 1.0])
@pytest.mark.parametrize("name", ["tanh", "sigmoid"])
def test_iterative_f_rinv_converges_to_a_local_minimizer(name, gamma):
    """With enough steps the answer is stationary and beats every nearby point."""
    rng = rng_for("irinv_conv", name, gamma)
    y, x0, _ = rinv_case(name, rng)
    op = OPS[name]
    x = op.f_rinv(B, y, x0, None, gamma, RinvOpts(steps=3000, lr=0.5, th=1e-2))
    grad = (op.f(B, x) - y) * op.deriv(B, x) + gamma * (x - x0)
    np.testing.assert_allclose(grad, 0, atol=1e-8)
    j = rinv_objective(name, x, y, x0, None, gamma)
    for _ in range(100):
        xp = x + 1e-2 * rng.standard_normal(x.shape)
        assert np.all(rinv_objective(name, xp, y, x0, None, gamma) >= j - 1e-12)


def test_iterative_f_rinv_matches_grid_minimum_when_convex_enough():
    """For y well inside the range and gamma large enough the 1-D objective has one minimum;
    the gradient steps then reach the grid's global minimum."""
    rng = rng_for("irinv_grid")
    op = OPS["tanh"]
    y = rng.uniform(-0.6, 0.6, 40)
    x0 = rng.uniform(-1.0, 1.0, 40)
    gamma = 1.0
    x = op.f_rinv(B, y, x0, None, gamma, RinvOpts(steps=500, lr=0.5, th=1e-2))
    grid = np.linspace(-4, 4, 80_001)
    for k in range(40):
        jg = rinv_objective("tanh", grid, y[k], x0[k], None, gamma)
        assert abs(x[k] - grid[np.argmin(jg)]) < 2e-4
        assert rinv_objective("tanh", x[k], y[k], x0[k], None, gamma) <= jg.min() + 1e-12


def test_iterative_f_rinv_float32_vectorized():
    rng = rng_for("irinv32")
    y = rng.uniform(-1.2, 1.2, (50, 30)).astype(np.float32)
    x0 = rng.uniform(-2, 2, (50, 30)).astype(np.float32)
    for name in ("tanh", "sigmoid"):
        x = OPS[name].f_rinv(B, y, x0, None, 1e-3, RinvOpts())
        assert x.shape == y.shape and x.dtype == np.float32 and np.all(np.isfinite(x)), name


# -- losses --------------------------------------------------------------------------------------
def loss_case(name, rng, batch=6, k=4):
    h = rng.standard_normal((batch, k)) * 2
    if name == "softmax_ce":
        y = np.eye(k)[rng.integers(0, k, batch)]
    elif name in ("sigmoid_ce", "sigmoid_l2"):
        y = rng.uniform(0, 1, (batch, k))
    else:
        y = rng.standard_normal((batch, k))
    return h, y


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_grad_matches_finite_differences(name):
    rng = rng_for("loss", name)
    loss = LOSSES[name]
    h, y = loss_case(name, rng)
    v = loss.value(B, h, y)
    assert v.shape == (h.shape[0],)
    # value_i depends on row i only, so the gradient of the sum is the per-example gradient.
    numeric = central_diff(lambda z: float(np.sum(loss.value(B, z, y))), h)
    np.testing.assert_allclose(loss.grad(B, h, y), numeric, rtol=1e-6, atol=1e-8)
    # Per-example: changing one row changes only that example's value.
    h2 = h.copy()
    h2[0] += 1.0
    np.testing.assert_array_equal(loss.value(B, h2, y)[1:], v[1:])


def test_loss_reference_values():
    h = np.array([[1.0, 2.0, 0.5]])
    y = np.array([[0.0, 1.0, 0.0]])
    p = np.exp(h) / np.exp(h).sum()
    assert LOSSES["softmax_ce"].value(B, h, y)[0] == pytest.approx(-np.log(p[0, 1]))
    np.testing.assert_allclose(LOSSES["softmax_ce"].output(B, h), p)
    s = 1 / (1 + np.exp(-h))
    assert LOSSES["sigmoid_ce"].value(B, h, y)[0] == pytest.approx(-np.sum(y * np.log(s) + (1 - y) * np.log(1 - s)))
    assert LOSSES["sigmoid_l2"].value(B, h, y)[0] == pytest.approx(0.5 * np.sum((s - y) ** 2))
    assert LOSSES["l2"].value(B, h, y)[0] == pytest.approx(0.5 * np.sum((h - y) ** 2))


@pytest.mark.parametrize("name", ["softmax_ce", "sigmoid_ce"])
def test_losses_stable_for_large_logits(name):
    h = np.array([[1000.0, -1000.0, 0.0]], np.float32)
    y = np.array([[0.0, 1.0, 0.0]], np.float32)
    v = LOSSES[name].value(B, h, y)
    g = LOSSES[name].grad(B, h, y)
    assert np.all(np.isfinite(v)) and np.all(np.isfinite(g))
    # softmax_ce: -log_softmax = 1000 - (-1000); sigmoid_ce: softplus(1000) + softplus(1000) + log 2.
    assert v[0] == pytest.approx(2000.0 if name == "softmax_ce" else 2000.0 + np.log(2.0), rel=1e-6)
