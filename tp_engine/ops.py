"""Elementary ops. Each registers, side by side, its function and the three maps that rules need:

- ``f(B, x, p)``: the function (``p`` is the op's parameter: W, b, or None);
- ``df(B, dy, x, p)``: one chain-rule step, the vector-Jacobian product w.r.t. ``x``;
- ``f_inv(B, y, x0, p, th)``: least-squares inverse, the ``x`` closest to ``x0`` among those whose
  ``f(x)`` is closest to ``y``;
- ``f_rinv(B, y, x0, p, gamma, opts)``: regularized inverse,
  ``argmin_x |f(x) - y|^2 + gamma |x - x0|^2``.

All are written against the backend interface ``B`` so both paths share them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

LEAKY_SLOPE = 0.01


@dataclass(frozen=True)
class Op:
    name: str
    f: Callable[..., Any]
    df: Callable[..., Any]
    f_inv: Callable[..., Any]
    f_rinv: Callable[..., Any]
    # d f / d x evaluated at x, elementwise (activations only); used by local gradients.
    deriv: Callable[..., Any] | None = None
    # df written through the output y = f(x), when that is cheaper (tanh: 1 - y^2): the forward
    # pass already holds y, so local gradients skip recomputing f.
    df_y: Callable[..., Any] | None = None

    # A backend may fuse the three methods below into one pass (NumPy: numba kernels in
    # backends/numpy_kernels.py, checked bit for bit against these expressions); it answers None
    # for what it has no kernel for, and the expressions run.
    def vjp(self, B, dy, x, y, p=None):
        """df(dy) at x, given also y = f(x)."""
        if self.df_y is None:
            return self.df(B, dy, x, p)
        fused = getattr(B, "fused_vjp_y", None)
        out = fused(self.name, dy, y) if fused is not None else None
        return out if out is not None else self.df_y(B, dy, y)

    def vjp_diff(self, B, a, b, x, y, scale=1.0, p=None):
        """vjp(scale * (a - b)) at x, given y = f(x): a residual sent back through the op."""
        fused = getattr(B, "fused_vjp_diff", None) if self.df_y is not None else None
        out = fused(self.name, a, b, y, scale) if fused is not None else None
        if out is not None:
            return out
        d = a - b
        return self.vjp(B, d if scale == 1.0 else scale * d, x, y, p)

    def step_back(self, B, x0, y0, y, p=None):
        """x0 - vjp(y0 - y) at x0: the target y of y0 = f(x0) taken one backprop step back."""
        fused = getattr(B, "fused_step_back", None)
        out = fused(self.name, x0, y0, y) if fused is not None else None
        return out if out is not None else x0 - self.vjp(B, y0 - y, x0, y0, p)


OPS: dict[str, Op] = {}


def defop(name, f, df, f_inv, f_rinv, deriv=None, df_y=None) -> Op:
    OPS[name] = Op(name, f, df, f_inv, f_rinv, deriv, df_y)
    return OPS[name]


@dataclass(frozen=True)
class RinvOpts:
    """Options of the iterative regularized inverse (tanh, sigmoid)."""

    steps: int = 2
    lr: float = 0.5
    th: float = 1e-2


# -- linear: x W ------------------------------------------------------------------------------
def _linear_f_inv(B, y, x0, W, th=None):
    # x0 + (y - x0 W) W+. W+ through the normal equations of the smaller Gram matrix: an SVD per
    # step costs ~40 ms at 240x240 here, a solve ~1 ms. Exact whenever W has full rank.
    r = y - B.matmul(x0, W)
    n_in, n_out = W.shape[0], W.shape[1]
    if n_in >= n_out:  # W+ = (W^T W)^-1 W^T
        z = B.transpose(B.solve(B.matmul_tn(W, W), B.transpose(r)))
        return x0 + B.matmul_nt(z, W)
    # W+ = W^T (W W^T)^-1
    z = B.matmul_nt(r, W)
    return x0 + B.transpose(B.solve(B.matmul_nt(W, W), B.transpose(z)))


def _linear_f_rinv(B, y, x0, W, gamma, opts=None):
    # (y W^T + gamma x0)(W W^T + gamma I)^-1; the matrix is symmetric, so solve on the transpose.
    a = B.matmul_nt(W, W) + gamma * B.eye(W.shape[0])
    rhs = B.matmul_nt(y, W) + gamma * x0
    return B.transpose(B.solve(a, B.transpose(rhs)))


defop(
    "linear",
    f=lambda B, x, W: B.matmul(x, W),
    df=lambda B, dy, x, W: B.matmul_nt(dy, W),
    f_inv=_linear_f_inv,
    f_rinv=_linear_f_rinv,
)

# -- addition: x + b --------------------------------------------------------------------------
defop(
    "add",
    f=lambda B, x, b: x + b,
    df=lambda B, dy, x, b: dy,
    f_inv=lambda B, y, x0, b, th=None: y - b,
    f_rinv=lambda B, y, x0, b, gamma, opts=None: (y - b + gamma * x0) / (1.0 + gamma),
)


# -- smooth squashing activations: a few vectorized gradient steps from f_inv ------------------
def _iterative_rinv(f, deriv, f_inv):
    def f_rinv(B, y, x0, p, gamma, opts: RinvOpts = RinvOpts()):
        x = f_inv(B, y, x0, p, opts.th)
        for _ in range(opts.steps):
            fx = f(B, x, p)
            # gradient of 1/2 |f(x)-y|^2 + gamma/2 |x-x0|^2 (the 1/2 only rescales rinv_lr)
            x = x - opts.lr * ((fx - y) * deriv(B, x) + gamma * (x - x0))
        return x

    return f_rinv


def _tanh_deriv(B, x):
    t = B.tanh(x)
    return 1.0 - t * t


def _tanh_f_inv(B, y, x0, p=None, th=1e-2):
    return B.arctanh(B.clip(y, -1.0 + th, 1.0 - th))


defop(
    "tanh",
    f=lambda B, x, p=None: B.tanh(x),
    df=lambda B, dy, x, p=None: dy * _tanh_deriv(B, x),
    f_inv=_tanh_f_inv,
    f_rinv=_iterative_rinv(lambda B, x, p: B.tanh(x), _tanh_deriv, _tanh_f_inv),
    deriv=_tanh_deriv,
    df_y=lambda B, dy, y: dy * (1.0 - y * y),
)


def _sigmoid_deriv(B, x):
    s = B.sigmoid(x)
    return s * (1.0 - s)


def _sigmoid_f_inv(B, y, x0, p=None, th=1e-2):
    y = B.clip(y, th, 1.0 - th)
    return B.log(y) - B.log(1.0 - y)


defop(
    "sigmoid",
    f=lambda B, x, p=None: B.sigmoid(x),
    df=lambda B, dy, x, p=None: dy * _sigmoid_deriv(B, x),
    f_inv=_sigmoid_f_inv,
    f_rinv=_iterative_rinv(lambda B, x, p: B.sigmoid(x), _sigmoid_deriv, _sigmoid_f_inv),
    deriv=_sigmoid_deriv,
    df_y=lambda B, dy, y: dy * y * (1.0 - y),
)


# -- piecewise-linear activations: closed forms by comparing candidate minimizers -------------
def _piecewise_rinv(slope):
    """argmin_x (g(x)-y)^2 + gamma (x-x0)^2 for g(x) = x (x>=0), slope*x (x<0)."""

    def f_rinv(B, y, x0, p, gamma, opts=None):
        # Candidate on the right branch, projected onto x >= 0.
        xr = B.maximum((y + gamma * x0) / (1.0 + gamma), 0.0)
        # Candidate on the left branch (slope s): (s y + gamma x0) / (s^2 + gamma), onto x <= 0.
        xl = B.minimum((slope * y + gamma * x0) / (slope * slope + gamma), 0.0)

        def obj(x):
            gx = B.where(x >= 0, x, slope * x)
            return (gx - y) * (gx - y) + gamma * (x - x0) * (x - x0)

        return B.where(obj(xr) <= obj(xl), xr, xl)

    return f_rinv


def _relu_f_inv(B, y, x0, p=None, th=None):
    # Any x <= 0 maps to 0; the one closest to x0 is min(x0, 0).
    return B.where(y > 0, y, B.minimum(x0, 0.0))


defop(
    "relu",
    f=lambda B, x, p=None: B.maximum(x, 0.0),
    df=lambda B, dy, x, p=None: B.where(x > 0, dy, 0.0 * dy),
    f_inv=_relu_f_inv,
    f_rinv=_piecewise_rinv(0.0),
    deriv=lambda B, x: B.where(x > 0, 1.0 + 0.0 * x, 0.0 * x),
)

defop(
    "leaky_relu",
    f=lambda B, x, p=None: B.where(x > 0, x, LEAKY_SLOPE * x),
    df=lambda B, dy, x, p=None: B.where(x > 0, dy, LEAKY_SLOPE * dy),
    f_inv=lambda B, y, x0, p=None, th=None: B.where(y > 0, y, y / LEAKY_SLOPE),
    f_rinv=_piecewise_rinv(LEAKY_SLOPE),
    deriv=lambda B, x: B.where(x > 0, 1.0 + 0.0 * x, LEAKY_SLOPE + 0.0 * x),
)

defop(
    "linear_act",
    f=lambda B, x, p=None: x,
    df=lambda B, dy, x, p=None: dy,
    f_inv=lambda B, y, x0, p=None, th=None: y,
    f_rinv=lambda B, y, x0, p, gamma, opts=None: (y + gamma * x0) / (1.0 + gamma),
    deriv=lambda B, x: 1.0 + 0.0 * x,
    df_y=lambda B, dy, y: dy,
)


def activation(name: str) -> Op:
    """The op of a config activation name ('linear' means the identity activation)."""
    return OPS["linear_act" if name == "linear" else name]
