"""cynchrod's rules for compose files: Compose's merge, the subset it runs, and its refusals.

Called by ``compose._Loader`` once the files are read, interpolated and valid under the Compose
Specification. Every key is either mapped onto ``ServiceSpec``, ignored as Compose ignores it
(``version``) or with a warning (``container_name``: cynchrod names containers), or refused with a
code naming the key and the rule: ``policy_violation`` for what the manifest policy forbids,
``unsupported_key`` for the rest. Nothing is dropped silently. ``docs/compose.md`` is the table.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import posixpath
import re
import shlex
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from cynchrod.core import specs, updates
from cynchrod.core.codes import Code
from cynchrod.core.errors import ManifestError
from cynchrod.desired import manifests, validation
from cynchrod.desired.compose import files

if TYPE_CHECKING:
    from cynchrod.desired.compose import _Loader

log = logging.getLogger("cynchrod.compose")

TOP_KEYS = frozenset({"version", "name", "services", "volumes", "include", "secrets", "configs", "networks"})
SERVICE_KEYS = frozenset({
    "image", "command", "entrypoint", "environment", "env_file", "ports", "expose", "volumes", "tmpfs", "restart",
    "depends_on", "healthcheck", "labels", "user", "working_dir", "hostname", "stop_signal", "stop_grace_period",
    "init", "read_only", "deploy", "container_name", "profiles", "cpus", "mem_limit", "mem_reservation", "secrets",
    "configs", "tty", "stdin_open", "networks", "build",
})
#: A top-level network's keys cynchrod takes (its one private network is a bridge it makes).
NETWORK_KEYS = frozenset({"driver"})
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                        r"[A-Za-z0-9])?)*$")
#: Keys the manifest policy forbids, with the rule each breaks (a false/empty value is the default: allowed).
POLICY = {
    "privileged": "a privileged container owns the host",
    "devices": "host devices are never passed in",
    "cap_add": "no capability is on the allow-list",
    "security_opt": "security options are never relaxed",
    "use_api_socket": "the Docker socket is never mounted",
    "cgroup_parent": "containers stay in cynchrod's cgroup",
    "volumes_from": "another container's mounts are not shared",
}
#: Keys whose value ``host`` shares a host namespace.
HOST_NAMESPACES = ("network_mode", "pid", "ipc", "userns_mode", "uts")
KNOWN_RUNTIMES = ("runc", "io.containerd.runc.v2")
DEPENDS_CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
DEPLOY_KEYS = frozenset({"replicas", "resources"})
RESOURCE_KEYS = frozenset({"cpus", "memory"})
#: ``x-cynchrod`` keys of health-gated deploys (docs/health.md): the app's ``on_failure``, and
#: ``min_ready`` and ``health_timeout`` for each of its services, as a native manifest's top level.
READINESS_KEYS = frozenset({"min_ready", "health_timeout", "on_failure"})
HEALTH_KEYS = frozenset({"test", "interval", "timeout", "retries", "start_period", "disable"})
X_CYNCHROD_KEYS = frozenset({"org", "domain", "state", "restartedAt", "files", "profiles", "update"}) | READINESS_KEYS
#: cynchrod's keys of one service, under ``services.<name>.x-cynchrod``.
X_SERVICE_KEYS = frozenset({"update"})
_APP_SCHEMA = validation.load_document("app.schema.json")
_X_SCHEMA = validation.Schema("x-cynchrod", document={
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        **{k: _APP_SCHEMA["properties"][k] for k in ("org", "domain", "state", "restartedAt", *sorted(READINESS_KEYS))},
        "files": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "profiles": {"type": "array", "items": {"type": "string"}},
        "update": _APP_SCHEMA["$defs"]["update"],
    },
})
_X_SERVICE_SCHEMA = validation.Schema("x-cynchrod of a service", document={
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {"update": _APP_SCHEMA["$defs"]["update"]},
})
UPDATE_KEYS = frozenset(_APP_SCHEMA["$defs"]["update"]["properties"])
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmg]?)b?\s*$", re.I)
_BYTE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
#: As for a secret of the store (``desired.secrets``).
MAX_SECRET_BYTES = 64 * 1024
_PORT = re.compile(r"^(?:(?P<ip>\[[0-9a-fA-F:]*\]|\d+\.\d+\.\d+\.\d+):)?(?:(?P<published>\d+)?:)?(?P<target>\d+)"
                   r"(?:/(?P<protocol>tcp|udp|sctp))?$")
#: Lists Compose unions when merging files; other lists are replaced.
_UNION = ("ports", "expose", "tmpfs", "dns", "dns_search", "external_links")


def merge(base: dict[str, Any], over: Mapping[str, Any], where: tuple[str, ...] = ()) -> dict[str, Any]:
    """Compose's merge of a later file over an earlier one: mappings merged, ``environment``,
    ``labels`` and ``volumes`` (by mount path) merged by key, some lists unioned, others replaced."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        in_service = len(where) == 2 and where[0] == "services"
        if in_service and key in ("environment", "labels") and old is not None:
            out[key] = {**_pairs(old), **_pairs(value)}
        elif in_service and key == "volumes" and isinstance(old, list) and isinstance(value, list):
            by_target = {_volume_target(v): v for v in old}
            by_target.update({_volume_target(v): v for v in value})
            out[key] = list(by_target.values())
        elif in_service and key in _UNION and isinstance(old, list) and isinstance(value, list):
            out[key] = [*old, *[v for v in value if v not in old]]
        elif isinstance(old, dict) and isinstance(value, dict) and key not in ("command", "entrypoint"):
            out[key] = merge(old, value, (*where, key))
        else:
            out[key] = value
    return out


def _pairs(value: Any) -> dict[str, Any]:
    """``environment``/``labels`` as a mapping, from the list (``A=1``, ``A``) or mapping form."""
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, Any] = {}
    for item in value or []:
        key, sep, rest = str(item).partition("=")
        out[key] = rest if sep else None
    return out


