"""What the spec needs to know about TrialConfig's fields: every dotted path and its kind."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tp_engine.config import TrialConfig, field_paths
from worker.spec.translate import _unwrap_optional

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
