"""The store's database: its schema and migrations, its connection, transactions and batches.

``Database`` is the base of the store's parts (``apps``, ``tokens``, ``secrets``, ``meta``):
they share its one connection and lock, so a transaction or a batch may span them all.
"""

from __future__ import annotations

import _thread
import contextlib
import pathlib
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cynchrod.core import decisions
from cynchrod.core.codes import Code
from cynchrod.core.decisions import FAILED
from cynchrod.core.errors import StateUnwritable, StoreError, TemporaryError
from cynchrod.store.records import App

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
    refusal TEXT,
    note TEXT,
    healthy_spec TEXT,
    gate TEXT
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
    last_seen TEXT,
    log TEXT
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
    expires_at REAL NOT NULL,
    session TEXT
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
-- Dashboard sessions: the cookie carries a random id and only its hash is kept here, so a
-- sign-out (the row deleted), a revoked token or the expiry ends every copy of the cookie.
CREATE TABLE IF NOT EXISTS sessions (
    hash TEXT PRIMARY KEY,
    token_id TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""
# Notifications and commit statuses (``store/outbox.py``). Every status change of an app or a
# deployment is written to ``status_changes`` by these triggers, whoever writes the row: the one
# hook point the notifier reads (``core/notices.py``), so a new status flows through unchanged.
SCHEMA += """
CREATE TABLE IF NOT EXISTS status_changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    app_id TEXT NOT NULL,
    deployment_id INTEGER,
    old TEXT,
    new TEXT NOT NULL,
    code TEXT,
    error TEXT,
    serving TEXT,
    "commit" TEXT,
    at TEXT NOT NULL
);
-- What people were last told of each app (a failure's event and code), so a failure that repeats
-- pass after pass is told once.
CREATE TABLE IF NOT EXISTS notify_state (app_id TEXT PRIMARY KEY, told TEXT NOT NULL);
-- At-least-once delivery: a row per message and target, until it is sent or dead.
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dedupe TEXT NOT NULL UNIQUE,
    target TEXT NOT NULL,
    target_name TEXT NOT NULL,
    kind TEXT NOT NULL,
    event TEXT NOT NULL,
    org TEXT NOT NULL,
    app TEXT NOT NULL,
    body TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL,
    sent_at TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(status, next_at);
CREATE INDEX IF NOT EXISTS outbox_org ON outbox(org, id);
-- Passes a webhook asked for (``store/passes.py``): the next pass that fetches takes them and
-- writes its outcome per app, so the caller can wait for it (``GET /passes/{id}``, ``cynchrod wait``).
CREATE TABLE IF NOT EXISTS passes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    trigger TEXT NOT NULL,
    requested_commit TEXT,
    status TEXT NOT NULL,
    "commit" TEXT,
    requested_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT,
    source_error TEXT,
    apps_json TEXT
);
CREATE INDEX IF NOT EXISTS passes_status ON passes(status);
"""

#: Made after the columns they read exist (``migrate`` adds those of an older state dir first).
TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS apps_status_changed AFTER UPDATE OF status, serving, refusal, last_error ON apps
WHEN OLD.status IS NOT NEW.status OR OLD.serving IS NOT NEW.serving
     OR (NEW.status != 'running' AND (OLD.refusal IS NOT NEW.refusal OR OLD.last_error IS NOT NEW.last_error))
BEGIN
    INSERT INTO status_changes (kind, app_id, old, new, code, error, serving, "commit", at)
    VALUES ('app', NEW.id, OLD.status, NEW.status, NEW.refusal, NEW.last_error, NEW.serving, NEW."commit",
            strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));
END;
CREATE TRIGGER IF NOT EXISTS deployments_added AFTER INSERT ON deployments
BEGIN
    INSERT INTO status_changes (kind, app_id, deployment_id, old, new, code, error, "commit", at)
    VALUES ('deployment', NEW.app_id, NEW.id, NULL, NEW.status, NEW.error_code, NEW.error, NEW."commit",
            strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));
END;
CREATE TRIGGER IF NOT EXISTS deployments_status_changed AFTER UPDATE OF status ON deployments
WHEN OLD.status IS NOT NEW.status
BEGIN
    INSERT INTO status_changes (kind, app_id, deployment_id, old, new, code, error, "commit", at)
    VALUES ('deployment', NEW.app_id, NEW.id, OLD.status, NEW.status, NEW.error_code, NEW.error, NEW."commit",
            strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));
