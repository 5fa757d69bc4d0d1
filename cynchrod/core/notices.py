"""What people and forges are told when a deployment's status changes: pure, no I/O.

The store records every status change of an app or a deployment in its ``status_changes``
table (SQLite triggers: the one hook point, so any writer and any status, today's or a later
one's, flows through without a change here). The notifier (``shell/notify.py``) reads those
rows as ``Change`` values and asks this module:

* ``app_event``: which event an app's change is for people (``failed``, ``recovered``,
  ``rolled_back``, ``quota``, ``secret_missing``, ``build_failed``), given what they were last
  told about the app (``last``), and what to remember instead. One message per state change,
  not one per pass: a failure that repeats (the same event and code) says nothing again.
* ``forge_state``: which commit status a deployment's change is for its forge (``pending``,
  ``success``, ``failure``).
* ``Route.matches``: whether a configured target wants an event (``on:`` and the org/app filters).

Statuses the health-gated deploys add (``crashed``, ``unhealthy``, ``completed``, ``rolled_back``)
are listed here already, so their changes are told as soon as the store records them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from cynchrod.core.codes import Code

#: Event names, as ``on:`` filters and the event JSON's ``event`` name them.
FAILED = "failed"
RECOVERED = "recovered"
ROLLED_BACK = "rolled_back"
QUOTA = "quota"
SECRET_MISSING = "secret_missing"
BUILD_FAILED = "build_failed"
#: An image update committed by cynchrod itself (``shell/updates.py``), told once per bump.
UPDATE_COMMITTED = "update_committed"
EVENTS = (FAILED, RECOVERED, ROLLED_BACK, QUOTA, SECRET_MISSING, BUILD_FAILED, UPDATE_COMMITTED)

#: Statuses (of an app or a deployment) that are a failure, a health, a rollback.
FAILING = frozenset({"failed", "crashed", "unhealthy"})
HEALTHY = frozenset({"running", "completed"})
ROLLED_BACK_STATUSES = frozenset({"rolled_back"})
#: A failure whose code has an event of its own; any other failure is ``failed``.
EVENT_OF_CODE = {Code.QUOTA_EXCEEDED.value: QUOTA, Code.SECRET_MISSING.value: SECRET_MISSING,
                 Code.BUILD_FAILED.value: BUILD_FAILED}
#: Deployment failures that are no outcome of the commit: replaced by a newer one, or retried after a stop.
NOT_AN_OUTCOME = frozenset({Code.SUPERSEDED.value, Code.INTERRUPTED.value})
#: A deployment row folded into its predecessor (the same failure again): its outcome is a failure.
FOLDED = "folded"

#: Commit statuses, in our words (each forge's own words: ``shell/notify.py``).
PENDING = "pending"
SUCCESS = "success"
FAILURE = "failure"

APP = "app"
DEPLOYMENT = "deployment"
#: A change of kind ``update``: an image update committed (``error`` holds ``service: old → new``).
UPDATE = "update"
_CODE_RE = re.compile(r"^(?:[^:\s]+:\d+: )?([a-z][a-z0-9_]*): ")


@dataclasses.dataclass(frozen=True)
class Change:
    """One row of the store's ``status_changes``: an app's or a deployment's status moved."""

    id: int
    kind: str  # APP | DEPLOYMENT
    app_id: str
    org: str
    app: str
    old: str | None
    new: str
    code: str | None
    error: str | None
    serving: str | None
    commit: str | None
    at: str
    deployment_id: int | None = None

    @property
    def failure_code(self) -> str | None:
        """The code of the failure: the row's own (a refusal, a deployment's), else the one
        ``last_error`` starts with (``code: message``, or ``path:line: code: message``)."""
        if self.code:
            return self.code
        found = _CODE_RE.match(self.error or "")
        return found.group(1) if found else None


def app_event(change: Change, last: str | None) -> tuple[str | None, str | None]:
    """(the event to tell, what to remember as told) for an app's change; ``last`` is what was
    remembered (None: nothing is wrong as far as people know). (None, last): say nothing."""
    if change.kind == UPDATE:
        return UPDATE_COMMITTED, last  # news, not a state: what people were told stays as it was
    if change.kind != APP:
        return None, last
    if change.new in FAILING or change.new in ROLLED_BACK_STATUSES:
        code = change.failure_code
        event = EVENT_OF_CODE.get(code or "")
        if event is None:
            event = ROLLED_BACK if (change.new in ROLLED_BACK_STATUSES or change.serving == "previous") else FAILED
        told = f"{event}:{code or ''}"
        return (None, last) if told == last else (event, told)
    if change.new in HEALTHY and last is not None:
        return RECOVERED, None
    return None, last


def forge_state(change: Change) -> str | None:
    """The commit status a deployment's change means, or None (not one the forge is told)."""
    if change.kind != DEPLOYMENT or not change.commit:
        return None
    if change.new == "deploying":
        return PENDING
    if change.new in HEALTHY or change.new in ("stopped", "removed"):
        return SUCCESS
    if change.new == FOLDED or change.new in ROLLED_BACK_STATUSES or (
            change.new in FAILING and change.code not in NOT_AN_OUTCOME):
        return FAILURE
    return None


def event_json(change: Change, event: str, *, url: str | None) -> dict[str, Any]:
    """The event as targets receive it (``NotificationEvent`` in the OpenAPI document)."""
    told = event not in (RECOVERED, UPDATE_COMMITTED)
    return {"id": f"evt_{change.id}", "event": event, "org": change.org, "app": change.app,
            "app_id": change.app_id, "status": change.new, "previous_status": change.old,
            "code": change.failure_code if told else None, "error": change.error if told else None,
            "message": change.error if event == UPDATE_COMMITTED else None,
            "serving": change.serving, "commit": change.commit, "at": change.at, "url": url}


@dataclasses.dataclass(frozen=True)
class Route:
    """Which events a target wants: ``on`` (None: all), ``orgs`` and ``apps`` (None: any)."""

    on: tuple[str, ...] | None = None
    orgs: tuple[str, ...] | None = None
    apps: tuple[str, ...] | None = None

    def matches(self, event: str, org: str, app: str) -> bool:
        """``apps`` entries are ``name`` (in any org the route takes) or ``org/name``."""
        return ((self.on is None or event in self.on)
                and (self.orgs is None or org in self.orgs)
                and (self.apps is None or app in self.apps or f"{org}/{app}" in self.apps))


def backoff(attempts: int, *, base: float, cap: float) -> float:
    """Seconds before the next try after ``attempts`` failed ones: base, 2 base, 4 base ... cap."""
    return float(min(cap, base * 2 ** max(0, min(attempts - 1, 30))))
