"""The store's rows as values: ``App``, ``Deployment``, ``Token``, ``Problem``, and what
an app row shows of its spec (``main_service``, ``services_json``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

from cynchrod.core import planning, specs

TOKEN_PREFIX = "cyn_"


def main_service(spec: specs.AppSpec) -> specs.ServiceSpec:
    """The service an app row shows: the first with a port, else the first."""
    return next((s for s in spec.services if s.port), spec.services[0])


def services_json(spec: specs.AppSpec, units: list[planning.Unit]) -> str:
    """Each service of an app with its image, port, own domain, replicas and the state of each unit."""
    out = []
    for s in spec.services:
        mine = sorted((u for u in units if u.service == s.name), key=lambda u: u.replica)
        out.append({"name": s.name, "image": s.image, "port": s.port, "domain": s.domain, "host_port": next(
            (u.endpoint for u in mine if u.endpoint), s.host_port), "replicas": s.replicas,
                    "running": sum(u.state == planning.RUNNING for u in mine),
                    "units": [{"replica": u.replica, "state": u.state, "instance": u.instance[:12],
                               **({"node": u.node} if u.node else {})} for u in mine]})
    return json.dumps(out, separators=(",", ":"))



@dataclasses.dataclass(frozen=True)
class App:
    id: str
    org: str
    name: str
    image: str
    domain: str | None
    port: int | None
    host_port: int | None
    status: str
    container_id: str | None
    created_at: str
    updated_at: str
    last_error: str | None
    path: str
    commit: str | None
    spec_json: str | None
    deployed_hash: str | None
    removed_at: str | None
    #: URL of the repository that declares the app.
    source: str
    #: Each service's image, port, replicas and unit states (``services_json``), as JSON.
    services_json: str | None = None
    #: Of a failed app: ``previous`` while an earlier version keeps serving (``decisions.PREVIOUS``).
    serving: str | None = None
    #: Of a failed app: the code of the refusal it is held with (``decisions.REFUSALS``: quota, domain).
    refusal: str | None = None
    #: Of a running app: the code of the note it keeps until its next deployment (``decisions.NOTES``:
    #: ``oom_killed``, when a healed unit had been killed for its memory).
    note: str | None = None
    #: The last spec of the app whose deployment passed its readiness (``AppSpec.to_json`` as text):
    #: what ``on_failure: rollback`` puts back (``shell.gates``).
    healthy_spec: str | None = None
    #: Where the app's readiness gate stands, as JSON (``shell.gates.persisted``): the spec hash it
    #: judges, its status (``deploying``, ``failed``, ``completed``), error, ``serving`` and open
    #: deployment. Read back after a restart, so a verdict (and a rollback) outlives the daemon.
    gate: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.org, self.name)

    @property
    def spec(self) -> specs.AppSpec | None:
        return specs.AppSpec.from_json(json.loads(self.spec_json)) if self.spec_json else None

    @property
    def domains(self) -> frozenset[str]:
        """The host names of the last recorded spec (the app's and its services'), lowercase."""
        spec = self.spec
        if spec is None:
            return frozenset({self.domain.lower()} if self.domain else ())
        return frozenset(spec.domains)

    @property
    def service_domains(self) -> list[tuple[str, str]]:
        """(service, domain) of each service with its own domain, from ``services_json``
        (parsed only when it names one: the dashboard lists hundreds of rows)."""
        if not self.services_json or '"domain":"' not in self.services_json:
            return []
        return [(s["name"], s["domain"]) for s in json.loads(self.services_json) if s.get("domain")]


@dataclasses.dataclass(frozen=True)
class Token:
    """An API token as stored: never the token itself, only its hash."""

    id: str
    name: str
    org: str
    admin: bool
    created_at: str
    revoked_at: str | None

    def sees(self, org: str) -> bool:
        return self.admin or self.org == org


@dataclasses.dataclass(frozen=True)
class Problem:
    """An error of the desired state that belongs to no app: a file that declares no deployed app
    (a new file with a YAML error, no name, a duplicate ...). The reconciler replaces the list
    after each pass that read a source; the API lists them beside the apps.

    ``org`` is the org the file declares as far as it can be read (None: it cannot be told).
    Who sees it: admin tokens, and tokens of that org; a file whose org is unknown is shown to
    admin tokens only, so no org reads another's file names or errors.
    """

    path: str
    line: int
    code: str
    message: str
    org: str | None

    def visible_to(self, org: str | None) -> bool:
        """Shown to a listing of ``org`` (None: every org, an admin's)."""
        return org is None or self.org == org

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code}: {self.message}"


def token_hash(token: str) -> str:
    # Tokens are 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Deployment:
    id: int
    app_id: str
    commit: str | None
    trigger: str
    status: str
    spec_hash: str | None
    error_code: str | None
    error: str | None
    started_at: str
    finished_at: str | None
    #: How many times in a row this same failure happened, and when it was last seen.
    attempts: int = 1
    last_seen: str | None = None
    #: The last log lines of the unit that failed its readiness (bounded: ``LOG_LINES``, ``LOG_BYTES``).
    log: str | None = None
