"""Local optimizers, written once against the backend so both paths update identically.

The update rules follow Keras's definitions, so a reader can check them against a known
implementation: RMSprop keeps ``eps`` inside the square root (Lee et al.'s centered RMSprop:
``sqrt(E[g^2] - E[g]^2 + eps)``), Adam adds it after.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tp_engine.config import OptimizerConfig

DEFAULT_EPS = {"sgd": 0.0, "rmsprop": 1e-3, "rmsprop_centered": 1e-3, "adam": 1e-8}


class Optimizer:
    """Updates a fixed list of backend variables from their gradients."""

    def __init__(self, B, cfg: OptimizerConfig, params: list[Any]):
        self.B, self.cfg, self.params = B, cfg, params
        self.eps = cfg.eps if cfg.eps is not None else DEFAULT_EPS[cfg.name]
        zeros = lambda p: B.variable(np.zeros(tuple(p.shape), np.float32))  # noqa: E731
        self.slots: dict[str, list[Any]] = {}
        if cfg.name in ("rmsprop", "rmsprop_centered"):
            self.slots["ms"] = [zeros(p) for p in params]
            if cfg.name == "rmsprop_centered":
                self.slots["mg"] = [zeros(p) for p in params]
        if cfg.name == "adam":
            self.slots["m"] = [zeros(p) for p in params]
            self.slots["v"] = [zeros(p) for p in params]
        if cfg.name != "adam":  # momentum 0 keeps the slot inert (TensorFlow's fused ops need it)
            self.slots["mom"] = [zeros(p) for p in params]
        self.t = B.variable(np.zeros((), np.float32))

    def apply(self, grads: list[Any]) -> None:
        B = self.B
        B.assign(self.t, self.t + 1.0)
        if self.cfg.weight_decay:
            grads = [g + self.cfg.weight_decay * p for p, g in zip(self.params, grads)]
        fused = getattr(B, "optimizer_step", None)
        if fused is None:
            return self.apply_reference(grads)
        hp = self.cfg.model_dump()
        hp["eps"] = self.eps
        for i, (p, g) in enumerate(zip(self.params, grads)):
            fused(self.cfg.name, p, g, {k: v[i] for k, v in self.slots.items()}, hp, self.t)

    def apply_reference(self, grads: list[Any]) -> None:
        """The update formulas, as array expressions (``t`` already incremented). Backends may
        supply a fused ``optimizer_step`` that computes the same thing in one pass."""
        B, c = self.B, self.cfg
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if c.clip_norm is not None:
                norm = B.sqrt(B.sum(g * g))
                g = g * B.minimum(1.0, c.clip_norm / (norm + 1e-12))
            if c.name == "adam":
                m, v = self.slots["m"][i], self.slots["v"][i]
                B.assign(m, m + (g - m) * (1.0 - c.beta1))
                B.assign(v, v + (g * g - v) * (1.0 - c.beta2))
                lr_t = c.lr * B.sqrt(1.0 - c.beta2**self.t) / (1.0 - c.beta1**self.t)
                B.assign(p, p - lr_t * m / (B.sqrt(v) + self.eps))
                continue
            if c.name == "sgd":  # slot holds m*slot + g (TensorFlow's convention)
                mom = self.slots["mom"][i]
                B.assign(mom, c.momentum * mom + g)
                B.assign(p, p - c.lr * mom)
                continue
            ms = self.slots["ms"][i]
            B.assign(ms, c.rho * ms + (1.0 - c.rho) * g * g)
            denom = ms + self.eps
            if c.name == "rmsprop_centered":
                mg = self.slots["mg"][i]
                B.assign(mg, c.rho * mg + (1.0 - c.rho) * g)
                denom = denom - mg * mg
            mom = self.slots["mom"][i]  # m*mom + lr*g/sqrt(denom) (TensorFlow's convention)
            B.assign(mom, c.momentum * mom + c.lr * g / B.sqrt(denom))
            B.assign(p, p - mom)
