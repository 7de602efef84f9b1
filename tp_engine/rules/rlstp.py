"""rlstp (seed err_alg 2): targets through each op's regularized inverse f_rinv (gamma)."""
from tp_engine.ops import RinvOpts
from tp_engine.rules.base import OpByOpRule


class RLSTP(OpByOpRule):
    name = "rlstp"

    def invert(self, B, op, p, y, x0, y0, cfg):
        opts = RinvOpts(steps=cfg.rinv_steps, lr=cfg.rinv_lr, th=cfg.inv_threshold)
        return op.f_rinv(B, y, x0, p, cfg.gamma, opts)
