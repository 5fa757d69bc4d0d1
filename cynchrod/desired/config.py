"""Operator settings: the ``--config`` file (``schemas/config.schema.json``) merged with flags.

The CLI builds one ``Settings`` value; nothing else reads the environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import re
from typing import Any
from urllib.parse import unquote, urlparse

from cynchrod.core import decisions, notices, specs
from cynchrod.core.errors import ConfigError as ConfigError
from cynchrod.desired import validation, yamlio

_SCHEMA = validation.Schema("config.schema.json")
_OWNER_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
ORG_RE = specs.NAME_RE
#: config-file key -> Settings field
_FILE_KEYS = {"repo": "repo", "branch": "branch", "path": "path", "state": "state", "interval": "interval",
              "listen": "listen", "owner": "owner", "publishAddress": "publish_address", "resync": "resync",
              "watch": "watch",
              "concurrency": "concurrency", "stopTimeout": "stop_timeout", "runtime": "runtime",
              "workers": "workers", "authFailures": "auth_failures"}
RUNTIMES = ("docker", "swarm")
DEFAULT_MAX_APPS = decisions.DEFAULT_MAX_APPS


def load_file(path: pathlib.Path) -> dict[str, Any]:
    try:
        data = yamlio.load(path.read_bytes()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yamlio.YamlError as exc:
        raise ConfigError(f"{path}:{exc.line}: {exc.code}: {exc.message}") from exc
    problems = _SCHEMA.problems(data)
    if problems:
        where = ".".join(map(str, problems[0].path)) or "config"
        raise ConfigError(f"{path}: {where}: {problems[0].message}")
    values = {_FILE_KEYS[k]: v for k, v in data.items() if k in _FILE_KEYS}
    if isinstance(values.get("watch"), bool):
        values["watch"] = "on" if values["watch"] else "off"
    if "defaults" in data:
        values["default_max_apps"] = data["defaults"].get("max_apps", DEFAULT_MAX_APPS)
    if "webhook" in data:
        values["webhook_secret"] = data["webhook"].get("secret", "")
    if "edge" in data:
        edge = data["edge"]
        for key, field in (("admin", "edge"), ("listen", "edge_listen"), ("tlsListen", "edge_tls_listen"),
                           ("readyTimeout", "edge_ready_timeout"), ("drain", "edge_drain")):
            if key in edge:
                values[field] = edge[key]
    if "registry" in data:
        values.update(registry_url=data["registry"]["url"], registry_username=data["registry"].get("username", ""),
                      registry_password=data["registry"].get("password", ""))
    if "sources" in data:
        values["sources"] = [SourceConfig(repo=c["repo"], branch=c.get("branch", "main"), path=c.get("path", ""),
                                          org=c.get("org")) for c in data["sources"]]
    if "builds" in data:
        values["build_local_repos"] = tuple(data["builds"].get("localRepos", []))
    if "orgs" in data:
        values["org_build_local_repos"] = tuple(sorted(
            (org, tuple(o["builds"].get("localRepos", []))) for org, o in data["orgs"].items() if "builds" in o))
    if "orgs" in data:
        values["org_max_apps"] = tuple(sorted((org, o["max_apps"]) for org, o in data["orgs"].items()
                                              if "max_apps" in o))
    if "notify" in data:
        values["notify"] = tuple(_notify_target(t) for t in data["notify"])
    if "forge" in data:
        values["forge"] = _forge(data["forge"])
    if "publicUrl" in data:
        values["public_url"] = data["publicUrl"].rstrip("/")
    if "delivery" in data:
        d = data["delivery"]
        values["delivery"] = Delivery(**{k: d[key] for key, k in (
            ("backoff", "backoff_s"), ("maxBackoff", "max_backoff_s"), ("attempts", "attempts"),
            ("timeout", "timeout_s")) if key in d})
    return values


def _env(name: str, where: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(f"{where}: the environment variable {name} is not set")
    return value


def _notify_target(t: dict[str, Any]) -> NotifyTarget:
    kind = "webhook" if "webhook" in t else "apprise"
    secret = _env(t["secret_env"], f"notify: {kind} secret_env") if "secret_env" in t else ""
    route = notices.Route(on=tuple(t["on"]) if "on" in t else None,
                          orgs=tuple(t["orgs"]) if "orgs" in t else None,
                          apps=tuple(t["apps"]) if "apps" in t else None)
    return NotifyTarget(kind=kind, url=t[kind], secret=secret, route=route)


FORGE_API = {"github": "https://api.github.com", "gitlab": "https://gitlab.com/api/v4",
             "bitbucket": "https://api.bitbucket.org/2.0"}


def _forge(f: dict[str, Any]) -> Forge:
    kind = f["kind"]
    api_url = f.get("api_url") or FORGE_API.get(kind, "")
    if not api_url:
        raise ConfigError(f"forge: api_url is required for {kind} (e.g. https://gitea.example.com/api/v1)")
    return Forge(kind=kind, api_url=api_url.rstrip("/"), repository=f["repository"],
                 token=_env(f["token_env"], "forge: token_env"))


@dataclasses.dataclass(frozen=True)
class NotifyTarget:
    """One ``notify:`` entry: a generic ``webhook`` (HMAC-signed with ``secret``) or an ``apprise`` URL."""

    kind: str
    url: str = dataclasses.field(repr=False)
    secret: str = dataclasses.field(default="", repr=False)
    route: notices.Route = dataclasses.field(default_factory=notices.Route)

    @property
    def id(self) -> str:
        """Stable across restarts and reloads while the entry is the same; the outbox keeps this, not the URL."""
        return "t_" + hashlib.sha256(f"{self.kind}\0{self.url}".encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """What the API may show: the scheme and host of a webhook, the scheme of an Apprise URL
        (their paths and credentials may be secrets)."""
        parsed = urlparse(self.url)
        if self.kind == "webhook":
            return f"webhook {parsed.scheme}://{parsed.hostname or ''}{f':{parsed.port}' if parsed.port else ''}"
        return f"apprise {parsed.scheme or self.url.split(':', 1)[0]}://"


@dataclasses.dataclass(frozen=True)
class Forge:
    """``forge:``: commit statuses for the followed repository."""

    kind: str
    api_url: str
    repository: str
    token: str = dataclasses.field(repr=False)

    @property
    def id(self) -> str:
        return "f_" + hashlib.sha256(f"{self.kind}\0{self.api_url}\0{self.repository}".encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"forge {self.kind} {self.repository}"


@dataclasses.dataclass(frozen=True)
class Delivery:
    """``delivery:``: how notifications are retried (seconds): backoff, 2 backoff ... maxBackoff, dead after
    ``attempts``; each attempt gives up after ``timeout``."""

    backoff_s: float = 5.0
    max_backoff_s: float = 600.0
    attempts: int = 12
    timeout_s: float = 5.0


_REMOTE_SCHEMES = ("https", "http", "ssh", "git")
_SCP_LIKE = re.compile(r"^[^/:]+:(?!//)")


def local_repo_path(url: str) -> pathlib.Path | None:
    """The folder a repository URL names on this machine, or None for a remote URL.

    Remote: ``https://``, ``http://``, ``ssh://``, ``git://`` and scp-like
    ``user@host:path``. Everything else is local to libgit2 (a path, ``file://``,
    ``~/x``, ``./x``) and is returned resolved (symlinks and ``..`` followed), so a
    prefix check cannot be escaped.
    """
    parsed = urlparse(url)
    if parsed.scheme.lower() in _REMOTE_SCHEMES and parsed.netloc:
        return None
    if parsed.scheme.lower() == "file":
        return pathlib.Path(unquote(parsed.path) or "/").resolve()
    if "://" not in url and _SCP_LIKE.match(url):
        return None
    return pathlib.Path(url).expanduser().resolve()


def repo_allowed(url: str, local_prefixes: tuple[str, ...]) -> bool:
    """A remote URL always; a local one only under one of ``local_prefixes`` (paths or file:// URLs)."""
    path = local_repo_path(url)
    if path is None:
        return True
    for prefix in local_prefixes:
        root = local_repo_path(prefix)
        if root is not None and (path == root or path.is_relative_to(root)):
            return True
    return False


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
    #: ``on``: local repositories and working trees are watched (a push applies at once); ``off``: not.
    watch: str = "on"
    listen: str = "127.0.0.1:8080"
    owner: str = "cynchrod"
    publish_address: str = "127.0.0.1"
    concurrency: int = 4
    stop_timeout: int = 10
    #: API worker processes (0: one per CPU core).
    workers: int = 0
    #: Wrong credentials a client address may send before it backs off (``cynchrod.api.throttle``).
    auth_failures: int = 10
    default_max_apps: int = DEFAULT_MAX_APPS
    org_max_apps: tuple[tuple[str, int], ...] = ()
    #: Every followed repository: ``--repo`` (repeatable) or the config's ``sources``.
    sources: tuple[SourceConfig, ...] = ()
    #: Shared secret of ``POST /webhooks/git`` (config ``webhook.secret`` or
    #: ``CYNCHROD_WEBHOOK_SECRET``); empty turns the endpoint off.
    webhook_secret: str = dataclasses.field(default="", repr=False)
    #: Caddy's admin API (``--edge http://127.0.0.1:2019``); empty: no edge, ``domain`` is informational.
    edge: str = ""
    #: Where the edge's plain-HTTP server listens (``--edge-listen``).
    edge_listen: str = ":80"
    #: Where the edge's HTTPS server listens (``--edge-tls-listen``); empty: none.
    edge_tls_listen: str = ""
    #: Seconds a zero-downtime deploy waits for the new unit to be ready.
    edge_ready_timeout: float = 60.0
    #: Seconds the old unit keeps running after the route moved (in-flight requests finish).
    edge_drain: float = 2.0
    #: ``docker`` (one engine, containers) or ``swarm`` (a swarm manager, services).
    runtime: str = "docker"
    #: Where the swarm runtime pushes the images of repo apps (config ``registry``).
    registry_url: str = ""
    registry_username: str = ""
    registry_password: str = dataclasses.field(default="", repr=False)
    #: The ``--config`` file, watched and reloaded by the daemon.
    config_path: str = ""
    #: ``builds.localRepos``: where ``build.repo`` may name a repository on this machine.
    build_local_repos: tuple[str, ...] = ()
    org_build_local_repos: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: ``notify:``: where events go (``shell/notify.py``).
    notify: tuple[NotifyTarget, ...] = ()
    #: ``forge:``: commit statuses of the followed repository.
    forge: Forge | None = None
    #: ``publicUrl``: the dashboard's address as people reach it (links in events and commit statuses).
    public_url: str = ""
    delivery: Delivery = dataclasses.field(default_factory=Delivery)

    def build_repo_allowed(self, org: str, url: str) -> bool:
        """Whether an app of ``org`` may build from ``url`` (``policy_violation`` when not)."""
        return repo_allowed(url, self.build_local_repos + dict(self.org_build_local_repos).get(org, ()))

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
        return [f.name for f in dataclasses.fields(cls)
                if f.name not in ("org_max_apps", "sources", "config_path", "build_local_repos",
                                  "org_build_local_repos", "notify", "forge", "public_url", "delivery")]

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
                elif key in ("org_max_apps", "sources", "build_local_repos", "org_build_local_repos", "notify"):
                    out[key] = tuple(value)
                elif key in ("forge", "delivery") or (key == "repo" and isinstance(value, list)):
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
        if settings.edge and not settings.edge.startswith(("http://", "https://")):
            raise ConfigError(f"edge: {settings.edge!r} must be the URL of Caddy's admin API, "
                              "e.g. http://127.0.0.1:2019")
        if settings.edge_ready_timeout <= 0 or settings.edge_drain < 0:
            raise ConfigError("edge ready timeout must be positive, drain not negative")
        if settings.watch not in ("on", "off"):
            raise ConfigError(f"watch: {settings.watch!r} must be on or off")
        if settings.runtime not in RUNTIMES:
            raise ConfigError(f"runtime: {settings.runtime!r} must be one of {', '.join(RUNTIMES)}")
        if not 1 <= settings.auth_failures <= 1_000_000:
            raise ConfigError(f"authFailures: {settings.auth_failures} must be from 1 to 1000000")
        if settings.resync <= 0 or settings.interval <= 0 or settings.concurrency < 1 or settings.stop_timeout < 0 \
                or not 0 <= settings.workers <= 64:
            raise ConfigError("interval and concurrency must be positive, stop timeout not negative, "
                              "workers from 0 (one per core) to 64")
        return settings
