from __future__ import annotations

from typing import Any


class Rule:
    name: str = ""
    # bp is exact backprop: it ignores the top-target step alpha (always 1).
    uses_alpha: bool = True
    # dtp trains learned inverses g_l.
    learned_inverse: bool = False

    def propagate(self, B, net, cfg, l: int, t_l: Any, fwd) -> Any:
        """Target of h_{l-1} from the target t_l of h_l."""
        raise NotImplementedError


class OpByOpRule(Rule):
    """Sends the target down through layer l's ops in reverse: activation, addition, linear."""

    def invert(self, B, op, p, y, x0, y0, cfg) -> Any:
        raise NotImplementedError

    def propagate(self, B, net, cfg, l, t_l, fwd):
        t = t_l
        for op, p, x0, y0 in reversed(net.chain(fwd, l)):
            t = self.invert(B, op, p, t, x0, y0, cfg)
        return t
