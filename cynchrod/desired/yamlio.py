"""YAML in and out: the only module that imports ruamel.yaml.

Every YAML cynchrod reads — manifests from Git, ``POST /apps`` bodies, the
``--config`` file, the files imperative calls edit — comes through ``load``
or ``load_roundtrip``, so the guards are the same everywhere:

* size: at most ``MAX_BYTES`` (1 MiB);
* aliases (``*name``) are refused before anything is built: expanding them
  is how a few hundred bytes become gigabytes ("billion laughs"); compose files
  (``load_roundtrip(..., aliases=True)``) may use them, as real ones do
  (``x-common: &common`` ... ``<<: *common``): ``plain`` then counts the values
  it expands and stops at ``MAX_NODES``, so a billion laughs is refused all the same;
* nesting: at most ``MAX_DEPTH`` levels of mappings and lists, checked on the
  parser's event stream, so a deep document is refused in microseconds instead
  of recursing (``RecursionError``) in the composer; flow collections (``[``,
  ``{``) are counted by the scanner as it reads them (``_Scanner``), before its
  look-ahead makes their depth cost the square of itself;
* the result is plain JSON-like data (``plain``): string keys only; strings,
  integers, floats, booleans and null; dates become ISO strings; anything else
  (``!!binary``, ``!!set``, custom tags, complex keys) is refused with a line.

Any failure is a ``YamlError`` with a stable code and a 1-based line; no other
exception leaves this module for bad input (the guarantee callers rely on to
turn one bad file into that file's error).
"""

from __future__ import annotations

import datetime
import io
import math
from collections.abc import Iterable, Mapping
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, NodeEvent
from ruamel.yaml.scalarstring import DoubleQuotedScalarString
from ruamel.yaml.scanner import RoundTripScanner
from ruamel.yaml.util import load_yaml_guess_indent

from cynchrod.core.errors import YamlError as YamlError

MAX_BYTES = 1024 * 1024
#: Mappings and lists nested deeper than this are refused (a manifest needs about 5).
MAX_DEPTH = 32
#: Nodes (scalars, mappings, lists) in one document: bounds the work a 1 MiB file can ask for.
MAX_NODES = 200_000


def _line(event: Any) -> int:
    mark = getattr(event, "start_mark", None)
    return int(mark.line) + 1 if mark is not None else 1


def _decode(raw: bytes | str) -> str:
    if isinstance(raw, str):
        if len(raw) > MAX_BYTES:  # characters, checked again as bytes below when it matters
            raise YamlError(f"over the {MAX_BYTES} byte limit", code="too_large")
        return raw
    if len(raw) > MAX_BYTES:
        raise YamlError(f"{len(raw)} bytes, over the {MAX_BYTES} byte limit", code="too_large")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(f"not UTF-8 ({exc.reason})") from exc


def _too_deep(line: int) -> YamlError:
    return YamlError(f"nested more than {MAX_DEPTH} levels deep", code="yaml_too_deep", line=line)


class _Scanner(RoundTripScanner):
    """ruamel's round-trip scanner, refusing a flow collection (``[``, ``{``) nested past
    ``MAX_DEPTH`` as it reads the bracket. The scanner looks up to 1,024 characters ahead
    for the end of a possible simple key, and checks every open one at each token: a line
    of a thousand ``[`` took 0.8 s before the parser's events reached the depth check
    (cProfile: ``stale_possible_simple_keys``). A flow level is a level of the depth, so
    this refuses nothing the event check lets through."""

    def fetch_flow_collection_start(self, TokenClass: Any, to_push: str) -> None:
        if self.flow_level >= MAX_DEPTH:
            raise _too_deep(self.reader.get_mark().line + 1)
        super().fetch_flow_collection_start(TokenClass, to_push)


