"""A client of the Registry HTTP API v2 (the OCI distribution API), for image updates.

Called by the update checker (``shell/updates.py``) on its own thread, never inside a pass.
It lists a repository's tags (following ``Link: <…>; rel="next"`` pages) and reads a tag's
manifest digest (``HEAD`` with the manifest media types in ``Accept``, so the digest is the one
``docker pull`` resolves, not a schema1 one). Authentication follows the registry's
``WWW-Authenticate`` challenge: ``Basic`` with the org's credentials, or ``Bearer``: a token
fetched from the challenge's realm (with the credentials, when there are any), cached until it
expires. Every request has a timeout; an error, a timeout or a 429 puts the registry in back-off
(doubling from 5 s to 10 min, or the ``Retry-After`` it asks for), during which calls fail at once
without a request. Library errors become ``RegistryError`` with a stable code.

Credentials are an org secret named ``registry-auths`` (encrypted at rest like every secret): JSON
``{"HOST[:PORT]": {"username": "…", "password": "…"}}``, or a Docker ``config.json``
(``{"auths": {"HOST": {"auth": "base64(user:pass)"}}}``). They are sent to their host only.

Scheme: ``http`` for loopback registries (127.0.0.0/8, ``::1``, ``localhost``: what dockerd trusts
without TLS), ``https`` for every other host unless it is listed in ``insecure`` (the daemon lists the
host of the config's ``registry.url`` when that URL is ``http://``: the swarm lab's registry).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib import parse

import requests

from cynchrod.core import updates
from cynchrod.core.codes import Code
from cynchrod.core.errors import RegistryError

#: The org secret that holds registry credentials.
AUTH_SECRET = "registry-auths"
MANIFEST_TYPES = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
#: Connect and read timeouts of every request (a slow registry delays only its own check).
TIMEOUT = (3.0, 10.0)
PAGE_SIZE = 1000
MAX_PAGES = 50
MIN_BACKOFF = 5.0
MAX_BACKOFF = 600.0
MAX_BODY = 8 * 1024 * 1024
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')
_LINK = re.compile(r"<([^>]+)>\s*;\s*rel=\"?next\"?")


@dataclasses.dataclass(frozen=True)
class Credentials:
    username: str
    password: str = dataclasses.field(repr=False)


def parse_auths(raw: bytes | None) -> dict[str, Credentials]:
    """The ``registry-auths`` secret -> host -> credentials. ``RegistryError`` (unauthorized) when unreadable;
    the message never holds the value."""
    if not raw:
        return {}
    try:
        data = json.loads(raw)
        entries = data.get("auths", data) if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise ValueError
        out: dict[str, Credentials] = {}
        for host, entry in entries.items():
            host = str(host).removeprefix("https://").removeprefix("http://").split("/", 1)[0]
            if "auth" in entry:
                user, _, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
            else:
                user, password = entry["username"], entry["password"]
            out[host] = Credentials(str(user), str(password))
        return out
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error, UnicodeDecodeError):
        raise RegistryError(f"the org secret {AUTH_SECRET} is not JSON of host -> username/password",
                            code=Code.REGISTRY_UNAUTHORIZED) from None


def insecure_hosts(url: str) -> list[str]:
    """The host of a configured ``http://`` registry URL (spoken to without TLS), else none."""
    parts = parse.urlsplit(url)
    return [parts.netloc] if parts.scheme == "http" and parts.netloc else []


def is_loopback(host: str) -> bool:
    name = parse.urlsplit("//" + host).hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass
class _Backoff:
    until: float = 0.0
    delay: float = 0.0
    reason: str = ""


