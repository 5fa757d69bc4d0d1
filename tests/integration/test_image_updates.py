"""Image updates end to end, in process: a real loopback registry (Debian's docker-registry) with
locally built images, a real Git repository, the real reconciler and engine. The checker's clock is
the test's (``due``): a check runs when the test says an interval has passed, so nothing sleeps."""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
from collections.abc import Iterator

import pytest

from cynchrod import runtime
from cynchrod.desired import registry
from cynchrod.shell import control, metrics, updates
from tests.helpers import GitRepo, git, wait_for
from tests.registryd import LocalRegistry, Proxy, Pusher

pytestmark = pytest.mark.xdist_group("registry")


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalRegistry, Pusher]]:
    root = tmp_path_factory.mktemp("registry")
    served = LocalRegistry(root)
    pusher = Pusher()
    try:
        for tag in ("1.4.2", "1.5.0", "2.0.0"):
            pusher.push(served.host, "shop/web", tag, content=tag)
        yield served, pusher
    finally:
        pusher.cleanup()
        served.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def manifest(image: str, update: str = "semver: '^1.4'", name: str = "web", extra: str = "") -> str:
    return (f"# the shop's front end\nname: {name}\nimage: \"{image}\"   # the bot bumps this\n"
            f"command: [sleep, '3600']\nmemory: 64\nupdate:\n  {update}\n  interval: 30s\n{extra}")


@pytest.fixture
def rig(harness, repo: GitRepo) -> Iterator[tuple[object, updates.Checker, Clock, metrics.Metrics]]:  # type: ignore[no-untyped-def]
    clock = Clock()
    stats = metrics.Metrics(harness.db)
    ctl = control.Control(src=harness.src, db=harness.db, wake=lambda trigger: None)
    checker = updates.Checker(db=harness.db, ctl=ctl, client=registry.Registry(timeout=(1.0, 3.0)), stats=stats,
                              clock=clock)
    yield harness, checker, clock, stats
    checker.close()


def check(checker: updates.Checker) -> list[concurrent.futures.Future[None]]:
    futures = checker.tick()
    for f in futures:
        f.result(30)
    return futures


def state(harness, name: str = "web") -> dict[str, object]:  # type: ignore[no-untyped-def]
    app = harness.app(name)
    return harness.db.update_states(app.id)[0].to_json()  # type: ignore[no-any-return]


def head(repo: GitRepo) -> tuple[str, str]:
    git("pull", "-q", "origin", "main", cwd=repo.work)
    return (git("log", "-1", "--format=%an <%ae>|%s", cwd=repo.work).strip(),
            (repo.work / "apps/web.yaml").read_text())


def running_image(harness, name: str = "web") -> str:  # type: ignore[no-untyped-def]
    return str(harness.containers()[name]["Image"])


def test_an_update_is_committed_deployed_and_out_of_range_tags_ignored(rig, repo: GitRepo, reg) -> None:  # type: ignore[no-untyped-def]
    harness, checker, clock, stats = rig
    served, pusher = reg
    for tag in ("1.4.2", "1.5.0", "2.0.0"):  # a repository of its own: this test pushes a new tag
        pusher.push(served.host, "shop/first", tag, content=f"first {tag}")
    image = f"{served.host}/shop/first:1.4.2"
    repo.push({"apps/web.yaml": manifest(image)})
    harness.sync()
    assert running_image(harness) == image
    check(checker)
    who, text = head(repo)
    assert who == "cynchrod <cynchrod@localhost>|update default/web: first 1.4.2 → 1.5.0"
    assert text == manifest(f"{served.host}/shop/first:1.5.0")  # comments, layout and quoting kept
    assert state(harness)["reason"] == "committed" and state(harness)["candidate"] == "1.5.0"  # 2.0.0: out of range
    harness.sync()
    assert running_image(harness) == f"{served.host}/shop/first:1.5.0"
    deployments = harness.db.deployments(harness.app("web").id, limit=5)
    assert deployments[0].commit == git("rev-parse", "HEAD", cwd=repo.work).strip()
    # Nothing new: a check within the interval asks nothing; after it, up to date.
    assert checker.tick() == []
    clock.now += 31
    check(checker)
    assert state(harness)["reason"] == "up_to_date"
    # A new tag in range: committed within one interval.
    pusher.push(served.host, "shop/first", "1.6.0", content="1.6.0")
    clock.now += 31
    check(checker)
    assert head(repo)[0].endswith("update default/web: first 1.5.0 → 1.6.0")
    text = stats.render().decode()
    assert f'cynchrod_image_updates_committed_total{{registry="{served.host}"}} 2.0' in text
    assert f'cynchrod_image_update_checks_total{{registry="{served.host}"}} 3.0' in text


