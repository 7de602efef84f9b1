"""The spec's sections besides its parameters: search, early stopping, resources, failures,
published figures and the report's grouping."""
from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tp_engine.config import TrialConfig
from worker.spec.distributions import _STRICT, Finite, Positive
from worker.spec.errors import FieldError, SpecError
from worker.spec.translate import _field_errors

MAX_TRIALS = 100_000


class SearchConfig(BaseModel):
    model_config = _STRICT

    method: Literal["grid", "random", "optuna"] = "grid"
    # Tune semantics: the grid is repeated num_samples times; sampled parameters drawn each time.
    num_samples: int = Field(1, ge=1, le=MAX_TRIALS)
    metric: str = "valid_accuracy"
    mode: Literal["max", "min"] = "max"
    max_concurrent_trials: int | None = Field(None, ge=1)
    time_budget_s: Positive | None = None
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] | None = Field(None, min_length=1, max_length=1000)
    repeats: int | None = Field(None, ge=1, le=1000)

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_./-]{1,200}", v):
            raise ValueError("must be a metric name (1-200 letters, digits, '_', '.', '/' or '-')")
        return v

    @model_validator(mode="after")
    def _seeds(self):
        if self.seeds is not None and self.repeats is not None:
            raise SpecError.at("repeats", "give either search.seeds or search.repeats, not both")
        if self.seeds is not None:
            first: dict[int, int] = {}
            dup = []
            for i, s in enumerate(self.seeds):
                if s in first:
                    dup.append(FieldError(f"seeds[{i}]", f"duplicate seed {s} (also seeds[{first[s]}])"))
                first.setdefault(s, i)
            if dup:
                raise SpecError(dup)
        return self

    @property
    def seed_list(self) -> list[int]:
        if self.seeds is not None:
            return list(self.seeds)
        return list(range(self.repeats or 1))


class EarlyStopConfig(BaseModel):
    """ASHA on ``training_iteration`` (one per epoch)."""

    model_config = _STRICT

    enabled: bool = False
    grace_period: int = Field(1, ge=1)
    reduction_factor: Finite = Field(2, ge=2)
    max_t: int | None = Field(None, ge=1)  # None: the largest number of epochs a trial can run


class ResourcesConfig(BaseModel):
    model_config = _STRICT

    cpus_per_trial: Positive = 1
    gpus_per_trial: Finite = Field(0, ge=0)

    @model_validator(mode="after")
    def _whole_above_one(self):
        # Ray accepts fractions of one CPU/GPU, but quantities above 1 must be whole numbers.
        bad = [FieldError(name, f"{v} is above 1 and not a whole number (Ray refuses that)")
               for name, v in (("cpus_per_trial", self.cpus_per_trial),
                               ("gpus_per_trial", self.gpus_per_trial))
               if v > 1 and v != int(v)]
        if bad:
            raise SpecError(bad)
        return self


class FailureConfig(BaseModel):
    model_config = _STRICT

    max_failures: int = Field(0, ge=-1)  # -1: retry forever (Tune semantics)


class Published(BaseModel):
    model_config = _STRICT

    source: str = Field(min_length=1, max_length=500)
    metric: Literal["test_error", "test_accuracy"] = "test_error"
    # Keyed by rule (dtp), or by group (dtp/fashion_mnist) when the report groups trials.
    values: dict[str, float] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _keys(cls, v: dict[str, float]) -> dict[str, float]:
        errors: list[FieldError] = []
        for key in v:
            rule = key.split("/")[0]
            try:
                TrialConfig.model_validate({"rule": rule})
            except ValidationError as e:
                errors.extend(FieldError(key, f"{rule!r}: {fe.reason}") for fe in _field_errors(e, TrialConfig)
                              if fe.path == "rule")
        if errors:
            raise SpecError(errors)
        return v


class ReportConfig(BaseModel):
    """How the comparison groups trials: by rule, and by the values of these grid parameters."""

    model_config = _STRICT

    group_by: list[str] = Field(default_factory=list)
