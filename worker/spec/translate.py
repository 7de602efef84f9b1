"""Pydantic's validation errors translated into :class:`FieldError`s a person can act on: readable
paths (without Pydantic's union tags), reasons without Pydantic's prefixes, and the nearest allowed
key or name ("did you mean ...?")."""
from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from tp_engine.config import TrialConfig
from worker.spec.distributions import PARAM_MODELS
from worker.spec.errors import FieldError, SpecError, _fmt_loc, _join


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


def _is_spec(root: type[BaseModel]) -> bool:
    """The sweep spec, whose ``parameters`` map paths to distributions (the other root is TrialConfig)."""
    return "parameters" in root.model_fields


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model a (raw Pydantic) location points into, for 'unknown key' suggestions."""
    if _is_spec(root) and len(loc) == 3 and loc[0] == "parameters":
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
        if _is_spec(root) and len(loc) >= 3 and loc[0] == "parameters" and loc[2] in PARAM_MODELS:
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
            if _is_spec(root) and len(loc) == 2 and loc[0] == "parameters":
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
