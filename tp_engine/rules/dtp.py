"""dtp (seed err_alg 3): difference target propagation (Lee, Zhang, Fischer, Bengio 2015).

t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l), with the learned inverse g_l(h) = s(h V_l + c_l). The
difference term cancels g_l's reconstruction error, so t_{l-1} = h_{l-1} when t_l = h_l."""
from tp_engine.rules.base import Rule


class DTP(Rule):
    name = "dtp"
    learned_inverse = True

    def propagate(self, B, net, cfg, l, t_l, fwd):
        return fwd.hs[l - 1] + net.inverse(l, t_l) - net.inverse(l, fwd.hs[l])
