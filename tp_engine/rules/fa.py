"""fa: feedback alignment (Lillicrap, Cownden, Tweed, Akerman 2016).

Backprop's targets, except that the error crosses layer l's weights through a fixed random
matrix B_l (drawn independently of W_l, never trained) instead of W_l^T."""
from tp_engine.feedback import Feedback
from tp_engine.rules.base import Rule


class FA(Rule):
    name = "fa"
    summary = "backprop with fixed random backward weights (Lillicrap et al. 2016)"
    cost = 1.0
    uses_alpha = False
    feedback = Feedback("layerwise", activation="linear", bias=False, init="xavier_uniform")
    defaults = {
        # No published FA recipe for this MLP: Meulemans et al.'s BP recipe (Adam, MNIST).
        "optimizer": {"name": "adam", "lr": 2.97e-4, "beta1": 0.99, "beta2": 0.999, "eps": 6.93e-8},
        "top_target": "output",
    }

    def propagate(self, B, net, cfg, l, t_l, fwd):
        d = net.layer_act(l).vjp_diff(B, fwd.hs[l], t_l, fwd.as_[l], fwd.hs[l])  # vjp(h - t)
        return fwd.hs[l - 1] - B.matmul(d, net.V[l])
