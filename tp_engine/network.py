"""The layered network: parameters, initialization and the forward pass.

Layer ``l`` (1..L) is three ops: ``u = h_{l-1} W_l`` (linear), ``a = u + b_l`` (add),
``h_l = s(a)`` (activation; the output layer L is affine, its nonlinearity belongs to the loss).
Lists are indexed by layer number; index 0 is unused so code reads like the formulas.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tp_engine.feedback import Feedback
from tp_engine.ops import OPS, Op, activation


def init_matrix(rng: np.random.Generator, n_in: int, n_out: int, scheme: str, scale: float = 1e-3) -> np.ndarray:
    """Xavier uniform +-sqrt(6/(fan_in+fan_out)); 'orthogonal' then sets all singular values to 1
    (Lee et al. 2015); 'xavier_normal': N(0, 2/(fan_in+fan_out)) (Meulemans et al. 2020);
    'uniform': U(+-scale) (Shibuya et al. 2023)."""
    if scheme == "xavier_normal":
        return (np.sqrt(2.0 / (n_in + n_out)) * rng.standard_normal((n_in, n_out))).astype(np.float32)
    if scheme == "uniform":
        return rng.uniform(-scale, scale, size=(n_in, n_out)).astype(np.float32)
    r = np.sqrt(6.0 / (n_in + n_out))
    w = rng.uniform(-r, r, size=(n_in, n_out))
    if scheme == "orthogonal":
        u, _, vt = np.linalg.svd(w, full_matrices=False)
        w = u @ vt
    return w.astype(np.float32)


@dataclass
class Forward:
    """Values of one forward pass: hs[0] = x, hs[l] = h_l, as_[l] = a_l (pre-activation)."""

    hs: list[Any]
    as_: list[Any]


class Network:
    def __init__(self, B, sizes: list[int], act: str, init: str, seed_seq: np.random.SeedSequence,
                 inverse_layers: list[int] = (), feedback: Feedback | None = None, feedback_scale: float = 1e-3):
        self.B = B
        self.sizes = list(sizes)
        self.L = len(sizes) - 1
        self.act_name = act
        self.act: Op = activation(act)
        rng = np.random.default_rng(seed_seq)
        self.W: list[Any] = [None]
        self.b: list[Any] = [None]
        for l in range(1, self.L + 1):
            self.W.append(B.variable(init_matrix(rng, sizes[l - 1], sizes[l], init)))
            self.b.append(B.variable(np.zeros(sizes[l], np.float32)))
        # Feedback maps (tp_engine/feedback.py), drawn after the forward weights: layer-wise
        # g_l: h_l -> h_{l-1} (dtp's inverses, fa's B_l), or direct from the output to h_l.
        fb = feedback or Feedback("layerwise")
        self.inverse_layers = list(inverse_layers)
        self.fb_act: Op = self.act if fb.activation == "hidden" else OPS["linear_act"]
        self.V: dict[int, Any] = {}
        self.c: dict[int, Any] = {}
        for l in self.inverse_layers:
            n_from, n_to = (sizes[l], sizes[l - 1]) if fb.kind == "layerwise" else (sizes[-1], sizes[l])
            scheme = init if fb.init == "forward" else fb.init
            self.V[l] = B.variable(init_matrix(rng, n_from, n_to, scheme, feedback_scale))
            if fb.bias:
                self.c[l] = B.variable(np.zeros(n_to, np.float32))

    def layer_act(self, l: int) -> Op:
        return OPS["linear_act"] if l == self.L else self.act

    def forward(self, x) -> Forward:
        B = self.B
        hs, as_ = [x], [None]
        for l in range(1, self.L + 1):
            a = B.matmul(hs[-1], self.W[l]) + self.b[l]
            as_.append(a)
            hs.append(self.layer_act(l).f(B, a))
        return Forward(hs, as_)

    def chain(self, fwd: Forward, l: int) -> list[tuple[Op, Any, Any, Any]]:
        """Layer l's ops in forward order, as (op, param, input x0, output y0)."""
        u = fwd.as_[l] - self.b[l]
        return [
            (OPS["linear"], self.W[l], fwd.hs[l - 1], u),
            (OPS["add"], self.b[l], u, fwd.as_[l]),
            (self.layer_act(l), None, fwd.as_[l], fwd.hs[l]),
        ]

    def inverse(self, l: int, h):
        """g_l(h) = s(h V_l + c_l): the feedback map of layer l (dtp's learned inverse into h_{l-1};
        for direct feedback, from the output into h_l). Linear and bias-free when the rule says."""
        z = self.B.matmul(h, self.V[l])
        return self.fb_act.f(self.B, z + self.c[l] if l in self.c else z)

    def forward_params(self) -> list[Any]:
        return [p for l in range(1, self.L + 1) for p in (self.W[l], self.b[l])]

    def inverse_params(self) -> list[Any]:
        return [p for l in self.inverse_layers for p in ((self.V[l], self.c[l]) if l in self.c else (self.V[l],))]

    # -- persistence: plain numpy arrays, loadable by either backend -----------------------
    def state(self) -> dict[str, np.ndarray]:
        B = self.B
        out = {}
        for l in range(1, self.L + 1):
            out[f"W{l}"] = np.array(B.to_numpy(self.W[l]))
            out[f"b{l}"] = np.array(B.to_numpy(self.b[l]))
        for l in self.inverse_layers:
            out[f"V{l}"] = np.array(B.to_numpy(self.V[l]))
            if l in self.c:
                out[f"c{l}"] = np.array(B.to_numpy(self.c[l]))
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        B = self.B
        for l in range(1, self.L + 1):
            B.assign(self.W[l], B.asarray(state[f"W{l}"]))
            B.assign(self.b[l], B.asarray(state[f"b{l}"]))
        for l in self.inverse_layers:
            if f"V{l}" in state:
                B.assign(self.V[l], B.asarray(state[f"V{l}"]))
                if l in self.c:
                    B.assign(self.c[l], B.asarray(state[f"c{l}"]))
