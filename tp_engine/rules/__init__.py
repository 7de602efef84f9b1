"""Propagation rules. A rule says how the target of layer l-1 is made from the target of layer l;
everything else (top target, local losses, optimizers) is shared. Adding a rule is one module here
plus its line in RULES."""
from tp_engine.rules.base import Rule
from tp_engine.rules.bp import BP
from tp_engine.rules.dtp import DTP
from tp_engine.rules.lstp import LSTP
from tp_engine.rules.rlstp import RLSTP

RULES: dict[str, Rule] = {r.name: r for r in (BP(), LSTP(), RLSTP(), DTP())}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}") from None
