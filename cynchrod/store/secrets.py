"""Org secrets and repo apps' webhook secrets, sealed by ``cynchrod.desired.secrets``:
stored and read back sealed, never decrypted here."""

from __future__ import annotations

from cynchrod.store.db import Database, now


class Secrets(Database):
    """Sealed org secrets and app webhook secrets (the API writes them; the reconciler reads them)."""

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
