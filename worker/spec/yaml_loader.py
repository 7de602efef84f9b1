"""The spec's YAML reader: plain data only (no aliases, anchors, non-core tags, duplicate keys or
timestamps), at most 1 MiB, one document; every refusal is a :class:`SpecError` at ``<document>``
with the line and column."""
from __future__ import annotations

import re
from typing import Any

import yaml

from worker.spec.errors import DOCUMENT, SpecError

MAX_SPEC_BYTES = 1 << 20  # 1 MiB


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
