"""The pure part of image updates: policies, references and the choice of the next tag."""

from __future__ import annotations

import pathlib

import pytest

from cynchrod.core import updates
from cynchrod.core.updates import Choice, UpdatePolicy

TAGS = ["1.4.2", "1.4.3", "1.5.0", "2.0.0", "v1.6.0", "latest", "1.7.0-rc.1", "main-abc"]


@pytest.mark.parametrize(("raw", "expected"), [
    ({"semver": "^1.4"}, UpdatePolicy(semver="^1.4")),
    ({"digest": True, "interval": "30s", "commit": False}, UpdatePolicy(digest=True, interval=30.0, commit=False)),
    ({"regex": r"^build-(\d+)$", "sort": "numeric", "interval": "1h"},
     UpdatePolicy(regex=r"^build-(\d+)$", sort="numeric", interval=3600.0)),
    ({"semver": "~1.4.2", "interval": 5}, UpdatePolicy(semver="~1.4.2", interval=5.0)),
    ({"semver": ">=1.4 <2", "interval": "24h"}, UpdatePolicy(semver=">=1.4 <2", interval=86400.0)),
])
def test_policies_parse(raw: dict[str, object], expected: UpdatePolicy) -> None:
    assert updates.parse_policy(raw) == expected


@pytest.mark.parametrize(("raw", "key"), [
    ({}, "semver"),
    ({"semver": "^1", "digest": True}, "digest"),
    ({"semver": "not a range !!"}, "semver"),
    ({"regex": "(unclosed"}, "regex"),
    ({"regex": ".*", "sort": "random"}, "sort"),
    ({"semver": "^1", "sort": "alpha"}, "sort"),
    ({"semver": "^1", "interval": "4s"}, "interval"),
    ({"semver": "^1", "interval": "25h"}, "interval"),
    ({"semver": "^1", "interval": "soon"}, "interval"),
])
def test_bad_policies_name_their_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(updates.PolicyError) as caught:
        updates.parse_policy(raw)
    assert caught.value.key == key