def deployed_then_bumped(repo: GitRepo, harness, checker, host: str) -> None:  # type: ignore[no-untyped-def]
    """web deployed at 1.4.2, then bumped by the checker to 1.5.0 (the registry's newest in range) and running it."""
    repo.push({"apps/web.yaml": manifest(f"{host}/shop/web:1.4.2")})
    harness.sync()
    check(checker)
    harness.sync()
    assert running_image(harness).endswith(":1.5.0")

def test_a_rollback_is_not_bumped_again_until_the_manifest_changes(rig, repo: GitRepo, reg) -> None:  # type: ignore[no-untyped-def]
    harness, checker, clock, _ = rig
    served, _ = reg
    deployed_then_bumped(repo, harness, checker, served.host)
    # A person goes back to 1.4.2 in Git.
    head(repo)
    repo.push({"apps/web.yaml": manifest(f"{served.host}/shop/web:1.4.2")}, message="back to 1.4.2")
    harness.sync()
    bumps = git("rev-list", "--count", "HEAD", cwd=repo.work)
    clock.now += 31
    check(checker)
    assert state(harness)["reason"] == "paused" and state(harness)["paused"] is True
    clock.now += 31
    check(checker)
    assert git("rev-list", "--count", "HEAD", cwd=repo.work) == bumps
    assert running_image(harness).endswith(":1.4.2")
    # The person changes the manifest again: updates resume.
    repo.push({"apps/web.yaml": manifest(f"{served.host}/shop/web:1.4.2", extra="env:\n  A: '1'\n")})
    harness.sync()
    clock.now += 31
    check(checker)
    assert state(harness)["reason"] == "committed" and state(harness)["paused"] is False


def test_commit_false_only_reports_and_a_pinned_digest_is_never_bumped(rig, repo: GitRepo, reg) -> None:  # type: ignore[no-untyped-def]
    harness, checker, _, stats = rig
    served, _ = reg
    digest = registry.Registry().digest(registry.updates.parse_reference(f"{served.host}/shop/web:1.4.2"), "1.4.2")
    repo.push({"apps/web.yaml": manifest(f"{served.host}/shop/web:1.4.2", update="semver: '^1.4'\n  commit: false"),
               "apps/pinned.yaml": manifest(f"{served.host}/shop/web:1.4.2@{digest}", name="pinned")})
    harness.sync()
    commits = git("rev-list", "--count", "HEAD", cwd=repo.work)
    check(checker)
    assert state(harness)["update_available"] is True and state(harness)["candidate"] == "1.5.0"
    assert state(harness, "pinned")["reason"] == "pinned_digest"
    git("pull", "-q", "origin", "main", cwd=repo.work)
    assert git("rev-list", "--count", "HEAD", cwd=repo.work) == commits
    assert "cynchrod_updates_available 1.0" in stats.render().decode()