class Registry:
    """Talks to any number of registries; thread-safe; keeps tokens and back-off per registry."""

    def __init__(self, *, timeout: tuple[float, float] = TIMEOUT, insecure: Iterable[str] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout = timeout
        self._insecure = frozenset(insecure)
        self._clock = clock
        self._session = requests.Session()
        self._session.headers["User-Agent"] = "cynchrod-updates"
        self._lock = threading.Lock()
        self._backoff: dict[str, _Backoff] = {}
        self._tokens: dict[tuple[str, str, str], tuple[str, float]] = {}
        #: Requests sent per registry host (for tests and /metrics).
        self.requests: dict[str, int] = {}

    def close(self) -> None:
        self._session.close()

    # -- the two questions -----------------------------------------------------------------------
    def tags(self, ref: updates.ImageRef, *, credentials: Credentials | None = None) -> list[str]:
        """Every tag of ``ref``'s repository (all pages)."""
        url: str | None = f"{self._base(ref.registry)}/v2/{ref.repository}/tags/list?n={PAGE_SIZE}"
        out: list[str] = []
        for _ in range(MAX_PAGES):
            if url is None:
                break
            response = self._request("GET", url, ref=ref, credentials=credentials)
            try:
                body = json.loads(response.content[:MAX_BODY])
                page = body.get("tags") or [] if isinstance(body, dict) else None
                if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                    raise ValueError
            except ValueError:
                self._fail(ref.registry, "not a tag list")
                raise RegistryError(f"{ref.registry}/{ref.repository}: the tag list is not JSON of tags",
                                    code=Code.REGISTRY_GARBAGE) from None
            out.extend(page)
            url = self._next(url, response.headers.get("Link"))
        self._ok(ref.registry)
        return out

    def digest(self, ref: updates.ImageRef, tag: str, *, credentials: Credentials | None = None) -> str | None:
        """The digest ``tag`` points at (None when there is no such tag)."""
        url = f"{self._base(ref.registry)}/v2/{ref.repository}/manifests/{parse.quote(tag)}"
        response = self._request("HEAD", url, ref=ref, credentials=credentials, accept=MANIFEST_TYPES,
                                 missing_ok=True)
        if response.status_code == 404:
            self._ok(ref.registry)
            return None
        digest = response.headers.get("Docker-Content-Digest", "")
        if not re.fullmatch(r"[a-z0-9]+:[a-f0-9]{32,}", digest):
            self._fail(ref.registry, "no digest")
            raise RegistryError(f"{ref.registry}/{ref.repository}:{tag}: no Docker-Content-Digest in the answer",
                                code=Code.REGISTRY_GARBAGE)
        self._ok(ref.registry)
        return digest

    def backing_off(self, registry: str) -> float:
        """Seconds left of ``registry``'s back-off (0 when it may be asked)."""
        with self._lock:
            state = self._backoff.get(registry)
            return max(0.0, state.until - self._clock()) if state else 0.0

    # -- plumbing --------------------------------------------------------------------------------
    def _base(self, host: str) -> str:
        scheme = "http" if is_loopback(host) or host in self._insecure else "https"
        return f"{scheme}://{host}"

    @staticmethod
    def _next(url: str, link: str | None) -> str | None:
        match = _LINK.search(link or "")
        return parse.urljoin(url, match.group(1)) if match else None

    def _ok(self, registry: str) -> None:
        with self._lock:
            self._backoff.pop(registry, None)

    def _fail(self, registry: str, reason: str, *, retry_after: float | None = None) -> float:
        with self._lock:
            state = self._backoff.setdefault(registry, _Backoff())
            state.delay = min(MAX_BACKOFF, max(MIN_BACKOFF, state.delay * 2))
            wait = min(MAX_BACKOFF, retry_after) if retry_after is not None else state.delay
            state.until = self._clock() + wait
            state.reason = reason
            return wait

    def _send(self, method: str, url: str, headers: Mapping[str, str], *,
              auth: tuple[str, str] | None = None) -> requests.Response:
        host = parse.urlsplit(url).netloc
        with self._lock:
            self.requests[host] = self.requests.get(host, 0) + 1
        return self._session.request(method, url, headers=dict(headers), timeout=self._timeout, auth=auth,
                                     allow_redirects=True, stream=False)

    def _request(self, method: str, url: str, *, ref: updates.ImageRef, credentials: Credentials | None,
                 accept: str | None = None, missing_ok: bool = False) -> requests.Response:
        registry = ref.registry
        left = self.backing_off(registry)
        if left > 0:
            with self._lock:
                reason = self._backoff[registry].reason if registry in self._backoff else ""
            raise RegistryError(f"{registry}: backing off for {left:.0f}s after: {reason}",
                                code=Code.REGISTRY_UNREACHABLE)
        headers = {"Accept": accept} if accept else {}
        scope = f"repository:{ref.repository}:pull"
        who = credentials.username if credentials else ""
        try:
            token = self._cached_token(registry, scope, who)
            if token:
                headers["Authorization"] = f"Bearer {token}"
            response = self._send(method, url, headers)
            if response.status_code == 401:
                challenge = response.headers.get("WWW-Authenticate", "")
                kind = challenge.split(" ", 1)[0].lower()
                if kind == "basic" and credentials is not None:
                    response = self._send(method, url, headers, auth=(credentials.username, credentials.password))
                elif kind == "bearer":
                    headers["Authorization"] = f"Bearer {self._token(challenge, registry, scope, credentials)}"
                    response = self._send(method, url, headers)
        except requests.RequestException as exc:
            wait = self._fail(registry, type(exc).__name__)
            raise RegistryError(f"{registry}: {_describe(exc)} (next try in {wait:.0f}s)",
                                code=Code.REGISTRY_UNREACHABLE) from None
        status = response.status_code
        if status in (401, 403):
            self._fail(registry, f"HTTP {status}")
            raise RegistryError(f"{registry}/{ref.repository}: HTTP {status}: "
                                + ("the credentials were refused" if credentials else "credentials are needed"
                                   f" (org secret {AUTH_SECRET})"), code=Code.REGISTRY_UNAUTHORIZED)
        if status == 404 and missing_ok:
            return response
        if status != 200:
            retry = _retry_after(response.headers.get("Retry-After")) if status in (429, 503) else None
            wait = self._fail(registry, f"HTTP {status}", retry_after=retry)
            raise RegistryError(f"{registry}/{ref.repository}: HTTP {status} (next try in {wait:.0f}s)",
                                code=Code.REGISTRY_UNREACHABLE)
        return response

    def _cached_token(self, registry: str, scope: str, who: str) -> str | None:
        with self._lock:
            found = self._tokens.get((registry, scope, who))
        return found[0] if found and found[1] > self._clock() else None

    def _token(self, challenge: str, registry: str, scope: str, credentials: Credentials | None) -> str:
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise RegistryError(f"{registry}: a Bearer challenge without a realm", code=Code.REGISTRY_GARBAGE)
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        auth = (credentials.username, credentials.password) if credentials else None
        response = self._send("GET", realm + ("&" if "?" in realm else "?") + parse.urlencode(query), {}, auth=auth)
        if response.status_code in (401, 403):
            raise RegistryError(f"{registry}: the token service refused "
                                + ("the credentials" if credentials else "anonymous access"),
                                code=Code.REGISTRY_UNAUTHORIZED)
        try:
            body: Any = response.json()
            token = body.get("token") or body.get("access_token")
            if response.status_code != 200 or not isinstance(token, str) or not token:
                raise ValueError
            ttl = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise RegistryError(f"{registry}: the token service answered no token (HTTP {response.status_code})",
                                code=Code.REGISTRY_GARBAGE) from None
        with self._lock:
            self._tokens[(registry, scope, credentials.username if credentials else "")] = (
                token, self._clock() + max(0.0, ttl - 5))
        return token


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _describe(exc: requests.RequestException) -> str:
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "cannot connect"
    return "the request failed"