END;
-- An image update committed by cynchrod (``store.updates``): told as ``update_committed``, once per
-- bump (a re-check that keeps ``bumped_commit`` says nothing). ``error`` carries the versions.
CREATE TRIGGER IF NOT EXISTS image_update_committed AFTER UPDATE OF bumped_commit ON image_updates
WHEN NEW.bumped_commit IS NOT NULL AND OLD.bumped_commit IS NOT NEW.bumped_commit
BEGIN
    INSERT INTO status_changes (kind, app_id, old, new, error, "commit", at)
    SELECT 'update', NEW.app_id, a.status, a.status, NEW.service || ': ' || OLD.image || ' → ' || NEW.bumped_to,
           NEW.bumped_commit, strftime('%Y-%m-%dT%H:%M:%SZ', 'now') FROM apps a WHERE a.id = NEW.app_id;
END;
CREATE TRIGGER IF NOT EXISTS image_update_committed_first AFTER INSERT ON image_updates
WHEN NEW.bumped_commit IS NOT NULL
BEGIN
    INSERT INTO status_changes (kind, app_id, old, new, error, "commit", at)
    SELECT 'update', NEW.app_id, a.status, a.status, NEW.service || ': ' || NEW.bumped_to,
           NEW.bumped_commit, strftime('%Y-%m-%dT%H:%M:%SZ', 'now') FROM apps a WHERE a.id = NEW.app_id;
END;
-- A deploying row folded into the same failure before it (``finish_deployment(merge=True)``).
CREATE TRIGGER IF NOT EXISTS deployments_folded AFTER DELETE ON deployments WHEN OLD.status = 'deploying'
BEGIN
    INSERT INTO status_changes (kind, app_id, deployment_id, old, new, "commit", at)
    VALUES ('deployment', OLD.app_id, OLD.id, OLD.status, 'folded', OLD."commit",
            strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));
