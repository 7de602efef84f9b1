"""bp (seed err_alg 0): backprop written as targets, t = h - dloss/dh at every op."""
from tp_engine.rules.base import OpByOpRule


class BP(OpByOpRule):
    name = "bp"
    uses_alpha = False

    def invert(self, B, op, p, y, x0, y0, cfg):
        return x0 - op.vjp(B, y0 - y, x0, y0, p)
