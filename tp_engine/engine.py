"""The engine: one training step, shared by every rule and both backends, and its state (weights
and optimizer slots) to save and load.

1. forward pass;
2. top target from the loss gradient;
3. the rule sends targets down, layer by layer;
4. each layer takes an optimizer step on its local loss |h_l - t_l|^2 (mean over the batch, as in
   Lee et al.'s code), with its input and target held constant;
5. rules with trained feedback (dtp, drl, ddtp_linear, ldrl): the feedback weights take steps on
   their own loss (tp_engine/feedback.py), before the forward weights.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tp_engine.config import TrialConfig
from tp_engine.losses import LOSSES
from tp_engine.network import Forward, Network
from tp_engine.ops import OPS
from tp_engine.optimizers import Optimizer
from tp_engine.rules import RULES, get_rule


class Engine:
    def __init__(self, B, cfg: TrialConfig, n_in: int, n_out: int, loss: str):
        self.B, self.cfg = B, cfg
        self.rule = get_rule(cfg.rule)
        self.loss = LOSSES[loss]
        sizes = [n_in, *cfg.hidden, n_out]
        L = len(sizes) - 1
        self.top = L if cfg.top_target == "output" else L - 1
        if self.top < 1:
            raise ValueError("top_target last_hidden needs at least one hidden layer")
        fb = self.rule.feedback
        if fb is None:
            inverse_layers = []
        elif fb.kind == "layerwise":  # g_l for l = 2..top (none into the input)
            inverse_layers = list(range(2, self.top + 1))
        else:  # direct: from the output to every hidden layer below the top target
            inverse_layers = list(range(1, self.top))
        init_seq, self.shuffle_seq, self.noise_seq = np.random.SeedSequence(cfg.seed).spawn(3)
        self.net = Network(B, sizes, cfg.activation, cfg.init, init_seq, inverse_layers, fb, cfg.feedback_init_scale)
        scaled = lambda o: o.model_copy(update={"lr": o.lr * cfg.lr_scale})  # noqa: E731
        self.opt = Optimizer(B, scaled(cfg.optimizer), self.net.forward_params())
        # Feedback that is trained gets its own optimizer; fixed feedback (fa, dfa, fwdtp) none.
        self.inv_opt = (
            Optimizer(B, scaled(cfg.inverse_optimizer), self.net.inverse_params())
            if inverse_layers and fb.trained else None
        )
        # Compiled entry points (TensorFlow traces these once; NumPy runs them as they are).
        self.forward_step = B.compile(self._forward_step)
        self.inverse_step = B.compile(self._inverse_step)
        self.batch_step = B.compile(self._batch_step)
        self.diagnose = B.compile(self._diagnose)
        self.predict_logits = B.compile(lambda x: self.net.forward(x).hs[-1])

    # -- targets ---------------------------------------------------------------------------
    def targets(self, fwd: Forward, y, rule=None) -> dict[int, Any]:
        """t_l for every layer l = 1..L under ``rule`` (default: this engine's rule).

        Scales follow Lee et al.'s code, so their hyperparameters carry over: the top step is
        ``alpha`` times the gradient of the batch-mean loss, and local losses are batch means of
        |h - t|^2. Exact targets (bp, and the output layer under ``last_hidden``) step by half the
        per-example gradient, which makes their local gradients equal backprop's exactly."""
        B, net, cfg = self.B, self.net, self.cfg
        rule = rule or self.rule
        n = B.rows(fwd.hs[0])
        exact = 0.5
        step = cfg.alpha / n if rule.uses_alpha else exact
        top = self.top if rule is self.rule else net.L  # the bp reference always starts at the output
        L = net.L
        g = self.loss.grad(B, fwd.hs[L], y)  # per-example d loss_i / d h_L
        t: dict[int, Any] = {}
        if top == L:
            t[L] = fwd.hs[L] - step * g
        else:
            # Lee's code: the output layer learns from the loss gradient directly, and the first
            # target sits on the last hidden layer.
            t[L] = fwd.hs[L] - exact * g
            dh = OPS["linear"].df(B, g, fwd.hs[L - 1], net.W[L])
            t[L - 1] = fwd.hs[L - 1] - step * dh
        rule.fill_targets(B, net, cfg, t, top, fwd)
        return t

    # -- local losses and their gradients ----------------------------------------------------
    def layer_grads(self, fwd: Forward, l: int, t_l) -> list[Any]:
        """Gradients of the local loss mean_batch |s(h_{l-1} W_l + b_l) - t_l|^2 w.r.t. W_l, b_l."""
        B, net = self.B, self.net
        h_in, act = fwd.hs[l - 1], net.layer_act(l)
        n = B.rows(h_in)

        def loss_fn(params):
            W, b = params
            d = act.f(B, B.matmul(h_in, W) + b) - t_l
            return B.sum(d * d) / n

        def manual():
            delta = act.vjp_diff(B, fwd.hs[l], t_l, fwd.as_[l], fwd.hs[l], 2.0)  # vjp(2 (h - t))
            return [B.matmul_tn(h_in, delta) / n, B.mean(delta, axis=0)]

        return B.local_grads(loss_fn, [net.W[l], net.b[l]], manual)

    @property
    def trained_feedback_layers(self) -> list[int]:
        return self.net.inverse_layers if self.inv_opt is not None else []

    def noise_width(self, l: int) -> int:
        """Columns of the noise array the feedback loss of layer l takes."""
        return self.rule.feedback.loss.noise_width(self.net, l)

    def inverse_grads(self, fwd: Forward, l: int, noise) -> tuple[list[Any], Any]:
        """Gradients of layer l's feedback loss w.r.t. its feedback parameters (V_l, c_l), and
        the loss (tp_engine/feedback.py; dtp: Lee's reconstruction loss)."""
        return self.rule.feedback.loss.grads(self, fwd, l, noise)

    # -- steps -----------------------------------------------------------------------------
    def _forward_step(self, x, y):
        """Update the forward weights on one batch. Returns (summed loss, correct count)."""
        B, net = self.B, self.net
        fwd = net.forward(x)
        t = self.targets(fwd, y)
        grads: list[Any] = []
        for l in range(1, net.L + 1):
            grads.extend(self.layer_grads(fwd, l, t[l]))
        self.opt.apply(grads)
        out = fwd.hs[net.L]
        loss_sum = B.sum(self.loss.value(B, out, y))
        correct = B.count(B.equal(B.argmax(out, axis=1), B.argmax(y, axis=1)))
        return loss_sum, correct

    def _inverse_step(self, x, noise):
        """Update the learned inverses on one batch; ``noise`` is one array per inverse layer."""
        net = self.net
        fwd = net.forward(x)
        grads: list[Any] = []
        for l, e in zip(self.trained_feedback_layers, noise):
            grads.extend(self.inverse_grads(fwd, l, e)[0])
        self.inv_opt.apply(grads)
        return 0

    def _batch_step(self, x, y, noise):
        """per_batch schedule: inverses first, then forward weights, on the same batch."""
        self._inverse_step(x, noise)
        return self._forward_step(x, y)

    def _diagnose(self, x, y, noise):
        """Per layer: this rule's local gradient of W_l, backprop's gradient of the global loss,
        the local loss, and the feedback loss of rules that train feedback. Nothing is updated."""
        B, net = self.B, self.net
        fwd = net.forward(x)
        t = self.targets(fwd, y)
        # bp from the output is its own reference: reuse its targets and gradients (same numbers).
        is_bp = self.rule is RULES["bp"] and self.top == net.L
        t_bp = t if is_bp else self.targets(fwd, y, rule=RULES["bp"])
        out: dict[str, Any] = {}
        for l in range(1, net.L + 1):
            g_rule = self.layer_grads(fwd, l, t[l])[0]
            g_bp = g_rule if is_bp else self.layer_grads(fwd, l, t_bp[l])[0]
            out[f"dot/{l}"] = B.sum(g_rule * g_bp)
            out[f"norm_rule/{l}"] = B.sqrt(B.sum(g_rule * g_rule))
            out[f"norm_bp/{l}"] = B.sqrt(B.sum(g_bp * g_bp))
            d = fwd.hs[l] - t[l]
            out[f"local_loss/{l}"] = B.sum(d * d) / B.rows(x)
        for l, e in zip(self.trained_feedback_layers, noise):
            out[f"inverse_loss/{l}"] = self.inverse_grads(fwd, l, e)[1]
        return out


# -- state -----------------------------------------------------------------------------------
def engine_state(engine: Engine) -> dict[str, np.ndarray]:
    """Everything needed to continue training exactly: weights and optimizer slots."""
    B = engine.B
    st = {f"net/{k}": v for k, v in engine.net.state().items()}
    for tag, opt in (("opt", engine.opt), ("inv_opt", engine.inv_opt)):
        if opt is None:
            continue
        st[f"{tag}/t"] = np.array(B.to_numpy(opt.t))
        for slot, vars_ in opt.slots.items():
            for i, v in enumerate(vars_):
                st[f"{tag}/{slot}/{i}"] = np.array(B.to_numpy(v))
    return st


def load_engine_state(engine: Engine, st: dict[str, np.ndarray]) -> None:
    """Put back what :func:`engine_state` took (on either backend)."""
    B = engine.B
    engine.net.load_state({k[4:]: v for k, v in st.items() if k.startswith("net/")})
    for tag, opt in (("opt", engine.opt), ("inv_opt", engine.inv_opt)):
        if opt is None:
            continue
        B.assign(opt.t, B.asarray(st[f"{tag}/t"]))
        for slot, vars_ in opt.slots.items():
            for i, v in enumerate(vars_):
                B.assign(v, B.asarray(st[f"{tag}/{slot}/{i}"]))
