"""API tokens (only their hash is kept), dashboard sessions and single-use log-stream tickets."""

from __future__ import annotations

import secrets
import sqlite3
import time

from cynchrod.store.db import Database, now
from cynchrod.store.records import TOKEN_PREFIX, Token, token_hash

#: Marks a session id (never a token: a cookie's id cannot be used as a bearer token).
SESSION_PREFIX = "ses_"


def _token(row: sqlite3.Row) -> Token:
    return Token(id=row["id"], name=row["name"], org=row["org"], admin=bool(row["admin"]),
                 created_at=row["created_at"], revoked_at=row["revoked_at"])


class Tokens(Database):
    """Tokens and tickets (the CLI makes tokens; the API authenticates with them)."""

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

    # -- dashboard sessions (the cookie holds the id; only its hash is kept) ------

    def open_session(self, token_id: str, *, ttl_s: float) -> str:
        """A new session of this token; its id is returned once, for the signed cookie."""
        session = SESSION_PREFIX + secrets.token_urlsafe(32)
        now_s = time.time()
        with self.transaction(apps_changed=False) as db:
            db.execute("DELETE FROM sessions WHERE expires_at < ?", (now_s,))
            db.execute("INSERT INTO sessions (hash, token_id, expires_at) VALUES (?,?,?)",
                       (token_hash(session), token_id, now_s + ttl_s))
        return session

    def session_token(self, session: str) -> Token | None:
        """The token of a live session (not signed out, not expired), revoked or not; None if the
        session is over."""
        rows = self._query("SELECT t.id, t.name, t.org, t.admin, t.created_at, t.revoked_at FROM sessions s"
                           " JOIN tokens t ON t.id = s.token_id WHERE s.hash = ? AND s.expires_at > ?",
                           (token_hash(session), time.time()))
        return _token(rows[0]) if rows else None

    def is_live_session(self, session_hash: str) -> bool:
        return bool(self._query("SELECT 1 FROM sessions WHERE hash = ? AND expires_at > ?",
                                (session_hash, time.time())))

    def end_session(self, session: str) -> None:
        with self.transaction(apps_changed=False) as db:
            db.execute("DELETE FROM sessions WHERE hash = ?", (token_hash(session),))

    # -- log-stream tickets (single use; only their hash is kept) ----------------

    def issue_ticket(self, ticket: str, *, token_id: str, app_id: str, ttl_s: float,
                     session: str | None = None) -> None:
        now_s = time.time()
        with self.transaction(apps_changed=False) as db:
            db.execute("DELETE FROM tickets WHERE expires_at < ?", (now_s,))
            db.execute("INSERT INTO tickets (hash, token_id, app_id, expires_at, session) VALUES (?,?,?,?,?)",
                       (token_hash(ticket), token_id, app_id, now_s + ttl_s,
                        token_hash(session) if session else None))

    def ticket_token(self, ticket: str, app_id: str) -> str | None:
        """The token id a live ticket for this app was issued to, without spending it."""
        rows = self._query("SELECT token_id FROM tickets WHERE hash = ? AND app_id = ? AND expires_at > ?",
                           (token_hash(ticket), app_id, time.time()))
        return str(rows[0]["token_id"]) if rows else None

    def redeem_ticket(self, ticket: str, app_id: str) -> tuple[str, str | None] | None:
        """What the ticket was issued to, once (any process), for this app, before it expires: the
        token id and, for a dashboard session's ticket, the session's hash (its stream ends with it)."""
        with self.transaction(apps_changed=False) as db:
            row = db.execute("SELECT token_id, app_id, expires_at, session FROM tickets WHERE hash = ?",
                             (token_hash(ticket),)).fetchone()
            if row is None:
                return None
            db.execute("DELETE FROM tickets WHERE hash = ?", (token_hash(ticket),))
        if row["app_id"] != app_id or row["expires_at"] < time.time():
            return None
        return str(row["token_id"]), row["session"]
