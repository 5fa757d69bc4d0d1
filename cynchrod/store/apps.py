"""App rows and their deployment history, and the quota reservations of ``POST /apps``.

App rows are soft-deleted to ``removed`` and never erased; a deployment row is one attempt
(queued, deploying, then its outcome), repeated failures folded into one.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from cynchrod.core import decisions, specs
from cynchrod.core.codes import Code
from cynchrod.core.decisions import DEPLOYING, FAILED, QUEUED, REMOVED
from cynchrod.core.errors import AppExists, QuotaFull
from cynchrod.store.db import Database, converted, now
from cynchrod.store.records import App, Deployment, main_service

#: What a deployment keeps of a failed unit's log: its last lines, and at most this many bytes of them.
LOG_LINES = 100
LOG_BYTES = 64 * 1024


def bounded_log(lines: Sequence[str]) -> str | None:
    """The last ``LOG_LINES`` lines, cut to the last ``LOG_BYTES`` bytes (None for none)."""
    if not lines:
        return None
    text = "\n".join(lines[-LOG_LINES:]).encode()[-LOG_BYTES:]
    return text.decode("utf-8", "ignore")


class Apps(Database):
    """App rows, deployments and reservations (the reconciler writes them; the API and CLI read them)."""

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
        with self._lock, converted():
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
        """Set ``fields`` of a row. A ``last_error`` written without a ``refusal`` (or a ``note``)
        clears it: each belongs to the error that states it (``Decision.refusal``, ``Decision.note``)."""
        if not fields:
            return
        if "last_error" in fields:
            fields.setdefault("refusal", None)
            fields.setdefault("note", None)
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
                    self._transition(db, build_deployment, DEPLOYING, spec_hash=spec_hash)
                    return build_deployment
            queued = db.execute("SELECT id, trigger FROM deployments WHERE app_id = ? AND status = ?"
                                " ORDER BY id DESC LIMIT 1", (app_id, QUEUED)).fetchone()
            db.execute("UPDATE apps SET status = ?, updated_at = ? WHERE id = ?", (DEPLOYING, now(), app_id))
            if queued is not None:
                # Older queued rows of the same app are superseded by this deployment.
                db.execute("UPDATE deployments SET status = ?, error_code = ?, finished_at = ?"
                           " WHERE app_id = ? AND status = ? AND id != ?",
                           (FAILED, Code.SUPERSEDED, now(), app_id, QUEUED, queued["id"]))
                self._transition(db, int(queued["id"]), DEPLOYING, spec_hash=spec_hash, commit=commit,
                                 started_at=now())
                return int(queued["id"])
            cur = db.execute(
                'INSERT INTO deployments (app_id, "commit", trigger, status, spec_hash, started_at)'
                " VALUES (?,?,?,?,?,?)", (app_id, commit, trigger, DEPLOYING, spec_hash, now()))
            return int(cur.lastrowid or 0)

    def deployment(self, deployment_id: int) -> Deployment | None:
        rows = self._query("SELECT * FROM deployments WHERE id = ?", (deployment_id,))
        return Deployment(**dict(rows[0])) if rows else None

    def finish_deployment(self, deployment_id: int, *, status: str, error_code: str | None = None,
                          error: str | None = None, merge: bool = False, log: Sequence[str] = ()) -> int:
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
            self._transition(db, deployment_id, status, error_code=error_code, error=error, finished_at=now(),
                             log=bounded_log(log))
            return deployment_id

    def _transition(self, db: sqlite3.Connection, deployment_id: int, status: str, **fields: Any) -> None:
        """The one place a deployment's status changes once it has run (deploying, running, completed,
        crashed, unhealthy, failed): what records or announces a status change hooks in here."""
        sets = ", ".join(f'"{k}" = ?' for k in ("status", *fields))
        db.execute(f"UPDATE deployments SET {sets} WHERE id = ?", (status, *fields.values(), deployment_id))

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

    def set_gate(self, org: str, name: str, gate: str | None) -> None:
        """The live app's ``gate`` (``shell.gates``: what its readiness gate judged, for a restart)."""
        with self.transaction() as db:
            db.execute("UPDATE apps SET gate = ? WHERE org = ? AND name = ? AND status != 'removed'", (gate, org, name))

    def interrupt_unfinished(self) -> int:
        """At start-up: a deployment left ``deploying`` by a killed daemon is failed, except one
        whose readiness was being judged (its app's ``gate`` names it): the next pass judges it again."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE deployments SET status = ?, error_code = ?,"
                " error = 'the daemon stopped during this deployment; it is retried', finished_at = ?"
                " WHERE status = ? AND id NOT IN (SELECT json_extract(gate, '$.deployment') FROM apps"
                " WHERE gate IS NOT NULL AND status != 'removed' AND json_extract(gate, '$.deployment') IS NOT NULL)",
                (FAILED, Code.INTERRUPTED, now(), DEPLOYING))
            return cur.rowcount

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
