"""``cynchrod convert``: an app's spec written as the other format (a native manifest as a compose
file, a compose app as a native manifest), so users can move either way.

Called by the CLI with a spec parsed by ``manifests`` or ``compose``; pure apart from YAML writing
(``yamlio``). Each writer says what its format cannot: a key left out is a warning
(``services.web.user: not expressible in a native manifest (left out)``), never dropped silently.
Reading the output back gives the same app for every key both formats have.
"""

from __future__ import annotations

from typing import Any

from cynchrod.core import specs, updates
from cynchrod.desired import yamlio

#: ServiceSpec fields a native manifest has no key for, with their defaults (a set one is warned).
_NOT_NATIVE = ("entrypoint", "user", "working_dir", "hostname", "stop_signal", "stop_grace_period", "read_only",
               "tmpfs", "labels", "expose", "ports", "cpu_reservation", "memory_reservation", "binds", "tty",
               "stdin_open", "aliases")
#: Native keys a compose app has no key for yet (a set one is warned).
_NOT_COMPOSE = ("min_ready", "health_timeout")


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _update(policy: updates.UpdatePolicy) -> dict[str, Any]:
    block: dict[str, Any] = {}
    if policy.semver is not None:
        block["semver"] = policy.semver
    if policy.digest:
        block["digest"] = True
    if policy.regex is not None:
        block["regex"] = policy.regex
        if policy.sort != "semver":
            block["sort"] = policy.sort
    if policy.interval != updates.DEFAULT_INTERVAL:
        block["interval"] = _number(policy.interval)
    if not policy.commit:
        block["commit"] = False
    return block


def _dump(data: dict[str, Any]) -> str:
    return yamlio.dump_roundtrip(yamlio.new_mapping(data.items())).decode()


# -- compose -> native ---------------------------------------------------------------------------


def to_native(spec: specs.AppSpec) -> tuple[str, list[str]]:
    """A native manifest of ``spec`` (a compose app's) and the warnings for what it cannot say."""
    warnings: list[str] = []
    top: dict[str, Any] = {"name": spec.name}
    if spec.org != specs.DEFAULT_ORG:
        top["org"] = spec.org
    if spec.domain is not None:
        top["domain"] = spec.domain
    if spec.state != "running":
        top["state"] = spec.state
    if spec.on_failure != "keep":
        top["on_failure"] = spec.on_failure
    for name in sorted(spec.inline_secrets):
        warnings.append(f"secrets.{name}: its value comes from the repository; set it in the org's store "
                        f"(cynchrod secret set {spec.org}/{name})")
    flat = len(spec.services) == 1 and not spec.services[0].depends_on
    services = {s.name: _native_service(s, warnings, flat=flat) for s in spec.services}
    if flat:
        top.update(next(iter(services.values())))
    else:
        top["services"] = services
    return _dump(top), sorted(warnings)


def _native_service(service: specs.ServiceSpec, warnings: list[str], *, flat: bool) -> dict[str, Any]:
    at = f"services.{service.name}"
    out: dict[str, Any] = {"image": service.image}
    if service.build is not None and service.build.local:
        warnings.append(f"{at}.build: a build context of the manifests repository is not expressible in a native "
                        "manifest (its build: names a repository of its own); the image is the tag cynchrod "
                        "builds from it")
    if service.command is not None:
        out["command"] = list(service.command)
    if service.port is not None:
        out["port"] = service.port
    if service.host_port is not None:
        out["hostPort"] = service.host_port
    if service.env:
        out["env"] = dict(service.env)
    if service.cpu != specs.DEFAULT_CPU:
        out["cpu"] = _number(service.cpu)
    if service.memory != specs.DEFAULT_MEMORY_MB:
        out["memory"] = service.memory
    volumes = []
    for volume in service.volumes:
        if not volume.name:
            warnings.append(f"{at}.volumes: the anonymous volume {volume.path} is not expressible in a native "
                            "manifest (left out)")
            continue
        volumes.append(f"{volume.name}:{volume.path}{':ro' if volume.read_only else ''}")
    if volumes:
        out["volumes"] = volumes
    if service.secrets:
        out["secrets"] = list(service.secrets)
    if service.healthcheck is not None:
        health = service.healthcheck
        test: Any = health.test[1] if health.test[0] == "CMD-SHELL" else list(health.test[1:])
        block: dict[str, Any] = {"test": test}
        for key, default in (("interval", 30.0), ("timeout", 30.0), ("start_period", 0.0)):
            if getattr(health, key) != default:
                block[key] = _number(getattr(health, key))
        if health.retries != 3:
            block["retries"] = health.retries
        out["healthcheck"] = block
    if service.replicas != 1:
        out["replicas"] = service.replicas
    if service.depends_on and not flat:
        out["depends_on"] = _depends_on(service)
    if service.oneshot:
        out["oneshot"] = True
    if service.update is not None:
        out["update"] = _update(service.update)
    for key in _NOT_NATIVE:
        value = getattr(service, key)
        if value not in (None, (), False):
            warnings.append(f"{at}.{key}: not expressible in a native manifest (left out)")
    if service.init is False:
        warnings.append(f"{at}.init: not expressible in a native manifest (left out)")
    return out


