"""Local optimizers, as a table like ``OPS``: each optimizer declares once its state slots, its
default ``eps`` and its update, written against the backend.

The update rules follow Keras's definitions, so a reader can check them against a known
implementation: RMSprop keeps ``eps`` inside the square root (Lee et al.'s centered RMSprop:
``sqrt(E[g^2] - E[g]^2 + eps)``), Adam adds it after. Momentum slots follow TensorFlow's fused
ops (``mom = m*mom + step``), so the TensorFlow path can use them directly.

Training calls ``B.optimizer_step`` (part of the backend interface) once per parameter. The NumPy
backend runs fused numba kernels (``tp_engine/backends/numpy_kernels.py``) and TensorFlow its raw
training ops, both computing these formulas in one pass; an optimizer without a fused kernel runs
:func:`array_step`, the table's array expressions, on either backend. The independent oracle the
tests compare every path against is written separately, in float64, in ``tests/test_engine.py``.

Adding an optimizer: one ``defopt`` below (its name then becomes a valid ``optimizer.name``);
hyperparameters it needs beyond OptimizerConfig's go there too.

This module imports no NumPy at load time: the config takes the optimizer names from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from tp_engine.config import OptimizerConfig


@dataclass(frozen=True)
class OptimizerDef:
    name: str
    # Per-parameter state, zeros at the start; saved with the engine's state under these names.
    slots: tuple[str, ...]
    # eps when OptimizerConfig.eps is None.
    default_eps: float
    # update(B, p, g, s, hp, t): one parameter's step as array expressions. ``s`` maps slot names
    # to this parameter's slot variables, ``hp`` is OptimizerConfig as a dict (eps resolved),
    # ``t`` the step count, already incremented; ``g`` is already clipped.
    update: Callable[..., None]


OPTIMIZERS: dict[str, OptimizerDef] = {}


def defopt(name: str, slots: tuple[str, ...], default_eps: float, update: Callable[..., None]) -> OptimizerDef:
    OPTIMIZERS[name] = OptimizerDef(name, slots, default_eps, update)
    return OPTIMIZERS[name]


# -- sgd: mom = m*mom + g; p -= lr*mom ---------------------------------------------------------
def _sgd(B, p, g, s, hp, t):
    mom = s["mom"]
    B.assign(mom, hp["momentum"] * mom + g)
    B.assign(p, p - hp["lr"] * mom)


# -- rmsprop (centered: the running mean of g is subtracted under the square root) --------------
def _rmsprop(B, p, g, s, hp, t, centered=False):
    rho = hp["rho"]
    ms = s["ms"]
    B.assign(ms, rho * ms + (1.0 - rho) * g * g)
    denom = ms + hp["eps"]
    if centered:
        mg = s["mg"]
        B.assign(mg, rho * mg + (1.0 - rho) * g)
        denom = denom - mg * mg
    mom = s["mom"]  # momentum 0 keeps the slot inert (TensorFlow's fused ops need it)
    B.assign(mom, hp["momentum"] * mom + hp["lr"] * g / B.sqrt(denom))
    B.assign(p, p - mom)


def _rmsprop_centered(B, p, g, s, hp, t):
    _rmsprop(B, p, g, s, hp, t, centered=True)


# -- adam (bias correction folded into the step size) -------------------------------------------
def _adam(B, p, g, s, hp, t):
    m, v = s["m"], s["v"]
    B.assign(m, m + (g - m) * (1.0 - hp["beta1"]))
    B.assign(v, v + (g * g - v) * (1.0 - hp["beta2"]))
    lr_t = hp["lr"] * B.sqrt(1.0 - hp["beta2"] ** t) / (1.0 - hp["beta1"] ** t)
    B.assign(p, p - lr_t * m / (B.sqrt(v) + hp["eps"]))


defopt("sgd", ("mom",), 0.0, _sgd)
defopt("rmsprop", ("ms", "mom"), 1e-3, _rmsprop)
defopt("rmsprop_centered", ("ms", "mg", "mom"), 1e-3, _rmsprop_centered)
defopt("adam", ("m", "v"), 1e-8, _adam)

DEFAULT_EPS: dict[str, float] = {name: d.default_eps for name, d in OPTIMIZERS.items()}


def array_step(B, name: str, p, g, slots: dict[str, Any], hp: dict[str, Any], t) -> None:
    """One parameter's update from the table, as array expressions: ``Backend.optimizer_step``
    for an optimizer the backend has no fused kernel for."""
    if hp["clip_norm"] is not None:
        norm = B.sqrt(B.sum(g * g))
        g = g * B.minimum(1.0, hp["clip_norm"] / (norm + 1e-12))
    OPTIMIZERS[name].update(B, p, g, slots, hp, t)


class Optimizer:
    """Updates a fixed list of backend variables from their gradients."""

    def __init__(self, B, cfg: OptimizerConfig, params: list[Any]):
        import numpy as np  # here, not at the top: the config imports this module and stays light

        self.B, self.cfg, self.params = B, cfg, params
        spec = OPTIMIZERS[cfg.name]
        self.eps = cfg.eps if cfg.eps is not None else spec.default_eps
        self.slots: dict[str, list[Any]] = {
            slot: [B.variable(np.zeros(tuple(p.shape), np.float32)) for p in params] for slot in spec.slots
        }
        self.t = B.variable(np.zeros((), np.float32))
        self.hp = {**cfg.model_dump(), "eps": self.eps}
        # A backend may step every parameter at once (NumPy: FusedOptimizer); optional, so a
        # backend without it goes through optimizer_step one parameter at a time.
        make = getattr(B, "fused_optimizer", None)
        self._fused = make(cfg.name, params, self.slots, self.hp) if make is not None else None

    def apply(self, grads: list[Any]) -> None:
        B = self.B
        B.assign(self.t, self.t + 1.0)
        if self.cfg.weight_decay:
            grads = [g + self.cfg.weight_decay * p for p, g in zip(self.params, grads)]
        if self._fused is not None:
            self._fused.step(grads, float(B.to_numpy(self.t)))
            return
        for i, (p, g) in enumerate(zip(self.params, grads)):
            B.optimizer_step(self.cfg.name, p, g, {k: v[i] for k, v in self.slots.items()}, self.hp, self.t)
