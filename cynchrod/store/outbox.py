"""The notifications outbox: status changes in, messages queued per target, their delivery state.

The triggers of ``db.SCHEMA`` write every status change of an app or a deployment to
``status_changes``; the notifier (``shell/notify.py``, the reconciler process) takes them with
``take_changes`` and queues messages with ``enqueue`` in the same transaction, so a change is
turned into messages exactly once even when the daemon is killed meanwhile. Messages wait in
``outbox`` (it survives restarts) until sent, or dead after too many failed attempts;
``GET /notifications`` and ``/metrics`` read them here. Rows never hold a target's URL or secret,
only its id and a name safe to show.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

from cynchrod.core import notices
from cynchrod.store.db import Database, now

QUEUED = "queued"
SENT = "sent"
DEAD = "dead"
#: Sent messages are kept this long for the API, then dropped.
SENT_KEPT_S = 7 * 86400


@dataclasses.dataclass(frozen=True)
class Message:
    """A message for one target, as ``enqueue`` takes it."""

    dedupe: str
    target: str
    target_name: str
    kind: str
    event: str
    org: str
    app: str
    body: str


@dataclasses.dataclass(frozen=True)
class Notification(Message):
    """A row of the outbox: the message and its delivery."""

    id: int
    status: str
    attempts: int
    next_at: float
    last_error: str | None
    created_at: str
    sent_at: str | None


class Outbox(Database):
    """Status changes and the outbox (the notifier writes them; the API and ``/metrics`` read them)."""

    def take_changes(self, turn: Callable[[list[notices.Change], dict[str, str]],
                                          tuple[Iterable[Message], dict[str, str | None]]],
                     *, limit: int = 200) -> int:
        """Turn the oldest ``limit`` status changes into messages, in one transaction: ``turn``
        gets the changes and what people were last told of their apps, and returns the messages
        and the new told-state of each app it changed (None: forget). The changes are deleted.
        Returns how many were taken. With none waiting, one read and no transaction."""
        if not self._query("SELECT 1 FROM status_changes LIMIT 1"):
            return 0
        with self.transaction(apps_changed=False) as db:
            rows = db.execute(
                "SELECT c.*, a.org AS org, a.name AS app FROM status_changes c LEFT JOIN apps a ON a.id = c.app_id"
                " ORDER BY c.id LIMIT ?", (limit,)).fetchall()
            if not rows:
                return 0
            changes = [notices.Change(id=r["id"], kind=r["kind"], app_id=r["app_id"], org=r["org"] or "",
                                      app=r["app"] or "", old=r["old"], new=r["new"], code=r["code"],
                                      error=r["error"], serving=r["serving"], commit=r["commit"], at=r["at"],
                                      deployment_id=r["deployment_id"]) for r in rows]
            ids = sorted({c.app_id for c in changes})
            marks = ",".join("?" * len(ids))
            told = {r["app_id"]: r["told"] for r in db.execute(
                f"SELECT app_id, told FROM notify_state WHERE app_id IN ({marks})", ids)}
            messages, new_told = turn(changes, told)
            stamp, at = now(), time.time()
            for m in messages:
                db.execute("INSERT OR IGNORE INTO outbox (dedupe, target, target_name, kind, event, org, app, body,"
                           " status, next_at, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                           (m.dedupe, m.target, m.target_name, m.kind, m.event, m.org, m.app, m.body, QUEUED, at,
                            stamp))
            for app_id, value in new_told.items():
                if value is None:
                    db.execute("DELETE FROM notify_state WHERE app_id = ?", (app_id,))
                else:
                    db.execute("INSERT INTO notify_state (app_id, told) VALUES (?, ?)"
                               " ON CONFLICT(app_id) DO UPDATE SET told = excluded.told", (app_id, value))
            db.execute("DELETE FROM status_changes WHERE id <= ?", (changes[-1].id,))
            return len(changes)

    def due_notifications(self, *, at: float, limit: int, skip: Iterable[int] = ()) -> list[Notification]:
        """Messages to try now (``skip``: those being tried)."""
        skipped = tuple(skip)
        marks = ",".join("?" * len(skipped))
        # Only the oldest queued message of each target and app: a target hears of an app in order
        # (a commit's "pending" never lands after its "success").
        sql = ("SELECT * FROM outbox WHERE id IN (SELECT MIN(id) FROM outbox WHERE status = ?"
               " GROUP BY target, org, app) AND next_at <= ?")
        if skipped:
            sql += f" AND id NOT IN ({marks})"
        rows = self._query(sql + " ORDER BY next_at, id LIMIT ?", (QUEUED, at, *skipped, limit))
        return [Notification(**dict(r)) for r in rows]

    def next_notification_at(self) -> float | None:
        rows = self._query("SELECT MIN(next_at) AS at FROM outbox WHERE status = ?", (QUEUED,))
        return None if rows[0]["at"] is None else float(rows[0]["at"])

    def notification_sent(self, notification_id: int) -> None:
        with self.transaction(apps_changed=False) as db:
            db.execute("UPDATE outbox SET status = ?, attempts = attempts + 1, sent_at = ?, last_error = NULL"
                       " WHERE id = ?", (SENT, now(), notification_id))
            db.execute("DELETE FROM outbox WHERE status = ? AND sent_at < ?",
                       (SENT, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - SENT_KEPT_S))))

    def notification_failed(self, notification_id: int, *, error: str, retry_at: float | None) -> None:
        """A failed attempt: tried again at ``retry_at``, or dead (None)."""
        with self.transaction(apps_changed=False) as db:
            db.execute("UPDATE outbox SET status = ?, attempts = attempts + 1, last_error = ?, next_at = ?"
                       " WHERE id = ?", (QUEUED if retry_at is not None else DEAD, error[:500],
                                         retry_at if retry_at is not None else 0.0, notification_id))

    def notifications(self, *, org: str | None = None, status: str | None = None,
                      limit: int = 100) -> list[Notification]:
        sql, args = "SELECT * FROM outbox WHERE 1=1", []
        if org is not None:
            sql += " AND org = ?"
            args.append(org)
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
        return [Notification(**dict(r)) for r in rows]

    def dead_notifications(self, *, org: str | None = None) -> int:
        """How many messages (of ``org``) were given up on."""
        sql, args = "SELECT COUNT(*) AS n FROM outbox WHERE status = ?", [DEAD]
        if org is not None:
            sql += " AND org = ?"
            args.append(org)
        return int(self._query(sql, tuple(args))[0]["n"])

    def notification_counts(self) -> dict[str, Any]:
        """Rows by status, and failed attempts in all (of rows still kept)."""
        counts: dict[str, Any] = dict.fromkeys((QUEUED, SENT, DEAD), 0)
        for r in self._query("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status"):
            counts[r["status"]] = int(r["n"])
        failed = self._query("SELECT COALESCE(SUM(attempts - (status = 'sent')), 0) AS n FROM outbox")
        counts["failed"] = int(failed[0]["n"])
        return counts
