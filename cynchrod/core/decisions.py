"""The pure decision core: what each app needs, given everything a pass knows.

Called by the reconciler once per pass (and by ``cynchrod plan``): ``decide`` takes
the desired specs, the store's rows, the units of the runtime's view, each app's
back-off memory and the time, and returns one ``Decision`` per app: the actions,
the status to record, the failure to record, when to look again, whether it is
pruned. No I/O, no clock, no engine: the reconciler is the shell that fetches the
inputs and carries the decisions out, and the unit tests (with hypothesis) drive
this module against the in-memory runtime.

The rules, each written once here:

* **Prune** only what a source that was read no longer declares (``may_prune``):
  an unreadable, empty or unparsable source never removes anything.
* **Holds**: an app with a missing secret, a failing or pending build, or a policy
  refusal is not acted on; its units stay as they are.
* **Quota**: per org, apps that already have a row keep their place; new ones are
  admitted oldest commit first up to ``max_apps``; an admitted app is never refused.
* **Domains**: a domain (an app's or a service's) is one app's, across orgs: the
  app that holds it keeps it, a second claim is held with ``domain_taken``.
* **Refusals** (``quota_exceeded``, ``domain_taken``) are recorded as the row's ``refusal``
  (``Decision.refusal``), which the next pass reads back; never a prefix of ``last_error``.
  So is the note a running app keeps until its next deployment (``oom_killed``: the row's
  ``note``, ``Decision.note``).
* **Back-off**: every failure backs off (1, 2, 4 ... 300 s), temporary ones
  included; a permanent failure waits for a new spec. Self-healing a unit that
  keeps dying backs off the same way (0, 0, 1, 2 ... 300 s), reset after a minute up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Protocol

from cynchrod.core import planning, specs
from cynchrod.core.codes import Code
from cynchrod.core.errors import CynchrodError, ManifestError, PermanentError

#: App statuses (the product page's words).
QUEUED = "queued"
PENDING = "pending"
DEPLOYING = "deploying"
RUNNING = "running"
STOPPED = "stopped"
FAILED = "failed"
REMOVED = "removed"
#: An app whose units all ran to completion (``oneshot``), and such a deployment.
COMPLETED = "completed"
APP_STATUSES = (QUEUED, PENDING, DEPLOYING, RUNNING, STOPPED, FAILED, REMOVED, COMPLETED)
#: Shown, never stored: an app that should be running while the engine cannot be seen (a frozen or
#: unreachable dockerd): what we last saw is no longer known to be true.
UNKNOWN = "unknown"


def shown_status(status: str, *, engine_up: bool) -> str:
    """The status the API, the dashboard and ``/metrics`` show for a stored one."""
    return UNKNOWN if not engine_up and status in (RUNNING, DEPLOYING) else status
#: ``serving`` of a failed app whose units of an earlier version still run (its newest version
#: was refused, held, or could not be applied): "failed — previous version running".
PREVIOUS = "previous"

#: Trigger names, as deployment rows record them, strongest first.
TRIGGERS = ("api", "rollback", "update", "webhook", "watch", "build", "self-heal", "poll")
DEFAULT_MAX_APPS = 10
BACKOFF_MAX_S = 300.0
HEAL_RESET_S = 60.0
#: Holds the decisions themselves make (quota, domains): a refused app holds no place.
REFUSALS = frozenset({Code.QUOTA_EXCEEDED, Code.DOMAIN_TAKEN})
#: Notes a running app keeps (its ``last_error``) until its next deployment: why a healed unit had died.
NOTES = frozenset({Code.OOM_KILLED})


class Row(Protocol):
    """What the decisions read of a stored app row (``store.App``)."""

    @property
    def status(self) -> str: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def refusal(self) -> str | None:
        """The code of the refusal (one of ``REFUSALS``) the app was last held with, else None."""
        ...
    @property
    def note(self) -> str | None:
        """The code of the note (one of ``NOTES``) a running app keeps with its ``last_error``, else None."""
        ...
    @property
    def deployed_hash(self) -> str | None: ...
    @property
    def source(self) -> str: ...
    @property
    def domains(self) -> frozenset[str]:
        """The host names the app's last recorded spec claims, lowercase."""
        ...
    @property
    def created_at(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class Backoff:
    """One app's memory between passes: failures in a row, and self-heals."""

    failures: int = 0
    #: No new attempt before this time (the clock the reconciler passes in).
    until: float = 0.0
    #: A permanent failure of this spec hash: nothing is tried until the hash changes.
    blocked_hash: str = ""
    heals: int = 0
    last_heal: float = -math.inf


def delay(count: int) -> float:
    """1, 2, 4 ... seconds for the ``count``-th failure in a row, capped at five minutes."""
    return min(BACKOFF_MAX_S, 2.0 ** max(count - 1, 0))


def after_failure(memory: Backoff, error: CynchrodError, *, spec_hash: str, now: float) -> Backoff:
    failures = memory.failures + 1
    return dataclasses.replace(memory, failures=failures, until=now + delay(failures),
                               blocked_hash=spec_hash if error.permanent else "")


def after_success(memory: Backoff) -> Backoff:
    return dataclasses.replace(memory, failures=0, until=0.0, blocked_hash="")


@dataclasses.dataclass(frozen=True)
class Gate:
    """Where an app's readiness gate stands (``core.health``, judged by the reconciler): its status
    overrides ``running`` while the units of ``spec_hash`` are in place and nothing is to be done."""

    spec_hash: str
    status: str = DEPLOYING
    error: str | None = None
    #: For a failed gate: ``PREVIOUS`` when the last healthy version was put back (``on_failure: rollback``).
    serving: str | None = None


@dataclasses.dataclass(frozen=True)
class Inputs:
    desired: Mapping[tuple[str, str], specs.AppSpec]
    rows: Mapping[tuple[str, str], Row]
    units: Sequence[planning.Unit]
    now: float
    trigger: str = "poll"
    #: Errors of the files that declare an app whose last good spec is kept running.
    manifest_errors: Mapping[tuple[str, str], Sequence[ManifestError]] = dataclasses.field(default_factory=dict)
    #: Apps not to act on this pass, and why (secret missing, build failed, policy).
    holds: Mapping[tuple[str, str], CynchrodError] = dataclasses.field(default_factory=dict)
    #: Apps waiting for something that is under way (a build): status only.
    waiting: Mapping[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    memory: Mapping[tuple[str, str], Backoff] = dataclasses.field(default_factory=dict)
    #: Sources whose commit was read this pass (only their undeclared apps may go).
    read: frozenset[str] = frozenset()
    all_read: bool = True
    max_apps: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: For new apps over a cap: how many commits ago their file appeared (older first).
    ages: Mapping[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    #: Apps whose deployment's readiness is being judged, or was judged failed or completed.
    gates: Mapping[tuple[str, str], Gate] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Decision:
    key: tuple[str, str]
    spec: specs.AppSpec | None
    actions: tuple[planning.Action, ...] = ()
    #: The status once the actions are done (or now, when there are none).
    status: str = RUNNING
    #: ``last_error`` to record (None clears it).
    error: str | None = None
    #: A failed deployment to record (deduplicated against the last one by the store).
    failure: CynchrodError | None = None
    #: The deployment's trigger ("self-heal" when healing a deployed spec).
    trigger: str = "poll"
    #: Record a finished deployment although nothing is acted on (a spec change with no unit change).
    record: bool = False
    #: Look at this app again after this many seconds (back-off).
    retry_in: float | None = None
    #: Remove the app: carry out the removals, then its resources and its row.
    prune: bool = False
    memory: Backoff = Backoff()
    #: For a failed app: ``PREVIOUS`` when an earlier version keeps serving (``previous_serving``).
    serving: str | None = None
    #: The row's ``refusal`` to record: the code of a quota or domain hold (``REFUSALS``), else None.
    refusal: Code | None = None
    #: The row's ``note`` to record with ``error``: the code of a note a running app keeps (``NOTES``).
    note: Code | None = None

    @property
    def acts(self) -> bool:
        return bool(self.actions)


def may_prune(row_source: str | None, *, read: frozenset[str], all_read: bool) -> bool:
    """An app declared nowhere may go only if the repository it came from was read."""
    if not row_source:
        return all_read
    return row_source in read


def running_status(spec: specs.AppSpec, units: Sequence[planning.Unit], row: Row | None) -> str:
    if spec.state == "stopped":
        return STOPPED
    up = {(u.service, u.replica) for u in units if u.state == planning.RUNNING}
    want = {(s.name, r) for s in spec.services for r in range(s.replicas)}
    done = {(u.service, u.replica) for u in units if u.state == planning.EXITED and u.exit_code == 0
            and any(s.oneshot and s.name == u.service for s in spec.services)}
    if want <= up | done:
        return RUNNING
    return row.status if row is not None else QUEUED


def previous_serving(units: Sequence[planning.Unit], *, failed_hashes: frozenset[str]) -> bool:
    """A failed app's earlier version serves: it has units, all running, none of the version that failed."""
    return bool(units) and all(u.state == planning.RUNNING and u.spec_hash not in failed_hashes for u in units)


def _serving(inputs: Inputs, d: Decision, units: Sequence[planning.Unit]) -> str | None:
    """``serving`` of a decision: a failed app with an earlier version up (or put back by its actions).

    With a manifest error the spec is the last good one, so its own units are the earlier version;
    otherwise (a hold, a back-off after a failed apply) units of the new spec are not."""
    if d.status != FAILED or d.spec is None or d.spec.state == "stopped":
        return None
    if d.key in inputs.manifest_errors:
        if d.actions:
            return PREVIOUS  # the actions put the last good spec back
        return PREVIOUS if previous_serving(units, failed_hashes=frozenset()) else None
    if d.actions:
        return None
    new = frozenset(d.spec.service_hash(s) for s in d.spec.services)
    return PREVIOUS if previous_serving(units, failed_hashes=new) else None


def manifest_text(errors: Sequence[ManifestError]) -> str:
    """Every error of a failing file, one per line (the first decides the code)."""
    return "\n".join(str(e) for e in errors)


def quota(inputs: Inputs) -> dict[tuple[str, str], CynchrodError]:
    """New apps over their org's ``max_apps``, and why; apps that have a row keep their place."""
    by_org: dict[str, list[tuple[str, str]]] = {}
    for key in inputs.desired:
        by_org.setdefault(key[0], []).append(key)
    refused: dict[tuple[str, str], CynchrodError] = {}
    for org, keys in by_org.items():
        cap = inputs.max_apps.get(org, DEFAULT_MAX_APPS)
        if len(keys) <= cap:
            continue  # all fit, whichever are new
        admitted = {k for k in keys if k in inputs.rows and not quota_refused(inputs.rows[k])}
        new = [k for k in keys if k not in admitted]
        new.sort(key=lambda k: (-inputs.ages.get(k, 0), k[1]))
        for key in new[max(cap - len(admitted), 0):]:
            refused[key] = PermanentError(
                f"org {org} is at its max_apps of {cap}; {key[1]} was not deployed", code=Code.QUOTA_EXCEEDED)
    return refused


def over_cap(desired: Mapping[tuple[str, str], specs.AppSpec], rows: Mapping[tuple[str, str], Row],
             max_apps: Mapping[str, int]) -> set[tuple[str, str]]:
    """The new apps whose age ``quota`` needs (only orgs over their cap)."""
    counts: dict[str, int] = {}
    for org, _ in desired:
        counts[org] = counts.get(org, 0) + 1
    return {k for k in desired if counts[k[0]] > max_apps.get(k[0], DEFAULT_MAX_APPS)
            and (k not in rows or quota_refused(rows[k]))}


def admitted(rows: Mapping[tuple[str, str], Row], org: str) -> int:
    """How many apps of ``org`` hold a place under its cap (the one quota count, used by
    the passes and by ``POST /apps`` alike): a row refused for quota holds none."""
    return sum(1 for (o, _), row in rows.items() if o == org and not quota_refused(row))


def quota_refused(row: Row) -> bool:
    return row.status == FAILED and row.refusal == Code.QUOTA_EXCEEDED


def domain_refused(row: Row) -> bool:
    return row.status == FAILED and row.refusal == Code.DOMAIN_TAKEN


def refusal_of(error: CynchrodError) -> Code | None:
    """The refusal a hold records (quota, domain), or None for other holds and failures."""
    code = Code.of(error.code)
    return code if code in REFUSALS else None


def _noted(row: Row | None) -> tuple[str | None, Code | None]:
    """(``last_error``, its code) of a note a running app keeps until its next deployment, read by the
    row's ``note`` column (``NOTES``); (None, None) when it has none (other errors are cleared)."""
    note = Code.of(row.note) if row is not None else None
    if row is None or note not in NOTES:
        return None, None
    return row.last_error, note


def _holder(domain: str, holder: tuple[str, str], claim: tuple[str, str]) -> str:
    """Who holds ``domain``, as the claimant may be told: an app of its own org by name; another
    org's app not at all (every other cross-org lookup is a 404, and this text reaches the
    claimant's API answers, dashboard and CLI)."""
    if holder[0] == claim[0]:
        return f"domain {domain} belongs to app {holder[0]}/{holder[1]}"
    return f"domain {domain} is taken by an app of another org"


def domains(inputs: Inputs) -> dict[tuple[str, str], CynchrodError]:
    """Apps that claim a domain another app holds (any org), and why: first come keeps it.

    Every host name counts: an app's ``domain`` and its services'. The holder is
    an app whose row already has the domain and was not refused it
    (the oldest row, if several); else, among new claims, the first by org/name.
    """
    claims: dict[str, list[tuple[str, str]]] = {}
    for key, spec in inputs.desired.items():
        for domain in spec.domains:
            claims.setdefault(domain, []).append(key)
    refused: dict[tuple[str, str], CynchrodError] = {}
    for domain, keys in claims.items():
        if len(keys) < 2:
            continue

        def incumbent(k: tuple[str, str], domain: str = domain) -> bool:
            row = inputs.rows.get(k)
            return row is not None and domain in row.domains and not domain_refused(row) \
                and not quota_refused(row)

        holder = min(keys, key=lambda k: (not incumbent(k), inputs.rows[k].created_at if incumbent(k) else "", k))
        for key in keys:
            if key != holder:
                refused[key] = PermanentError(f"{_holder(domain, holder, key)}; {key[1]} was not deployed",
                                              code=Code.DOMAIN_TAKEN)
    return refused


def decide(inputs: Inputs) -> list[Decision]:
    """One decision per app that is desired, stored or observed, in name order."""
    units: dict[tuple[str, str], list[planning.Unit]] = {}
    for u in inputs.units:
        units.setdefault(u.key, []).append(u)
    refused = {**domains(inputs), **quota(inputs)}
    out = []
    desired, rows = inputs.desired, inputs.rows
    # Apps that may take the in-sync shortcut: no hold, back-off memory, wait or manifest error.
    special = inputs.holds.keys() | refused.keys() | inputs.memory.keys() | inputs.waiting.keys() \
        | inputs.manifest_errors.keys() | inputs.gates.keys()
    for key in sorted(desired.keys() | rows.keys() | units.keys()):
        spec = desired.get(key)
        mine = units.get(key, [])
        if spec is None:
            row = rows.get(key)
            if may_prune(row.source if row is not None else None, read=inputs.read, all_read=inputs.all_read):
                actions = tuple(planning.plan_app(None, mine, key))
                out.append(Decision(key, None, actions, status=REMOVED, prune=True, trigger=inputs.trigger))
            continue
        if key not in special and _in_sync(spec, mine):
            out.append(_in_sync_decision(inputs, key, spec, rows.get(key)))
            continue
        hold = inputs.holds.get(key) or refused.get(key)
        decision = _decide_app(inputs, spec, mine, rows.get(key), inputs.memory.get(key, Backoff()), hold)
        if decision.status == FAILED:
            gate = inputs.gates.get(key)
            serving = gate.serving if gate is not None and gate.status == FAILED and gate.serving else \
                _serving(inputs, decision, mine)
            decision = dataclasses.replace(decision, serving=serving)
        out.append(decision)
    return out


def _in_sync(spec: specs.AppSpec, units: Sequence[planning.Unit]) -> bool:
    """The common case of a no-op pass: one service, one replica, its one unit running this spec
    (nothing to plan: ``_decide_app`` would find no action and the status ``running``)."""
    if len(units) != 1 or len(spec.services) != 1 or spec.state == "stopped":
        return False
    service, unit = spec.services[0], units[0]
    return service.replicas == 1 and unit.replica == 0 and unit.service == service.name \
        and unit.state == planning.RUNNING and unit.spec_hash == spec.service_hash(service)


def _in_sync_decision(inputs: Inputs, key: tuple[str, str], spec: specs.AppSpec, row: Row | None) -> Decision:
    """What ``_decide_app`` decides for an app ``_in_sync`` with no hold, memory, wait or manifest
    error, without planning it: at 10,000 apps, planning each one made a no-op decision 3x slower."""
    error, note = _noted(row)
    return Decision(key, spec, status=RUNNING, error=error, note=note, trigger=inputs.trigger,
                    record=row is None or row.deployed_hash != spec.hash)


def _decide_app(inputs: Inputs, spec: specs.AppSpec, units: list[planning.Unit], row: Row | None,
                memory: Backoff, hold: CynchrodError | None) -> Decision:
    key, now = spec.key, inputs.now
    errors = inputs.manifest_errors.get(key, ())
    manifest_failure = errors[0] if errors else None
    if hold is not None:
        return Decision(key, spec, status=FAILED, error=str(hold), failure=hold, trigger=inputs.trigger,
                        memory=memory, refusal=refusal_of(hold))
    if key in inputs.waiting:
        return Decision(key, spec, status=DEPLOYING, error=None, trigger="build", memory=memory)
    if memory.blocked_hash and memory.blocked_hash != spec.hash:
        memory = after_success(memory)  # a new spec: a permanent failure no longer applies
    actions = tuple(planning.plan_app(spec, units, key))
    deployed = row is not None and row.deployed_hash == spec.hash
    if memory.heals and now - memory.last_heal >= HEAL_RESET_S:
        memory = dataclasses.replace(memory, heals=0)
    if not actions:
        status = running_status(spec, units, row)
        error, note = _noted(row)
        gate = inputs.gates.get(key)
        if gate is not None and gate.spec_hash == spec.hash and spec.state != "stopped":
            status = gate.status
            if status == FAILED:
                error, note = gate.error, None
        if manifest_failure is not None:
            status, error, note = FAILED, manifest_text(errors), None
        return Decision(key, spec, status=status, error=error, note=note, failure=manifest_failure,
                        trigger=inputs.trigger, record=not deployed, memory=after_success(memory)
                        if memory.failures and not memory.blocked_hash else memory)
    # Backed off: the row's error (and its refusal, if any) stand.
    kept = Code.of(row.refusal) if row is not None else None
    if memory.blocked_hash == spec.hash:
        return Decision(key, spec, status=FAILED, error=row.last_error if row is not None else None,
                        trigger=inputs.trigger, memory=memory, refusal=kept)
    if now < memory.until:
        return Decision(key, spec, status=FAILED, error=row.last_error if row is not None else None,
                        trigger=inputs.trigger, retry_in=memory.until - now, memory=memory, refusal=kept)
    trigger = inputs.trigger
    if deployed:
        # The spec was deployed and something diverged since: self-healing, backed off.
        trigger = "self-heal"
        if memory.heals >= 2 and now < memory.last_heal + delay(memory.heals - 1):
            wait = memory.last_heal + delay(memory.heals - 1) - now
            why = _death(units)
            error = f"{Code.CRASH_LOOP}: {why}; restarting in {math.ceil(wait)}s (restart {memory.heals + 1})"
            return Decision(key, spec, status=FAILED, error=error, trigger=trigger, retry_in=wait, memory=memory)
        memory = dataclasses.replace(memory, heals=memory.heals + 1, last_heal=now)
    status = STOPPED if spec.state == "stopped" else RUNNING
    error = None
    if manifest_failure is not None:
        status, error = FAILED, manifest_text(errors)
    return Decision(key, spec, actions, status=status, error=error, failure=manifest_failure, trigger=trigger,
                    memory=memory)


def _death(units: Sequence[planning.Unit]) -> str:
    for u in units:
        if u.state == planning.OOM_KILLED:
            return f"{Code.OOM_KILLED} (service {u.service} exceeded its memory limit)"
    for u in units:
        if u.state == planning.EXITED:
            return f"exited with code {u.exit_code}" if u.exit_code is not None else "exited"
    return "unit is gone"