def _depends_on(service: specs.ServiceSpec) -> Any:
    """A list, or the map form when a condition is other than ``service_started`` (both formats')."""
    conditions = dict(service.depends_on_conditions)
    if not conditions:
        return list(service.depends_on)
    return {name: {"condition": conditions.get(name, "service_started")} for name in service.depends_on}


# -- native -> compose ---------------------------------------------------------------------------


def _escaped(value: Any) -> Any:
    """Compose interpolates every string: a literal ``$`` is written ``$$``."""
    if isinstance(value, str):
        return value.replace("$", "$$")
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    return value


def _seconds(value: float) -> str:
    return f"{_number(value)}s"


def to_compose(spec: specs.AppSpec) -> tuple[str, list[str]]:
    """A compose file of ``spec`` (a native manifest's) and the warnings for what it cannot say."""
    warnings: list[str] = []
    services: dict[str, Any] = {}
    volumes: dict[str, Any] = {}
    secrets: dict[str, Any] = {}
    domain = spec.domain
    for service in spec.services:
        at = f"services.{service.name}"
        out: dict[str, Any] = {}
        if service.build is not None:
            warnings.append(f"{at}.build: not expressible in a compose app yet (give an image; left out)")
        else:
            out["image"] = service.image
        if service.command is not None:
            out["command"] = list(service.command)
        if service.env:
            out["environment"] = dict(service.env)
        if service.port is not None:
            out["ports"] = [f"{service.host_port}:{service.port}" if service.host_port else str(service.port)]
        if service.volumes:
            out["volumes"] = [f"{v.name}:{v.path}{':ro' if v.read_only else ''}" for v in service.volumes]
            volumes.update({v.name: None for v in service.volumes})
        if service.secrets:
            out["secrets"] = list(service.secrets)
            secrets.update({name: {"external": True} for name in service.secrets})
        if service.depends_on:
            out["depends_on"] = _depends_on(service)
        if service.oneshot:
            out["restart"] = "no"
        for key in _NOT_COMPOSE:
            if getattr(service, key) is not None:
                warnings.append(f"{at}.{key}: not expressible in a compose app yet (left out)")
        if service.healthcheck is not None:
            health = service.healthcheck
            out["healthcheck"] = {"test": list(health.test), "interval": _seconds(health.interval),
                                  "timeout": _seconds(health.timeout), "retries": health.retries,
                                  "start_period": _seconds(health.start_period)}
        deploy: dict[str, Any] = {}
        if service.replicas != 1:
            deploy["replicas"] = service.replicas
        limits: dict[str, Any] = {}
        if service.cpu != specs.DEFAULT_CPU:
            limits["cpus"] = str(_number(service.cpu))
        if service.memory != specs.DEFAULT_MEMORY_MB:
            limits["memory"] = f"{service.memory}M"
        if limits:
            deploy["resources"] = {"limits": limits}
        if deploy:
            out["deploy"] = deploy
        if service.domain is not None:
            if domain is not None and domain != service.domain:
                warnings.append(f"{at}.domain: a compose app routes one domain (x-cynchrod.domain); "
                                f"{service.domain} left out")
            else:
                domain = service.domain
        if service.update is not None:
            out["x-cynchrod"] = {"update": _update(service.update)}
        services[service.name] = _escaped(out)
    if spec.on_failure != "keep":
        warnings.append(f"on_failure: {spec.on_failure}: not expressible in a compose app yet (left out)")
    top: dict[str, Any] = {"name": spec.name, "services": services}
    if volumes:
        top["volumes"] = volumes
    if secrets:
        top["secrets"] = secrets
    ext: dict[str, Any] = {}
    if spec.org != specs.DEFAULT_ORG:
        ext["org"] = spec.org
    if domain is not None:
        ext["domain"] = domain
    if spec.state != "running":
        ext["state"] = spec.state
    if ext:
        top["x-cynchrod"] = ext
    return _dump(top), sorted(warnings)
