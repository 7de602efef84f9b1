"""TensorFlow backend: variables on CPU or GPU, local gradients from GradientTape, steps compiled
with tf.function (XLA when ``jit_compile``; on CPU not for steps that solve linear systems), optimizer
updates by TensorFlow's fused training ops.

TensorFlow is imported only here, and only when this backend is asked for.
"""
from __future__ import annotations

import os

import numpy as np


def _import_tf():
    # Quiet TensorFlow's start-up lines unless the user asked for them.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    return tf


class DeviceError(ValueError):
    pass


_THREADS_SET = False


class TensorflowBackend:
    name = "tensorflow"

    def __init__(self, device: str = "auto", jit_compile: bool = True):
        global _THREADS_SET
        tf = _import_tf()
        self.tf = tf
        if not _THREADS_SET:
            # Ray gives a trial OMP_NUM_THREADS=<its CPUs>; TensorFlow ignores that variable, so
            # honour it here or two trials fight over both cores.
            n = os.environ.get("OMP_NUM_THREADS")
            try:
                if n and int(n) > 0:
                    tf.config.threading.set_intra_op_parallelism_threads(int(n))
                    tf.config.threading.set_inter_op_parallelism_threads(max(1, int(n)))
            except RuntimeError:  # already initialized in this process
                pass
            gpus = tf.config.list_physical_devices("GPU")
            for g in gpus:
                try:  # several trials may share one GPU
                    tf.config.experimental.set_memory_growth(g, True)
                except RuntimeError:
                    pass
            _THREADS_SET = True
        gpus = tf.config.list_physical_devices("GPU")
        if device == "gpu" and not gpus:
            raise DeviceError("device gpu requested but TensorFlow sees no GPU; use device auto or cpu")
        self.device = "/GPU:0" if (device in ("auto", "gpu") and gpus) else "/CPU:0"
        self.jit_compile = jit_compile

    # -- arrays ----------------------------------------------------------------------------
    def asarray(self, x):
        if isinstance(x, self.tf.Tensor):
            return x
        with self.tf.device(self.device):
            return self.tf.convert_to_tensor(np.asarray(x, dtype=np.float32))

    def to_numpy(self, x):
        return x.numpy() if hasattr(x, "numpy") else np.asarray(x)

    def variable(self, x):
        with self.tf.device(self.device):
            return self.tf.Variable(np.asarray(x, dtype=np.float32))

    def assign(self, var, value):
        var.assign(value)

    # -- math ------------------------------------------------------------------------------
    def matmul(self, a, b):
        return self.tf.matmul(a, b)

    def matmul_tn(self, a, b):
        return self.tf.matmul(a, b, transpose_a=True)

    def matmul_nt(self, a, b):
        return self.tf.matmul(a, b, transpose_b=True)

    def solve(self, a, b):
        return self.tf.linalg.solve(a, b)

    def rows(self, x):
        # Dynamic: a retraced step may see the batch dimension as None.
        return self.tf.cast(self.tf.shape(x)[0], self.tf.float32)

    def eye(self, n):
        return self.tf.eye(n, dtype=self.tf.float32)

    def tanh(self, x):
        return self.tf.tanh(x)

    def arctanh(self, x):
        return self.tf.math.atanh(x)

    def sigmoid(self, x):
        return self.tf.sigmoid(x)

    def exp(self, x):
        return self.tf.exp(x)

    def log(self, x):
        return self.tf.math.log(x)

    def log1p(self, x):
        return self.tf.math.log1p(x)

    def sqrt(self, x):
        return self.tf.sqrt(x)

    def abs(self, x):
        return self.tf.abs(x)

    def maximum(self, a, b):
        return self.tf.maximum(a, b)

    def minimum(self, a, b):
        return self.tf.minimum(a, b)

    def where(self, c, a, b):
        return self.tf.where(c, a, b)

    def clip(self, x, lo, hi):
        return self.tf.clip_by_value(x, lo, hi)

    def sum(self, x, axis=None, keepdims=False):
        return self.tf.reduce_sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis=None):
        return self.tf.reduce_mean(x, axis=axis)

    def max(self, x, axis=None, keepdims=False):
        return self.tf.reduce_max(x, axis=axis, keepdims=keepdims)

    def argmax(self, x, axis=-1):
        return self.tf.argmax(x, axis=axis)

    def equal(self, a, b):
        return self.tf.equal(a, b)

    def count(self, mask):
        return self.tf.reduce_sum(self.tf.cast(mask, self.tf.int32))

    def transpose(self, x):
        return self.tf.transpose(x)

    # -- gradients, optimizers, compilation -------------------------------------------------
    def local_grads(self, loss_fn, params, manual):
        with self.tf.GradientTape() as tape:
            loss = loss_fn(params)
        return tape.gradient(loss, params)

    def optimizer_step(self, name, p, g, slots, hp, t):
        """TensorFlow's fused training ops, which compute tp_engine.optimizers' formulas; the
        table's array expressions for an optimizer they lack."""
        fused = _FUSED.get(name)
        if fused is None:
            from tp_engine.optimizers import array_step

            return array_step(self, name, p, g, slots, hp, t)
        tf = self.tf
        if hp["clip_norm"] is not None:
            g = tf.clip_by_norm(g, hp["clip_norm"])
        fused(tf, p, g, slots, hp, t)

    def compile(self, fn):
        """``fn`` as a tf.function. With ``jit_compile``, XLA compiles it, except on CPU when its
        graph holds a matrix decomposition (lstp, rlstp: ``solve``): XLA's CPU decompositions are
        loops of small ops, ~4x slower than TensorFlow's own kernels (a 240x240 solve with 100
        right-hand sides: ~15 ms vs ~3.5 ms), which made those rules slower than NumPy; such a
        function runs as a plain graph (lstp's step: ~2.5x faster). The choice is made once, at
        the first call, from the traced graph (tracing alone does not compile)."""
        tf, device = self.tf, self.device
        chosen = None

        def run(*args):
            nonlocal chosen
            with tf.device(device):
                if chosen is None:
                    chosen, run.xla = self._choose(fn, args)
                return chosen(*args)

        run.xla = None  # after the first call: whether XLA compiled the step
        return run

    def _choose(self, fn, args):
        """(tf.function of ``fn``, whether it is XLA-compiled), traced on ``args``."""
        tf = self.tf
        if self.jit_compile:
            xla = tf.function(fn, jit_compile=True, reduce_retracing=True)
            if "GPU" in self.device or _XLA_SLOW_OPS.isdisjoint(_op_types(xla.get_concrete_function(*args).graph)):
                return xla, True
        return tf.function(fn, reduce_retracing=True), False


