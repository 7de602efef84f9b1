"""A spec's problems: one :class:`FieldError` per problem, gathered into one :class:`SpecError`,
with paths dotted and list indices as ``[i]`` (``parameters.optimizer.lr.min``, ``search.seeds[1]``)."""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

DOCUMENT = "<document>"  # the path of problems with the document itself (YAML, size)


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
