"""The sweep spec itself: :class:`SweepSpec`, its validation across sections, and what the worker
asks of it (trial configs, the grid, the trials of a dry run)."""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from tp_engine.config import TrialConfig, merge, set_path
from worker.spec.distributions import (
    _STRICT,
    FLOAT_RANGES,
    ChoiceParam,
    Parameter,
    QLogUniformParam,
    ValuesParam,
    _Param,
    _Range,
)
from worker.spec.errors import DOCUMENT, FieldError, SpecError, _join
from worker.spec.fields import FIELD_KINDS, FIELD_PATHS, _plain
from worker.spec.sections import (
    MAX_TRIALS,
    EarlyStopConfig,
    FailureConfig,
    Published,
    ReportConfig,
    ResourcesConfig,
    SearchConfig,
)
from worker.spec.translate import _field_errors, _or, _suggest, _type_name
from worker.spec.yaml_loader import MAX_SPEC_BYTES, _load_yaml


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

    def grid_points(self) -> list[dict[str, Any]]:
        """The grid's points with their seed (``{path: value, ..., "seed": s}``), in the order
        they run: longest first (``tp_engine.cost``), so that the short trials fill the slots
        at the end of a sweep; points of equal cost keep the spec's order (values parameters in
        spec order, then the seed, the last varying fastest). Sampled parameters are left out
        (they take the base value for the estimate)."""
        from tp_engine.cost import trial_cost

        grid = self.grid_params()
        points = [{**dict(zip(grid, combo[:-1])), "seed": combo[-1]}
                  for combo in itertools.product(*grid.values(), self.seeds)]

        def cost(point: dict[str, Any]) -> float:
            try:
                return trial_cost(self.trial_config(point))
            except SpecError:  # an invalid combination still fails as its own trial, as before
                return 0.0

        return sorted(points, key=lambda p: -cost(p))  # stable

    def expand(self, sample_seed: int = 0) -> list[dict[str, Any]]:
        """The trials the sweep will run, in Tune's order, for a dry run: for each of
        num_samples repetitions, :meth:`grid_points`. Sampled parameters are drawn here with
        ``random.Random(sample_seed)`` for the preview only; Tune draws its own.
        """
        rng = random.Random(sample_seed)
        points = self.grid_points()
        trials: list[dict[str, Any]] = []
        for _ in range(self.search.num_samples):
            for point in points:
                params = {path: copy.deepcopy(point[path]) if path in point else dist.sample(rng)
                          for path, dist in self.parameters.items()}
                trials.append({"trial": len(trials), "params": params, "seed": point["seed"]})
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
