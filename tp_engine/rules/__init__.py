"""Propagation rules. A rule says how targets are sent down (and which feedback weights it has,
and how they are trained); everything else (top target, local losses, optimizers) is shared.
Adding a rule is one module here plus its line in RULES: the spec, the CLIs and the report take
their rule names from this registry."""
from tp_engine.rules.base import Rule
from tp_engine.rules.bp import BP
from tp_engine.rules.ddtp_linear import DDTPLinear
from tp_engine.rules.dfa import DFA
from tp_engine.rules.drl import DRL
from tp_engine.rules.dtp import DTP
from tp_engine.rules.fa import FA
from tp_engine.rules.fwdtp import FWDTP
from tp_engine.rules.ldrl import LDRL
from tp_engine.rules.lstp import LSTP
from tp_engine.rules.rlstp import RLSTP

# Registration order is the order of tables and plots.
RULES: dict[str, Rule] = {r.name: r for r in (
    BP(), DTP(), RLSTP(), LSTP(), FA(), DFA(), DRL(), DDTPLinear(), LDRL(), FWDTP(),
)}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}") from None
