"""Fused optimizer updates for the NumPy path.

A step of centered RMSprop written as array expressions makes ~12 passes over every parameter; at
Lee's network that cost as much as the step's matrix products. Each kernel here makes one pass.
They compute the table's array expressions (``tp_engine.optimizers``) bit for bit: every operand
is float32 and the operations come in the same order, as NumPy 2 evaluates those expressions (its
Python-float constants are cast to float32). The constants (``1 - rho`` and so on) are rounded to
float32 once, here, from the same Python floats; tests/test_fused_kernels.py checks the kernels
against ``array_step`` and tests/test_engine.py against a float64 oracle.

Until 2026-12 the kernels took ``1.0 - rho`` in numba's float64 and multiplied in float64: that
matched neither the table nor TensorFlow, cost the last bits of every Lee-recipe trial, and made
centered RMSprop 3.5x slower (half-width vectors plus conversions: 1.45 ms against 0.42 ms per
step of Lee's network, one thread).

``error_model="numpy"``: a float division by zero gives inf/nan as in NumPy instead of numba's
default Python model, whose per-element ZeroDivisionError check kept LLVM from vectorizing the
loops.

:class:`FusedOptimizer` steps a whole parameter list with the slots' flat views and float32
hyperparameters prepared once, so a step is one kernel call per parameter and little else."""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, fastmath=False, error_model="numpy")
def sgd(p, g, mom, lr, momentum, scale):
    # TensorFlow's momentum slot convention: accum = m*accum + g; p -= lr*accum.
    for i in range(p.size):
        mom[i] = momentum * mom[i] + g[i] * scale
        p[i] = p[i] - lr * mom[i]


@numba.njit(cache=True, fastmath=False, error_model="numpy")
def rmsprop_centered_momentum(p, g, ms, mg, mom, lr, rho, c, momentum, eps, scale):
    # Lee et al.'s optimizer, the hot path: one branch-free loop so LLVM vectorizes it (c = 1 - rho).
    for i in range(p.size):
        gi = g[i] * scale
        ms[i] = rho * ms[i] + c * gi * gi
        mg[i] = rho * mg[i] + c * gi
        mom[i] = momentum * mom[i] + lr * gi / np.sqrt(ms[i] + eps - mg[i] * mg[i])
        p[i] = p[i] - mom[i]


@numba.njit(cache=True, fastmath=False, error_model="numpy")
def rmsprop(p, g, ms, mg, mom, lr, rho, c, momentum, eps, centered, scale):
    for i in range(p.size):
        gi = g[i] * scale
        ms[i] = rho * ms[i] + c * gi * gi
        denom = ms[i] + eps
        if centered:
            mg[i] = rho * mg[i] + c * gi
            denom = denom - mg[i] * mg[i]
        mom[i] = momentum * mom[i] + lr * gi / np.sqrt(denom)
        p[i] = p[i] - mom[i]


@numba.njit(cache=True, fastmath=False, error_model="numpy")
def adam(p, g, m, v, lr_t, c1, c2, eps, scale):
    # c1 = 1 - beta1, c2 = 1 - beta2
    for i in range(p.size):
        gi = g[i] * scale
        m[i] = m[i] + (gi - m[i]) * c1
        v[i] = v[i] + (gi * gi - v[i]) * c2
        p[i] = p[i] - lr_t * m[i] / (np.sqrt(v[i]) + eps)


_EMPTY = np.zeros(1, np.float32)
f32 = np.float32
_UNIT = f32(1.0)


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)  # a view: the arrays are contiguous


def _consts(name: str, hp: dict) -> tuple:
    """The kernel's float32 constants after the state arrays, in its argument order. ``1 - rho``
    and the like are taken from the Python floats, as the table's expressions take them."""
    if name == "sgd":
        return f32(hp["lr"]), f32(hp["momentum"])
    if name in ("rmsprop", "rmsprop_centered"):
        return f32(hp["lr"]), f32(hp["rho"]), f32(1.0 - hp["rho"]), f32(hp["momentum"]), f32(hp["eps"])
    if name == "adam":  # after lr_t, which changes every step
        return f32(1.0 - hp["beta1"]), f32(1.0 - hp["beta2"]), f32(hp["eps"])
    raise KeyError(f"no fused kernel for optimizer {name!r}")


def _adam_lr(hp: dict, t) -> np.float32:
    """Adam's bias-corrected step size, the table's expression on a float32 step count."""
    t = np.asarray(t, np.float32)
    return f32(hp["lr"] * np.sqrt(1.0 - hp["beta2"] ** t) / (1.0 - hp["beta1"] ** t))


def _clip_scale(g: np.ndarray, clip) -> np.float32:
    """The table's clipping factor (``array_step``): min(1, clip / (|g| + 1e-12)) in float32."""
    if clip is None:
        return _UNIT
    return f32(np.minimum(1.0, clip / (np.sqrt(np.sum(g * g)) + 1e-12)))


