"""Feedback parameters and the losses that train them.

A rule that sends targets (or errors) down through weights of its own declares a ``Feedback``:

- ``kind``: ``layerwise`` parameters ``Q_l`` map layer ``l`` to layer ``l-1`` (``l = 2..top``, as
  Lee's inverses); ``direct`` parameters map the output layer straight to each hidden layer
  (``l = 1..L-1``, shape ``n_L x n_l``);
- the map itself: ``g_l(h) = s(h Q_l + c_l)`` with the hidden activation ``s``, or linear; with
  or without the bias ``c_l``;
- how ``Q_l`` is initialized;
- ``loss``: the feedback loss it is trained on, or None for fixed feedback (never trained).

Feedback weights live in ``Network.V`` / ``Network.c`` whatever the rule, so saving, loading and
the optimizer treat them alike. Each loss below registers, side by side, the noise it needs per
layer and its gradients (a closed form for NumPy; TensorFlow differentiates ``loss_fn``), as the
ops in ``ops.py`` do. The trainer draws the noise (one array per trained layer, ``noise_width``
columns, std ``noise``) so both paths see the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal



@dataclass(frozen=True)
class FeedbackLoss:
    name: str
    # Columns of the noise array this loss needs for layer l (split inside when it needs two).
    noise_width: Callable[[Any, int], int]
    # grads(engine, fwd, l, noise) -> ([dQ_l, dc_l (if the map has a bias)], loss value)
    grads: Callable[..., tuple[list[Any], Any]]


@dataclass(frozen=True)
class Feedback:
    kind: Literal["layerwise", "direct"]
    activation: Literal["hidden", "linear"] = "hidden"
    bias: bool = True
    # forward: the forward weights' scheme (config ``init``); xavier_uniform, xavier_normal;
    # uniform: U(+-feedback_init_scale).
    init: Literal["forward", "xavier_uniform", "xavier_normal", "uniform"] = "forward"
    loss: FeedbackLoss | None = None

    @property
    def trained(self) -> bool:
        return self.loss is not None


# -- helpers ----------------------------------------------------------------------------------
def _params(net, l: int) -> list[Any]:
    return [net.V[l], net.c[l]] if l in net.c else [net.V[l]]


def _map_grads(B, net, l: int, terms, n) -> list[Any]:
    """Closed-form gradient w.r.t. (Q_l, c_l) of a loss whose only dependence on them is through
    g_l evaluated at several points: ``terms`` = [(input u, pre-activation, output, n * dloss/doutput)].
    The batch size ``n`` divides last (the order Lee's dtp has always used, kept bit for bit)."""
    act = net.fb_act
    gQ, gc = None, None
    for u, pre, out, up in terms:
        delta = act.vjp(B, up, pre, out)
        q, c = B.matmul_tn(u, delta), B.sum(delta, axis=0)
        gQ, gc = (q, c) if gQ is None else (gQ + q, gc + c)
    return [gQ / n, gc / n] if l in net.c else [gQ / n]


def _apply(B, net, l: int, u, params=None):
    """(pre-activation, output) of g_l at ``u``, with ``params`` = (Q, c) overriding the net's."""
    Q = params[0] if params is not None else net.V[l]
    pre = B.matmul(u, Q)
    if l in net.c:
        pre = pre + (params[1] if params is not None else net.c[l])
    return pre, net.fb_act.f(B, pre)


def _forward_from(B, net, x, first: int, last: int):
    """Run layers first..last on input x (a corrupted activation of layer first-1)."""
    h = x
    for k in range(first, last + 1):
        h = net.layer_act(k).f(B, B.matmul(h, net.W[k]) + net.b[k])
    return h


def _inv_sigma2(cfg) -> float:
    return 1.0 / (cfg.noise * cfg.noise) if cfg.noise > 0 else 1.0


# -- Lee et al. 2015 (dtp): reconstruct a corrupted input through one layer and back ------------
def _lee_grads(engine, fwd, l, noise):
    """mean_batch |g_l(f_l(h_{l-1}+e)) - (h_{l-1}+e)|^2."""
    B, net = engine.B, engine.net
    xc = fwd.hs[l - 1] + noise
    z = net.layer_act(l).f(B, B.matmul(xc, net.W[l]) + net.b[l])
    n = B.rows(xc)

    def loss_fn(params):
        d = _apply(B, net, l, z, params)[1] - xc
        return B.sum(d * d) / n

    pre, r = _apply(B, net, l, z)
    d = r - xc
    grads = B.local_grads(loss_fn, _params(net, l), lambda: _map_grads(B, net, l, [(z, pre, r, 2.0 * d)], n))
    return grads, B.sum(d * d) / n


LEE = FeedbackLoss("lee_reconstruction", lambda net, l: net.sizes[l - 1], _lee_grads)


# -- Meulemans et al. 2020 (drl): difference reconstruction through the rest of the network ------
def _drl_grads(engine, fwd, l, noise):
    """Corrupt h_{l-1}, run it up to the top layer, bring it back down the difference-corrected
    chain (clean activations), and penalize (1/sigma^2) mean |reconstruction - corrupted|^2 (the
    mean over batch and units, as the authors' mse). Only g_l learns: the chain above layer l is
    held constant."""
    B, net, cfg, top = engine.B, engine.net, engine.cfg, engine.top
    xc = fwd.hs[l - 1] + noise
    r = _forward_from(B, net, xc, l, top)
    for k in range(top, l, -1):  # down to layer l
        r = fwd.hs[k - 1] + net.inverse(k, r) - net.inverse(k, fwd.hs[k])
    n, s = B.rows(xc) * net.sizes[l - 1], _inv_sigma2(cfg)

    def loss_fn(params):
        d = fwd.hs[l - 1] + _apply(B, net, l, r, params)[1] - _apply(B, net, l, fwd.hs[l], params)[1] - xc
        return s * B.sum(d * d) / n

    p1, o1 = _apply(B, net, l, r)
    p2, o2 = _apply(B, net, l, fwd.hs[l])
    d = fwd.hs[l - 1] + o1 - o2 - xc
    up = 2.0 * s * d

    def manual():
        return _map_grads(B, net, l, [(r, p1, o1, up), (fwd.hs[l], p2, o2, -up)], n)

    return B.local_grads(loss_fn, _params(net, l), manual), s * B.sum(d * d) / n


DIFFERENCE = FeedbackLoss("difference_reconstruction", lambda net, l: net.sizes[l - 1], _drl_grads)


# -- Meulemans et al. 2020 (ddtp_linear): the same for direct linear feedback ----------------------
def _ddtp_grads(engine, fwd, l, noise):
    """Corrupt h_l, run it to the output, and reconstruct h_l + e as h_l + (a_L' - a_L) Q_l:
    (1/sigma^2) mean |(a_L' - a_L) Q_l - e|^2 (over batch and units, the authors' mse)."""
    B, net, cfg = engine.B, engine.net, engine.cfg
    L = net.L
    dout = _forward_from(B, net, fwd.hs[l] + noise, l + 1, L) - fwd.hs[L]
    n, s = B.rows(dout) * net.sizes[l], _inv_sigma2(cfg)

    def loss_fn(params):
        d = _apply(B, net, l, dout, params)[1] - noise
        return s * B.sum(d * d) / n

    pre, o = _apply(B, net, l, dout)
    d = o - noise
    grads = B.local_grads(loss_fn, _params(net, l), lambda: _map_grads(B, net, l, [(dout, pre, o, 2.0 * s * d)], n))
    return grads, s * B.sum(d * d) / n


DIRECT_DIFFERENCE = FeedbackLoss("direct_difference_reconstruction", lambda net, l: net.sizes[l], _ddtp_grads)


# -- Ernoult et al. 2022 (ldrl): local difference reconstruction ----------------------------------
def _ldrl_grads(engine, fwd, l, noise):
    """With r = g_l(h_l): dr = g_l(f_l(h_{l-1} + e)) - r and dr_y = g_l(h_l + eta) - r; the loss
    mean_batch [-2 e.dr + |dr_y|^2] (sums over units, as the authors') is minimized when g_l's
    Jacobian is the transpose of f_l's. ``noise`` holds e (n_{l-1} columns) then eta (n_l)."""
    B, net = engine.B, engine.net
    k = net.sizes[l - 1]
    e, eta = noise[:, :k], noise[:, k:]
    x, y = fwd.hs[l - 1], fwd.hs[l]
    yn = net.layer_act(l).f(B, B.matmul(x + e, net.W[l]) + net.b[l])
    ye = y + eta
    n, s = B.rows(x), 1.0

    def loss_fn(params):
        r = _apply(B, net, l, y, params)[1]
        dr = _apply(B, net, l, yn, params)[1] - r
        dry = _apply(B, net, l, ye, params)[1] - r
        return s * (B.sum(-2.0 * e * dr) + B.sum(dry * dry)) / n

    (pr, r), (pa, a), (pc, c) = _apply(B, net, l, y), _apply(B, net, l, yn), _apply(B, net, l, ye)
    dry = c - r
    loss = s * (B.sum(-2.0 * e * (a - r)) + B.sum(dry * dry)) / n

    def manual():
        ua, uc = -2.0 * s * e, 2.0 * s * dry
        return _map_grads(B, net, l, [(yn, pa, a, ua), (ye, pc, c, uc), (y, pr, r, -ua - uc)], n)

    return B.local_grads(loss_fn, _params(net, l), manual), loss


LOCAL_DIFFERENCE = FeedbackLoss(
    "local_difference_reconstruction", lambda net, l: net.sizes[l - 1] + net.sizes[l], _ldrl_grads
)

