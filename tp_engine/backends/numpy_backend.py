"""NumPy backend: float32 arrays, closed-form local gradients, no compilation."""
from __future__ import annotations

import numpy as np

F32 = np.float32
_KERNELS = None


def _kernels():
    """tp_engine.backends.numpy_kernels, imported (with numba) on first use."""
    global _KERNELS
    if _KERNELS is None:
        from tp_engine.backends import numpy_kernels

        _KERNELS = numpy_kernels
    return _KERNELS


class NumpyBackend:
    name = "numpy"

    def asarray(self, x):
        return np.asarray(x, dtype=F32)

    def to_numpy(self, x):
        return np.asarray(x)

    def variable(self, x):
        return np.array(x, dtype=F32, copy=True)

    def assign(self, var, value):
        var[...] = value

    matmul = staticmethod(np.matmul)

    @staticmethod
    def matmul_tn(a, b):
        return a.T @ b

    @staticmethod
    def matmul_nt(a, b):
        return a @ b.T

    @staticmethod
    def solve(a, b):
        return np.linalg.solve(a, b)

    @staticmethod
    def rows(x):
        """Number of rows, as a number usable in arithmetic."""
        return x.shape[0]

    @staticmethod
    def eye(n):
        return np.eye(n, dtype=F32)

    tanh = staticmethod(np.tanh)
    arctanh = staticmethod(np.arctanh)
    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    log1p = staticmethod(np.log1p)
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)
    where = staticmethod(np.where)
    clip = staticmethod(np.clip)
    transpose = staticmethod(np.transpose)

    @staticmethod
    def sigmoid(x):
        # 0.5 * (1 + tanh(x/2)) is the overflow-free logistic.
        return F32(0.5) * (F32(1.0) + np.tanh(F32(0.5) * x))

    @staticmethod
    def sum(x, axis=None, keepdims=False):
        if axis == 0 and not keepdims:  # bias gradients: one numba pass, NumPy's order
            out = _kernels().colsum(x)
            if out is not None:
                return out
        return np.sum(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def mean(x, axis=None):
        if axis == 0:
            out = _kernels().colsum(x)
            if out is not None:  # np.mean: the float32 sum divided by the count
                out /= F32(x.shape[0])
                return out
        return np.mean(x, axis=axis)

    @staticmethod
    def max(x, axis=None, keepdims=False):
        return np.max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def argmax(x, axis=-1):
        return np.argmax(x, axis=axis)

    @staticmethod
    def equal(a, b):
        return np.equal(a, b)

    @staticmethod
    def count(mask):
        return np.count_nonzero(mask)

    def optimizer_step(self, name, p, g, slots, hp, t):
        from tp_engine.backends.numpy_kernels import optimizer_step

        if not optimizer_step(name, p, g, slots, hp, float(t)):  # no fused kernel for it
            from tp_engine.optimizers import array_step

            array_step(self, name, p, g, slots, hp, t)

    # Fused elementwise chains (tp_engine.ops.Op.vjp / vjp_diff / step_back): one numba pass
    # instead of several NumPy ones, bit for bit the same; None where there is no kernel.
    @staticmethod
    def fused_vjp_y(op, dy, y):
        return _kernels().vjp_y(op, dy, y)

    @staticmethod
    def fused_vjp_diff(op, a, b, y, scale):
        return _kernels().vjp_diff(op, a, b, y, scale)

    @staticmethod
    def fused_step_back(op, x0, y0, y):
        return _kernels().step_back(op, x0, y0, y)

    def fused_optimizer(self, name, params, slots, hp):
        """All of an optimizer's parameters stepped by numba kernels (``FusedOptimizer.step``),
        or None (then ``optimizer_step`` per parameter). A subclass that overrides
        ``optimizer_step`` (tests' array-expression path) keeps it: no fused stepper."""
        if type(self).optimizer_step is not NumpyBackend.optimizer_step:
            return None
        from tp_engine.backends.numpy_kernels import make_fused

        return make_fused(name, params, slots, hp)

    def local_grads(self, loss_fn, params, manual):
        return list(manual())

    def compile(self, fn):
        return fn