def _sgd(p, g, s, hp, t, scale):
    sgd(_flat(p), _flat(g), _flat(s["mom"]), *_consts("sgd", hp), scale)


def _rmsprop(p, g, s, hp, t, scale):
    rmsprop(_flat(p), _flat(g), _flat(s["ms"]), _EMPTY, _flat(s["mom"]), *_consts("rmsprop", hp), False, scale)


def _rmsprop_centered(p, g, s, hp, t, scale):
    rmsprop_centered_momentum(_flat(p), _flat(g), _flat(s["ms"]), _flat(s["mg"]), _flat(s["mom"]),
                              *_consts("rmsprop_centered", hp), scale)


def _adam(p, g, s, hp, t, scale):
    adam(_flat(p), _flat(g), _flat(s["m"]), _flat(s["v"]), _adam_lr(hp, t), *_consts("adam", hp), scale)


# optimizer name (tp_engine.optimizers.OPTIMIZERS) -> its fused step(p, g, slots, hp, t, scale);
# the slots are the ones the table declares.
FUSED = {"sgd": _sgd, "rmsprop": _rmsprop, "rmsprop_centered": _rmsprop_centered, "adam": _adam}


class FusedOptimizer:
    """The fused update of every parameter of one optimizer: ``step(grads, t)`` does what
    :func:`optimizer_step` does for each (p, g) pair, with the per-call preparation (flat views,
    float32 hyperparameters) done once here. Slots and parameters are updated in place, so they
    must stay the same arrays (loading a state assigns into them)."""

    NAMES = ("sgd", "rmsprop", "rmsprop_centered", "adam")

    def __init__(self, name: str, params: list, slots: dict[str, list], hp: dict):
        self.name = name
        self.hp = hp
        self.clip = hp["clip_norm"]
        self.params = [_flat(p) for p in params]
        per = []
        for i, p in enumerate(self.params):
            s = {k: _flat(v[i]) for k, v in slots.items()}
            if name == "sgd":
                per.append((s["mom"],))
            elif name == "rmsprop":
                per.append((s["ms"], _EMPTY, s["mom"]))
            elif name == "rmsprop_centered":
                per.append((s["ms"], s["mg"], s["mom"]))
            else:  # adam
                per.append((s["m"], s["v"]))
        self.slots = per
        self.consts = _consts(name, hp)
        self.kernel = {"sgd": sgd, "rmsprop": rmsprop, "rmsprop_centered": rmsprop_centered_momentum,
                       "adam": adam}[name]

    def step(self, grads: list, t: float) -> None:
        name, k, c = self.name, self.kernel, self.consts
        if name == "adam":
            c = (_adam_lr(self.hp, t), *c)
        for p, g, s in zip(self.params, grads, self.slots):
            if not (type(g) is np.ndarray and g.dtype == np.float32 and g.flags.c_contiguous):
                g = np.ascontiguousarray(g, dtype=np.float32)
            sc = _clip_scale(g, self.clip)
            g = g.reshape(-1)
            if g.size != p.size:
                raise ValueError(f"gradient of {g.size} values for a parameter of {p.size}")
            if name == "rmsprop":
                k(p, g, *s, *c, False, sc)
            else:
                k(p, g, *s, *c, sc)


def make_fused(name: str, params: list, slots: dict[str, list], hp: dict) -> FusedOptimizer | None:
    """A :class:`FusedOptimizer` for optimizer ``name``, or None when it has no fused kernel or a
    parameter is not a contiguous float32 array (then each step goes through optimizer_step)."""
    if name not in FusedOptimizer.NAMES:  # a kernel added to FUSED alone runs per parameter
        return None
    arrays = list(params) + [a for v in slots.values() for a in v]
    if not all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous for a in arrays):
        return None
    return FusedOptimizer(name, params, slots, hp)


def optimizer_step(name: str, p: np.ndarray, g: np.ndarray, slots: dict, hp: dict, t: float) -> bool:
    """Update p in place with the fused kernel of ``name``; False when there is none. ``slots``
    holds this parameter's state arrays (same shape as p)."""
    step = FUSED.get(name)
    if step is None:
        return False
    g = np.ascontiguousarray(g, dtype=np.float32)
    step(p, g, slots, hp, t, _clip_scale(g, hp["clip_norm"]))
    return True


# -- fused elementwise chains --------------------------------------------------------------------
# Each kernel computes, in float32 and in the same order, the NumPy expression in its comment, so
# its result is bit for bit NumPy's (no FMA contraction without fastmath; constants are float32,
# as NumPy 2 casts a Python float against a float32 array). tests/test_fused_kernels.py checks it.
_ONE = np.float32(1.0)


