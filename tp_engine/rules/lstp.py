"""lstp (seed err_alg 1): targets through each op's least-squares inverse f_inv."""
from tp_engine.rules.base import OpByOpRule


class LSTP(OpByOpRule):
    name = "lstp"

    def invert(self, B, op, p, y, x0, y0, cfg):
        return op.f_inv(B, y, x0, p, cfg.inv_threshold)
