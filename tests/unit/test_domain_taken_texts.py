"""A state dir written before issue 24 item 8 kept ``domain_taken`` texts that name another
org's app (``belongs to app acme/web``) in app rows and deployment history: opening the store
rewrites those (and only those) as the new text, so no surface shows them again."""

from __future__ import annotations

import pathlib
import sqlite3

from cynchrod import store
from cynchrod.core import specs
from cynchrod.core.codes import Code

SERVICES = (specs.ServiceSpec(name=specs.MAIN_SERVICE, image="img:1"),)


def test_old_cross_org_domain_taken_texts_are_rewritten_when_the_store_opens(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "s.db"
    db = store.Store(path)
    old = {"beta": "domain shop.example belongs to app acme/web; shop was not deployed",
           "acme": "domain shop.example belongs to app acme/web; shop was not deployed"}
    ids = {}
    for org, text in old.items():
        row = db.ensure_app(specs.AppSpec(org=org, name="shop", source="repo", services=SERVICES), commit="c1")
        db.record_failure(row.id, commit="c1", trigger="poll", spec_hash=None, code=Code.DOMAIN_TAKEN, error=text)
        db.update_app(row.id, status="failed", last_error=f"domain_taken: {text}", refusal=Code.DOMAIN_TAKEN)
        ids[org] = row.id
    db.close()
    raw = sqlite3.connect(path)
    raw.execute("DELETE FROM meta WHERE key LIKE 'migrated:domain_taken%'")  # as a state dir written before
    raw.commit()
    raw.close()

    for _ in range(2):  # and again: nothing changes the second time
        db = store.Store(path)
        beta, acme = db.app(ids["beta"]), db.app(ids["acme"])
        assert beta is not None and acme is not None
        assert beta.last_error == "domain_taken: domain shop.example is taken by an app of another org; " \
                                  "shop was not deployed"
        assert acme.last_error == f"domain_taken: {old['acme']}"  # within its org, the holder stays named
        raw = sqlite3.connect(path)
        errors = dict(raw.execute("SELECT app_id, error FROM deployments").fetchall())
        raw.close()
        assert errors[ids["beta"]] == "domain shop.example is taken by an app of another org; shop was not deployed"
        assert errors[ids["acme"]] == old["acme"]
        db.close()
