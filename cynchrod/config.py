"""Operator settings: the ``--config`` file (``schemas/config.schema.json``) merged with flags.

The CLI builds one ``Settings`` value; nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Any

import jsonschema
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from cynchrod import decisions, manifests, specs
from cynchrod.errors import PermanentError

_VALIDATOR = jsonschema.Draft202012Validator(manifests.load_schema("config.schema.json"))
_OWNER_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
ORG_RE = specs.NAME_RE
#: config-file key -> Settings field
_FILE_KEYS = {"repo": "repo", "branch": "branch", "path": "path", "state": "state", "interval": "interval",
              "listen": "listen", "owner": "owner", "publishAddress": "publish_address", "resync": "resync",
              "concurrency": "concurrency", "stopTimeout": "stop_timeout",
              "workers": "workers"}
DEFAULT_MAX_APPS = decisions.DEFAULT_MAX_APPS


class ConfigError(PermanentError):
    code = "invalid_config"


def load_file(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = YAML(typ="safe").load(path.read_text()) or {}
    except (OSError, YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        where = ".".join(map(str, errors[0].absolute_path)) or "config"
        raise ConfigError(f"{path}: {where}: {errors[0].message}")
    values = {_FILE_KEYS[k]: v for k, v in data.items() if k in _FILE_KEYS}
    if "defaults" in data:
        values["default_max_apps"] = data["defaults"].get("max_apps", DEFAULT_MAX_APPS)
    if "webhook" in data:
        values["webhook_secret"] = data["webhook"].get("secret", "")
    if "sources" in data:
        values["sources"] = [SourceConfig(repo=c["repo"], branch=c.get("branch", "main"), path=c.get("path", ""),
                                          org=c.get("org")) for c in data["sources"]]
    if "orgs" in data:
        values["org_max_apps"] = tuple(sorted((org, o["max_apps"]) for org, o in data["orgs"].items()
                                              if "max_apps" in o))
    return values


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One followed repository; ``org`` pins it to one tenant's org."""

    repo: str
    branch: str = "main"
    path: str = ""
    org: str | None = None


@dataclasses.dataclass(frozen=True)
class Settings:
    repo: str = ""
    branch: str = "main"
    path: str = ""
    state: pathlib.Path = pathlib.Path("state")
    interval: float = 30.0
    #: Seconds between full relists of the engine (events keep the view current in between).
    resync: float = 300.0
    listen: str = "127.0.0.1:8080"
    owner: str = "cynchrod"
    publish_address: str = "127.0.0.1"
    concurrency: int = 4
    stop_timeout: int = 10
    #: API worker processes (0: one per CPU core).
    workers: int = 0
    default_max_apps: int = DEFAULT_MAX_APPS
    org_max_apps: tuple[tuple[str, int], ...] = ()
    #: Every followed repository: ``--repo`` (repeatable) or the config's ``sources``.
    sources: tuple[SourceConfig, ...] = ()
    #: Shared secret of ``POST /webhooks/git`` (config ``webhook.secret`` or
    #: ``CYNCHROD_WEBHOOK_SECRET``); empty turns the endpoint off.
    webhook_secret: str = dataclasses.field(default="", repr=False)
    #: The ``--config`` file, watched and reloaded by the daemon.
    config_path: str = ""

    def max_apps(self, org: str) -> int:
        """The org's app cap (``orgs.<org>.max_apps``, else ``defaults.max_apps``, else 10)."""
        return dict(self.org_max_apps).get(org, self.default_max_apps)

    @property
    def api_workers(self) -> int:
        """How many API worker processes to run: ``workers``, else one per CPU core."""
        return self.workers or max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                   else (os.cpu_count() or 1))

    @classmethod
    def flag_fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("org_max_apps", "sources", "config_path")]

    @classmethod
    def build(cls, values: dict[str, Any]) -> Settings:
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        for key, value in values.items():
            kind = types[key]
            try:
                if kind == "float":
                    out[key] = float(value)
                elif kind == "int":
                    out[key] = int(value)
                elif kind == "pathlib.Path":
                    out[key] = pathlib.Path(value)
                elif key in ("org_max_apps", "sources"):
                    out[key] = tuple(value)
                elif key == "repo" and isinstance(value, list):
                    out[key] = value
                else:
                    out[key] = str(value)
            except ValueError as exc:
                raise ConfigError(f"{key}: {value!r} is not a valid {kind}") from exc
        repos = out.pop("repo", "")
        settings = cls(**out)
        if not settings.sources:
            urls = repos if isinstance(repos, list) else [repos] if repos else []
            settings = dataclasses.replace(settings, sources=tuple(
                SourceConfig(repo=u, branch=settings.branch, path=settings.path) for u in urls))
        if settings.sources:
            settings = dataclasses.replace(settings, repo=settings.sources[0].repo)
        urls = [(c.repo, c.branch) for c in settings.sources]
        if len(set(urls)) != len(urls):
            raise ConfigError("the same repository and branch is listed twice")
        if not _OWNER_RE.match(settings.owner):
            raise ConfigError(f"owner: {settings.owner!r} must be lowercase letters, digits and '-'")
        if settings.resync <= 0 or settings.interval <= 0 or settings.concurrency < 1 or settings.stop_timeout < 0 \
                or not 0 <= settings.workers <= 64:
            raise ConfigError("interval and concurrency must be positive, stop timeout not negative, "
                              "workers from 0 (one per core) to 64")
        return settings
