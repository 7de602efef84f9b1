"""fwdtp: fixed-weight difference target propagation (Shibuya, Inoue, Sakai, Yairi 2023).

dtp's targets through feedback maps g_l(h) = tanh(h B_l) that are drawn once and never trained."""
from tp_engine.feedback import Feedback
from tp_engine.rules.dtp import DTP


class FWDTP(DTP):
    name = "fwdtp"
    summary = "dtp with fixed random feedback, never trained (Shibuya et al. 2023)"
    cost = 1.2
    feedback = Feedback("layerwise", bias=False, init="uniform")
    defaults = {  # code defaults of the authors' Main.py (docs/rules.md)
        "top_target": "output",
        "optimizer": {"name": "sgd", "lr": 1e-3, "momentum": 0.0},
        # stepsize 1e-2 on the summed loss = alpha / batch on our batch-mean one (batch 256).
        "alpha": 2.56,
        "batch_size": 256,
        "feedback_init_scale": 1e-3,
    }