def _volume_target(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("target", ""))
    parts = str(entry).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def duration(value: Any) -> float:
    """Compose's durations (``1m30s``, ``500ms``, a bare number of seconds) in seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    pieces = _DURATION.findall(text)
    if not pieces or "".join(n + u for n, u in pieces) != text:
        raise ValueError(f"{value!r} is not a duration (e.g. 30s, 1m30s, 500ms)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in pieces)


def megabytes(value: Any) -> int:
    """A Compose byte size (``512m``, ``1g``, ``1gb``, a number of bytes) in whole MB."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = float(value)
    else:
        found = _BYTES.match(str(value))
        if found is None:
            raise ValueError(f"{value!r} is not a size (e.g. 512m, 1g)")
        size = float(found.group(1)) * _BYTE_UNITS[found.group(2).lower()]
    mb = size / 1024 ** 2
    if not mb.is_integer():
        raise ValueError(f"{value!r} is not a whole number of MB")
    return int(mb)


def _command(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(shlex.split(value))
    return tuple(str(v) for v in value)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


class _Rules:
    def __init__(self, loader: _Loader, merged: dict[str, Any]) -> None:
        self.loader = loader
        self.merged = merged
        self.errors: list[ManifestError] = []
        #: The app's org and name (where its writable copies go), once read.
        self.org = loader.default_org()
        self.app = ""

    def err(self, message: str, code: str, where: list[Any]) -> None:
        path, line = self.loader.locate(where)
        self.errors.append(ManifestError(message, code=code, path=path, line=line))

    def unsupported(self, where: list[Any], why: str = "") -> None:
        field = _field(where)
        self.err(f"{field}: not supported by cynchrod{': ' + why if why else ''} (docs/compose.md lists the "
                 "supported keys)", Code.UNSUPPORTED_KEY, where)

    def check(self, where: list[Any], parse: Callable[[], Any]) -> Any:
        try:
            return parse()
        except ValueError as exc:
            self.err(f"{_field(where)}: {exc}", Code.INVALID_VALUE, where)
            return None


def _field(where: list[Any]) -> str:
    """``services.web.ports[0].mode`` for a path of keys and indexes."""
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def to_result(loader: _Loader, merged: dict[str, Any]) -> manifests.Result:
    rules = _Rules(loader, merged)
    ext = merged.get("x-cynchrod") or {}
    org = loader.default_org()
    main = loader.main
    _x_problems(rules, ["x-cynchrod"], ext, _X_SCHEMA, X_CYNCHROD_KEYS, "a cynchrod key")
    if isinstance(ext.get("org"), str):
        org = ext["org"]
        if loader.org is not None and org != loader.org:
            rules.err(f"x-cynchrod.org: this repository may only declare apps of org {loader.org}",
                      Code.ORG_FORBIDDEN, ["x-cynchrod", "org"])
    name = loader.app_name(merged)
    if not specs.NAME_RE.match(name):
        rules.err(f"name: {name!r} is not an app name (lowercase letters, digits and -, at most 63; set name: or "
                  "rename the directory)", Code.INVALID_VALUE, ["name"] if "name" in merged else [])
    for key in merged:
        if key in TOP_KEYS or key == "x-cynchrod" or str(key).startswith("x-"):
            continue
        rules.unsupported([key])
    declared_volumes = _top_volumes(rules, merged.get("volumes") or {})
    declared_secrets, secret_values = _top_secrets(rules, merged.get("secrets") or {})
    declared_configs = _top_configs(rules, merged.get("configs") or {})
    services = dict(merged.get("services") or {})
    active = set(ext.get("profiles") or [])
    enabled = {n: s for n, s in services.items() if not (s or {}).get("profiles")
               or active & set((s or {}).get("profiles") or [])}
    if not enabled:
        rules.err("services: no service is enabled (give services, or list their profiles in x-cynchrod.profiles)",
                  Code.MISSING_KEY, ["services"])
    if len(enabled) > 32:
        rules.err(f"services: {len(enabled)} services, over the 32 an app may have", Code.OUT_OF_RANGE, ["services"])
    app_update = ext.get("update") if isinstance(ext.get("update"), dict) else None
    if app_update is not None and len(enabled) > 1:
        rules.err(f"x-cynchrod.update: the app has {len(enabled)} services: put the block on a service, "
                  "services.<name>.x-cynchrod.update", Code.INVALID_UPDATE, ["x-cynchrod", "update"])
        app_update = None
    rules.org, rules.app = org, name
    aliases = _networks(rules, merged.get("networks") or {}, enabled)
    built = [_service(rules, n, s or {}, enabled, declared_volumes, declared_secrets, declared_configs,
                      app_update=app_update, aliases=aliases.get(n, ())) for n, s in sorted(enabled.items())]
    graph = {n: list((s or {}).get("depends_on") or []) for n, s in enabled.items()}
    cycle = manifests._cycle(graph)
    if cycle:
        rules.err(f"services.{cycle[0]}.depends_on: a cycle: {' -> '.join(cycle)}", Code.INVALID_VALUE,
                  ["services", cycle[0], "depends_on"])
    domain = ext.get("domain")
    if domain is not None and len([s for s in built if s is not None and s.port]) != 1:
        rules.err("x-cynchrod.domain: the app needs exactly one service with a published port to route the domain "
                  "to", Code.INVALID_VALUE, ["x-cynchrod", "domain"])
    if rules.errors:
        return manifests.Result(main, None, tuple(sorted(rules.errors, key=lambda e: (e.path, e.line))), org=org)
    restarted = ext.get("restartedAt")
    built = [_tagged(s, org, name) for s in built]
    return manifests.Result(main, specs.AppSpec(
        org=org, name=name, services=tuple(_readiness(s, ext) for s in built if s is not None), domain=domain,
        state=ext.get("state", "running"), restarted_at=None if restarted is None else str(restarted), path=main,
        secret_values=tuple(sorted((n, v) for n, v in secret_values.items()
                                   if any(n in s.secrets for s in built if s is not None))),
        on_failure=str(ext.get("on_failure", "keep"))))


def _x_problems(rules: _Rules, at: list[Any], block: Any, schema: validation.Schema, keys: frozenset[str],
                what: str) -> bool:
    """Schema problems of an ``x-cynchrod`` block (the app's or a service's); True when there were some."""
    problems = schema.problems(block)
    for problem in problems:  # True only for problems of the update block: other keys' do not hide it
        where = [*at, *problem.path]
        if problem.rule == "additionalProperties":
            parent = block
            for part in problem.path:
                parent = parent[part]
            allowed = keys if not problem.path else UPDATE_KEYS
            kind = what if not problem.path else "an update key"
            for key in sorted(set(parent) - allowed):
                rules.err(f"{_field([*where, key])} is not {kind}" + manifests._did_you_mean(key, allowed),
                          Code.UNKNOWN_KEY, [*where, key])
        else:
            code = Code.INVALID_UPDATE if "update" in problem.path[:1] else problem.code
            rules.err(f"{_field(where)}: {problem.message}", code, where)
    return not isinstance(block, dict) or any(p.path[:1] == ("update",) for p in problems)


def _update(rules: _Rules, name: str, svc: dict[str, Any], app_block: Any) -> updates.UpdatePolicy | None:
    """The service's ``update`` block (``services.<name>.x-cynchrod.update``, or the app's
    ``x-cynchrod.update`` for its one service) as the ``UpdatePolicy`` a manifest's gives."""
    own = svc.get("x-cynchrod")
    at = ["services", name, "x-cynchrod"]
    if own is not None and _x_problems(rules, at, own, _X_SERVICE_SCHEMA, X_SERVICE_KEYS,
                                       "a cynchrod key of a service (update is)"):
        return None
    block, where = ((own or {}).get("update"), [*at, "update"]) if (own or {}).get("update") is not None \
        else (app_block, ["x-cynchrod", "update"])
    if block is None:
        return None
    try:
        policy = updates.parse_policy(block)
    except updates.PolicyError as exc:
        at_key = [*where, exc.key] if exc.key in block else where
        rules.err(f"{_field(where)}.{exc.key}: {exc.message}", Code.INVALID_UPDATE, at_key)
        return None
    if policy.commit:
        path, raw = rules.loader.raw_value(["services", name, "image"])
        if path != rules.loader.main:
            rules.err(f"services.{name}.image: set in {path}, so the bump cannot edit it: write the image in "
                      f"{posixpath.basename(rules.loader.main)}, or set commit: false", Code.INVALID_UPDATE,
                      ["services", name, "image"])
            return None
        if raw != svc.get("image"):
            rules.err(f"services.{name}.image: written with ${{...}}, so the bump cannot edit it: write the image "
                      f"in full in {posixpath.basename(path)}, or set commit: false", Code.INVALID_UPDATE,
                      ["services", name, "image"])
            return None
    return policy


def _networks(rules: _Rules, declared: Mapping[str, Any], enabled: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Compose's networks onto the app's one private network: the services may use one network
    between them (``default`` when they name none), declared with ``driver: bridge`` at most; its
    ``aliases`` are further names of the service on it. Service name -> aliases."""
    for name, body in declared.items():
        for key, value in (body or {}).items():
            if str(key).startswith("x-") or (key == "driver" and value in ("bridge", "overlay")):
                continue
            rules.unsupported(["networks", name, key], "each app has one private bridge network made by cynchrod")
    used: dict[str, str] = {}  # the network -> the first service on it
    found: dict[str, tuple[str, ...]] = {}
    for service, body in sorted(enabled.items()):
        value = (body or {}).get("networks")
        where = ["services", service, "networks"]
        entries: dict[str, Any] = {"default": None} if value is None else \
            {str(n): None for n in value} if isinstance(value, list) else {str(k): v for k, v in value.items()}
        for network, options in entries.items():
            at = [*where, network] if isinstance(value, dict) else where
            if network != "default" and network not in declared:
                rules.err(f"services.{service}.networks: network {network!r} is not declared in the top-level "
                          "networks", Code.INVALID_VALUE, at)
                continue
            if used and network not in used:
                rules.unsupported(where, f"{next(iter(used))} and {network}: each app has one private network that "
                                  "all its services share")
                continue
            used.setdefault(network, service)
            for key in options or {}:
                if key != "aliases" and not str(key).startswith("x-"):
                    rules.unsupported([*at, key], "a service's network takes aliases only")
            names: list[str] = []
            for i, alias in enumerate((options or {}).get("aliases") or []):
                if not _HOST_NAME.match(str(alias)):
                    rules.err(f"services.{service}.networks.{network}.aliases[{i}]: {alias!r} is not a host name "
                              "(letters, digits, - and .)", Code.INVALID_VALUE, [*at, "aliases", i])
                else:
                    names.append(str(alias))
            found[service] = tuple(sorted({*found.get(service, ()), *names}))
    return found


def _readiness(service: specs.ServiceSpec, ext: Mapping[str, Any]) -> specs.ServiceSpec:
    """``x-cynchrod.min_ready`` and ``health_timeout`` on each service (validated by the schema)."""
    if "min_ready" not in ext and "health_timeout" not in ext:
        return service
    return dataclasses.replace(service, min_ready=manifests._seconds(ext.get("min_ready")),
                               health_timeout=manifests._seconds(ext.get("health_timeout")))


def _top_volumes(rules: _Rules, volumes: Mapping[str, Any]) -> set[str]:
    for name, body in volumes.items():
        if not manifests._VOLUME_NAME.match(str(name)):
            rules.err(f"volumes.{name}: not a volume name cynchrod takes (lowercase letters, digits, _ . -)",
                      Code.INVALID_VALUE, ["volumes", name])
        for key in (body or {}):
            if not str(key).startswith("x-"):
                rules.unsupported(["volumes", name, key], "cynchrod makes each app's volumes on the local driver")
    return set(volumes)


def _top_secrets(rules: _Rules, secrets: Mapping[str, Any]) -> tuple[set[str], dict[str, bytes]]:
    """Top-level secrets: ``external: true`` ones are cynchrod's own (``cynchrod secret set ORG/NAME``);
    ``file:`` (a file of the app's directory) and ``environment:`` (a variable of its ``.env``) are
    values the repository gives, carried in memory and staged on the tmpfs like the others.
    Returns the declared names and the repository's values."""
    loader = rules.loader
    values: dict[str, bytes] = {}
    for name, body in secrets.items():
        where = ["secrets", name]
        body = body or {}
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", str(name)):
            rules.err(f"secrets.{name}: not a secret name (letters, digits, _ . -)", Code.INVALID_VALUE, where)
            continue
        extra = sorted(k for k in body if k not in ("external", "name", "file", "environment")
                       and not str(k).startswith("x-"))
        if body.get("name", name) != name:
            extra.insert(0, "name")
        if extra:
            rules.unsupported([*where, extra[0]], "a secret is external: true, file: or environment:")
            continue
        given = [k for k in ("external", "file", "environment") if body.get(k) not in (None, False)]
        if len(given) != 1:
            rules.err(f"secrets.{name}: give one of external: true, file: and environment:", Code.INVALID_VALUE,
                      where)
            continue
        if given == ["file"]:
            inside = posixpath.normpath(posixpath.join(loader.directory, str(body["file"])))
            if str(body["file"]).startswith(("/", "~")) or not inside.startswith(loader.directory + "/"):
                rules.err(f"secrets.{name}.file: {body['file']!r} must be a file of the app's directory",
                          Code.POLICY_VIOLATION, [*where, "file"])
                continue
            if inside not in loader.files:
                rules.err(f"secrets.{name}.file: {body['file']!r} is not a file of {loader.directory}/",
                          Code.FILE_NOT_FOUND, [*where, "file"])
                continue
            value = loader.files[inside]
        elif given == ["environment"]:
            value = loader.env.get(str(body["environment"]), "").encode()
            if not value:
                rules.err(f"secrets.{name}.environment: {body['environment']} is not set (or empty) in the app's "
                          ".env", Code.INVALID_VALUE, [*where, "environment"])
                continue
        else:
            continue
        if not value:
            rules.err(f"secrets.{name}.file: the file is empty", Code.INVALID_VALUE, [*where, "file"])
        elif len(value) > MAX_SECRET_BYTES:
            rules.err(f"secrets.{name}: {len(value)} bytes, over the {MAX_SECRET_BYTES} a secret may have",
                      Code.OUT_OF_RANGE, [*where, given[0]])
        else:
            values[str(name)] = value
    return set(secrets), values


def _top_configs(rules: _Rules, configs: Mapping[str, Any]) -> dict[str, str]:
    """Top-level configs (``file:`` of the app's directory, ``content:``, ``environment:`` from
    ``.env``) copied like bind-mounted files; name -> host path of the copy."""
    loader = rules.loader
    found: dict[str, str] = {}
    for name, body in configs.items():
        where = ["configs", name]
        body = body or {}
        extra = sorted(k for k in body if k not in ("file", "content", "environment", "name") and
                       not str(k).startswith("x-"))
        if extra:
            rules.unsupported([*where, extra[0]], "configs come from file:, content: or environment:")
            continue
        if "file" in body:
            inside = posixpath.normpath(posixpath.join(loader.directory, str(body["file"])))
            if not inside.startswith(loader.directory + "/"):
                rules.err(f"configs.{name}.file: {body['file']!r} must be a file of the app's directory",
                          Code.POLICY_VIOLATION, [*where, "file"])
                continue
            if inside not in loader.files:
                rules.err(f"configs.{name}.file: {body['file']!r} is not a file of {loader.directory}/",
                          Code.FILE_NOT_FOUND, [*where, "file"])
                continue
            content = loader.files[inside]
        elif "content" in body:
            content = str(body["content"]).encode()
        elif "environment" in body:
            content = loader.env.get(str(body["environment"]), "").encode()
        else:
            rules.err(f"configs.{name}: give file, content or environment", Code.MISSING_KEY, where)
            continue
        leaf = f"{loader.directory}/{name}"
        found[name] = files.materialise(loader.files_dir, leaf, {leaf: content})
    return found


def _service_configs(rules: _Rules, name: str, svc: dict[str, Any], declared: Mapping[str, str]
                     ) -> list[specs.Bind]:
    binds: list[specs.Bind] = []
    for i, entry in enumerate(svc.get("configs") or []):
        where = ["services", name, "configs", i]
        item = entry if isinstance(entry, dict) else {"source": entry}
        extra = sorted(set(item) - {"source", "target"})
        if extra:
            rules.unsupported([*where, extra[0]], "a config is a read-only file")
            continue
        source = str(item["source"])
        target = str(item.get("target") or f"/{source}")
        if source not in declared:
            rules.err(f"services.{name}.configs[{i}]: config {source!r} is not declared in the top-level configs",
                      Code.INVALID_VALUE, where)
        elif (why := manifests.mount_target_problem(target)) is not None:
            rules.err(f"services.{name}.configs[{i}]: {target!r}: {why}", Code.INVALID_MOUNT, where)
        else:
            binds.append(specs.Bind(declared[source], target))
    return binds


def _service_secrets(rules: _Rules, name: str, svc: dict[str, Any], declared: set[str]) -> list[str]:
    found: list[str] = []
    for i, entry in enumerate(svc.get("secrets") or []):
        where = ["services", name, "secrets", i]
        if isinstance(entry, dict):
            extra = sorted(set(entry) - {"source", "target"})
            if extra or entry.get("target", entry["source"]) != entry["source"]:
                rules.unsupported([*where, extra[0] if extra else "target"],
                                  "a secret is mounted at /run/secrets/<its name>")
                continue
            entry = entry["source"]
        if entry not in declared:
            rules.err(f"services.{name}.secrets[{i}]: secret {entry!r} is not declared in the top-level secrets",
                      Code.INVALID_VALUE, where)
            continue
        found.append(str(entry))
    return found


def _service(rules: _Rules, name: str, svc: dict[str, Any], enabled: Mapping[str, Any],
             volumes: set[str], secrets: set[str], configs: Mapping[str, str], *,
             app_update: Any = None, aliases: tuple[str, ...] = ()) -> specs.ServiceSpec | None:
    at = ["services", name]
    before = len(rules.errors)
    if not specs.NAME_RE.match(name):
        rules.err(f"services.{name}: a service name is lowercase letters, digits and - (at most 63)",
                  Code.INVALID_VALUE, at)
    for key, value in svc.items():
        where = [*at, key]
        if key in SERVICE_KEYS or str(key).startswith("x-"):
            continue
        if key in POLICY:
            if value:  # privileged: false, devices: [] ask for nothing
                rules.err(f"services.{name}.{key}: is not allowed: {POLICY[key]}", Code.POLICY_VIOLATION, where)
        elif key in HOST_NAMESPACES:
            if str(value) == "host":
                rules.err(f"services.{name}.{key}: host is not allowed: containers never share the host's "
                          "namespaces", Code.POLICY_VIOLATION, where)
            else:
                rules.unsupported(where)
        elif key == "runtime":
            if str(value) not in KNOWN_RUNTIMES:
                rules.err(f"services.{name}.runtime: {value!r} is not allowed: only runc runs here",
                          Code.POLICY_VIOLATION, where)
        else:
            rules.unsupported(where)
    build = _build(rules, name, svc["build"]) if "build" in svc else None
    if "image" not in svc and "build" not in svc:
        rules.err(f"services.{name}: image or build is required", Code.MISSING_KEY, at)
    if "image" in svc and "build" in svc:
        log.warning("%s: services.%s.image is not used with build: cynchrod tags the image it builds "
                    "cynchrod/<org>-<app>-<service>:<digest>", rules.loader.main, name)
    if "container_name" in svc:
        log.warning("%s: services.%s.container_name is ignored: cynchrod names containers", rules.loader.main, name)
    env: dict[str, str] = {}
    env_files = svc.get("env_file")
    for i, entry in enumerate([env_files] if isinstance(env_files, (str, dict)) else env_files or []):
        item = entry if isinstance(entry, dict) else {"path": entry}
        extra = set(item) - {"path", "required"}
        if extra:
            rules.unsupported([*at, "env_file", i, sorted(extra)[0]])
            continue
        try:
            env.update(rules.loader.env_file(str(item["path"]), required=item.get("required", True) is not False,
                                             at=[*at, "env_file"]))
        except Exception as exc:  # a located error from the loader
            rules.errors.extend(getattr(exc, "errors", []))
    for key, value in _pairs(svc.get("environment")).items():
        if value is None:
            if key in rules.loader.env:  # Compose takes a bare name from the environment: here the .env
                env[key] = rules.loader.env[key]
            continue
        env[key] = _text(value)
    ports, port, host_port = _ports(rules, name, svc)
    replicas = _replicas(rules, name, svc)
    if (host_port is not None or any(p.published for p in ports)) and replicas > 1:
        rules.err(f"services.{name}.ports: a published port can be bound by one replica only, and replicas is "
                  f"{replicas}", "host_port_replicas", [*at, "ports"])
    cpu, memory, cpu_res, mem_res = _resources(rules, name, svc)
    mounts, tmpfs, binds = _volumes(rules, name, svc, volumes)
    binds.extend(_service_configs(rules, name, svc, configs))
    tmpfs_value = svc.get("tmpfs")
    tmpfs.extend([tmpfs_value] if isinstance(tmpfs_value, str) else tmpfs_value or [])
    depends, conditions = _depends(rules, name, svc, enabled)
    health = _health(rules, name, svc)
    used_secrets = _service_secrets(rules, name, svc, secrets)
    labels = _pairs(svc.get("labels"))
    for key in labels:
        if key.startswith("io.cynchrod."):
            rules.err(f"services.{name}.labels: {key} is cynchrod's own label", Code.POLICY_VIOLATION,
                      [*at, "labels"])
    expose = []
    for i, value in enumerate(svc.get("expose") or []):
        got = rules.check([*at, "expose", i], functools.partial(_port_number, value))
        if got is not None:
            expose.append(got)
    restart = svc.get("restart")
    # "no": a oneshot (a migration): exiting 0 is completed and it is not restarted (docs/health.md).
    if restart is not None and restart not in ("always", "unless-stopped", "no"):
        rules.err(f"services.{name}.restart: {restart!r}: not supported: cynchrod restarts every service that stops "
                  "(always, unless-stopped), or runs it once (no)", Code.UNSUPPORTED_KEY, [*at, "restart"])
    grace = svc.get("stop_grace_period")
    update = _update(rules, name, svc, app_update) if "image" in svc and "build" not in svc else None
    if "build" in svc and ((svc.get("x-cynchrod") or {}).get("update") is not None or app_update is not None):
        where_update = [*at, "x-cynchrod", "update"] if (svc.get("x-cynchrod") or {}).get("update") is not None \
            else ["x-cynchrod", "update"]
        rules.err(f"{_field(where_update)}: services.{name} is built from its build: context, so there is no "
                  "image to follow (a push to the context rebuilds it)", Code.INVALID_UPDATE, where_update)
    if len(rules.errors) > before:
        return None
    return specs.ServiceSpec(
        name=name, image=BUILT_IMAGE if build is not None else str(svc["image"]), build=build,
        command=_command(svc.get("command")), env=tuple(sorted(env.items())),
        port=port, host_port=host_port, cpu=cpu, memory=memory, volumes=tuple(mounts),
        depends_on=tuple(sorted(depends)), healthcheck=health, replicas=replicas,
        secrets=tuple(sorted(set(used_secrets))),
        entrypoint=_command(svc.get("entrypoint")), user=_opt(svc.get("user")),
        working_dir=_opt(svc.get("working_dir")), hostname=_opt(svc.get("hostname")),
        stop_signal=_opt(svc.get("stop_signal")),
        stop_grace_period=None if grace is None else rules.check([*at, "stop_grace_period"], lambda: duration(grace)),
        init=svc.get("init"), read_only=bool(svc.get("read_only", False)), tmpfs=tuple(tmpfs),
        labels=tuple(sorted((k, _text(v)) for k, v in labels.items())), expose=tuple(sorted(set(expose))),
        ports=tuple(ports), cpu_reservation=cpu_res, memory_reservation=mem_res,
        depends_on_conditions=tuple(sorted(conditions.items())), binds=tuple(binds),
        tty=bool(svc.get("tty", False)), stdin_open=bool(svc.get("stdin_open", False)), update=update,
        aliases=aliases, oneshot=restart == "no",
    )


#: The image of a built service until ``_tagged`` names it (once the app's org and name are known).
BUILT_IMAGE = "<built>"
#: ``build:`` keys cynchrod takes; the others are ``unsupported_key`` (or ``policy_violation``, below).
BUILD_KEYS = frozenset({"context", "dockerfile", "target", "args"})
#: ``build:`` keys that would give the build more than the runtime gives a container.
BUILD_POLICY = {
    "privileged": "a build never runs privileged",
    "entitlements": "a build gets no extra entitlements",
    "ssh": "the host's SSH agent and keys are never passed to a build",
}
_REMOTE_CONTEXT = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|git@|github\.com/)", re.I)


def _build(rules: _Rules, name: str, value: Any) -> specs.Build | None:
    """``build:`` (a context path, or ``{context, dockerfile, target, args}``): a folder of the app's
    directory, copied by its content under the state dir like a bind-mounted folder (see
    ``compose.files``). The copy's path, the Dockerfile, the target and the args make the image's tag
    (``_tagged``), so the same content is built once and a change of any of them is a new image."""
    at = ["services", name, "build"]
    body: dict[str, Any] = {"context": value} if isinstance(value, str) else dict(value or {})
    failed = False
    for key, given in body.items():
        if key in BUILD_KEYS or str(key).startswith("x-"):
            continue
        if key in BUILD_POLICY:
            if given:
                rules.err(f"services.{name}.build.{key}: is not allowed: {BUILD_POLICY[key]}", Code.POLICY_VIOLATION,
                          [*at, key])
                failed = True
        elif key == "network" and str(given) == "host":
            rules.err(f"services.{name}.build.network: host is not allowed: builds never share the host's "
                      "network", Code.POLICY_VIOLATION, [*at, key])
            failed = True
        else:
            rules.unsupported([*at, key], "a build takes context, dockerfile, target and args")
            failed = True
    directory = rules.loader.directory
    context = str(body.get("context") or ".")
    where = [*at, "context"] if isinstance(value, dict) and "context" in value else at
    if _REMOTE_CONTEXT.match(context):
        rules.unsupported(where, f"{context!r}: a build context is a folder of the app's directory (a remote "
                          "context is not fetched)")
        return None
    inside = posixpath.normpath(posixpath.join(directory, context))
    if context.startswith(("/", "~")) or not (inside == directory or inside.startswith(directory + "/")):
        rules.err(f"services.{name}.build.context: {context!r} is outside the app's directory {directory}/; a "
                  "build context is a folder of it", Code.POLICY_VIOLATION, where)
        return None
    # The compose files themselves (and ``.env``) are left out: a commit of the API's stop, start or
    # restart, or a change to another service, edits them and must not rebuild the image.
    declaration = {f.path for f in rules.loader.loaded} | {f"{directory}/.env"}
    members = {p: data for p, data in rules.loader.files.items()
               if p.startswith(inside + "/") and p not in declaration}
    dockerfile = str(body.get("dockerfile") or "Dockerfile")
    at_file = [*at, "dockerfile"] if "dockerfile" in body else where
    named = posixpath.normpath(posixpath.join(inside, dockerfile))
    if dockerfile.startswith(("/", "~")) or not named.startswith(inside + "/"):
        rules.err(f"services.{name}.build.dockerfile: {dockerfile!r} is outside the build context {context!r}",
                  Code.POLICY_VIOLATION, at_file)
        return None
    if named not in members:
        rules.err(f"services.{name}.build: {posixpath.relpath(named, directory)!r} is not a file of {directory}/ "
                  "(files over 1 MiB, symlinks and hidden files are not copied)", Code.FILE_NOT_FOUND, at_file)
        return None
    args: dict[str, str] = {}
    for key, given in _pairs(body.get("args")).items():
        if given is None:  # Compose takes a bare name from the environment: here the .env
            if key in rules.loader.env:
                args[key] = rules.loader.env[key]
            continue
        args[key] = _text(given)
    if failed:
        return None
    copy = files.materialise(rules.loader.files_dir, inside, members)
    return specs.Build(repo="", ref="", context=copy, dockerfile=posixpath.relpath(named, inside),
                       args=tuple(sorted(args.items())), target=str(body.get("target") or ""))


def _tagged(service: specs.ServiceSpec | None, org: str, app: str) -> specs.ServiceSpec | None:
    """A built service's image: ``cynchrod/<org>-<app>-<service>:<digest>``, the digest of its
    context's content, Dockerfile, target and args (what a build depends on)."""
    if service is None or service.build is None:
        return service
    build = service.build
    digest = hashlib.sha256(json.dumps([build.context, build.dockerfile, build.target, list(build.args)])
                            .encode()).hexdigest()[:12]
    return dataclasses.replace(service, image=f"cynchrod/{org}-{app}-{service.name}:{digest}")


def _port_number(value: Any) -> int:
    return int(str(value).split("/")[0].split("-")[0])


def _opt(value: Any) -> str | None:
    return None if value is None else str(value)


def _ports(rules: _Rules, name: str, svc: dict[str, Any]) -> tuple[list[specs.Port], int | None, int | None]:
    found: list[specs.Port] = []
    for i, entry in enumerate(svc.get("ports") or []):
        where = ["services", name, "ports", i]
        if isinstance(entry, dict):
            extra = set(entry) - {"target", "published", "host_ip", "protocol", "mode", "name", "app_protocol"}
            if extra:
                rules.unsupported([*where, sorted(extra)[0]])
                continue
            if entry.get("mode", "ingress") not in ("ingress", "host"):
                rules.unsupported([*where, "mode"])
            target, published, protocol = entry.get("target"), entry.get("published"), entry.get("protocol", "tcp")
        else:
            got = _PORT.match(str(entry))
            if got is None:
                rules.unsupported(where, f"{entry!r}: port ranges are not supported; give each port")
                continue
            target, published, protocol = got.group("target"), got.group("published"), got.group("protocol") or "tcp"
        if published is not None and "-" in str(published):
            rules.unsupported(where, "port ranges are not supported; give each port")
            continue
        port = specs.Port(int(str(target)), None if published in (None, "") else int(str(published)), str(protocol))
        for number in (port.target, port.published):
            if number is not None and not 1 <= number <= 65535:
                rules.err(f"services.{name}.ports[{i}]: {number} is not a port (1-65535)", Code.OUT_OF_RANGE, where)
        found.append(port)
    first = next((p for p in found if p.protocol == "tcp"), None)
    if first is None:
        return found, None, None
    return [p for p in found if p is not first], first.target, first.published


def _replicas(rules: _Rules, name: str, svc: dict[str, Any]) -> int:
    deploy = svc.get("deploy") or {}
    for key in deploy:
        if key not in DEPLOY_KEYS and not str(key).startswith("x-"):
            rules.unsupported(["services", name, "deploy", key])
    replicas = deploy.get("replicas", 1)
    if not isinstance(replicas, int) or not 0 <= replicas <= 100:
        rules.err(f"services.{name}.deploy.replicas: {replicas!r} is not 0 to 100", Code.OUT_OF_RANGE,
                  ["services", name, "deploy", "replicas"])
        return 1
    return replicas


def _resources(rules: _Rules, name: str, svc: dict[str, Any]
               ) -> tuple[float, int, float | None, int | None]:
    res = (svc.get("deploy") or {}).get("resources") or {}
    at = ["services", name, "deploy", "resources"]
    for key in res:
        if key not in ("limits", "reservations") and not str(key).startswith("x-"):
            rules.unsupported([*at, key])
    limits, reserved = res.get("limits") or {}, res.get("reservations") or {}
    for group, body in (("limits", limits), ("reservations", reserved)):
        for key in body:
            if key not in RESOURCE_KEYS and not str(key).startswith("x-"):
                rules.unsupported([*at, group, key])
    cpus = limits.get("cpus", svc.get("cpus"))
    memory = limits.get("memory", svc.get("mem_limit"))
    cpu = specs.DEFAULT_CPU if cpus is None else rules.check([*at, "limits", "cpus"], lambda: float(cpus))
    mem = specs.DEFAULT_MEMORY_MB if memory is None else rules.check([*at, "limits", "memory"],
                                                                     lambda: megabytes(memory))
    if cpu is not None and not 0.01 <= cpu <= 8:
        rules.err(f"services.{name}.deploy.resources.limits.cpus: {cpu} is not 0.01 to 8 cores", Code.OUT_OF_RANGE,
                  [*at, "limits", "cpus"])
    if mem is not None and not 64 <= mem <= 16384:
        rules.err(f"services.{name}.deploy.resources.limits.memory: {mem} MB is not 64 to 16384 MB",
                  Code.OUT_OF_RANGE, [*at, "limits", "memory"])
    rcpus, rmem = reserved.get("cpus"), reserved.get("memory", svc.get("mem_reservation"))
    cpu_res = None if rcpus is None else rules.check([*at, "reservations", "cpus"], lambda: float(rcpus))
    mem_res = None if rmem is None else rules.check([*at, "reservations", "memory"], lambda: megabytes(rmem))
    if mem_res is not None and mem is not None and mem_res > mem:
        rules.err(f"services.{name}.deploy.resources.reservations.memory: {mem_res} MB is over the limit ({mem} MB)",
                  Code.OUT_OF_RANGE, [*at, "reservations", "memory"])
    return cpu or specs.DEFAULT_CPU, mem or specs.DEFAULT_MEMORY_MB, cpu_res, mem_res


def _volumes(rules: _Rules, name: str, svc: dict[str, Any], declared: set[str]
             ) -> tuple[list[specs.Volume], list[str], list[specs.Bind]]:
    binds: list[specs.Bind] = []
    mounts: list[specs.Volume] = []
    tmpfs: list[str] = []
    targets: set[str] = set()
    directory = rules.loader.directory
    for i, entry in enumerate(svc.get("volumes") or []):
        where = ["services", name, "volumes", i]
        field = f"services.{name}.volumes[{i}]"
        if isinstance(entry, dict):
            extra = set(entry) - {"type", "source", "target", "read_only"}
            if extra:
                rules.unsupported([*where, sorted(extra)[0]])
                continue
            kind, source, target = entry.get("type"), str(entry.get("source") or ""), str(entry.get("target", ""))
            read_only = bool(entry.get("read_only", False))
            writable = entry.get("read_only") is False
            if kind == "tmpfs":
                tmpfs.append(target)
                continue
            if kind not in ("volume", "bind"):
                rules.unsupported([*where, "type"], f"{kind!r}")
                continue
        else:
            parts = str(entry).split(":")
            if len(parts) == 1:
                kind, source, target, mode = "volume", "", parts[0], ""
            else:
                source, target, mode = parts[0], parts[1], ":".join(parts[2:])
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if mode not in ("", "ro", "rw"):
                rules.unsupported(where, f"mount options {mode!r} (ro and rw are supported)")
                continue
            read_only = mode == "ro"
            writable = mode == "rw"
        if target.rstrip("/") in ("/var/run/docker.sock", "/run/docker.sock") or "docker.sock" in source:
            rules.err(f"{field}: the Docker socket is never mounted", Code.POLICY_VIOLATION, where)
            continue
        if kind == "bind":
            inside = posixpath.normpath(posixpath.join(directory, source))
            if source.startswith(("/", "~")) or inside.startswith("..") or inside == ".":
                rules.err(f"{field}: {source!r} mounts a host path outside the repository; only named volumes and "
                          "files of the app's directory are allowed", Code.POLICY_VIOLATION, where)
            elif not inside.startswith(directory + "/"):
                rules.unsupported(where, f"a bind mount names files of the app's directory {directory}/")
            elif (why := manifests.mount_target_problem(target)) is not None:
                rules.err(f"{field}: {target!r}: {why}", Code.INVALID_MOUNT, where)
            else:
                members = {p: data for p, data in rules.loader.files.items()
                           if p == inside or p.startswith(inside + "/")}
                if not members:
                    rules.err(f"{field}: {source!r} is not a file or folder of {directory}/ (files over 1 MiB, "
                              "symlinks and hidden files are not copied)", Code.FILE_NOT_FOUND, where)
                elif writable:  # the app's own copy, seeded once and kept (compose.files)
                    binds.append(specs.Bind(files.writable(rules.loader.files_dir, org=rules.org, app=rules.app,
                                                           directory=directory, inside=inside, members=members),
                                            target, read_only=False))
                else:
                    binds.append(specs.Bind(files.materialise(rules.loader.files_dir, inside, members), target))
            continue
        if (why := manifests.mount_target_problem(target)) is not None:
            rules.err(f"{field}: {target!r}: {why}", Code.INVALID_MOUNT, where)
            continue
        if target in targets:
            rules.err(f"{field}: {target!r} is mounted twice", Code.INVALID_MOUNT, where)
            continue
        targets.add(target)
        if source and source not in declared:
            rules.err(f"{field}: volume {source!r} is not declared in the top-level volumes", Code.INVALID_VALUE,
                      where)
            continue
        mounts.append(specs.Volume(name=source, path=target, read_only=read_only))
    return mounts, tmpfs, binds


def _depends(rules: _Rules, name: str, svc: dict[str, Any], enabled: Mapping[str, Any]
             ) -> tuple[list[str], dict[str, str]]:
    value = svc.get("depends_on") or []
    entries: dict[str, dict[str, Any]] = {d: {} for d in value} if isinstance(value, list) else \
        {k: v or {} for k, v in value.items()}
    depends: list[str] = []
    conditions: dict[str, str] = {}
    for dep, body in entries.items():
        where = ["services", name, "depends_on", dep] if isinstance(value, dict) else ["services", name, "depends_on"]
        for key in body:
            if key not in ("condition", "required"):
                rules.unsupported([*where, key])
        if dep not in enabled or dep == name:
            if body.get("required", True) is False:
                continue
            rules.err(f"services.{name}.depends_on: {dep!r} is not another enabled service of this app",
                      Code.INVALID_VALUE, where)
            continue
        condition = body.get("condition", "service_started")
        if condition not in DEPENDS_CONDITIONS:
            rules.err(f"services.{name}.depends_on.{dep}.condition: {condition!r} is not one of "
                      f"{', '.join(DEPENDS_CONDITIONS)}", Code.INVALID_VALUE, where)
        elif condition != "service_started":
            conditions[dep] = condition
        depends.append(dep)
    return depends, conditions


def _health(rules: _Rules, name: str, svc: dict[str, Any]) -> specs.Healthcheck | None:
    body = svc.get("healthcheck")
    if body is None or body.get("disable"):
        return None
    at = ["services", name, "healthcheck"]
    for key in body:
        if key not in HEALTH_KEYS and not str(key).startswith("x-"):
            rules.unsupported([*at, key])
    test = body.get("test")
    if test is None:
        rules.err(f"services.{name}.healthcheck.test is required (or disable: true)", Code.MISSING_KEY, at)
        return None
    if isinstance(test, str):
        command: tuple[str, ...] = ("CMD-SHELL", test)
    elif test and test[0] == "NONE":
        return None
    elif test and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1:
        command = tuple(str(t) for t in test)
    else:
        rules.err(f"services.{name}.healthcheck.test: a list starts with CMD, CMD-SHELL or NONE (or give a string)",
                  Code.INVALID_VALUE, [*at, "test"])
        return None
    times: dict[str, float] = {}
    for key, default in (("interval", 30.0), ("timeout", 30.0), ("start_period", 0.0)):
        got = rules.check([*at, key], functools.partial(duration, body.get(key, default)))
        times[key] = default if got is None else got
    return specs.Healthcheck(test=command, retries=int(body.get("retries", 3)), **times)