END;
"""

# Image updates (``store.updates``): one row per app service with an ``update:`` block. A state dir from
# before gets the table from this script like any other (CREATE ... IF NOT EXISTS).
SCHEMA += """
CREATE TABLE IF NOT EXISTS image_updates (
    app_id TEXT NOT NULL,
    service TEXT NOT NULL,
    image TEXT NOT NULL DEFAULT '',
    checked_at TEXT,
    candidate TEXT,
    reason TEXT,
    error_code TEXT,
    error TEXT,
    bumped_to TEXT,
    bumped_commit TEXT,
    bumped_at TEXT,
    paused_spec TEXT,
    failed TEXT NOT NULL DEFAULT '[]',
    seen_commit TEXT,
    PRIMARY KEY (app_id, service)
);
"""


def migrate(db: sqlite3.Connection) -> None:
    """Create what is missing, and add the columns of a state dir written by an older version."""
    db.executescript(SCHEMA)
    columns = {r["name"] for r in db.execute("PRAGMA table_info(apps)")}
    if "source" not in columns:  # a state dir from before several repositories
        db.execute("ALTER TABLE apps ADD COLUMN source TEXT NOT NULL DEFAULT ''")
    if "services_json" not in columns:
        db.execute("ALTER TABLE apps ADD COLUMN services_json TEXT")
    if "serving" not in columns:  # a state dir from before "failed — previous version running"
        db.execute("ALTER TABLE apps ADD COLUMN serving TEXT")
    if "refusal" not in columns:  # a state dir from before refusals had a column: read the old prefixes once
        db.execute("ALTER TABLE apps ADD COLUMN refusal TEXT")
        for code in decisions.REFUSALS:
            db.execute("UPDATE apps SET refusal = ? WHERE status = ? AND substr(last_error, 1, ?) = ?",
                   (code, FAILED, len(code), code))
    if "note" not in columns:  # a state dir from before notes had a column: read the old prefixes once
        db.execute("ALTER TABLE apps ADD COLUMN note TEXT")
        for code in decisions.NOTES:
            db.execute("UPDATE apps SET note = ? WHERE status != ? AND substr(last_error, 1, ?) = ?",
                       (code, FAILED, len(code) + 1, f"{code}:"))
    if "healthy_spec" not in columns:  # a state dir from before health-gated deploys
        db.execute("ALTER TABLE apps ADD COLUMN healthy_spec TEXT")
    if "gate" not in columns:  # a state dir from before the gates' verdicts outlived a restart
        db.execute("ALTER TABLE apps ADD COLUMN gate TEXT")
    columns = {r["name"] for r in db.execute("PRAGMA table_info(deployments)")}
    if "attempts" not in columns:  # a state dir from before repeated failures were merged
        db.execute("ALTER TABLE deployments ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1")
        db.execute("ALTER TABLE deployments ADD COLUMN last_seen TEXT")
    if "log" not in columns:  # a state dir from before failed units' last log lines were kept
        db.execute("ALTER TABLE deployments ADD COLUMN log TEXT")
    if db.execute("SELECT 1 FROM meta WHERE key = ?", (_DOMAIN_TEXTS,)).fetchone() is None:
        _rewrite_domain_taken_texts(db)
    if "session" not in {r["name"] for r in db.execute("PRAGMA table_info(tickets)")}:
        # A state dir from before server-side sessions: a ticket may carry the session it was issued to.
        db.execute("ALTER TABLE tickets ADD COLUMN session TEXT")
    db.executescript(TRIGGERS)


#: ``meta`` key set once the texts below were rewritten (so later starts skip the scan).
_DOMAIN_TEXTS = "migrated:domain_taken_texts"
_HOLDER_RE = re.compile(r"domain (\S+) belongs to app ([^/\s]+)/[^;\s]+")


def _rewrite_domain_taken_texts(db: sqlite3.Connection) -> None:
    """A state dir from before issue 24 item 8: ``domain_taken`` texts naming another org's app
    (in app rows and deployment history) now say only that the domain is taken, as a pass says it."""

    def scrubbed(text: str, org: str) -> str:
        return _HOLDER_RE.sub(lambda m: m.group(0) if m.group(2) == org
                              else f"domain {m.group(1)} is taken by an app of another org", text)

    for row in db.execute("SELECT id, org, last_error FROM apps WHERE last_error LIKE '%belongs to app %'"
                          ).fetchall():
        if (new := scrubbed(row["last_error"], row["org"])) != row["last_error"]:
            db.execute("UPDATE apps SET last_error = ? WHERE id = ?", (new, row["id"]))
    for row in db.execute("SELECT d.id, a.org, d.error FROM deployments d JOIN apps a ON a.id = d.app_id"
                          " WHERE d.error_code = ? AND d.error LIKE '%belongs to app %'",
                          (Code.DOMAIN_TAKEN.value,)).fetchall():
        if (new := scrubbed(row["error"], row["org"])) != row["error"]:
            db.execute("UPDATE deployments SET error = ? WHERE id = ?", (new, row["id"]))
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (_DOMAIN_TEXTS, "1"))


@contextmanager
def converted() -> Iterator[None]:
    """sqlite3's errors as ours: no room or no permission is ``state_unwritable``."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc).lower()
        if "locked" in text or "busy" in text:
            raise TemporaryError(f"store busy: {exc}", code=Code.STORE_BUSY) from exc
        if any(w in text for w in ("full", "readonly", "read-only", "disk i/o", "unable to open")):
            raise StateUnwritable(f"the state directory cannot be written: {exc}") from exc
        raise StoreError(f"store: {exc}") from exc
    except sqlite3.Error as exc:
        raise StoreError(f"store: {exc}") from exc


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Database:
    """The connection every part of the store uses. Thread-safe: one connection per process,
    serialised by a lock (writes are tiny).

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
        with self._lock, converted():
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            migrate(self._db)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Many writes in one transaction (one sync to disk instead of one each): each
        ``transaction`` inside it is a savepoint, undone alone when it fails. Other threads'
        writes wait for the batch's end; keep it to store work only (no engine calls)."""
        with self._lock, converted():
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
        with self._lock, converted():
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
        with self._lock, converted():
            row = self._db.execute("PRAGMA data_version").fetchone()
        return (self.version, int(row[0]))

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock, converted():
            return self._db.execute(sql, args).fetchall()
