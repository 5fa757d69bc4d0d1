"""The store: app rows and deployment history in SQLite (WAL) under the state dir.

Written by the reconciler, read by the CLI and the API. It is derived state:
labels in Docker and commits in Git are the truth, so a lost store is rebuilt
by the next pass (history aside). App rows are soft-deleted to ``removed`` and
never erased.
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import hashlib
import json
import pathlib
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cynchrod.core import decisions, planning, specs
from cynchrod.core.decisions import APP_STATUSES, DEPLOYING, FAILED, PENDING, QUEUED, REMOVED, RUNNING, STOPPED
from cynchrod.core.errors import AppExists as AppExists
from cynchrod.core.errors import QuotaFull as QuotaFull
from cynchrod.core.errors import StateUnwritable, StoreError, TemporaryError

__all__ = ["APP_STATUSES", "DEPLOYING", "FAILED", "PENDING", "QUEUED", "REMOVED", "RUNNING", "STOPPED"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    image TEXT NOT NULL DEFAULT '',
    domain TEXT,
    port INTEGER,
    host_port INTEGER,
    status TEXT NOT NULL,
    container_id TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_error TEXT,
    path TEXT NOT NULL DEFAULT '',
    "commit" TEXT,
    spec_json TEXT,
    deployed_hash TEXT,
    removed_at TEXT,
    source TEXT NOT NULL DEFAULT '',
    services_json TEXT,
    serving TEXT,
    refusal TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS apps_live ON apps(org, name) WHERE status != 'removed';
CREATE TABLE IF NOT EXISTS deployments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app_id TEXT NOT NULL REFERENCES apps(id),
    "commit" TEXT,
    trigger TEXT NOT NULL,
    status TEXT NOT NULL,
    spec_hash TEXT,
    error_code TEXT,
    error TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    last_seen TEXT
);
CREATE INDEX IF NOT EXISTS deployments_app ON deployments(app_id, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    org TEXT NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
"""
TOKEN_PREFIX = "cyn_"
SCHEMA += """
CREATE TABLE IF NOT EXISTS app_webhooks (
    app_id TEXT PRIMARY KEY REFERENCES apps(id),
    sealed TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tickets (
    hash TEXT PRIMARY KEY,
    token_id TEXT NOT NULL,
    app_id TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (org, name)
);
CREATE TABLE IF NOT EXISTS secrets (
    org TEXT NOT NULL,
    name TEXT NOT NULL,
    sealed TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (org, name)
);
"""


#: When a write last failed for want of room or permission (monotonic seconds; /healthz reads it).
write_failed_at: float | None = None


