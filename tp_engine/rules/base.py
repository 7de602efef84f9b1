from __future__ import annotations

from typing import Any

from tp_engine.feedback import Feedback


class Rule:
    name: str = ""
    # One line for tables and --help.
    summary: str = ""
    # An epoch's time relative to bp's, with the rule's defaults on Lee's net, one BLAS thread
    # (bench/engine.py; the mean of results/bench/engine_numpy_quiet.json and engine_numpy_s8.json).
    # It only orders a sweep's trials longest first (tp_engine/cost.py): a rough figure costs
    # some packing, never a result.
    cost: float = 1.0
    # bp is exact backprop: it ignores the top-target step alpha (always 1); so do fa and dfa,
    # which are backprop with other backward weights.
    uses_alpha: bool = True
    # Feedback weights of the rule's own, and how they are trained (tp_engine/feedback.py).
    feedback: Feedback | None = None
    # TrialConfig fields this rule changes from the global defaults (a user's value always wins),
    # each with where it comes from; docs/rules.md gives the sources in full.
    defaults: dict[str, Any] = {}

    def propagate(self, B, net, cfg, l: int, t_l: Any, fwd) -> Any:
        """Target of h_{l-1} from the target t_l of h_l."""
        raise NotImplementedError

    def fill_targets(self, B, net, cfg, t: dict[int, Any], top: int, fwd) -> None:
        """Targets of the layers below ``top``, given t[top] (and t[L])."""
        for l in range(top, 1, -1):
            t[l - 1] = self.propagate(B, net, cfg, l, t[l], fwd)


class OpByOpRule(Rule):
    """Sends the target down through layer l's ops in reverse: activation, addition, linear."""

    def invert(self, B, op, p, y, x0, y0, cfg) -> Any:
        raise NotImplementedError

    def propagate(self, B, net, cfg, l, t_l, fwd):
        t = t_l
        for op, p, x0, y0 in reversed(net.chain(fwd, l)):
            t = self.invert(B, op, p, t, x0, y0, cfg)
        return t


class DirectRule(Rule):
    """The output's target offset reaches every hidden layer through its own direct feedback
    map: t_l = h_l + g_l(t_L - h_L) (dfa, ddtp_linear)."""

    def fill_targets(self, B, net, cfg, t, top, fwd):
        e = t[net.L] - fwd.hs[net.L]
        for l in range(top - 1, 0, -1):
            t[l] = fwd.hs[l] + net.inverse(l, e)
