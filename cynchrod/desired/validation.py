"""JSON Schema validation: the only module that imports jsonschema.

``Schema(name)`` loads ``cynchrod/desired/schemas/<name>`` (the same files as
``schemas/``) and reports every problem of a value as ``Problem`` records in
our own words, so the manifest parser and the config loader never see
jsonschema's types. JSON Schema has no word for "finite": a ``NaN`` or an
infinity compares false with every bound and would pass ``minimum`` and
``maximum``, so every non-finite number is reported here too (``out_of_range``),
whatever the schema says. YAML's ``.nan``/``.inf`` and Python's JSON ``NaN``
/``Infinity`` all meet this check.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

#: jsonschema keyword -> our error code
CODES = {
    "additionalProperties": "unknown_key",
    "required": "missing_key",
    "type": "invalid_type",
    "oneOf": "invalid_type",
    "minimum": "out_of_range",
    "maximum": "out_of_range",
    "exclusiveMinimum": "out_of_range",
    "exclusiveMaximum": "out_of_range",
    "minLength": "out_of_range",
    "maxLength": "out_of_range",
    "minItems": "out_of_range",
    "maxItems": "out_of_range",
    "minProperties": "out_of_range",
    "maxProperties": "out_of_range",
    "pattern": "invalid_value",
    "enum": "invalid_value",
    "propertyNames": "invalid_value",
    "uniqueItems": "invalid_value",
    "finite": "out_of_range",
    "not": "out_of_range",
}


@dataclasses.dataclass(frozen=True)
class Problem:
    """One schema violation: where (a path of keys and indexes), which rule, and a message."""

    path: tuple[str | int, ...]
    rule: str
    message: str
    #: For ``additionalProperties``: the keys the schema allows at ``path``.
    allowed: frozenset[str] | None = None
    #: For ``propertyNames``: the offending key.
    key: str | None = None

    @property
    def code(self) -> str:
        return CODES.get(self.rule, "invalid_manifest")


@cache
def load_document(name: str) -> dict[str, Any]:
    text = resources.files("cynchrod.desired").joinpath("schemas", name).read_text()
    result: dict[str, Any] = json.loads(text)
    return result


def non_finite(value: Any, path: tuple[str | int, ...] = ()) -> Iterator[tuple[str | int, ...]]:
    """Paths of every NaN or infinity in a JSON-like value."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from non_finite(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from non_finite(v, (*path, i))


class Schema:
    """A schema file by name (or a document built by the caller); the draft its ``$schema`` names
    (the vendored Compose Specification is draft-07, ours are 2020-12)."""

    def __init__(self, name: str, *, document: dict[str, Any] | None = None) -> None:
        self.document = document if document is not None else load_document(name)
        cls = jsonschema.validators.validator_for(self.document, default=jsonschema.Draft202012Validator)
        self._validator = cls(self.document)
        self.properties = frozenset(self.document.get("properties", {}))

    def problems(self, data: Any) -> list[Problem]:
        found: list[Problem] = []
        for path in non_finite(data):
            field = ".".join(map(str, path)) or "value"
            found.append(Problem(path, "finite", f"{field}: must be a finite number"))
        try:
            errors = list(self._validator.iter_errors(data))
        except RecursionError:
            return [*found, Problem((), "type", "the value is nested too deeply")]
        for err in sorted(errors, key=lambda e: list(map(str, e.absolute_path))):
            path = tuple(err.absolute_path)
            allowed = None
            if err.validator == "additionalProperties":
                allowed = frozenset(err.schema.get("properties", {})) if isinstance(err.schema, dict) \
                    else self.properties
            key = str(err.instance) if "propertyNames" in err.schema_path else None
            found.append(Problem(path, str(err.validator), err.message, allowed=allowed, key=key))
        return found
