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

This module imports only the standard library, PyYAML, Pydantic and ``tp_engine.config`` so a
spec validates quickly without Ray, TensorFlow, MLflow or NumPy.
"""
from __future__ import annotations

import copy
import difflib
import itertools
import json
import math
import os
import random
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tp_engine.config import TrialConfig, field_paths, merge, set_path

MAX_SPEC_BYTES = 1 << 20  # 1 MiB
MAX_TRIALS = 100_000
DOCUMENT = "<document>"

# --------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class FieldError:
    """One problem: ``path`` is dotted with list indices as ``[i]``; ``reason`` is for humans."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class SpecError(ValueError):
    """An invalid sweep spec. ``errors`` lists every problem found; ``str()`` gives one per line."""

    def __init__(self, errors: list[FieldError]):
        self.errors = list(errors)
        super().__init__(self.errors)

    @classmethod
    def at(cls, path: str, reason: str) -> "SpecError":
        return cls([FieldError(path, reason)])

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


def _join(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def _fmt_loc(loc: typing.Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out = _join(out, f"[{part}]" if isinstance(part, int) else str(part))
    return out


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _unwrap_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _suggest(word: str, options: list[str]) -> list[str]:
    return difflib.get_close_matches(word, options, n=3, cutoff=0.6)


def _or(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model a (raw Pydantic) location points into, for 'unknown key' suggestions."""
    if root is SweepSpec and len(loc) == 3 and loc[0] == "parameters":
        return PARAM_MODELS.get(loc[2])
    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
        if field is None:
            return None
        ann = _unwrap_optional(field.annotation)
        model = ann if _is_model(ann) else None
    return model


def _field_errors(exc: ValidationError, root: type[BaseModel], prefix: str = "") -> list[FieldError]:
    """Pydantic errors -> FieldErrors, with readable paths and reasons."""
    out: list[FieldError] = []
    for err in exc.errors(include_url=False):
        raw = tuple(err["loc"])
        loc = list(raw)
        if loc and loc[-1] == "[key]":  # a mapping key of the wrong type
            del loc[-1]
            got = _type_name(err.get("input"))
            out.append(FieldError(_join(prefix, _fmt_loc(loc)), f"keys must be strings, got {got}"))
            continue
        # Drop the discriminator tag Pydantic inserts: parameters.<path>.<tag>.<field>.
        if root is SweepSpec and len(loc) >= 3 and loc[0] == "parameters" and loc[2] in PARAM_MODELS:
            del loc[2]
        path = _join(prefix, _fmt_loc(loc))
        kind = err["type"]
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        if isinstance(inner, SpecError):
            out.extend(FieldError(_join(path, e.path), e.reason) for e in inner.errors)
            continue
        reason = err["msg"]
        if kind == "value_error" and reason.startswith("Value error, "):
            reason = reason[len("Value error, "):]
        elif kind == "assertion_error" and reason.startswith("Assertion failed, "):
            reason = reason[len("Assertion failed, "):]
        elif kind == "extra_forbidden":
            parent = _model_at(root, raw[:-1])
            key = str(raw[-1])
            allowed = list(parent.model_fields) if parent is not None else []
            close = _suggest(key, allowed)
            if "." in key and root is TrialConfig:
                reason = "unknown key; write nested fields as a mapping (optimizer: {lr: 0.01})"
            elif close:
                reason = f"unknown key; did you mean {_or(close)}?"
            elif allowed:
                reason = f"unknown key (allowed: {', '.join(allowed)})"
            else:
                reason = "unknown key"
        elif kind == "missing":
            reason = "required field is missing"
        elif kind == "union_tag_invalid":
            path = _join(path, "distribution")
            reason = f"unknown distribution {ctx.get('tag')!r}; expected one of {', '.join(PARAM_MODELS)}"
        elif kind == "union_tag_not_found":
            path = _join(path, "distribution")
            reason = f"required field is missing: one of {', '.join(PARAM_MODELS)}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            got = _type_name(err.get("input"))
            if root is SweepSpec and len(loc) == 2 and loc[0] == "parameters":
                reason = (f"expected a mapping with an explicit distribution, e.g. "
                          f"{{distribution: values, values: [...]}}; got {got} "
                          f"(a fixed value belongs in base)")
            else:
                reason = f"expected a mapping, got {got}"
        elif kind == "list_type":
            reason = f"expected a list, got {_type_name(err.get('input'))}"
        elif kind == "literal_error" and isinstance(err.get("input"), str):
            # An unknown rule, dataset, optimizer...: Pydantic names the registered ones; add the nearest.
            allowed = [a.strip().strip("'") for a in re.split(r",| or ", str(ctx.get("expected", ""))) if a.strip()]
            close = _suggest(err["input"], allowed)
            if close:
                reason = f"{reason}; did you mean {_or(close)}?"
        out.append(FieldError(path, reason))
    return out


# --------------------------------------------------------------------------------------------
# TrialConfig fields

FIELD_PATHS: tuple[str, ...] = tuple(field_paths())


def _field_kind(path: str) -> str:
    """'int', 'float', 'bool' or 'other' for a dotted TrialConfig path."""
    model: type[BaseModel] = TrialConfig
    parts = path.split(".")
    for part in parts[:-1]:
        model = _unwrap_optional(model.model_fields[part].annotation)
    ann = _unwrap_optional(model.model_fields[parts[-1]].annotation)
    if ann is bool:
        return "bool"
    if ann is int:
        return "int"
    if ann is float:
        return "float"
    return "other"


FIELD_KINDS: dict[str, str] = {p: _field_kind(p) for p in FIELD_PATHS}


def _plain(value: Any) -> Any:
    """NumPy scalars (as Tune samples them) -> Python scalars, without importing NumPy."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item() if getattr(value, "ndim", 0) == 0 else value.tolist()
    return value


# --------------------------------------------------------------------------------------------
# Parameters

_STRICT = ConfigDict(extra="forbid", strict=True)
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Param(BaseModel):
    model_config = _STRICT
    kind: ClassVar[str] = "sampled"  # "grid" (values), "sampled"

    def candidates(self) -> list[tuple[str, Any]]:
        """(relative path, value) of every value worth validating against TrialConfig."""
        raise NotImplementedError

    def sample(self, rng: random.Random) -> Any:
        raise NotImplementedError


class ValuesParam(_Param):
    """A grid dimension: every value is run."""

    kind: ClassVar[str] = "grid"
    distribution: Literal["values"]
    values: list[Any] = Field(min_length=1, max_length=10_000)

    def candidates(self) -> list[tuple[str, Any]]:
        return [(f"values[{i}]", v) for i, v in enumerate(self.values)]


class ChoiceParam(_Param):
    """One of ``values``, drawn uniformly per trial."""

    distribution: Literal["choice"]
    values: list[Any] = Field(min_length=1, max_length=10_000)

    def candidates(self) -> list[tuple[str, Any]]:
        return [(f"values[{i}]", v) for i, v in enumerate(self.values)]

    def sample(self, rng: random.Random) -> Any:
        return copy.deepcopy(rng.choice(self.values))


class _Range(_Param):
    def candidates(self) -> list[tuple[str, Any]]:
        return [("min", self.min), ("max", self.max)]  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _ordered(self):
        lo, hi = self.min, self.max  # type: ignore[attr-defined]
        if not lo < hi:
            raise SpecError.at("min", f"min ({lo}) must be less than max ({hi}); "
                                      f"put a fixed value in base")
        q = getattr(self, "q", None)
        if q is not None:
            bad = [FieldError(end, f"{end} ({v}) must be a multiple of q ({q})")
                   for end, v in (("min", lo), ("max", hi))
                   if not math.isclose(v / q, round(v / q))]
            if bad:
                raise SpecError(bad)
        return self


def _quantize(x: float, q: float) -> float:
    return float(f"{round(x / q) * q:.12g}")


class UniformParam(_Range):
    distribution: Literal["uniform"]
    min: Finite
    max: Finite

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.min, self.max)


class LogUniformParam(_Range):
    distribution: Literal["loguniform"]
    min: Positive
    max: Positive

    def sample(self, rng: random.Random) -> float:
        return math.exp(rng.uniform(math.log(self.min), math.log(self.max)))


class QUniformParam(_Range):
    distribution: Literal["quniform"]
    min: Finite
    max: Finite
    q: Positive

    def sample(self, rng: random.Random) -> float:
        return _quantize(rng.uniform(self.min, self.max), self.q)


class QLogUniformParam(_Range):
    distribution: Literal["qloguniform"]
    min: Positive
    max: Positive
    q: Positive

    def sample(self, rng: random.Random) -> float:
        x = math.exp(rng.uniform(math.log(self.min), math.log(self.max)))
        return min(max(_quantize(x, self.q), self.min), self.max)


class RandIntParam(_Range):
    """An integer in [min, max], both ends inclusive."""

    distribution: Literal["randint"]
    min: int
    max: int

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.min, self.max)


PARAM_MODELS: dict[str, type[_Param]] = {
    "values": ValuesParam,
    "choice": ChoiceParam,
    "uniform": UniformParam,
    "loguniform": LogUniformParam,
    "quniform": QUniformParam,
    "qloguniform": QLogUniformParam,
    "randint": RandIntParam,
}
FLOAT_RANGES = ("uniform", "loguniform", "quniform", "qloguniform")

Parameter = Annotated[
    Union[ValuesParam, ChoiceParam, UniformParam, LogUniformParam, QUniformParam,
          QLogUniformParam, RandIntParam],
    Field(discriminator="distribution"),
]


# --------------------------------------------------------------------------------------------
# Sections


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


# --------------------------------------------------------------------------------------------
# The spec


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


class SweepSpec(BaseModel):
    """A validated sweep. Build it with :func:`load_spec`, ``from_yaml``, ``from_file`` or
    ``from_dict`` (all raise :class:`SpecError`); ``model_validate`` raises Pydantic's error."""

    model_config = _STRICT

    name: str = Field(description="the MLflow experiment name")
    description: str | None = Field(None, max_length=100_000)
    base: dict[str, Any] = Field(default_factory=dict)
    # Per-rule settings on top of base (parameters still win): compare rules each with its own
    # recipe, e.g. Lee et al.'s bp learning rate beside their dtp one.
    # A key is a rule (dtp) or a rule on one dataset (drl/fashion_mnist), applied after the rule's.
    rule_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    search: SearchConfig = Field(default_factory=SearchConfig)
    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    failure: FailureConfig = Field(default_factory=FailureConfig)
    priority: int = 0  # higher runs first in the queue
    # Published figures to print beside ours in the comparison, e.g. a paper's test error per rule.
    published: "Published | None" = None
    # How the comparison groups trials (default: by rule only), e.g. {group_by: [dataset]}.
    report: "ReportConfig | None" = None

    # ---- validation -------------------------------------------------------------------------

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if len(v) > 200:
            raise ValueError(f"must be at most 200 characters (got {len(v)})")
        if not v.isprintable():
            raise ValueError("must contain only printable characters (no newlines or control characters)")
        return v

    @field_validator("base")
    @classmethod
    def _base(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "seed" in v:
            raise SpecError.at("seed", "set seeds in search.seeds (or search.repeats), not in base")
        try:
            TrialConfig.model_validate(v)
        except ValidationError as e:
            raise SpecError(_field_errors(e, TrialConfig)) from None
        return v

    @field_validator("rule_overrides")
    @classmethod
    def _rule_overrides(cls, v: dict[str, dict[str, Any]], info) -> dict[str, dict[str, Any]]:
        errors: list[FieldError] = []
        base = info.data.get("base") or {}
        for key, over in v.items():
            rule, _, dataset = key.partition("/")
            extra = {"rule": rule, **({"dataset": dataset} if dataset else {})}
            try:  # the key itself: a registered rule, and a known dataset
                TrialConfig.model_validate(extra)
            except ValidationError as e:
                errors.extend(FieldError(key, fe.reason) for fe in _field_errors(e, TrialConfig))
                continue
            if "seed" in over or "rule" in over or (dataset and "dataset" in over):
                errors.append(FieldError(key, "rule_overrides may not set seed, rule, or the dataset its key names"))
                continue
            try:
                data = merge(copy.deepcopy(base), copy.deepcopy(v.get(rule, {})) if dataset else {})
                TrialConfig.model_validate(merge(merge(data, copy.deepcopy(over)), extra))
            except ValidationError as e:
                errors.extend(FieldError(_join(key, fe.path), fe.reason) for fe in _field_errors(e, TrialConfig))
        if errors:
            raise SpecError(errors)
        return v

    @field_validator("parameters")
    @classmethod
    def _paths(cls, params: dict[str, _Param]) -> dict[str, _Param]:
        errors: list[FieldError] = []
        for path, dist in params.items():
            if path == "seed":
                errors.append(FieldError(path, "seed is not a parameter: list seeds in search.seeds "
                                               "(or search.repeats)"))
                continue
            if path not in FIELD_KINDS:
                close = _suggest(path, list(FIELD_PATHS))
                hint = f"; did you mean {_or(close)}?" if close else " (see tp_engine.config.field_paths())"
                errors.append(FieldError(path, "unknown parameter path" + hint))
                continue
            kind = FIELD_KINDS[path]
            if dist.distribution in FLOAT_RANGES and kind == "int":
                errors.append(FieldError(f"{path}.distribution", f"{path} is an integer field: "
                                         f"{dist.distribution} draws floats; use randint, values or choice"))
            elif isinstance(dist, _Range) and kind not in ("int", "float"):
                errors.append(FieldError(f"{path}.distribution", f"{path} is not numeric: "
                                         f"{dist.distribution} needs a number field; use values or choice"))
            if isinstance(dist, (ValuesParam, ChoiceParam)):
                seen: dict[str, int] = {}
                for i, value in enumerate(dist.values):
                    key = json.dumps(value, sort_keys=True, default=repr)
                    if key in seen:
                        errors.append(FieldError(f"{path}.values[{i}]", f"duplicate of values[{seen[key]}]"))
                    seen.setdefault(key, i)
        if errors:
            raise SpecError(errors)
        return params

    @model_validator(mode="after")
    def _cross(self) -> "SweepSpec":
        errors: list[FieldError] = []
        optuna = self.search.method == "optuna"
        for path, dist in self.parameters.items():
            where = f"parameters.{path}"
            if optuna and isinstance(dist, ValuesParam):
                errors.append(FieldError(f"{where}.distribution", "values is a grid, which optuna cannot "
                                         "search (it samples every parameter); use choice"))
            if optuna and isinstance(dist, QLogUniformParam):
                errors.append(FieldError(f"{where}.distribution", "optuna ignores the quantization of "
                                         "qloguniform; use loguniform, or method random"))
            for rel, value in dist.candidates():
                if optuna and isinstance(dist, ChoiceParam) and isinstance(value, (list, dict)):
                    errors.append(FieldError(f"{where}.{rel}", "optuna can only choose among scalars "
                                             "(string, number, boolean, null); use method random"))
                    continue
                for reason in self._value_problems(path, value):
                    errors.append(FieldError(f"{where}.{rel}", reason))
        seeds = self.search.seed_list
        if optuna and len(seeds) > 1:
            field = "search.repeats" if self.search.repeats is not None else "search.seeds"
            errors.append(FieldError(field, f"optuna proposes each configuration once and cannot run it "
                                     f"once per seed: give a single seed (got {len(seeds)}), then re-run "
                                     f"the best configurations over seeds with a grid sweep"))
        if not errors and self.early_stop.enabled:
            max_t = self.max_t()
            if self.early_stop.grace_period > max_t:
                errors.append(FieldError("early_stop.grace_period", f"grace_period "
                                         f"({self.early_stop.grace_period}) must be <= max_t ({max_t})"))
        if not errors:
            n = self.n_trials()
            if n > MAX_TRIALS:
                errors.append(FieldError("search.num_samples", f"the sweep would run {n} trials "
                                         f"(grid {self.grid_size()} x {len(seeds)} seeds x num_samples "
                                         f"{self.search.num_samples}); the limit is {MAX_TRIALS}"))
        if errors:
            raise SpecError(errors)
        return self

    @model_validator(mode="after")
    def _report_groups(self) -> "SweepSpec":
        """group_by names distinct grid parameters; published group keys name their values."""
        errors: list[FieldError] = []
        grid = self.grid_params()
        group_by = self.report.group_by if self.report else []
        for i, g in enumerate(group_by):
            if g == "rule":
                errors.append(FieldError(f"report.group_by[{i}]", "trials are always grouped by rule"))
            elif g not in grid:
                errors.append(FieldError(f"report.group_by[{i}]", f"{g!r} is not a grid parameter "
                                         f"(distribution: values) of this spec; grid: {', '.join(grid) or 'none'}"))
            elif g in group_by[:i]:
                errors.append(FieldError(f"report.group_by[{i}]", f"duplicate of {g!r}"))
        for key in (self.published.values if self.published else {}):
            parts = key.split("/")[1:]
            if not parts:
                continue  # a rule's figure: it stands for every group of that rule
            if len(parts) != len(group_by):
                errors.append(FieldError(f"published.values.{key}", f"a group key is rule/"
                                         f"{'/'.join(group_by) or '...'} (report.group_by); got {len(parts)} value(s)"))
                continue
            for g, value in zip(group_by, parts):
                allowed = [str(x) for x in grid.get(g, [])]
                if allowed and value not in allowed:
                    errors.append(FieldError(f"published.values.{key}", f"{value!r} is not a value of {g} "
                                             f"({', '.join(allowed)})"))
        if errors:
            raise SpecError(errors)
        return self

    def _value_problems(self, path: str, value: Any) -> list[str]:
        if FIELD_KINDS.get(path) in ("int", "float") and isinstance(value, bool):
            return ["expected a number, got a boolean"]
        data = copy.deepcopy(self.base)
        set_path(data, path, copy.deepcopy(value))
        try:
            TrialConfig.model_validate(data)
        except ValidationError as exc:
            found = _field_errors(exc, TrialConfig)
            return [fe.reason if fe.path == path else str(fe) for fe in found]
        return []

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Any) -> "SweepSpec":
        if not isinstance(data, dict):
            raise SpecError.at(DOCUMENT, f"spec must be a mapping (name: ..., base: ..., parameters: ...), "
                                         f"got {_type_name(data)}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise SpecError(_field_errors(e, cls)) from None

    @classmethod
    def from_yaml(cls, text: str | bytes) -> "SweepSpec":
        return cls.from_dict(_load_yaml(text))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "SweepSpec":
        p = Path(path)
        try:
            size = p.stat().st_size
            if size > MAX_SPEC_BYTES:
                raise SpecError.at(DOCUMENT, f"spec is larger than 1 MiB ({size} bytes)")
            with p.open("rb") as f:
                raw = f.read(MAX_SPEC_BYTES + 1)
        except OSError as e:
            raise SpecError.at(DOCUMENT, f"cannot read {p}: {e.strerror or e}") from None
        return cls.from_yaml(raw)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True,
                              default_flow_style=None, width=100)

    # ---- use --------------------------------------------------------------------------------

    @property
    def seeds(self) -> list[int]:
        return self.search.seed_list

    def trial_config(self, overrides: dict[str, Any] | None = None) -> TrialConfig:
        """``base`` + ``rule_overrides`` of the trial's rule + dotted-path ``overrides`` (e.g.
        Tune's config dict, with ``seed``)."""
        data = copy.deepcopy(self.base)
        overrides = overrides or {}
        rule = _plain(overrides.get("rule", data.get("rule", "dtp")))
        dataset = _plain(overrides.get("dataset", data.get("dataset", "mnist")))
        for key in (rule, f"{rule}/{dataset}"):
            if key in self.rule_overrides:
                data = merge(data, copy.deepcopy(self.rule_overrides[key]))
        for path, value in overrides.items():
            set_path(data, path, _plain(value))
        try:
            return TrialConfig.model_validate(data)
        except ValidationError as e:
            raise SpecError(_field_errors(e, TrialConfig)) from None

    def grid_params(self) -> dict[str, list[Any]]:
        return {p: d.values for p, d in self.parameters.items() if isinstance(d, ValuesParam)}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid_params().values())

    def n_trials(self) -> int:
        """grid size x seeds x num_samples (optuna: num_samples x its single seed)."""
        return self.grid_size() * len(self.seeds) * self.search.num_samples

    def expand(self, sample_seed: int = 0) -> list[dict[str, Any]]:
        """The trials the sweep will run, for a dry run.

        Order: for each of num_samples repetitions, the grid (values parameters in spec order,
        then the seed, the last varying fastest). Sampled parameters are drawn here with
        ``random.Random(sample_seed)`` for the preview only; Tune draws its own.
        """
        rng = random.Random(sample_seed)
        grid = self.grid_params()
        trials: list[dict[str, Any]] = []
        for _ in range(self.search.num_samples):
            for combo in itertools.product(*grid.values(), self.seeds):
                point = dict(zip(grid, combo[:-1]))
                params = {path: copy.deepcopy(point[path]) if path in point else dist.sample(rng)
                          for path, dist in self.parameters.items()}
                trials.append({"trial": len(trials), "params": params, "seed": combo[-1]})
        return trials

    def max_epochs(self) -> int:
        """The largest number of epochs any trial can run."""
        dist = self.parameters.get("epochs")
        if dist is None:
            return self.trial_config().epochs
        return max(self.trial_config({"epochs": v}).epochs for _, v in dist.candidates())

    def max_t(self) -> int:
        """ASHA's max_t: early_stop.max_t, or the largest number of epochs."""
        return self.early_stop.max_t or self.max_epochs()


