"""Turn a validated :class:`~worker.spec.SweepSpec` into Ray Tune objects.

The param space holds the sampled parameters by dotted path, and the grid as one dimension of
whole points (``{"grid_point": grid_search([{path: value, ..., "seed": s}, ...])}``) so that
trials start longest first; the trainable flattens its config with :func:`trial_params` and
builds its trial config with ``spec.trial_config(params)``.

Note: ``to_search_alg`` and ``to_scheduler`` carry ``metric``/``mode`` themselves, so do not also
pass them to ``tune.TuneConfig`` (Tune refuses a scheduler configured twice).
"""
from __future__ import annotations

from typing import Any

from ray import tune

from worker.spec import (
    ChoiceParam,
    LogUniformParam,
    QLogUniformParam,
    QUniformParam,
    RandIntParam,
    SweepSpec,
    UniformParam,
    ValuesParam,
)


def _domain(dist: Any) -> Any:
    if isinstance(dist, ValuesParam):
        return tune.grid_search(list(dist.values))
    if isinstance(dist, ChoiceParam):
        return tune.choice(list(dist.values))
    if isinstance(dist, UniformParam):
        return tune.uniform(dist.min, dist.max)
    if isinstance(dist, LogUniformParam):
        return tune.loguniform(dist.min, dist.max)
    if isinstance(dist, QUniformParam):
        return tune.quniform(dist.min, dist.max, dist.q)
    if isinstance(dist, QLogUniformParam):
        return tune.qloguniform(dist.min, dist.max, dist.q)
    if isinstance(dist, RandIntParam):
        return tune.randint(dist.min, dist.max + 1)  # spec: max inclusive; Tune: upper exclusive
    raise TypeError(f"unknown distribution {dist!r}")


# The key of the one grid dimension: each value is a whole grid point with its seed.
GRID_KEY = "grid_point"


def to_param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's ``param_space``: the sampled parameters, and the grid (values parameters x seeds)
    as one dimension whose values are whole points in ``spec.grid_points()``'s order, longest
    first. (Given one grid dimension per parameter, Tune would vary the first in sorted key order
    fastest, whatever the cost.) With optuna, which cannot take a grid, the spec guarantees a
    single seed, passed as a constant."""
    space = {path: _domain(dist) for path, dist in spec.parameters.items() if not isinstance(dist, ValuesParam)}
    if spec.search.method == "optuna":
        space["seed"] = spec.seeds[0]
    else:
        space[GRID_KEY] = tune.grid_search(spec.grid_points())
    return space


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's dotted-path parameters and seed, flat, from the config Tune gives it (a sweep
    started before the grid became one dimension has them flat already)."""
    flat = {k: v for k, v in config.items() if k != GRID_KEY}
    flat.update(config.get(GRID_KEY) or {})
    return flat


def to_search_alg(spec: SweepSpec) -> Any:
    """None (Tune's BasicVariantGenerator) for grid/random; OptunaSearch for optuna, limited to
    ``max_concurrent_trials`` when set (a ConcurrencyLimiter with the same limit as
    TuneConfig.max_concurrent_trials is accepted by Tune)."""
    if spec.search.method != "optuna":
        return None
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    alg: Any = OptunaSearch(metric=spec.search.metric, mode=spec.search.mode, seed=spec.seeds[0])
    if spec.search.max_concurrent_trials:
        alg = ConcurrencyLimiter(alg, max_concurrent=spec.search.max_concurrent_trials)
    return alg


def to_scheduler(spec: SweepSpec) -> Any:
    """ASHA over epochs (``training_iteration``) when early stopping is enabled, else None."""
    es = spec.early_stop
    if not es.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="training_iteration",
        metric=spec.search.metric,
        mode=spec.search.mode,
        max_t=spec.max_t(),
        grace_period=es.grace_period,
        reduction_factor=es.reduction_factor,
    )