@pytest.mark.parametrize(("image", "registry", "repository", "tag", "digest"), [
    ("busybox", updates.DOCKER_HUB, "library/busybox", None, None),
    ("shop/web:1.4.2", updates.DOCKER_HUB, "shop/web", "1.4.2", None),
    ("registry.example.com/shop/web:1.4.2", "registry.example.com", "shop/web", "1.4.2", None),
    ("127.0.0.1:5000/web:1", "127.0.0.1:5000", "web", "1", None),
    ("localhost/web", "localhost", "web", None, None),
    ("127.0.0.1:5000/web:1@sha256:" + "a" * 64, "127.0.0.1:5000", "web", "1", "sha256:" + "a" * 64),
])
def test_references_split(image: str, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = updates.parse_reference(image)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


@pytest.mark.parametrize("image", ["", ":1", "web:", "web@sha256:short"])
def test_bad_references(image: str) -> None:
    with pytest.raises(ValueError):
        updates.parse_reference(image)


IMG = "127.0.0.1:5000/shop/web:1.4.2"


@pytest.mark.parametrize(("policy", "image", "kwargs", "expected"), [
    (UpdatePolicy(semver="^1.4"), IMG, {}, Choice("v1.6.0", "newer")),
    (UpdatePolicy(semver="~1.4.2"), IMG, {}, Choice("1.4.3", "newer")),
    (UpdatePolicy(semver="^2"), IMG, {}, Choice("2.0.0", "newer")),
    (UpdatePolicy(semver="^3"), IMG, {}, Choice(None, "no_match")),
    (UpdatePolicy(semver="^1.4"), "127.0.0.1:5000/shop/web:v1.6.0", {}, Choice(None, "up_to_date")),
    (UpdatePolicy(semver="~1.4"), "127.0.0.1:5000/shop/web:1.5.0", {}, Choice(None, "up_to_date")),  # never back
    (UpdatePolicy(semver="^1.4"), IMG + "@sha256:" + "b" * 64, {}, Choice(None, "pinned_digest")),
    (UpdatePolicy(semver="^1.4"), "127.0.0.1:5000/shop/web", {}, Choice(None, "no_tag")),
    (UpdatePolicy(semver="^1.4"), IMG, {"paused": True}, Choice("v1.6.0", "paused")),
    (UpdatePolicy(semver="^1.4"), IMG, {"failed": ["v1.6.0"]}, Choice("1.5.0", "newer")),
    (UpdatePolicy(semver="~1.4"), IMG, {"failed": ["1.4.3"]}, Choice("1.4.3", "failed_before")),
    (UpdatePolicy(semver="~1.4"), IMG.replace("1.4.2", "1.4.3"), {"failed": ["1.4.3"]},
     Choice("1.4.3", "failed_before")),
    (UpdatePolicy(semver=">=1.7.0-rc.0 <2"), IMG, {}, Choice("1.7.0-rc.1", "newer")),
    (UpdatePolicy(regex=r"^main-.*$", sort="alpha"), "r.io/w:main-aaa", {}, Choice("main-abc", "newer")),
])
def test_choose(policy: UpdatePolicy, image: str, kwargs: dict[str, object], expected: Choice) -> None:
    assert updates.choose(policy, image, TAGS, **kwargs) == expected  # type: ignore[arg-type]


def test_numeric_sort_uses_the_capture_group() -> None:
    policy = UpdatePolicy(regex=r"^build-(\d+)$", sort="numeric")
    tags = ["build-9", "build-10", "build-100x", "other"]
    assert updates.choose(policy, "r.io/w:build-9", tags) == Choice("build-10", "newer")


def test_digest_following() -> None:
    new = "sha256:" + "c" * 64
    assert updates.choose_digest("r.io/w:1", new) == Choice(f"r.io/w:1@{new}", "newer")
    assert updates.choose_digest(f"r.io/w:1@{new}", new) == Choice(None, "up_to_date")
    assert updates.choose_digest("r.io/w:1", None) == Choice(None, "no_match")
    assert updates.choose_digest("r.io/w:1", new, paused=True).reason == "paused"
    assert updates.choose_digest("r.io/w:1", new, failed=[f"r.io/w:1@{new}"]).reason == "failed_before"


def test_bumped_image_keeps_the_name_as_written() -> None:
    assert updates.bumped_image(IMG, Choice("1.5.0", "newer")) == "127.0.0.1:5000/shop/web:1.5.0"
    assert updates.bumped_image("web:1", Choice("2", "newer")) == "web:2"
    assert updates.display_version(IMG) == "1.4.2"


def test_manifests_carry_the_policy_outside_the_hash() -> None:
    from cynchrod.desired import manifests

    plain = manifests.parse("a.yaml", b"name: a\nimage: r.io/shop/web:1.4.2\n").spec
    raw = b"name: a\nimage: r.io/shop/web:1.4.2\nupdate:\n  semver: '^1.4'\n  interval: 30s\n  commit: false\n"
    spec = manifests.parse("a.yaml", raw).spec
    assert spec is not None and plain is not None
    assert spec.services[0].update == UpdatePolicy(semver="^1.4", interval=30.0, commit=False)
    assert spec.hash == plain.hash
    assert type(spec).from_json(spec.to_json()) == spec


def test_services_have_their_own_update_block() -> None:
    from cynchrod.desired import manifests

    raw = (b"name: a\nservices:\n  web:\n    image: r.io/web:1\n    update:\n      digest: true\n"
           b"  db:\n    image: r.io/db:1\n")
    spec = manifests.parse("a.yaml", raw).spec
    assert spec is not None
    assert {s.name: s.update for s in spec.services} == {"web": UpdatePolicy(digest=True), "db": None}


@pytest.mark.parametrize(("raw", "line", "code"), [
    (b"name: a\nimage: r.io/w:1\nupdate:\n  semver: '^1'\n  interval: 2s\n", 5, "invalid_update"),
    (b"name: a\nimage: r.io/w:1\nupdate:\n  semver: 'nope nope'\n", 4, "invalid_update"),
    (b"name: a\nimage: r.io/w:1\nupdate:\n  commit: true\n", 3, "invalid_update"),
    (b"name: a\nimage: r.io/w:1\nupdate:\n  semver: '^1'\n  every: 5m\n", 5, "unknown_key"),
    (b"name: a\nservices:\n  w:\n    build: {repo: 'https://x.io/r'}\n    update: {semver: '^1'}\n", 5,
     "invalid_update"),
    (b"name: a\nupdate: {semver: '^1'}\nservices:\n  w:\n    image: r.io/w:1\n", 2, "invalid_value"),
])
def test_bad_update_blocks_are_located(raw: bytes, line: int, code: str) -> None:
    from cynchrod.desired import manifests

    result = manifests.parse("a.yaml", raw)
    assert result.spec is None
    assert [(e.code, e.line) for e in result.errors] == [(code, line)], [str(e) for e in result.errors]


ROUND_TRIP = """\
# the shop's front end
name: web   # keep me
org: shop
image: "127.0.0.1:5000/shop/web:1.4.2"  # pinned by the bot
update:
    semver: '^1.4'
env:
    A: '1'
"""


def test_the_bump_keeps_comments_layout_and_quoting() -> None:
    from cynchrod.desired import edits

    out = edits.set_image(ROUND_TRIP.encode(), None, "127.0.0.1:5000/shop/web:1.4.2", "127.0.0.1:5000/shop/web:1.5.0")
    assert out.decode() == ROUND_TRIP.replace("web:1.4.2", "web:1.5.0")
    single = ROUND_TRIP.replace('"127.0.0.1:5000/shop/web:1.4.2"', "'127.0.0.1:5000/shop/web:1.4.2'")
    out = edits.set_image(single.encode(), None, "127.0.0.1:5000/shop/web:1.4.2", "127.0.0.1:5000/shop/web:1.5.0")
    assert out.decode() == single.replace("web:1.4.2", "web:1.5.0")


def test_a_service_bump_and_a_changed_manifest() -> None:
    from cynchrod.core.errors import PermanentError
    from cynchrod.desired import edits

    raw = b"name: a\nservices:\n  db:\n    image: r.io/db:1\n  web:\n    image: r.io/web:1  # x\n"
    assert edits.set_image(raw, "web", "r.io/web:1", "r.io/web:2") == raw.replace(b"web:1", b"web:2")
    with pytest.raises(PermanentError) as caught:
        edits.set_image(raw, "web", "r.io/web:0", "r.io/web:2")
    assert caught.value.code == "image_update_failed"


@pytest.mark.parametrize(("before", "after", "bumped", "expected"), [
    ("r.io/w:1.5.0", "r.io/w:1.4.2", "r.io/w:1.5.0", True),  # our bump reverted
    ("r.io/w:1.5.0", "r.io/w:1.4.2", None, True),  # a person's older tag
    ("r.io/w:1.4.2", "r.io/w:1.6.0", None, False),  # a person's newer tag
    ("r.io/w:1.4.2", "r.io/w:1.5.0", "r.io/w:1.5.0", False),  # ours
    ("r.io/w:1.5.0", "r.io/other:1.0.0", None, False),  # another image
    ("r.io/w:1@sha256:" + "a" * 64, "r.io/w:1", "r.io/w:1@sha256:" + "a" * 64, True),  # digest bump undone
])
def test_rollbacks(before: str, after: str, bumped: str | None, expected: bool) -> None:
    assert updates.is_rollback(UpdatePolicy(semver=">=0"), before=before, after=after, bumped_to=bumped) is expected


def test_an_older_state_dir_gets_the_table(tmp_path: pathlib.Path) -> None:
    import sqlite3

    from cynchrod import store

    db = store.Store(tmp_path / "cynchrod.db")
    db.close()
    with sqlite3.connect(tmp_path / "cynchrod.db") as raw:  # as a version before image updates left it
        raw.execute("DROP TABLE image_updates")
    db = store.Store(tmp_path / "cynchrod.db")
    state = store.UpdateState(app_id="a1", service="main", image="r.io/w:1", reason="up_to_date", failed=("2",))
    db.put_update_state(state)
    assert db.update_states("a1") == [state]
    db.drop_update_states("a1", keep=set())
    assert db.update_states() == []
    db.close()
