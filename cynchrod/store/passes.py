"""Passes a caller asked for and their outcome: what lets a webhook tell the truth.

A signed push delivery records a ``queued`` pass (``request_pass``, in the API worker) and answers
with its id. The reconciler's next pass that fetches takes every queued one (``claim_passes``:
``running``) and, when it ends, writes what it applied, per app (``finish_passes``: ``done``).
Passes nobody asked for (the interval's, the engine's) are not recorded: a pass with nothing to
do writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from cynchrod.store.db import Database, now

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
#: Kept for the API this long (rows), newest first.
KEPT = 1000


@dataclasses.dataclass(frozen=True)
class PassRecord:
    id: int
    trigger: str
    requested_commit: str | None
    status: str
    commit: str | None
    requested_at: str
    started_at: str | None
    finished_at: str | None
    source_error: str | None
    apps_json: str | None

    @property
    def apps(self) -> list[dict[str, Any]]:
        """Each app's outcome: org, app, status, error."""
        found: list[dict[str, Any]] = json.loads(self.apps_json) if self.apps_json else []
        return found


class Passes(Database):
    def request_pass(self, *, trigger: str, commit: str | None) -> int:
        with self.transaction(apps_changed=False) as db:
            cur = db.execute("INSERT INTO passes (trigger, requested_commit, status, requested_at) VALUES (?,?,?,?)",
                             (trigger, commit, QUEUED, now()))
            db.execute("DELETE FROM passes WHERE id <= ?", (int(cur.lastrowid or 0) - KEPT,))
            return int(cur.lastrowid or 0)

    def claim_passes(self) -> list[int]:
        """The queued passes, now running (one read, and a write only when there are some)."""
        ids = [int(r["id"]) for r in self._query("SELECT id FROM passes WHERE status = ?", (QUEUED,))]
        if ids:
            marks = ",".join("?" * len(ids))
            with self.transaction(apps_changed=False) as db:
                db.execute(f"UPDATE passes SET status = ?, started_at = ? WHERE id IN ({marks})",
                           (RUNNING, now(), *ids))
        return ids

    def finish_passes(self, ids: list[int], *, commit: str | None, source_error: str | None,
                      apps: list[dict[str, Any]]) -> None:
        if not ids:
            return
        marks = ",".join("?" * len(ids))
        with self.transaction(apps_changed=False) as db:
            db.execute(f'UPDATE passes SET status = ?, "commit" = ?, finished_at = ?, source_error = ?, apps_json = ?'
                       f" WHERE id IN ({marks})",
                       (DONE, commit, now(), source_error, json.dumps(apps, separators=(",", ":")), *ids))

    def pass_record(self, pass_id: int) -> PassRecord | None:
        rows = self._query("SELECT * FROM passes WHERE id = ?", (pass_id,))
        return PassRecord(**dict(rows[0])) if rows else None

    def passes_of_commit(self, commit: str, *, limit: int = 20) -> list[PassRecord]:
        """Passes asked for ``commit``, or that applied it (a prefix of 7 or more hex digits matches)."""
        pattern = commit.lower() + "%"
        rows = self._query('SELECT * FROM passes WHERE requested_commit LIKE ? OR "commit" LIKE ?'
                           " ORDER BY id DESC LIMIT ?", (pattern, pattern, limit))
        return [PassRecord(**dict(r)) for r in rows]
