"""dfa: direct feedback alignment (Nokland 2016).

The output error reaches every hidden layer l through its own fixed random matrix B_l
(n_out x n_l): t_l = h_l - e B_l, so the local update is (e B_l) * s'(a_l), as in the paper."""
from tp_engine.feedback import Feedback
from tp_engine.rules.base import DirectRule


class DFA(DirectRule):
    name = "dfa"
    summary = "the output error sent to each layer by a fixed random matrix (Nokland 2016)"
    cost = 1.0
    uses_alpha = False
    # Meulemans et al. 2020's DFA: frozen xavier-normal direct feedback (their tuned recipe).
    feedback = Feedback("direct", activation="linear", bias=False, init="xavier_normal")
    defaults = {
        "optimizer": {"name": "adam", "lr": 3.81e-4, "beta1": 0.9, "beta2": 0.999},
        "top_target": "output",
    }