def _check_events(text: str, *, aliases: bool = False) -> None:
    """Walk the parser's events (no document is built): aliases, depth, node count."""
    depth = nodes = 0
    yaml = YAML(typ="rt")
    yaml.Scanner = _Scanner
    try:
        for event in yaml.parse(io.StringIO(text)):
            if isinstance(event, AliasEvent) and not aliases:
                raise YamlError("YAML aliases are not allowed", code="yaml_alias", line=_line(event))
            if isinstance(event, NodeEvent):
                nodes += 1
                if nodes > MAX_NODES:
                    raise YamlError(f"more than {MAX_NODES} values", code="too_large", line=_line(event))
            if isinstance(event, CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _too_deep(_line(event))
            elif isinstance(event, CollectionEndEvent):
                depth -= 1
    except YamlError:
        raise
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlError(str(exc.problem or exc.context or "invalid YAML"),
                        line=mark.line + 1 if mark is not None else 1) from exc
    except Exception as exc:  # the parser's own bugs included: bad input never escapes as a crash
        raise YamlError(_first_line(exc)) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _compose(text: str, *, roundtrip: bool) -> list[Any]:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    if roundtrip:
        yaml.preserve_quotes = True
    try:
        return [d for d in yaml.load_all(io.StringIO(text)) if d is not None]
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise YamlError(str(exc.problem or exc.context or "invalid YAML"),
                        line=mark.line + 1 if mark is not None else 1) from exc
    except Exception as exc:  # e.g. an integer of 5,000 digits (ValueError), a bad timestamp
        raise YamlError(_first_line(exc)) from exc


def load_roundtrip(raw: bytes | str, *, aliases: bool = False) -> Any:
    """One document as ruamel's round-trip nodes (comments, order and line numbers kept).

    Guarded like ``load``; ``None`` for an empty document. Several documents are an
    ``invalid_manifest`` error. ``aliases``: anchors and aliases are allowed (compose files);
    ``plain`` bounds what they expand to.
    """
    text = _decode(raw)
    _check_events(text, aliases=aliases)
    docs = _compose(text, roundtrip=True)
    if len(docs) > 1:
        raise YamlError(f"expected exactly one YAML document, found {len(docs)}", code="invalid_manifest")
    return docs[0] if docs else None


def load(raw: bytes | str) -> Any:
    """One YAML document as plain data (dict, list, str, int, float, bool, None)."""
    doc = load_roundtrip(raw)
    return plain(doc)


def plain(node: Any, _depth: int = 0, _line: int = 1, _left: list[int] | None = None) -> Any:
    """Round-trip nodes as plain JSON-like values; ``YamlError`` for anything else.

    Timestamps become ISO strings. Float values are kept as they are (``.nan``
    included): finiteness is a schema rule (``validation``), reported with its key.
    At most ``MAX_NODES`` values are made (what aliases expand to counts).
    """
    if _left is None:
        _left = [MAX_NODES]
    _left[0] -= 1
    if _left[0] < 0:
        raise YamlError(f"expands to more than {MAX_NODES} values (aliases?)", code="too_large", line=_line)
    if isinstance(node, (CommentedMap, CommentedSeq)) and node.lc.line is not None:
        _line = node.lc.line + 1
    if _depth > MAX_DEPTH:
        raise _too_deep(_line)
    if isinstance(node, str):
        return _text(node, _line)
    if node is None or isinstance(node, (bool, int, float)):
        return _scalar(node)
    if isinstance(node, (datetime.date, datetime.datetime)):
        return node.isoformat()
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            at = _key_line(node, key, _line)
            if not isinstance(key, str):
                raise YamlError(f"keys must be strings, got {_describe(key)}", code="invalid_type", line=at)
            out[_text(key, at)] = plain(value, _depth + 1, at, _left)
        return out
    if isinstance(node, list):
        return [plain(v, _depth + 1, _item_line(node, i, _line), _left) for i, v in enumerate(node)]
    raise YamlError(f"unsupported value {_describe(node)} (only strings, numbers, booleans, null, "
                    "mappings and lists)", code="invalid_type", line=_line)


def _scalar(value: Any) -> Any:
    """ruamel's scalar subclasses (ScalarFloat, ScalarInt, quoted strings) as built-in types."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def _text(value: str, line: int) -> str:
    """A string that every later step can store and send: no NUL, no lone surrogate ("\\udcff")."""
    if "\0" in value:
        raise YamlError("strings may not contain NUL characters", code="invalid_value", line=line)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise YamlError("a string is not valid Unicode text (a lone surrogate escape)", code="invalid_value",
                        line=line) from exc
    return str(value)


def _describe(value: Any) -> str:
    tag = getattr(getattr(value, "tag", None), "value", None)
    if tag:
        return f"a value tagged {tag}"
    return f"a {type(value).__name__.replace('Commented', '').lower()}"


def _key_line(node: Any, key: Any, default: int) -> int:
    try:
        return int(node.lc.key(key)[0]) + 1
    except Exception:
        return default


def _item_line(node: Any, index: int, default: int) -> int:
    try:
        return int(node.lc.item(index)[0]) + 1
    except Exception:
        return default


def line_of(doc: Any, path: Iterable[Any]) -> int:
    """1-based line of the key (or item) at ``path`` in a round-trip document; best effort."""
    node = doc
    line = doc.lc.line + 1 if isinstance(doc, (CommentedMap, CommentedSeq)) and doc.lc.line is not None else 1
    for part in path:
        try:
            if isinstance(node, CommentedMap) and part in node:
                line = node.lc.key(part)[0] + 1
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                line = node.lc.item(part)[0] + 1
                node = node[part]
            else:
                break
        except Exception:
            break
    return line


def is_mapping(doc: Any) -> bool:
    return isinstance(doc, CommentedMap)


def is_finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


# -- writing ----------------------------------------------------------------------------


def _writer(indent: dict[str, int] | None = None) -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap the user's long lines
    if indent:
        yaml.indent(**indent)
    return yaml


def guess_indent(text: str) -> dict[str, int]:
    """Indentation of nested mappings and of "- " items, as the file has them (call after a guarded load)."""
    try:
        _, sequence, offset = load_yaml_guess_indent(text)
    except Exception:
        sequence, offset = None, None
    mapping = 2
    for line in text.splitlines():
        body = line.lstrip(" ")
        if body and len(body) < len(line) and not body.startswith(("-", "#")):
            mapping = len(line) - len(body)
            break
    offset = offset or 0
    return {"mapping": mapping, "sequence": sequence or offset + 2, "offset": offset}


def dump_roundtrip(doc: Any, *, indent: dict[str, int] | None = None) -> bytes:
    out = io.StringIO()
    _writer(indent).dump(doc, out)
    return out.getvalue().encode("utf-8")


def new_mapping(items: Iterable[tuple[str, Any]], *, header: str | None = None) -> Any:
    doc = CommentedMap()
    for key, value in items:
        doc[key] = value
    if header:
        doc.yaml_set_start_comment(header)
    return doc


def double_quoted(text: str) -> str:
    """A string written with double quotes (timestamps that must stay strings)."""
    quoted: str = DoubleQuotedScalarString(text)
    return quoted


def same_style(old: Any, text: str) -> str:
    """``text`` written the way ``old`` was (plain, 'single' or "double" quoted, literal ...)."""
    from ruamel.yaml.scalarstring import ScalarString

    if isinstance(old, ScalarString):
        styled: str = type(old)(text)
        return styled
    return text