@contextmanager
def _converted() -> Iterator[None]:
    """sqlite3's errors as ours: no room or no permission is ``state_unwritable``."""
    global write_failed_at
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            raise TemporaryError(f"store busy: {exc}", code="store_busy") from exc
        if any(w in text for w in ("full", "readonly", "read-only", "disk i/o", "unable to open")):
            write_failed_at = time.monotonic()
            raise StateUnwritable(f"the state directory cannot be written: {exc}") from exc
        raise StoreError(f"store: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"store: {exc}") from exc


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


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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


def _token(row: sqlite3.Row) -> Token:
    return Token(id=row["id"], name=row["name"], org=row["org"], admin=bool(row["admin"]),
                 created_at=row["created_at"], revoked_at=row["revoked_at"])


class Store:
    """Thread-safe: one connection per process, serialised by a lock (writes are tiny).

    Several processes share the database (the reconciler and the API workers): WAL
    lets readers go on while one writes, and every writer path is one transaction.
    """

    def __init__(self, path: pathlib.Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        # A native lock, also under gevent: nothing yields while it is held (SQLite calls only),
        # and a thread pool's native threads may share this connection with the hub.
        self._lock = _thread.RLock()
        #: Inside ``batch`` (on the thread holding ``_lock``): transactions are savepoints.
        self._batching = False
        #: Bumped by every write of this process that may change app or deployment rows.
        self.version = 0
        self._live: tuple[tuple[int, int], dict[tuple[str, str], App]] | None = None
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(SCHEMA)
            columns = {r["name"] for r in self._db.execute("PRAGMA table_info(apps)")}
            if "source" not in columns:  # a state dir from before several repositories
                self._db.execute("ALTER TABLE apps ADD COLUMN source TEXT NOT NULL DEFAULT ''")
            if "services_json" not in columns:
                self._db.execute("ALTER TABLE apps ADD COLUMN services_json TEXT")
            if "serving" not in columns:  # a state dir from before "failed — previous version running"
                self._db.execute("ALTER TABLE apps ADD COLUMN serving TEXT")
            if "refusal" not in columns:  # a state dir from before refusals had a column: read the old prefixes once
                self._db.execute("ALTER TABLE apps ADD COLUMN refusal TEXT")
                for code in decisions.REFUSALS:
                    self._db.execute("UPDATE apps SET refusal = ? WHERE status = ? AND substr(last_error, 1, ?) = ?",
                                     (code, FAILED, len(code), code))
            columns = {r["name"] for r in self._db.execute("PRAGMA table_info(deployments)")}
            if "attempts" not in columns:  # a state dir from before repeated failures were merged
                self._db.execute("ALTER TABLE deployments ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1")
                self._db.execute("ALTER TABLE deployments ADD COLUMN last_seen TEXT")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Many writes in one transaction (one sync to disk instead of one each): each
        ``transaction`` inside it is a savepoint, undone alone when it fails. Other threads'
        writes wait for the batch's end; keep it to store work only (no engine calls)."""
        with self._lock, _converted():
            if self._batching:
                yield
                return
            self._db.execute("BEGIN IMMEDIATE")
            self._batching = True
            try:
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            finally:
                self._batching = False
            if self._db.in_transaction:  # SQLite rolls all back itself on some errors (a full disk)
                self._db.execute("COMMIT")

    @contextmanager
    def transaction(self, *, apps_changed: bool = True) -> Iterator[sqlite3.Connection]:
        with self._lock, _converted():
            if self._batching:
                yield from self._savepoint(apps_changed)
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            if apps_changed:
                self.version += 1

    def _savepoint(self, apps_changed: bool) -> Iterator[sqlite3.Connection]:
        self._db.execute("SAVEPOINT write")
        try:
            yield self._db
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK TO write")
                self._db.execute("RELEASE write")
            raise
        self._db.execute("RELEASE write")
        if apps_changed:
            self.version += 1

    def generation(self) -> tuple[int, int]:
        """Changes whenever any process has committed a write since the last call saw it
        (SQLite's ``data_version`` for the others' commits, ``version`` for this process's):
        one cheap pragma, so per-process caches of the store stay right across processes."""
        with self._lock, _converted():
            row = self._db.execute("PRAGMA data_version").fetchone()
        return (self.version, int(row[0]))

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock, _converted():
            return self._db.execute(sql, args).fetchall()

    # -- apps -----------------------------------------------------------------

    def apps(self, *, org: str | None = None, include_removed: bool = True) -> list[App]:
        sql = "SELECT * FROM apps WHERE 1=1"
        args: list[Any] = []
        if org is not None:
            sql += " AND org = ?"
            args.append(org)
        if not include_removed:
            sql += " AND status != 'removed'"
        return [App(**dict(r)) for r in self._query(sql + " ORDER BY org, name, created_at", tuple(args))]

    def live_apps(self) -> dict[tuple[str, str], App]:
        """Every live app, re-read only when a write (of this process, or of another one:
        SQLite's ``data_version``) may have changed them."""
        with self._lock, _converted():
            key = (self.version, self._db.execute("PRAGMA data_version").fetchone()[0])
            if self._live is None or self._live[0] != key:
                self._live = (key, {a.key: a for a in self.apps(include_removed=False)})
            return dict(self._live[1])

    def live_app(self, org: str, name: str) -> App | None:
        rows = self._query("SELECT * FROM apps WHERE org = ? AND name = ? AND status != 'removed'", (org, name))
        return App(**dict(rows[0])) if rows else None

    def app(self, app_id: str) -> App | None:
        rows = self._query("SELECT * FROM apps WHERE id = ?", (app_id,))
        return App(**dict(rows[0])) if rows else None

    def ensure_app(self, spec: specs.AppSpec, *, commit: str | None) -> App:
        """The live row for ``spec``'s org/name, created ``queued`` if new."""
        with self.transaction() as db:
            row = db.execute("SELECT * FROM apps WHERE org = ? AND name = ? AND status != 'removed'",
                             spec.key).fetchone()
            if row is None:
                app_id = "app_" + secrets.token_hex(6)
                stamp = now()
                db.execute(
                    "INSERT INTO apps (id, org, name, image, domain, port, status, created_at, updated_at, path,"
                    ' "commit", spec_json, source) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)',
                    (app_id, spec.org, spec.name, main_service(spec).image, spec.domain, main_service(spec).port,
                     QUEUED, stamp, stamp, spec.path, commit, spec.json_text, spec.source))
                row = db.execute("SELECT * FROM apps WHERE id = ?", (app_id,)).fetchone()
        return App(**dict(row))

    def update_app(self, app_id: str, **fields: Any) -> None:
        """Set ``fields`` of a row. A ``last_error`` written without a ``refusal`` clears the
        refusal: it belongs to the error that states it (``Decision.refusal``)."""
        if not fields:
            return
        if "last_error" in fields:
            fields.setdefault("refusal", None)
        fields["updated_at"] = now()
        cols = ", ".join(f'"{k}" = ?' for k in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE apps SET {cols} WHERE id = ?", (*fields.values(), app_id))

    def record_spec(self, app: App, spec: specs.AppSpec, *, commit: str | None) -> None:
        """Remember the last good spec, so a broken edit keeps this one running.

        Writes only when something changed: a no-op pass writes nothing.
        """
        spec_json = spec.json_text
        if (app.spec_json, app.commit, app.source) != (spec_json, commit, spec.source):
            self.update_app(app.id, image=main_service(spec).image, domain=spec.domain, port=main_service(spec).port,
                            path=spec.path,
                            commit=commit, spec_json=spec_json, source=spec.source)

    def remove_app(self, app_id: str, *, commit: str | None, trigger: str) -> None:
        """Soft-delete: the row (and its history) stays, with status ``removed``."""
        deployment = self.start_deployment(app_id, commit=commit, trigger=trigger, spec_hash="")
        self.finish_deployment(deployment, status=REMOVED)
        self.update_app(app_id, status=REMOVED, removed_at=now(), container_id=None, host_port=None)

    # -- deployments --------------------------------------------------------

    def queue_deployment(self, app_id: str, *, commit: str, trigger: str) -> int:
        """A deployment an imperative call asked for; the next pass that acts on the app takes it."""
        with self.transaction() as db:
            cur = db.execute(
                'INSERT INTO deployments (app_id, "commit", trigger, status, started_at) VALUES (?,?,?,?,?)',
                (app_id, commit, trigger, QUEUED, now()))
            return int(cur.lastrowid or 0)

    def ensure_queued(self, app_id: str, *, commit: str | None, trigger: str) -> int:
        """The app's queued deployment (one an API call made, or a new one): a pass has
        decided to act on the app, and a worker has not taken it yet."""
        with self.transaction() as db:
            queued = db.execute("SELECT id FROM deployments WHERE app_id = ? AND status = ? ORDER BY id DESC"
                                " LIMIT 1", (app_id, QUEUED)).fetchone()
            db.execute("UPDATE apps SET status = ?, updated_at = ? WHERE id = ?", (QUEUED, now(), app_id))
            if queued is not None:
                return int(queued["id"])
            cur = db.execute(
                'INSERT INTO deployments (app_id, "commit", trigger, status, started_at) VALUES (?,?,?,?,?)',
                (app_id, commit, trigger, QUEUED, now()))
            return int(cur.lastrowid or 0)

    def start_deployment(self, app_id: str, *, commit: str | None, trigger: str, spec_hash: str,
                         build_deployment: int | None = None) -> int:
        """Move the app's queued deployment (if any) to ``deploying``, or open a new one.

        ``build_deployment`` is the deployment a build of this spec ran under: the
        deploy continues it, so its build log and its result are one row.
        """
        with self.transaction() as db:
            if build_deployment is not None:
                row = db.execute("SELECT id FROM deployments WHERE id = ? AND app_id = ? AND status IN (?, ?)",
                                 (build_deployment, app_id, QUEUED, DEPLOYING)).fetchone()
                if row is not None:
                    db.execute("UPDATE apps SET status = ?, updated_at = ? WHERE id = ?", (DEPLOYING, now(), app_id))
                    db.execute("UPDATE deployments SET status = ?, spec_hash = ? WHERE id = ?",
                               (DEPLOYING, spec_hash, build_deployment))
                    return build_deployment
            queued = db.execute("SELECT id, trigger FROM deployments WHERE app_id = ? AND status = ?"
                                " ORDER BY id DESC LIMIT 1", (app_id, QUEUED)).fetchone()
            db.execute("UPDATE apps SET status = ?, updated_at = ? WHERE id = ?", (DEPLOYING, now(), app_id))
            if queued is not None:
                # Older queued rows of the same app are superseded by this deployment.
                db.execute("UPDATE deployments SET status = ?, error_code = 'superseded', finished_at = ?"
                           " WHERE app_id = ? AND status = ? AND id != ?",
                           (FAILED, now(), app_id, QUEUED, queued["id"]))
                db.execute('UPDATE deployments SET status = ?, spec_hash = ?, "commit" = ?, started_at = ?'
                           " WHERE id = ?", (DEPLOYING, spec_hash, commit, now(), queued["id"]))
                return int(queued["id"])
            cur = db.execute(
                'INSERT INTO deployments (app_id, "commit", trigger, status, spec_hash, started_at)'
                " VALUES (?,?,?,?,?,?)", (app_id, commit, trigger, DEPLOYING, spec_hash, now()))
            return int(cur.lastrowid or 0)

    def deployment(self, deployment_id: int) -> Deployment | None:
        rows = self._query("SELECT * FROM deployments WHERE id = ?", (deployment_id,))
        return Deployment(**dict(rows[0])) if rows else None

    def finish_deployment(self, deployment_id: int, *, status: str, error_code: str | None = None,
                          error: str | None = None, merge: bool = False) -> int:
        """Close a deployment. With ``merge``, a failure that repeats the app's previous
        deployment (same spec and code) is folded into that row (attempts, last seen,
        newest message) instead of adding one: a loop of retries does not grow the history."""
        with self.transaction() as db:
            if merge and status == FAILED:
                mine = db.execute("SELECT app_id, spec_hash FROM deployments WHERE id = ?",
                                  (deployment_id,)).fetchone()
                prev = db.execute(
                    "SELECT id FROM deployments WHERE app_id = ? AND id < ? ORDER BY id DESC LIMIT 1",
                    (mine["app_id"], deployment_id)).fetchone() if mine is not None else None
                if prev is not None and db.execute(
                        "SELECT 1 FROM deployments WHERE id = ? AND status = ? AND error_code IS ? AND spec_hash IS ?",
                        (prev["id"], FAILED, error_code, mine["spec_hash"])).fetchone():
                    # The same failure again (messages may differ in ids): one row, counted, newest message.
                    db.execute("DELETE FROM deployments WHERE id = ?", (deployment_id,))
                    db.execute("UPDATE deployments SET attempts = attempts + 1, last_seen = ?, error = ? WHERE id = ?",
                               (now(), error, prev["id"]))
                    return int(prev["id"])
            db.execute("UPDATE deployments SET status = ?, error_code = ?, error = ?, finished_at = ? WHERE id = ?",
                       (status, error_code, error, now(), deployment_id))
            return deployment_id

    def record_failure(self, app_id: str, *, commit: str | None, trigger: str, spec_hash: str | None,
                       code: str, error: str) -> int:
        """A failure found before anything was applied (bad manifest, quota, missing secret):
        the app's queued deployment takes it, else a new failed row; a repeat of the last
        failure is folded into it."""
        stamp = now()
        with self.transaction() as db:
            queued = db.execute("SELECT id FROM deployments WHERE app_id = ? AND status = ? ORDER BY id DESC"
                                " LIMIT 1", (app_id, QUEUED)).fetchone()
            if queued is not None:
                db.execute("UPDATE deployments SET status = ?, spec_hash = ?, error_code = ?, error = ?,"
                           " finished_at = ? WHERE id = ?", (FAILED, spec_hash, code, error, stamp, queued["id"]))
                return int(queued["id"])
            last = db.execute("SELECT id, status, error_code, error FROM deployments WHERE app_id = ?"
                              " ORDER BY id DESC LIMIT 1", (app_id,)).fetchone()
            if last is not None and (last["status"], last["error_code"], last["error"]) == (FAILED, code, error):
                db.execute("UPDATE deployments SET attempts = attempts + 1, last_seen = ? WHERE id = ?",
                           (stamp, last["id"]))
                return int(last["id"])
            cur = db.execute(
                'INSERT INTO deployments (app_id, "commit", trigger, status, spec_hash, error_code, error,'
                " started_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (app_id, commit, trigger, FAILED, spec_hash, code, error, stamp, stamp))
            return int(cur.lastrowid or 0)

    def deployments(self, app_id: str, *, limit: int = 20) -> list[Deployment]:
        rows = self._query("SELECT * FROM deployments WHERE app_id = ? ORDER BY id DESC LIMIT ?", (app_id, limit))
        return [Deployment(**dict(r)) for r in rows]

    def last_deployment(self, app_id: str) -> Deployment | None:
        found = self.deployments(app_id, limit=1)
        return found[0] if found else None

    def last_deployments(self, *, org: str | None = None) -> dict[str, Deployment]:
        """The newest deployment of every app (of ``org``), in one query: app id -> deployment."""
        sql = ("SELECT d.* FROM deployments d JOIN (SELECT app_id, MAX(id) AS id FROM deployments GROUP BY app_id) m"
               " ON d.id = m.id")
        args: tuple[Any, ...] = ()
        if org is not None:
            sql += " JOIN apps a ON a.id = d.app_id WHERE a.org = ?"
            args = (org,)
        return {r["app_id"]: Deployment(**dict(r)) for r in self._query(sql, args)}

    def interrupt_unfinished(self) -> int:
        """At start-up: a deployment left ``deploying`` by a killed daemon is failed."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE deployments SET status = ?, error_code = 'interrupted',"
                " error = 'the daemon stopped during this deployment; it is retried', finished_at = ?"
                " WHERE status = ?", (FAILED, now(), DEPLOYING))
            return cur.rowcount

    # -- tokens ---------------------------------------------------------------

    def create_token(self, *, org: str, name: str, admin: bool = False) -> tuple[Token, str]:
        """A new token; the secret is returned once and only its hash is kept."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = "tok_" + secrets.token_hex(6)
        with self.transaction() as db:
            db.execute("INSERT INTO tokens (id, name, org, admin, hash, created_at) VALUES (?,?,?,?,?,?)",
                       (token_id, name, org, int(admin), token_hash(secret), now()))
        token = self.token_by_id(token_id)
        assert token is not None
        return token, secret

    def token_by_id(self, token_id: str) -> Token | None:
        rows = self._query("SELECT id, name, org, admin, created_at, revoked_at FROM tokens WHERE id = ?",
                           (token_id,))
        return _token(rows[0]) if rows else None

    def authenticate(self, secret: str) -> Token | None:
        """The live token whose hash matches, or None."""
        rows = self._query("SELECT id, name, org, admin, created_at, revoked_at FROM tokens"
                           " WHERE hash = ? AND revoked_at IS NULL", (token_hash(secret),))
        return _token(rows[0]) if rows else None

    def find_token(self, secret: str) -> Token | None:
        """The token whose hash matches, revoked or not (to say why a sign-in failed)."""
        rows = self._query("SELECT id, name, org, admin, created_at, revoked_at FROM tokens WHERE hash = ?",
                           (token_hash(secret),))
        return _token(rows[0]) if rows else None

    def is_live_token(self, token_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM tokens WHERE id = ? AND revoked_at IS NULL", (token_id,)))

    def tokens(self) -> list[Token]:
        rows = self._query("SELECT id, name, org, admin, created_at, revoked_at FROM tokens ORDER BY created_at")
        return [_token(r) for r in rows]

    def revoke_token(self, id_or_name: str) -> int:
        with self.transaction() as db:
            cur = db.execute("UPDATE tokens SET revoked_at = ? WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                             (now(), id_or_name, id_or_name))
            return cur.rowcount

    # -- secrets (sealed by ``cynchrod.desired.secrets``; never decrypted here) ------------

    def put_secret(self, org: str, name: str, sealed: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO secrets (org, name, sealed, updated_at) VALUES (?,?,?,?)"
                       " ON CONFLICT(org, name) DO UPDATE SET sealed = excluded.sealed,"
                       " updated_at = excluded.updated_at", (org, name, sealed, now()))

    def delete_secret(self, org: str, name: str) -> bool:
        with self.transaction() as db:
            return db.execute("DELETE FROM secrets WHERE org = ? AND name = ?", (org, name)).rowcount > 0

    def secret(self, org: str, name: str) -> str | None:
        rows = self._query("SELECT sealed FROM secrets WHERE org = ? AND name = ?", (org, name))
        return str(rows[0]["sealed"]) if rows else None

    def secret_names(self, org: str) -> list[tuple[str, str]]:
        rows = self._query("SELECT name, updated_at FROM secrets WHERE org = ? ORDER BY name", (org,))
        return [(r["name"], r["updated_at"]) for r in rows]

    def put_app_webhook(self, app_id: str, sealed: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO app_webhooks (app_id, sealed, created_at) VALUES (?,?,?)"
                       " ON CONFLICT(app_id) DO UPDATE SET sealed = excluded.sealed, created_at = excluded.created_at",
                       (app_id, sealed, now()))

    def app_webhook(self, app_id: str) -> str | None:
        rows = self._query("SELECT sealed FROM app_webhooks WHERE app_id = ?", (app_id,))
        return str(rows[0]["sealed"]) if rows else None

    # -- log-stream tickets (single use; only their hash is kept) ----------------

    def issue_ticket(self, ticket: str, *, token_id: str, app_id: str, ttl_s: float) -> None:
        now_s = time.time()
        with self.transaction(apps_changed=False) as db:
            db.execute("DELETE FROM tickets WHERE expires_at < ?", (now_s,))
            db.execute("INSERT INTO tickets (hash, token_id, app_id, expires_at) VALUES (?,?,?,?)",
                       (token_hash(ticket), token_id, app_id, now_s + ttl_s))

    def redeem_ticket(self, ticket: str, app_id: str) -> str | None:
        """The token id the ticket was issued to, once (any process), for this app, before it expires."""
        with self.transaction(apps_changed=False) as db:
            row = db.execute("SELECT token_id, app_id, expires_at FROM tickets WHERE hash = ?",
                             (token_hash(ticket),)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM tickets WHERE hash = ?", (token_hash(ticket),))
        if row["app_id"] != app_id or row["expires_at"] < time.time():
            return None
        return str(row["token_id"])

    # -- quota reservations (POST /apps, across processes) -----------------------

    def reserve_app(self, org: str, name: str, *, cap: int, ttl_s: float = 120.0) -> None:
        """Hold a place under ``org``'s cap for ``org/name`` while its commit is pushed.

        One write transaction checks and reserves: concurrent creates in any number of
        processes take exactly the free places. Raises ``AppExists`` or ``QuotaFull``.
        """
        now_s = time.time()
        with self.transaction(apps_changed=False) as db:
            db.execute("DELETE FROM reservations WHERE expires_at < ?", (now_s,))
            live = {(r["org"], r["name"]): App(**dict(r))
                    for r in db.execute("SELECT * FROM apps WHERE org = ? AND status != 'removed'", (org,))}
            held = {r["name"] for r in db.execute("SELECT name FROM reservations WHERE org = ?", (org,))}
            if (org, name) in live or name in held:
                raise AppExists(f"app {org}/{name} exists")
            count = decisions.admitted(live, org) + len({n for n in held if (org, n) not in live})
            if count >= cap:
                raise QuotaFull(f"org {org} has {count} apps, its max_apps is {cap}")
            db.execute("INSERT INTO reservations (org, name, expires_at) VALUES (?,?,?)", (org, name, now_s + ttl_s))

    def release_app(self, org: str, name: str) -> None:
        with self.transaction(apps_changed=False) as db:
            db.execute("DELETE FROM reservations WHERE org = ? AND name = ?", (org, name))

    # -- meta -----------------------------------------------------------------

    def instance_id(self) -> str:
        """This state directory's identity, made once: recorded on every unit it creates."""
        found = self.meta("instance")
        if isinstance(found, str) and found:
            return found
        with self.transaction(apps_changed=False) as db:
            db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('instance', ?)",
                       (json.dumps(secrets.token_hex(8)),))
        value = self.meta("instance")
        assert isinstance(value, str)
        return value

    def set_problems(self, problems: list[Problem]) -> None:
        """Replace the desired state's problems (a write like an app row's: listings are rebuilt)."""
        value = json.dumps([dataclasses.asdict(p) for p in problems])
        with self.transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES ('problems', ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                       (value, value))

    def problems(self, *, org: str | None = None) -> list[Problem]:
        """The desired state's problems shown to ``org`` (None: all of them), by path and line."""
        found = [Problem(**p) for p in self.meta("problems", [])]
        return sorted((p for p in found if p.visible_to(org)), key=lambda p: (p.path, p.line))

    def set_meta(self, key: str, value: Any) -> None:
        with self.transaction(apps_changed=False) as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = ?",
                       (key, json.dumps(value), json.dumps(value)))

    def meta(self, key: str, default: Any = None) -> Any:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0]["value"]) if rows else default