def test_two_apps_on_one_repository_ask_once_and_bad_registries_delay_nothing(rig, repo: GitRepo, reg) -> None:  # type: ignore[no-untyped-def]
    harness, checker, clock, _ = rig
    served, _ = reg
    counting = Proxy(served.host)
    slow = Proxy(served.host, mode="slow", delay=5)
    garbage = Proxy(served.host, mode="garbage")
    try:
        repo.push({
            "apps/a.yaml": manifest(f"{counting.host}/shop/web:1.4.2", name="a", update="semver: '~1.4'"),
            "apps/b.yaml": manifest(f"{counting.host}/shop/web:1.4.2", name="b", update="semver: '~1.4'"),
            "apps/slow.yaml": manifest(f"{slow.host}/shop/web:1.4.2", name="slow"),
            "apps/junk.yaml": manifest(f"{garbage.host}/shop/web:1.4.2", name="junk"),
            "apps/down.yaml": manifest("127.0.0.1:9/shop/web:1.4.2", name="down"),
        })
        harness.rec.sync("poll")
        for name in ("a", "b", "slow", "junk", "down"):
            assert harness.db.live_apps().get(("default", name)) is not None
        futures = checker.tick()
        assert len(futures) == 4  # a and b share one check
        done, pending = concurrent.futures.wait(futures, timeout=2)
        assert len(done) == 3 and len(pending) == 1  # the slow registry holds up only its own check
        assert counting.count["/v2/shop/web/tags/list"] == 1
        assert state(harness, "a")["reason"] == state(harness, "b")["reason"] == "up_to_date"
        assert state(harness, "junk")["error_code"] == "registry_garbage"
        assert state(harness, "down")["error_code"] == "registry_unreachable"
        # While the slow check runs, the next tick does not start it twice.
        clock.now += 31
        more = checker.tick()
        for f in [*more, *pending]:
            f.result(10)
        assert state(harness, "slow")["error_code"] == "registry_unreachable"
        assert "timed out" in str(state(harness, "slow")["error"])
        assert counting.count["/v2/shop/web/tags/list"] == 2  # one per interval for both apps
        assert slow.count["/v2/shop/web/tags/list"] == 1
    finally:
        for p in (counting, slow, garbage):
            p.stop()


def test_a_failed_update_is_not_retried_with_the_same_tag(rig, repo: GitRepo, reg) -> None:  # type: ignore[no-untyped-def]
    harness, checker, clock, _ = rig
    served, pusher = reg
    pusher.push(served.host, "shop/flaky", "1.0.0", content="flaky 1.0.0")
    pusher.push(served.host, "shop/flaky", "1.1.0", content="flaky 1.1.0", broken=True)
    repo.push({"apps/web.yaml": manifest(f"{served.host}/shop/flaky:1.0.0", update="semver: '^1.0'")})
    harness.sync()
    check(checker)
    assert state(harness)["bumped_to"] == f"{served.host}/shop/flaky:1.1.0"
    harness.watch()
    harness.sync()
    # The new container cannot run (its image has no programs): the app fails as its units die.
    wait_for(lambda: harness.sync("self-heal") and harness.app("web").status == "failed", 60, "the update to fail")
    git("fetch", "-q", "origin", cwd=repo.work)
    commits = git("rev-list", "--count", "origin/main", cwd=repo.work)
    for _ in range(2):
        clock.now += 31
        check(checker)
        assert state(harness)["reason"] == "failed_before" and state(harness)["failed"] == ["1.1.0"]
    git("fetch", "-q", "origin", cwd=repo.work)
    assert git("rev-list", "--count", "origin/main", cwd=repo.work) == commits
    # A newer tag is still taken.
    pusher.push(served.host, "shop/flaky", "1.2.0", content="flaky 1.2.0")
    clock.now += 31
    check(checker)
    assert state(harness)["reason"] == "committed" and state(harness)["candidate"] == "1.2.0"
    harness.sync()
    assert harness.app("web").status == "running"


