"""Manifests: YAML files in, frozen ``AppSpec`` values (or located errors) out.

Called by the reconciler on each pass and by ``cynchrod validate``. Parsing is
ruamel.yaml (for line numbers) then JSON Schema (``schemas/app.schema.json``)
then semantic checks. Results are cached by git blob id, so a pass over a
commit whose files did not change parses nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import posixpath
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cynchrod.core import specs, updates
from cynchrod.core.codes import Code
from cynchrod.core.errors import ManifestError
from cynchrod.desired import validation, yamlio

log = logging.getLogger("cynchrod.manifests")  # the name the logs have always shown

MAX_MANIFEST_BYTES = yamlio.MAX_BYTES
MANIFEST_SUFFIXES = (".yaml", ".yml")
#: Keys people reach for that would escape the sandbox: refused with their own code.
FORBIDDEN_KEYS = frozenset(
    {
        "privileged", "cap_add", "capAdd", "devices", "network_mode", "networkMode",
        "pid", "ipc", "security_opt", "securityOpt", "binds", "mounts", "user", "userns_mode", "cgroup_parent",
    }
)
#: yamlio's codes as manifest error codes.
_YAML_CODES = {"too_large": "manifest_too_large"}


def load_schema(name: str) -> dict[str, Any]:
    return validation.load_document(name)


_SCHEMA = validation.Schema("app.schema.json")


def is_manifest_path(path: str) -> bool:
    """Files a source lists: YAML (manifests and compose files) and the ``.env``/``*.env`` files a
    compose app reads (``.env`` beside a native manifest is listed and left alone)."""
    name = posixpath.basename(path)
    return path.endswith(MANIFEST_SUFFIXES) or name == ".env" or name.endswith(".env") or name.startswith(".env.")


@dataclasses.dataclass(frozen=True)
class Result:
    """What one file gave: a spec, or the errors that stop it."""

    path: str
    spec: specs.AppSpec | None
    errors: tuple[ManifestError, ...] = ()
    #: For a file that failed: the org it declares as far as it can be read (``declared_org``);
    #: None when that cannot be told.
    org: str | None = None


def _line_of(doc: Any, path: Iterable[Any]) -> int:
    """1-based line of the key at ``path`` in a round-trip document."""
    return yamlio.line_of(doc, path)


def _schema_errors(path: str, doc: Any, data: dict[str, Any]) -> list[ManifestError]:
    errors: list[ManifestError] = []
    for problem in _SCHEMA.problems(data):
        where = list(problem.path)
        if problem.rule == "additionalProperties":
            parent: Any = data
            for part in where:
                parent = parent[part]
            allowed = problem.allowed if problem.allowed is not None else _SCHEMA.properties
            for key in parent:
                if key in allowed:
                    continue
                forbidden = key in FORBIDDEN_KEYS
                reason = "is not allowed: cynchrod never grants it" if forbidden else \
                    "is not a known key" + _did_you_mean(key, allowed)
                errors.append(ManifestError(
                    f"{'.'.join(map(str, [*where, key]))} {reason}",
                    code="policy_violation" if forbidden else "unknown_key", path=path,
                    line=_line_of(doc, [*where, key])))
            continue
        if problem.key is not None:
            where = [*where, problem.key]
        field = ".".join(map(str, where)) or "manifest"
        message = problem.message.replace("'", "") if problem.rule == "required" else f"{field}: {problem.message}"
        if problem.rule == "finite":
            message = problem.message
        elif where and where[-1] == "memory":
            message = _memory_message(field, problem, _value_at(data, where))
        errors.append(ManifestError(message, code=problem.code, path=path, line=_line_of(doc, where)))
    return sorted(errors, key=lambda e: e.line)


def _did_you_mean(key: str, allowed: Iterable[str]) -> str:
    """``; did you mean memory?`` for ``memroy``: the closest allowed key, when one is close."""
    def plain(text: str) -> str:  # host_port, host-port and HOSTPORT are all hostPort
        return text.lower().replace("_", "").replace("-", "")

    close = [k for k in sorted(allowed) if plain(k) == plain(key)][:1] or \
        difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def _value_at(data: Any, where: Iterable[Any]) -> Any:
    for part in where:
        data = data[part]
    return data


#: Units people write after a memory size, as MB per unit (memory is in MB).
_MEMORY_UNITS = {"": 1, "m": 1, "mb": 1, "mi": 1, "mib": 1, "g": 1024, "gb": 1024, "gi": 1024, "gib": 1024}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def _memory_message(field: str, problem: validation.Problem, value: Any) -> str:
    """Memory errors name the unit: ``64MB`` is ``write 64``; a bound says it is MB."""
    if problem.rule in ("minimum", "maximum"):
        return f"{field}: {problem.message} (memory is in MB)"
    if problem.rule != "type":
        return f"{field}: {problem.message}"
    found = _SIZE.match(value) if isinstance(value, str) else None
    if found is not None and found.group(2).lower() in _MEMORY_UNITS:
        mb = float(found.group(1)) * _MEMORY_UNITS[found.group(2).lower()]
        if mb.is_integer():
            return f"{field} is in MB: write {int(mb)}, not {value!r}"
    return f"{field} is a whole number of MB (64 to 16384), e.g. memory: 512; got {value!r}"


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


def parse(path: str, raw: bytes, *, org: str | None = None) -> Result:
    """Parse and validate one manifest file. Never raises for bad input.

    ``org`` pins the file to one org (a tenant's repository): it is the default
    org, and any other org is refused with ``org_forbidden``. Whatever goes
    wrong in here — a bug of ours or of a library included — is this file's
    error, so that one file can never stop a pass.
    """
    try:
        result = _parse(path, raw, org=org)
    except Exception as exc:
        log.exception("manifest %s could not be parsed", path)
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        result = Result(path, None, (ManifestError(
            f"cannot be read ({type(exc).__name__}{': ' + detail if detail else ''})", code="invalid_manifest",
            path=path, line=1),))
    if result.spec is None and result.org is None:
        result = dataclasses.replace(result, org=org or declared_org(raw))
    return result


_ORG_LINE = re.compile(r"^org\s*:(.*)$", re.M)
_ORG_VALUE = re.compile(r"""^\s*(['"]?)([a-z0-9-]{1,63})\1\s*(#.*)?$""")


def declared_org(raw: bytes) -> str | None:
    """The org a file that could not be parsed declares, read from its text: the value of its one
    top-level ``org:`` line; ``default`` when it has none (as for a manifest without ``org``);
    None when there is an ``org:`` line that cannot be read. Who may see the file's errors
    follows from it (``GET /apps``: the file's org, and admin tokens)."""
    text = raw[:MAX_MANIFEST_BYTES].decode("utf-8", "replace")
    found = _ORG_LINE.findall(text)
    if not found:
        return specs.DEFAULT_ORG
    value = _ORG_VALUE.match(found[0]) if len(found) == 1 else None
    return value.group(2) if value is not None and re.fullmatch(specs.NAME_PATTERN, value.group(2)) else None


def _parse(path: str, raw: bytes, *, org: str | None) -> Result:
    def fail(message: str, code: str, line: int = 1) -> Result:
        return Result(path, None, (ManifestError(message, code=code, path=path, line=line),))

    if len(raw) > MAX_MANIFEST_BYTES:
        return fail(f"manifest is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} byte limit", "manifest_too_large")
    try:
        doc = yamlio.load_roundtrip(raw)
        data = yamlio.plain(doc)
    except yamlio.YamlError as exc:
        message = exc.message
        if exc.code == Code.YAML_ALIAS:
            message = "YAML aliases are not allowed in manifests"
        return fail(message, _YAML_CODES.get(exc.code, exc.code), exc.line)
    if doc is None:
        return fail("expected exactly one YAML document, found 0", "invalid_manifest")
    if not yamlio.is_mapping(doc) or not isinstance(data, dict):
        return fail("a manifest must be a mapping of keys to values", "invalid_type", _line_of(doc, []))
    errors = _schema_errors(path, doc, data)
    if not errors:
        errors = _semantic_errors(path, doc, data)
    if org is not None:
        if data.get("org", org) != org:
            errors.append(ManifestError(f"org: this repository may only declare apps of org {org}",
                                        code="org_forbidden", path=path, line=_line_of(doc, ["org"])))
        data.setdefault("org", org)
    if errors:
        declared = data.get("org", specs.DEFAULT_ORG)
        named = isinstance(declared, str) and re.fullmatch(specs.NAME_PATTERN, declared) is not None
        return Result(path, None, tuple(errors), org=org or (declared if named else None))
    return Result(path, _to_spec(path, data))


_SERVICE_ONLY_IN_SERVICES = ("image", "build", "command", "port", "hostPort", "volumes", "secrets", "healthcheck",
                             "oneshot", "update")
_VOLUME_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


def _semantic_errors(path: str, doc: Any, data: dict[str, Any]) -> list[ManifestError]:
    errors: list[ManifestError] = []

    def err(message: str, code: str, where: list[Any]) -> None:
        errors.append(ManifestError(message, code=code, path=path, line=_line_of(doc, where)))

    if "services" in data:
        for key in _SERVICE_ONLY_IN_SERVICES:
            if key in data:
                err(f"{key}: set it per service when the app has services", "invalid_value", [key])
        names = set(data["services"])
        for name, service in data["services"].items():
            if ("image" in service) == ("build" in service):
                err(f"services.{name}: give exactly one of image and build", "missing_key" if "image" not in
                    service else "invalid_value", ["services", name])
            _check_service(service, ["services", name], err,
                           replicas=int(service.get("replicas", data.get("replicas", 1))))
            for dep in service.get("depends_on", []):
                if dep not in names or dep == name:
                    err(f"services.{name}.depends_on: {dep!r} is not another service of this app", "invalid_value",
                        ["services", name, "depends_on"])
        cycle = _cycle({n: list(s.get("depends_on", [])) for n, s in data["services"].items()})
        if cycle:
            err(f"services: depends_on has a cycle: {' -> '.join(cycle)}", "invalid_value", ["services"])
    else:
        if "image" not in data and "build" not in data:
            err("image is required (or build, or services)", "missing_key", [])
        elif "image" in data and "build" in data:
            err("give either image or build, not both", "invalid_value", ["build"])
        _check_service(data, [], err, replicas=int(data.get("replicas", 1)))
    if "domain" in data:
        with_port = [n for n, s in data["services"].items() if "port" in s] if "services" in data else \
            (["main"] if "port" in data else [])
        if len(with_port) != 1:
            err("domain: the app needs exactly one port to route the domain to" + (
                f" (services with a port: {', '.join(sorted(with_port))}; or give each its own domain)"
                if with_port else ""), "invalid_value", ["domain"])
    _check_domains(data, err)
    return sorted(errors, key=lambda e: e.line)


def _check_domains(data: dict[str, Any], err: Callable[[str, str, list[Any]], None]) -> None:
    """A service's domain needs its port; no host name twice in one app (case aside)."""
    seen: dict[str, str] = {}
    if "domain" in data:
        seen[str(data["domain"]).lower()] = "domain"
    for name, service in (data.get("services") or {}).items():
        if "domain" not in service:
            continue
        where = ["services", name, "domain"]
        field = f"services.{name}.domain"
        if "port" not in service:
            err(f"{field}: the service needs a port to route its domain to", "invalid_value", where)
        domain = str(service["domain"]).lower()
        if domain in seen:
            err(f"{field}: {domain} is already this app's {seen[domain]}; a host name goes to one place",
                "duplicate_domain", where)
        else:
            seen[domain] = field


def _check_service(service: dict[str, Any], where: list[Any], err: Callable[[str, str, list[Any]], None],
                   *, replicas: int) -> None:
    prefix = ".".join(map(str, where)) + "." if where else ""
    if "update" in service:
        _check_update(service, where, prefix, err)
    for key in ("context", "dockerfile"):
        value = str((service.get("build") or {}).get(key, ""))
        if value.startswith(("/", "~")) or ".." in value.replace("\\", "/").split("/"):
            err(f"{prefix}build.{key}: {value!r} must stay inside the source repository", "policy_violation",
                [*where, "build", key])
    if isinstance(service.get("command"), str):
        try:
            shlex.split(service["command"])
        except ValueError as exc:
            err(f"{prefix}command: cannot be split like a shell would: {exc}", "invalid_value", [*where, "command"])
    if "hostPort" in service and "port" not in service:
        err(f"{prefix}hostPort needs port", "invalid_value", [*where, "hostPort"])
    if "hostPort" in service and replicas > 1:
        err(f"{prefix}hostPort: a host port can be bound by one replica only, and replicas is {replicas}",
            "host_port_replicas", [*where, "replicas" if "replicas" in service else "hostPort"])
    targets: dict[str, int] = {}
    for i, entry in enumerate(service.get("volumes", [])):
        name, _, rest = entry.partition(":")
        target, _, mode = rest.partition(":")
        at = [*where, "volumes", i]
        if name.startswith(("/", ".", "~")) or "/" in name or "\\" in name:
            err(f"{prefix}volumes[{i}]: {entry!r} mounts a host path; only named volumes are allowed",
                "policy_violation", at)
        elif not _VOLUME_NAME.match(name):
            err(f"{prefix}volumes[{i}]: {name!r} is not a volume name (lowercase letters, digits, _ . -)",
                "invalid_value", at)
        elif target.rstrip("/") in ("/var/run/docker.sock", "/run/docker.sock"):
            err(f"{prefix}volumes[{i}]: the Docker socket is never mounted", "policy_violation", at)
        elif (why := mount_target_problem(target)) is not None:
            err(f"{prefix}volumes[{i}]: {target!r}: {why}", Code.INVALID_MOUNT, at)
        elif target in targets:
            err(f"{prefix}volumes[{i}]: {target!r} is already the mount path of volumes[{targets[target]}]",
                Code.INVALID_MOUNT, at)
        elif mode not in ("", "ro", "rw"):
            err(f"{prefix}volumes[{i}]: mode must be ro or rw, got {mode!r}", "invalid_value", at)
        targets.setdefault(target, i)


def _check_update(service: dict[str, Any], where: list[Any], prefix: str,
                  err: Callable[[str, str, list[Any]], None]) -> None:
    block = service["update"]
    if "image" not in service:
        err(f"{prefix}update: needs image (a built image has no registry to watch)", Code.INVALID_UPDATE,
            [*where, "update"])
        return
    try:
        updates.parse_policy(block)
    except updates.PolicyError as exc:
        at = [*where, "update", exc.key] if exc.key in block else [*where, "update"]
        err(f"{prefix}update.{exc.key}: {exc.message}", Code.INVALID_UPDATE, at)


#: Mount paths a volume may not cover: the kernel's filesystems (the path and anything under it: the
#: engine mounts them itself and refuses, or the container fails to start) ...
KERNEL_DIRS = ("/proc", "/sys", "/dev")
#: ... and the image's system directories (the path itself: the volume would hide the image's programs,
#: libraries or configuration; a folder below them, ``/etc/nginx/conf.d``, ``/usr/share/nginx/html``, is fine).
SYSTEM_DIRS = re.compile(r"/(?:etc|bin|sbin|usr|lib|lib32|lib64|libx32)")


def mount_target_problem(target: str) -> str | None:
    """Why a volume's mount path (in the container) is refused, else None.

    The rule: absolute; normalised (no ``.``, ``..``, empty component or trailing ``/``: the
    engine would read ``/data/`` and ``/data`` as one path and the spec hash as two); not ``/``;
    not ``/proc``, ``/sys``, ``/dev`` or under them; not exactly ``/etc``, ``/bin``, ``/sbin``,
    ``/usr`` or ``/lib`` (``/lib32``, ``/lib64``, ``/libx32``); each path once per service (checked
    by the caller). Each refusal used to be a runtime failure or a container that could not start
    (``invalid mount config`` for ``data:/``)."""
    if not target.startswith("/"):
        return "a mount path must be absolute (start with /)"
    normal = posixpath.normpath(target)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if normal != target:
        return f"a mount path must be normalised (no '.', '..', '//' or trailing '/'): write {normal!r}"
    if target == "/":
        return "a volume cannot be mounted over the container's whole filesystem"
    if any(target == d or target.startswith(d + "/") for d in KERNEL_DIRS):
        return "/proc, /sys and /dev (and what is under them) belong to the kernel's filesystems"
    if SYSTEM_DIRS.fullmatch(target):
        return "a volume over a system directory would hide the image's own files (mount a folder below it)"
    return None


def _cycle(graph: dict[str, list[str]]) -> list[str]:
    """A dependency cycle as a path, or [] (depth-first, deterministic)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, [])):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt in graph and state.get(nxt) is None and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node)):
            return found
    return []


def _health(value: dict[str, Any] | None) -> specs.Healthcheck | None:
    if value is None:
        return None
    test = value["test"]
    return specs.Healthcheck(
        test=("CMD-SHELL", test) if isinstance(test, str) else ("CMD", *map(str, test)),
        interval=float(value.get("interval", 30)), timeout=float(value.get("timeout", 30)),
        retries=int(value.get("retries", 3)), start_period=float(value.get("start_period", 0)))


def _service(name: str, data: dict[str, Any], app: dict[str, Any]) -> specs.ServiceSpec:
    """A service from its own keys, with the app's cpu, memory and env as defaults."""
    env = {**(app.get("env") or {}), **(data.get("env") or {})} if data is not app else data.get("env")
    volumes = []
    for entry in data.get("volumes", []):
        vol, _, rest = entry.partition(":")
        target, _, mode = rest.partition(":")
        volumes.append(specs.Volume(name=vol, path=target, read_only=mode == "ro"))
    build = data.get("build")
    return specs.ServiceSpec(
        name=name,
        image=data.get("image", ""),
        build=None if build is None else specs.Build(
            repo=str(build["repo"]), ref=str(build.get("ref", "main")), context=str(build.get("context", ".")),
            dockerfile=str(build.get("dockerfile", "Dockerfile")), args=_env(build.get("args"))),
        command=_command(data.get("command")),
        env=_env(env),
        port=data.get("port"),
        host_port=data.get("hostPort"),
        cpu=float(data.get("cpu", app.get("cpu", specs.DEFAULT_CPU))),
        memory=int(data.get("memory", app.get("memory", specs.DEFAULT_MEMORY_MB))),
        volumes=tuple(volumes),
        depends_on=tuple(sorted(data.get("depends_on", []))),
        depends_on_conditions=_conditions(data.get("depends_on")),
        healthcheck=_health(data.get("healthcheck")),
        secrets=tuple(sorted(data.get("secrets", []))),
        replicas=int(data.get("replicas", app.get("replicas", 1))),
        # The app's own domain stays on the app (a single service's keys are the app's).
        domain=data.get("domain") if data is not app else None,
        update=updates.parse_policy(data["update"]) if "update" in data else None,
        oneshot=bool(data.get("oneshot", False)),
        min_ready=_seconds(data.get("min_ready", app.get("min_ready"))),
        health_timeout=_seconds(data.get("health_timeout", app.get("health_timeout"))),
    )


def _conditions(depends_on: Any) -> tuple[tuple[str, str], ...]:
    """The ``depends_on`` entries of the map form with a condition other than ``service_started``."""
    if not isinstance(depends_on, Mapping):
        return ()
    return tuple(sorted((str(name), str((entry or {}).get("condition", "service_started")))
                        for name, entry in depends_on.items()
                        if (entry or {}).get("condition", "service_started") != "service_started"))


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


def _to_spec(path: str, data: dict[str, Any]) -> specs.AppSpec:
    if "services" in data:
        services = tuple(_service(name, svc, data) for name, svc in sorted(data["services"].items()))
    else:
        services = (_service(specs.MAIN_SERVICE, data, data),)
    restarted = data.get("restartedAt")
    return specs.AppSpec(
        org=data.get("org", specs.DEFAULT_ORG),
        name=data["name"],
        services=services,
        domain=data.get("domain"),
        state=data.get("state", "running"),
        restarted_at=None if restarted is None else str(restarted),
        path=path,
        on_failure=str(data.get("on_failure", "keep")),
    )
