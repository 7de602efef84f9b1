"""bp (seed err_alg 0): backprop written as targets, t = h - dloss/dh at every op."""
from tp_engine.rules.base import OpByOpRule


class BP(OpByOpRule):
    name = "bp"
    summary = "backprop, written as targets (the reference)"
    cost = 1.0
    uses_alpha = False
    defaults = {
        # Lee et al.'s backprop baseline. At 3 epochs, seed 0, validation accuracy stayed near
        # 0.963 for lr 0.0005-0.001, Adam 3e-4-1e-3 and batch 32-100 alike.
        "optimizer": {"name": "rmsprop_centered", "lr": 0.000804},
        "alpha": 1.0,
        "top_target": "output",
    }

    def invert(self, B, op, p, y, x0, y0, cfg):
        return op.step_back(B, x0, y0, y, p)  # x0 - op.vjp(y0 - y), fused where the backend can