def test_basic_auth_with_the_orgs_encrypted_credentials(harness, repo: GitRepo, reg, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    from cynchrod.daemon import wiring

    served, _ = reg
    (tmp_path / "locked").mkdir()
    locked = LocalRegistry(tmp_path / "locked", htpasswd=("bot", "s3cret"), storage=served.storage)
    try:
        ctl = control.Control(src=harness.src, db=harness.db, wake=lambda trigger: None)
        checker = updates.Checker(db=harness.db, ctl=ctl,
                                  credentials=lambda org: wiring._registry_auths(harness.secrets, org))
        # Declared through the open registry (so the pass can pull), watched through the locked one.
        repo.push({"apps/web.yaml": manifest(f"{locked.host}/shop/web:1.4.2", update="semver: '~1.4'")})
        # Recorded without a pass: the engine cannot pull through the locked registry without a login.
        from cynchrod.desired import manifests

        spec = manifests.parse("apps/web.yaml", (repo.work / "apps/web.yaml").read_bytes()).spec
        assert spec is not None
        app = harness.db.ensure_app(spec, commit=None)
        harness.db.record_spec(app, spec, commit=None)
        check(checker)
        assert state(harness)["error_code"] == "registry_unauthorized"
        harness.secrets.set("default", registry.AUTH_SECRET,
                            json.dumps({locked.host: {"username": "bot", "password": "s3cret"}}).encode())
        checker.close()  # a new checker: the refusal put the registry in back-off for this one
        checker = updates.Checker(db=harness.db, ctl=ctl,
                                  credentials=lambda org: wiring._registry_auths(harness.secrets, org))
        check(checker)
        assert state(harness)["error_code"] is None and state(harness)["reason"] == "up_to_date"
        checker.close()
    finally:
        locked.stop()


def test_an_api_rollback_pauses_updates(rig, repo: GitRepo, reg) -> None:  # type: ignore[no-untyped-def]
    harness, checker, clock, _ = rig
    served, _ = reg
    deployed_then_bumped(repo, harness, checker, served.host)
    checker.control.rollback(harness.app("web"), actor="alice")
    harness.sync()
    assert running_image(harness).endswith(":1.4.2")
    for _ in range(2):
        clock.now += 31
        check(checker)
        assert state(harness)["reason"] == "paused" and state(harness)["candidate"] == "1.5.0"
    assert running_image(harness).endswith(":1.4.2")
    assert head(repo)[0].startswith("cynchrod <cynchrod@localhost>|rollback")


def test_apps_added_later_join_their_repositorys_schedule(rig, repo: GitRepo, reg) -> None:  # type: ignore[no-untyped-def]
    harness, checker, clock, _ = rig
    served, _ = reg
    counting = Proxy(served.host)
    try:
        repo.push({"apps/a.yaml": manifest(f"{counting.host}/shop/web:1.4.2", name="a", update="semver: '~1.4'")})
        harness.rec.sync("poll")
        check(checker)
        clock.now += 10
        repo.push({"apps/b.yaml": manifest(f"{counting.host}/shop/web:1.4.2", name="b", update="semver: '~1.4'")})
        harness.rec.sync("poll")
        check(checker)  # b is new: the repository is asked for a and b together
        assert counting.count["/v2/shop/web/tags/list"] == 2
        for expected in (2, 2, 3, 3, 3, 4):  # then once per interval (30 s) for both
            clock.now += 10
            check(checker)
            assert counting.count["/v2/shop/web/tags/list"] == expected
    finally:
        counting.stop()


def test_a_compose_apps_service_is_bumped_by_a_commit_to_its_compose_file(rig, repo: GitRepo, reg) -> None:  # type: ignore[no-untyped-def]
    harness, checker, _, _ = rig
    served, pusher = reg
    for tag in ("1.4.2", "1.5.0"):
        pusher.push(served.host, "shop/composed", tag, content=f"composed {tag}")

    def compose_file(tag: str) -> str:
        return ("# the shop, as Compose\nservices:\n  web:\n"
                f"    image: '{served.host}/shop/composed:{tag}'   # the bot bumps this\n"
                "    command: [sleep, '3600']\n    mem_limit: 64m\n"
                "    x-cynchrod:\n      update: {semver: '^1.4', interval: 30s}\n"
                "  side:\n    image: '" + f"{served.host}/shop/composed:1.4.2'   # not followed\n"
                "    command: [sleep, '3600']\n    mem_limit: 64m\n"
                "x-cynchrod:\n  org: shop   # keep\n")

    repo.push({"apps/shop/compose.yaml": compose_file("1.4.2")})
    harness.sync()
    check(checker)
    git("pull", "-q", "origin", "main", cwd=repo.work)
    assert git("log", "-1", "--format=%an <%ae>|%s", cwd=repo.work).strip() == \
        "cynchrod <cynchrod@localhost>|update shop/shop: composed 1.4.2 → 1.5.0"
    assert (repo.work / "apps/shop/compose.yaml").read_text() == compose_file("1.5.0")  # comments and quoting kept
    harness.sync()
    images = {r["Labels"][runtime.LABEL_SERVICE]: r["Image"]
              for r in harness.rt.api.containers(filters=harness.rt.owner_filter)}
    assert images == {"web": f"{served.host}/shop/composed:1.5.0", "side": f"{served.host}/shop/composed:1.4.2"}
