"""ddtp_linear: direct difference target propagation with linear feedback (Meulemans et al. 2020).

t_l = h_l + (t_L - h_L) Q_l for every hidden layer, with Q_l (n_out x n_l) trained on the
difference reconstruction loss of a corrupted h_l sent to the output (tp_engine/feedback.py)."""
from tp_engine.feedback import DIRECT_DIFFERENCE, Feedback
from tp_engine.rules.base import DirectRule


class DDTPLinear(DirectRule):
    name = "ddtp_linear"
    summary = "direct linear feedback from the output, difference reconstruction loss (Meulemans et al. 2020)"
    cost = 3.6
    feedback = Feedback("direct", activation="linear", bias=False, init="xavier_normal", loss=DIRECT_DIFFERENCE)
    defaults = {  # final_configs/mnist_DDTPlinear.py of the authors' code (docs/rules.md)
        "init": "xavier_normal",
        "top_target": "output",
        "alpha": 0.0610,
        "noise": 0.0908,
        "optimizer": {"name": "adam", "lr": 3.34e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1.26e-8},
        "inverse_optimizer": {"name": "adam", "lr": 1.64e-4, "beta1": 0.999, "beta2": 0.999, "eps": 2.84e-4,
                              "weight_decay": 5.8e-7},
        "schedule": "per_batch",
        "feedback_pretrain_epochs": 6,
        "feedback_epochs_per_epoch": 1,
    }