# --------------------------------------------------------------------------------------------
# YAML


class _Refused(Exception):
    def __init__(self, mark: Any, reason: str):
        super().__init__(reason)
        self.reason = f"line {mark.line + 1}, column {mark.column + 1}: {reason}" if mark else reason


_CORE = "tag:yaml.org,2002:"
_ALLOWED_TAGS = {None, "!"} | {_CORE + t for t in ("str", "int", "float", "bool", "null", "seq", "map")}


class SpecLoader(yaml.SafeLoader):
    """SafeLoader that also refuses anchors/aliases, explicit non-core tags, duplicate keys and
    timestamps (dates stay strings), and reads 1e-4 as a float (YAML 1.2)."""

    yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in rs if tag != _CORE + "timestamp"]
        for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(event.start_mark, f"aliases are not allowed (*{event.anchor})")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise _Refused(event.start_mark, f"anchors and aliases are not allowed (&{anchor})")
        tag = getattr(event, "tag", None)
        if tag not in _ALLOWED_TAGS:
            shown = "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag
            raise _Refused(event.start_mark, f"tag {shown} is not allowed (plain YAML data only)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == _CORE + "merge":
                    continue
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.YAMLError):
                    continue  # the base class reports unhashable keys
                if key in seen:
                    raise _Refused(key_node.start_mark, f"duplicate key {key!r}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


SpecLoader.add_implicit_resolver(
    _CORE + "float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(text: str | bytes) -> Any:
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_SPEC_BYTES:
        raise SpecError.at(DOCUMENT, f"spec is larger than 1 MiB ({size} bytes)")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise SpecError.at(DOCUMENT, f"spec is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise SpecError.at(DOCUMENT, "spec is empty")
    loader = SpecLoader(text)
    try:
        data = loader.get_single_data()
    except _Refused as e:
        raise SpecError.at(DOCUMENT, e.reason) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        if isinstance(e, yaml.composer.ComposerError) and "single document" in (e.context or ""):
            reason = "a spec is a single YAML document; found a second one (---)"
        else:
            syntax = isinstance(e, (yaml.scanner.ScannerError, yaml.parser.ParserError))
            kind = "YAML syntax error" if syntax else "YAML error"
            reason = f"{kind}: " + "; ".join(x for x in (e.context, e.problem) if x)
        raise SpecError.at(DOCUMENT, where + reason) from None
    except yaml.YAMLError as e:
        raise SpecError.at(DOCUMENT, f"YAML error: {e}") from None
    except RecursionError:
        raise SpecError.at(DOCUMENT, "spec is nested too deeply") from None
    finally:
        loader.dispose()
    if data is None:
        raise SpecError.at(DOCUMENT, "spec is empty")
    return data


def load_spec(path_or_text: str | bytes | os.PathLike[str]) -> SweepSpec:
    """A spec from a file path (``Path``, or a one-line string naming a .yaml/.yml/.json file or an
    existing file) or from YAML/JSON text."""
    if isinstance(path_or_text, os.PathLike):
        return SweepSpec.from_file(path_or_text)
    if isinstance(path_or_text, str) and "\n" not in path_or_text and (
        path_or_text.endswith((".yaml", ".yml", ".json")) or os.path.isfile(path_or_text)
    ):
        return SweepSpec.from_file(path_or_text)
    return SweepSpec.from_yaml(path_or_text)


__all__ = [
    "DOCUMENT", "FIELD_PATHS", "FieldError", "MAX_SPEC_BYTES", "MAX_TRIALS", "PARAM_MODELS",
    "SearchConfig", "SpecError", "SpecLoader", "SweepSpec", "load_spec",
]