# Ops XLA runs much slower than TensorFlow's kernels on CPU (decompositions and solves); a step
# holding one is not compiled with XLA (TensorflowBackend.compile).
_XLA_SLOW_OPS = frozenset({
    "MatrixSolve", "MatrixSolveLs", "MatrixInverse", "MatrixTriangularSolve", "Cholesky", "Qr", "Svd",
    "SelfAdjointEigV2", "Lu", "MatrixDeterminant", "LogMatrixDeterminant",
})


def _op_types(graph) -> set[str]:
    """Op types of a traced graph, including the functions it calls."""
    types = {op.type for op in graph.get_operations()}
    for f in graph.as_graph_def().library.function:
        types.update(node.op for node in f.node_def)
    return types


# -- fused updates: optimizer name (tp_engine.optimizers.OPTIMIZERS) -> raw training op -----------
def _c(tf, x):
    return tf.constant(x, tf.float32)


def _sgd(tf, p, g, s, hp, t):
    # accum = m*accum + g; var -= lr*accum
    tf.raw_ops.ResourceApplyMomentum(var=p.handle, accum=s["mom"].handle, lr=_c(tf, hp["lr"]), grad=g,
                                     momentum=_c(tf, hp["momentum"]))


def _rmsprop_args(tf, p, g, s, hp):
    return dict(var=p.handle, ms=s["ms"].handle, mom=s["mom"].handle, lr=_c(tf, hp["lr"]), rho=_c(tf, hp["rho"]),
                momentum=_c(tf, hp["momentum"]), epsilon=_c(tf, hp["eps"]), grad=g)


def _rmsprop(tf, p, g, s, hp, t):
    tf.raw_ops.ResourceApplyRMSProp(**_rmsprop_args(tf, p, g, s, hp))


def _rmsprop_centered(tf, p, g, s, hp, t):
    tf.raw_ops.ResourceApplyCenteredRMSProp(mg=s["mg"].handle, **_rmsprop_args(tf, p, g, s, hp))


def _adam(tf, p, g, s, hp, t):
    tf.raw_ops.ResourceApplyAdam(
        var=p.handle, m=s["m"].handle, v=s["v"].handle,
        beta1_power=tf.pow(_c(tf, hp["beta1"]), t), beta2_power=tf.pow(_c(tf, hp["beta2"]), t),
        lr=_c(tf, hp["lr"]), beta1=_c(tf, hp["beta1"]), beta2=_c(tf, hp["beta2"]), epsilon=_c(tf, hp["eps"]),
        grad=g,
    )


_FUSED = {"sgd": _sgd, "rmsprop": _rmsprop, "rmsprop_centered": _rmsprop_centered, "adam": _adam}
