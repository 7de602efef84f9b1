"""The parameter distributions of a spec, one model each; ``distribution`` picks the model."""
from __future__ import annotations

import copy
import math
import random
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from worker.spec.errors import FieldError, SpecError

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
