"""drl: DTP whose inverses are trained with the difference reconstruction loss
(Meulemans, Carzaniga, Suykens, Sacramento, Grewe 2020).

Targets as dtp; each g_l learns to reconstruct a corrupted h_{l-1} sent up to the output and
back down the difference-corrected chain (tp_engine/feedback.py)."""
from tp_engine.feedback import DIFFERENCE, Feedback
from tp_engine.rules.dtp import DTP


class DRL(DTP):
    name = "drl"
    summary = "dtp with the difference reconstruction loss (Meulemans et al. 2020)"
    cost = 9.3
    feedback = Feedback("layerwise", init="xavier_normal", loss=DIFFERENCE)
    defaults = {  # final_configs/mnist_DTPDRL.py of the authors' code (docs/rules.md)
        "init": "xavier_normal",
        "top_target": "output",
        "alpha": 0.0686,
        "noise": 0.0569,
        "optimizer": {"name": "adam", "lr": 4.33e-4, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8},
        "inverse_optimizer": {"name": "adam", "lr": 2.01e-5, "beta1": 0.99, "beta2": 0.999, "eps": 5.08e-8,
                              "weight_decay": 5.4e-6},
        "schedule": "per_batch",
        "feedback_pretrain_epochs": 6,
        "feedback_epochs_per_epoch": 1,
    }