@numba.njit(cache=True, error_model="numpy")
def _vjp_diff_tanh(a, b, y, c, out):
    for i in range(out.size):  # (c * (a - b)) * (1 - y * y)
        out[i] = (c * (a[i] - b[i])) * (_ONE - y[i] * y[i])


@numba.njit(cache=True, error_model="numpy")
def _vjp_diff_sigmoid(a, b, y, c, out):
    for i in range(out.size):  # (c * (a - b)) * y * (1 - y)
        out[i] = ((c * (a[i] - b[i])) * y[i]) * (_ONE - y[i])


@numba.njit(cache=True, error_model="numpy")
def _vjp_diff_identity(a, b, y, c, out):
    for i in range(out.size):  # c * (a - b)
        out[i] = c * (a[i] - b[i])


@numba.njit(cache=True, error_model="numpy")
def _vjp_y_tanh(dy, y, out):
    for i in range(out.size):  # dy * (1 - y * y)
        out[i] = dy[i] * (_ONE - y[i] * y[i])


@numba.njit(cache=True, error_model="numpy")
def _vjp_y_sigmoid(dy, y, out):
    for i in range(out.size):  # dy * y * (1 - y)
        out[i] = (dy[i] * y[i]) * (_ONE - y[i])


@numba.njit(cache=True, error_model="numpy")
def _step_back_tanh(x0, y0, y, out):
    for i in range(out.size):  # x0 - (y0 - y) * (1 - y0 * y0)
        out[i] = x0[i] - (y0[i] - y[i]) * (_ONE - y0[i] * y0[i])


@numba.njit(cache=True, error_model="numpy")
def _step_back_sigmoid(x0, y0, y, out):
    for i in range(out.size):  # x0 - (y0 - y) * y0 * (1 - y0)
        out[i] = x0[i] - ((y0[i] - y[i]) * y0[i]) * (_ONE - y0[i])


@numba.njit(cache=True, error_model="numpy")
def _step_back_identity(x0, y0, y, out):
    for i in range(out.size):  # x0 - (y0 - y)
        out[i] = x0[i] - (y0[i] - y[i])


_VJP_DIFF = {"tanh": _vjp_diff_tanh, "sigmoid": _vjp_diff_sigmoid, "linear_act": _vjp_diff_identity}
_VJP_Y = {"tanh": _vjp_y_tanh, "sigmoid": _vjp_y_sigmoid}
# add's vjp is the identity too: x0 - (y0 - y).
_STEP_BACK = {"tanh": _step_back_tanh, "sigmoid": _step_back_sigmoid, "linear_act": _step_back_identity,
              "add": _step_back_identity}


def _plain(*arrays) -> bool:
    """Same-shape C-contiguous float32 arrays: what the kernels take (else NumPy's expression)."""
    s = arrays[0].shape
    return all(type(a) is np.ndarray and a.dtype == np.float32 and a.shape == s and a.flags.c_contiguous
               for a in arrays)


def vjp_diff(op: str, a, b, y, c: float):
    """``op.vjp(c * (a - b))`` through y = op(x), in one pass; None when there is no kernel."""
    k = _VJP_DIFF.get(op)
    if k is None or not _plain(a, b, y):
        return None
    out = np.empty_like(y)
    k(a.reshape(-1), b.reshape(-1), y.reshape(-1), f32(c), out.reshape(-1))
    return out


def vjp_y(op: str, dy, y):
    """``op.df_y(dy, y)`` in one pass; None when there is no kernel."""
    k = _VJP_Y.get(op)
    if k is None or not _plain(dy, y):
        return None
    out = np.empty_like(y)
    k(dy.reshape(-1), y.reshape(-1), out.reshape(-1))
    return out


def step_back(op: str, x0, y0, y):
    """``x0 - op.vjp(y0 - y)`` (one backprop step of a target through op) in one pass; None when
    there is no kernel."""
    k = _STEP_BACK.get(op)
    if k is None or not _plain(x0, y0, y):
        return None
    out = np.empty_like(x0)
    k(x0.reshape(-1), y0.reshape(-1), y.reshape(-1), out.reshape(-1))
    return out


@numba.njit(cache=True, error_model="numpy")
def _colsum(x, out):
    # NumPy's add.reduce over axis 0 of a C-contiguous matrix: from its identity 0 (so a column
    # of -0.0 sums to +0.0), each row added in order (no pairwise blocking along that axis).
    n, m = x.shape
    for j in range(m):
        out[j] = 0.0
    for i in range(n):
        for j in range(m):
            out[j] += x[i, j]


def colsum(x):
    """``np.sum(x, axis=0)`` of a C-contiguous float32 matrix with rows; None otherwise."""
    if type(x) is not np.ndarray or x.ndim != 2 or x.dtype != np.float32 or not x.flags.c_contiguous \
            or x.shape[0] == 0:
        return None
    out = np.empty(x.shape[1], np.float32)
    _colsum(x, out)
    return out
