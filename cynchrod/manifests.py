"""Manifests: YAML files in, frozen ``AppSpec`` values (or located errors) out.

Called by the reconciler on each pass and by ``cynchrod validate``. Parsing is
ruamel.yaml (for line numbers) then JSON Schema (``schemas/app.schema.json``)
then semantic checks. Results are cached by git blob id, so a pass over a
commit whose files did not change parses nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import shlex
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any

import jsonschema
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent

from cynchrod import specs
from cynchrod.errors import ManifestError

MAX_MANIFEST_BYTES = 1024 * 1024
MANIFEST_SUFFIXES = (".yaml", ".yml")
#: Keys people reach for that would escape the sandbox: refused with their own code.
FORBIDDEN_KEYS = frozenset(
    {
        "privileged", "cap_add", "capAdd", "devices", "network_mode", "networkMode",
        "pid", "ipc", "security_opt", "securityOpt", "volumes", "binds", "user",
    }
)
_SCHEMA_CODES = {
    "additionalProperties": "unknown_key",
    "required": "missing_key",
    "type": "invalid_type",
    "oneOf": "invalid_type",
    "minimum": "out_of_range",
    "maximum": "out_of_range",
    "exclusiveMinimum": "out_of_range",
    "minLength": "out_of_range",
    "maxLength": "out_of_range",
    "minItems": "out_of_range",
    "pattern": "invalid_value",
    "enum": "invalid_value",
    "propertyNames": "invalid_value",
}


def load_schema(name: str) -> dict[str, Any]:
    text = resources.files("cynchrod").joinpath("schemas", name).read_text()
    result: dict[str, Any] = json.loads(text)
    return result


_SCHEMA = load_schema("app.schema.json")
_VALIDATOR = jsonschema.Draft202012Validator(_SCHEMA)
_PROPERTIES = frozenset(_SCHEMA["properties"])


def is_manifest_path(path: str) -> bool:
    return path.endswith(MANIFEST_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Result:
    """What one file gave: a spec, or the errors that stop it."""

    path: str
    spec: specs.AppSpec | None
    errors: tuple[ManifestError, ...] = ()


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


def _plain(node: Any) -> Any:
    """Round-trip nodes to plain JSON-able values (timestamps become ISO strings)."""
    if isinstance(node, (datetime.date, datetime.datetime)):
        return node.isoformat()
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _line_of(doc: Any, path: Iterable[Any]) -> int:
    """1-based line of the key at ``path`` in a round-trip document."""
    node, line = doc, (doc.lc.line + 1 if isinstance(doc, (CommentedMap, CommentedSeq)) else 1)
    for part in path:
        if isinstance(node, CommentedMap) and part in node:
            line = node.lc.key(part)[0] + 1
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and part < len(node):
            line = node.lc.item(part)[0] + 1
            node = node[part]
        else:
            break
    return line


def _schema_errors(path: str, doc: CommentedMap, data: dict[str, Any]) -> list[ManifestError]:
    errors: list[ManifestError] = []
    for err in sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        where = list(err.absolute_path)
        if err.validator == "additionalProperties":
            parent = doc
            for part in where:
                parent = parent[part]
            allowed = _PROPERTIES if not where else set()
            for key in parent:
                if key in allowed:
                    continue
                forbidden = key in FORBIDDEN_KEYS
                reason = "is not allowed: cynchrod never grants it" if forbidden else "is not a known key"
                errors.append(ManifestError(
                    f"{'.'.join(map(str, [*where, key]))} {reason}",
                    code="policy_violation" if forbidden else "unknown_key", path=path,
                    line=_line_of(doc, [*where, key])))
            continue
        if "propertyNames" in err.schema_path:
            where = [*where, err.instance]
        field = ".".join(map(str, where)) or "manifest"
        message = err.message.replace("'", "") if err.validator == "required" else f"{field}: {err.message}"
        errors.append(
            ManifestError(message, code=_SCHEMA_CODES.get(str(err.validator), "invalid_manifest"), path=path,
                          line=_line_of(doc, where))
        )
    return sorted(errors, key=lambda e: e.line)


def _command(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(shlex.split(value))
    return tuple(str(v) for v in value)


def _env(value: Mapping[str, Any] | None) -> tuple[tuple[str, str], ...]:
    def text(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return str(v)

    return tuple(sorted((str(k), text(v)) for k, v in (value or {}).items()))


def parse(path: str, raw: bytes) -> Result:
    """Parse and validate one manifest file. Never raises for bad input."""

    def fail(message: str, code: str, line: int = 1) -> Result:
        return Result(path, None, (ManifestError(message, code=code, path=path, line=line),))

    if len(raw) > MAX_MANIFEST_BYTES:
        return fail(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} byte limit", "manifest_too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return fail(f"not UTF-8 ({exc.reason})", "yaml_syntax")
    yaml = _yaml()
    try:
        # Aliases are refused before composing: expanding them is how a
        # "billion laughs" file makes a small input huge.
        for event in yaml.parse(io.StringIO(text)):
            if isinstance(event, AliasEvent):
                line = event.start_mark.line + 1 if event.start_mark else 1
                return fail("YAML aliases are not allowed in manifests", "yaml_alias", line)
        docs = list(yaml.load_all(io.StringIO(text)))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        return fail(str(exc.problem or exc.context or "invalid YAML"), "yaml_syntax", line)
    except YAMLError as exc:
        return fail(str(exc).splitlines()[0], "yaml_syntax")
    docs = [d for d in docs if d is not None]
    if len(docs) != 1:
        return fail(f"expected exactly one YAML document, found {len(docs)}", "invalid_manifest")
    doc = docs[0]
    if not isinstance(doc, CommentedMap):
        return fail("a manifest must be a mapping of keys to values", "invalid_type", _line_of(doc, []))
    data = _plain(doc)
    errors = _schema_errors(path, doc, data)
    if not errors:
        errors = _semantic_errors(path, doc, data)
    if errors:
        return Result(path, None, tuple(errors))
    return Result(path, _to_spec(path, data))


def _semantic_errors(path: str, doc: CommentedMap, data: dict[str, Any]) -> list[ManifestError]:
    errors = []
    if "services" in data:
        errors.append(ManifestError("services: multi-service apps are not supported yet", code="unsupported",
                                    path=path, line=_line_of(doc, ["services"])))
    elif "image" not in data:
        errors.append(ManifestError("image is required (or services)", code="missing_key", path=path,
                                    line=_line_of(doc, [])))
    if "hostPort" in data and "port" not in data:
        errors.append(ManifestError("hostPort needs port", code="invalid_value", path=path,
                                    line=_line_of(doc, ["hostPort"])))
    return errors


def _to_spec(path: str, data: dict[str, Any]) -> specs.AppSpec:
    service = specs.ServiceSpec(
        name=specs.MAIN_SERVICE,
        image=data["image"],
        command=_command(data.get("command")),
        env=_env(data.get("env")),
        port=data.get("port"),
        host_port=data.get("hostPort"),
        cpu=float(data.get("cpu", specs.DEFAULT_CPU)),
        memory=int(data.get("memory", specs.DEFAULT_MEMORY_MB)),
    )
    restarted = data.get("restartedAt")
    return specs.AppSpec(
        org=data.get("org", specs.DEFAULT_ORG),
        name=data["name"],
        services=(service,),
        domain=data.get("domain"),
        state=data.get("state", "running"),
        restarted_at=None if restarted is None else str(restarted),
        path=path,
    )


@dataclasses.dataclass(frozen=True)
class Desired:
    """The desired state one commit declares: good apps plus per-file errors."""

    apps: dict[tuple[str, str], specs.AppSpec]
    errors: tuple[ManifestError, ...]
    #: Paths of files that failed, so their last good spec can be kept.
    failed_paths: frozenset[str]


class Cache:
    """Parse results keyed by blob id; only ids seen in the last load are kept."""

    def __init__(self) -> None:
        self._results: dict[str, Result] = {}
        self.parses = 0

    def load(self, files: Iterable[tuple[str, str]], read: Callable[[str], bytes]) -> Desired:
        """``files`` is (path, blob id) pairs; ``read(blob id)`` is called on a miss only."""
        kept: dict[str, Result] = {}
        apps: dict[tuple[str, str], specs.AppSpec] = {}
        errors: list[ManifestError] = []
        failed: set[str] = set()
        for path, oid in sorted(files):
            key = f"{oid}:{path}"
            result = self._results.get(key)
            if result is None:
                result = parse(path, read(oid))
                self.parses += 1
            kept[key] = result
            if result.spec is None:
                errors.extend(result.errors)
                failed.add(path)
                continue
            other = apps.get(result.spec.key)
            if other is not None:
                errors.append(ManifestError(
                    f"app {result.spec.org}/{result.spec.name} is already declared in {other.path}",
                    code="duplicate_app", path=path, line=1))
                failed.add(path)
                continue
            apps[result.spec.key] = result.spec
        self._results = kept
        return Desired(apps=apps, errors=tuple(errors), failed_paths=frozenset(failed))
