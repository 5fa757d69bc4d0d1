"""Round-trip edits of manifest files for imperative calls (stop, start, restart, create).

ruamel.yaml's round-trip mode keeps the user's comments, key order and quoting;
only the keys we set change. Called by ``control`` through ``Source.commit_edit``.
"""

from __future__ import annotations

import io
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.scalarstring import DoubleQuotedScalarString
from ruamel.yaml.util import load_yaml_guess_indent

from cynchrod.errors import PermanentError


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap the user's long lines
    return yaml


def _guess_indent(text: str) -> dict[str, int]:
    """Indentation of nested mappings and of "- " items, as the file has them."""
    _, sequence, offset = load_yaml_guess_indent(text)
    mapping = 2
    for line in text.splitlines():
        body = line.lstrip(" ")
        if body and len(body) < len(line) and not body.startswith(("-", "#")):
            mapping = len(line) - len(body)
            break
    offset = offset or 0
    return {"mapping": mapping, "sequence": sequence or offset + 2, "offset": offset}


def set_keys(raw: bytes, values: dict[str, Any]) -> bytes:
    """Set top-level keys of a manifest, keeping everything else as written."""
    text = raw.decode("utf-8")
    yaml = _yaml()
    yaml.indent(**_guess_indent(text))  # keep the file's own indentation
    doc = yaml.load(text)
    if not isinstance(doc, CommentedMap):
        raise PermanentError("the manifest is not a mapping; fix it in Git first", code="invalid_manifest")
    for key, value in values.items():
        doc[key] = DoubleQuotedScalarString(value) if key == "restartedAt" else value
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue().encode("utf-8")


def new_manifest(data: dict[str, Any], *, header: str | None = None) -> bytes:
    """A manifest file for ``POST /apps``: keys in the documented order."""
    order = ["name", "org", "image", "command", "port", "hostPort", "domain", "env", "cpu", "memory", "state",
             "restartedAt", "services"]
    doc = CommentedMap()
    for key in sorted(data, key=lambda k: (order.index(k) if k in order else len(order), k)):
        doc[key] = data[key]
    if header:
        doc.yaml_set_start_comment(header)
    out = io.StringIO()
    _yaml().dump(doc, out)
    return out.getvalue().encode("utf-8")
