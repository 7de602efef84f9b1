"""ldrl: DTP with the local difference reconstruction loss (Ernoult, Normandin, Moudgil, Spinney,
Belilovsky, Rish, Richards, Bengio 2022).

Targets as dtp; each g_l takes several steps per batch on a layer-local loss whose minimum makes
its Jacobian the transpose of f_l's (tp_engine/feedback.py)."""
from tp_engine.feedback import LOCAL_DIFFERENCE, Feedback
from tp_engine.rules.dtp import DTP


class LDRL(DTP):
    name = "ldrl"
    summary = "dtp with the local difference reconstruction loss, several feedback steps a batch (Ernoult et al. 2022)"
    cost = 12.6
    feedback = Feedback("layerwise", init="xavier_normal", loss=LOCAL_DIFFERENCE)
    # The authors publish CIFAR-10 settings only; these were chosen on the validation split: feedback
    # SGD lr 0.1 (the loss scales with noise^2) gave 0.918 valid after 2 epochs of 10k MNIST rows
    # on 5x256, with angles to backprop of 21-44 degrees (docs/rules.md).
    defaults = {
        "init": "xavier_normal",
        "top_target": "output",
        "alpha": 0.0686,
        "noise": 0.1,
        "optimizer": {"name": "adam", "lr": 4.33e-4, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8},
        "inverse_optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
        "schedule": "per_batch",
        "feedback_iterations": 5,
        "feedback_pretrain_epochs": 1,
    }
