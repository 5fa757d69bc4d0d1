"""Dashboard sessions are rows of the store: the cookie's id alone is nothing once the row is
gone (signed out), expired, or its token revoked; only a hash of the id is kept."""

from __future__ import annotations

import pathlib
import sqlite3

from cynchrod import store


def test_a_session_lives_until_sign_out_expiry_or_revocation(tmp_path: pathlib.Path) -> None:
    db = store.Store(tmp_path / "s.db")
    other = store.Store(tmp_path / "s.db")  # another API worker process
    token, secret = db.create_token(org="o", name="alice")
    sid = db.open_session(token.id, ttl_s=3600)
    assert sid.startswith("ses_") and sid != secret
    seen = other.session_token(sid)
    assert seen is not None and seen.id == token.id
    assert db.authenticate(sid) is None  # a session id is not a bearer token
    with sqlite3.connect(tmp_path / "s.db") as raw:
        assert sid not in str(raw.execute("SELECT * FROM sessions").fetchall())  # only its hash

    db.end_session(sid)
    assert other.session_token(sid) is None

    expired = db.open_session(token.id, ttl_s=-1)
    assert db.session_token(expired) is None

    live = db.open_session(token.id, ttl_s=3600)
    db.revoke_token("alice")
    revoked = other.session_token(live)
    assert revoked is not None and revoked.revoked_at is not None  # the page says why it ended


def test_a_ticket_remembers_the_session_that_asked_for_it(tmp_path: pathlib.Path) -> None:
    db = store.Store(tmp_path / "s.db")
    token, _ = db.create_token(org="o", name="alice")
    sid = db.open_session(token.id, ttl_s=3600)
    db.issue_ticket("tkt_a", token_id=token.id, app_id="app_1", ttl_s=30, session=sid)
    db.issue_ticket("tkt_b", token_id=token.id, app_id="app_1", ttl_s=30)
    issued = db.redeem_ticket("tkt_a", "app_1")
    assert issued is not None and issued[0] == token.id and issued[1] is not None
    assert db.is_live_session(issued[1])
    assert db.redeem_ticket("tkt_b", "app_1") == (token.id, None)
    db.end_session(sid)
    assert not db.is_live_session(issued[1])
