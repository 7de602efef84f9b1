"""How long a trial will take, roughly, before it runs: enough to order a sweep's trials.

A sweep runs its trials a few at a time; started in the spec's order, a long trial that starts
last runs alone while the other slots idle (Lee's reproduction ended with one dtp trial on one
core for 11 minutes). Started longest first, the short trials fill in at the end. The estimate
only needs to rank trials: epochs x training rows x the network's weights x the rule's measured
cost per epoch (``Rule.cost``).
"""
from __future__ import annotations

import math

from tp_engine.config import TrialConfig
from tp_engine.data import SOURCES
from tp_engine.rules import RULES


def trial_cost(cfg: TrialConfig) -> float:
    """A trial's work in arbitrary units (bp on one row through one weight for one epoch = 1)."""
    source = SOURCES[cfg.dataset]
    n_in = math.prod(source.image_shape) if source.image_shape else 2
    n_out = n_in if cfg.mode == "autoencoder" else source.n_classes
    sizes = [n_in, *cfg.hidden, n_out]
    weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    rows = min((r for r in (source.train_rows, cfg.subset) if r), default=1)
    return cfg.epochs * rows * weights * RULES[cfg.rule].cost
