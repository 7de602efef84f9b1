"""Losses on the affine output ``h`` (the output nonlinearity belongs to the loss).

Reduction: the reported loss is the mean over the batch of the per-example loss (summed over
output units). ``grad`` is the per-example gradient d loss_i / d h_i; the gradient of the batch-mean
loss is ``grad / batch``. How targets scale it is documented in ``tp_engine.engine.Engine.targets``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Loss:
    name: str
    value: Callable[[Any, Any, Any], Any]  # (B, h, y) -> per-example losses, shape (batch,)
    grad: Callable[[Any, Any, Any], Any]  # (B, h, y) -> d loss_i / d h_i
    output: Callable[[Any, Any], Any]  # (B, h) -> prediction in target space (probabilities, pixels)


def _softplus(B, h):
    return B.maximum(h, 0.0) + B.log1p(B.exp(-B.abs(h)))


def _log_softmax(B, h):
    z = h - B.max(h, axis=1, keepdims=True)
    return z - B.log(B.sum(B.exp(z), axis=1, keepdims=True))


def _softmax(B, h):
    z = B.exp(h - B.max(h, axis=1, keepdims=True))
    return z / B.sum(z, axis=1, keepdims=True)


LOSSES: dict[str, Loss] = {
    "softmax_ce": Loss(
        "softmax_ce",
        value=lambda B, h, y: -B.sum(y * _log_softmax(B, h), axis=1),
        grad=lambda B, h, y: _softmax(B, h) - y,
        output=_softmax,
    ),
    "sigmoid_ce": Loss(
        "sigmoid_ce",
        value=lambda B, h, y: B.sum(_softplus(B, h) - y * h, axis=1),
        grad=lambda B, h, y: B.sigmoid(h) - y,
        output=lambda B, h: B.sigmoid(h),
    ),
    "sigmoid_l2": Loss(
        "sigmoid_l2",
        value=lambda B, h, y: 0.5 * B.sum((B.sigmoid(h) - y) * (B.sigmoid(h) - y), axis=1),
        grad=lambda B, h, y: (B.sigmoid(h) - y) * B.sigmoid(h) * (1.0 - B.sigmoid(h)),
        output=lambda B, h: B.sigmoid(h),
    ),
    "l2": Loss(
        "l2",
        value=lambda B, h, y: 0.5 * B.sum((h - y) * (h - y), axis=1),
        grad=lambda B, h, y: h - y,
        output=lambda B, h: h,
    ),
}
