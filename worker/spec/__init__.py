"""The sweep spec: one YAML file describing a hyperparameter sweep over ``TrialConfig``.

Shape (every key is optional unless marked; unknown keys are refused at every level)::

    name: tp-rules-mnist          # required: the MLflow experiment name
    description: "..."
    base: {dataset: mnist, epochs: 5}   # a partial TrialConfig; omitted fields take the
                                        # per-rule defaults, then the TrialConfig defaults
    parameters:                   # dotted paths into TrialConfig -> a distribution
      rule: {distribution: values, values: [bp, lstp, rlstp, dtp]}
      optimizer.lr: {distribution: loguniform, min: 1.0e-4, max: 1.0e-2}
    search: {method: grid, num_samples: 1, metric: valid_accuracy, mode: max,
             max_concurrent_trials: null, time_budget_s: null, seeds: [0, 1, 2]}
    early_stop: {enabled: false, grace_period: 1, reduction_factor: 2, max_t: null}
    resources: {cpus_per_trial: 1, gpus_per_trial: 0}
    failure: {max_failures: 0}
    priority: 0

Distributions (``distribution`` is always explicit):

* ``values``: a grid; every value is run (``tune.grid_search``). Not allowed with optuna.
* ``choice``: one value drawn per trial (``tune.choice``).
* ``uniform`` / ``loguniform``: floats in [min, max]; loguniform needs min > 0.
* ``quniform`` / ``qloguniform``: the same, rounded to a multiple of ``q``; min and max must be
  multiples of ``q`` (Tune refuses them otherwise).
* ``randint``: an integer in [min, max], **both ends inclusive** (as W&B's ``int_uniform``).
  ``worker.search_space`` passes ``max + 1`` to ``tune.randint``, whose upper end is exclusive.

Every value a parameter can take (each values/choice element, both ends of a range) is
validated against ``TrialConfig`` on top of ``base``. Float-only distributions are refused on
integer fields (use randint, values or choice); no range is accepted on non-numeric fields.

Seeds: ``search.seeds`` (or ``search.repeats: n`` for seeds 0..n-1; default ``[0]``) is a grid
dimension: every grid point runs once per seed. ``seed`` itself is not a parameter.

``search.method``: ``grid`` and ``random`` both run Tune's default BasicVariantGenerator
(``values`` -> grid, everything else sampled ``num_samples`` times per grid point; the two names
only document intent). ``optuna`` samples every parameter with OptunaSearch, which cannot take a
grid: ``values`` is refused (use ``choice``) and exactly one seed is required, because Optuna
proposes each configuration once and cannot replay it per seed. Re-run the best configurations
over several seeds in a second (grid) sweep.

Errors are collected into one :class:`SpecError`, one ``path: reason`` per line, where the path is
dotted with list indices as ``[i]`` (``parameters.optimizer.lr.min``, ``search.seeds[1]``).
Problems with the document itself (YAML syntax, size, aliases, tags) use the path
``<document>`` and give the line and column in the reason.

Modules, one concept each: ``errors`` (FieldError, SpecError), ``translate`` (Pydantic's errors
into FieldErrors), ``distributions`` (the parameter models), ``fields`` (TrialConfig's paths and
their kinds), ``sections`` (search, early_stop, resources, failure, published, report),
``sweep_spec`` (SweepSpec and load_spec), ``yaml_loader`` (the YAML reader). Import from the
package: ``from worker.spec import SweepSpec, SpecError, load_spec``.

This package imports only the standard library, PyYAML, Pydantic and ``tp_engine.config`` so a
spec validates quickly without Ray, TensorFlow, MLflow or NumPy.
"""
from __future__ import annotations

from worker.spec.distributions import (
    FLOAT_RANGES,
    PARAM_MODELS,
    ChoiceParam,
    LogUniformParam,
    Parameter,
    QLogUniformParam,
    QUniformParam,
    RandIntParam,
    UniformParam,
    ValuesParam,
)
from worker.spec.errors import DOCUMENT, FieldError, SpecError
from worker.spec.fields import FIELD_KINDS, FIELD_PATHS
from worker.spec.sections import (
    MAX_TRIALS,
    EarlyStopConfig,
    FailureConfig,
    Published,
    ReportConfig,
    ResourcesConfig,
    SearchConfig,
)
from worker.spec.sweep_spec import SweepSpec, load_spec
from worker.spec.yaml_loader import MAX_SPEC_BYTES, SpecLoader, _load_yaml

__all__ = [
    "DOCUMENT", "FIELD_KINDS", "FIELD_PATHS", "FLOAT_RANGES", "MAX_SPEC_BYTES", "MAX_TRIALS", "PARAM_MODELS",
    "ChoiceParam", "EarlyStopConfig", "FailureConfig", "FieldError", "LogUniformParam", "Parameter",
    "Published", "QLogUniformParam", "QUniformParam", "RandIntParam", "ReportConfig", "ResourcesConfig",
    "SearchConfig", "SpecError", "SpecLoader", "SweepSpec", "UniformParam", "ValuesParam", "_load_yaml",
    "load_spec",
]
