"""dtp (seed err_alg 3): difference target propagation (Lee, Zhang, Fischer, Bengio 2015).

t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l), with the learned inverse g_l(h) = s(h V_l + c_l). The
difference term cancels g_l's reconstruction error, so t_{l-1} = h_{l-1} when t_l = h_l."""
from tp_engine.feedback import LEE, Feedback
from tp_engine.rules.base import Rule


class DTP(Rule):
    name = "dtp"
    summary = "learned inverses, difference-corrected (Lee et al. 2015)"
    cost = 2.5
    feedback = Feedback("layerwise", loss=LEE)
    defaults = {  # Lee et al. 2015's published recipe
        "optimizer": {"name": "rmsprop_centered", "lr": 0.01489},
        "inverse_optimizer": {"name": "rmsprop_centered", "lr": 0.00501},
        "alpha": 0.3277,
        "noise": 0.3598,
        "top_target": "last_hidden",
        "schedule": "per_epoch",
    }

    def propagate(self, B, net, cfg, l, t_l, fwd):
        return fwd.hs[l - 1] + net.inverse(l, t_l) - net.inverse(l, fwd.hs[l])
