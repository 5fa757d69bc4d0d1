"""Sources against real Git: several repositories at once, each optionally pinned to one org, and the
commit-back of an API edit (a push racing ours is never overwritten)."""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import pytest

from cynchrod import runtime, store
from cynchrod.core import errors
from cynchrod.desired import source
from cynchrod.desired.source import mirror, push
from cynchrod.runtime import local
from cynchrod.shell import control, reconciler
from tests.helpers import TEST_IMAGE, GitRepo, cli, git, new_token


def manifest(name: str, extra: str = "") -> str:
    return f"name: {name}\nimage: {TEST_IMAGE}\ncommand: [sleep, '3600']\nmemory: 64\n{extra}"


def test_pinned_repositories(tmp_path: pathlib.Path, owner: str, images: object) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ops, tenant = GitRepo(tmp_path / "a"), GitRepo(tmp_path / "b")
    ops.push({"apps/web.yaml": manifest("web"), "apps/dup.yaml": manifest("dup", "org: tenant\n")})
    tenant.push({"apps/shop.yaml": manifest("shop"), "apps/evil.yaml": manifest("evil", "org: default\n"),
                 "apps/dup.yaml": manifest("dup")})
    state = tmp_path / "state"
    db = store.Store(state / "cynchrod.db")
    rt = local.LocalRuntime(owner=owner, stop_timeout=1)
    sources = [source.Source(ops.url, state_dir=state), source.Source(tenant.url, state_dir=state, org="tenant")]
    rec = reconciler.Reconciler(src=sources, rt=rt, db=db)
    try:
        result = rec.run_pass()
        assert sorted(result.manifest_errors) == [
            "apps/dup.yaml:1: duplicate_app: app tenant/dup is already declared by another repository",
            "apps/evil.yaml:5: org_forbidden: org: this repository may only declare apps of org tenant",
        ]
        live = db.live_apps()
        assert sorted(live) == [("default", "web"), ("tenant", "dup"), ("tenant", "shop")]
        assert live[("tenant", "shop")].source == tenant.url and live[("default", "web")].source == ops.url
        assert live[("tenant", "shop")].commit == result.commits[tenant.url]

        # The tenant's repository goes away: its apps stay, the other repository still applies.
        shutil.move(tenant.bare, tenant.bare.with_suffix(".gone"))
        ops.push({"apps/web.yaml": None, "apps/more.yaml": manifest("more")})
        result = rec.run_pass()
        assert result.source_error is not None and "source_unavailable" in result.source_error
        names = sorted(c["Labels"][runtime.LABEL_APP] for c in rt.api.containers(all=True, filters=rt.owner_filter))
        assert names == ["dup", "more", "shop"]

        # Apps created through the API go to the repository pinned to their org.
        shutil.move(tenant.bare.with_suffix(".gone"), tenant.bare)
        ctl = control.Control(src=sources, db=db, wake=lambda trigger: None)
        token, _ = db.create_token(org="tenant", name="t")
        accepted = ctl.create({"name": "api-made", "image": TEST_IMAGE}, token=token)
        assert accepted.app.source == tenant.url
        git("fetch", "-q", cwd=tenant.work)
        assert "name: api-made" in git("show", "origin/main:apps/tenant/api-made.yaml", cwd=tenant.work)
        assert "org: tenant" in git("show", "origin/main:apps/tenant/api-made.yaml", cwd=tenant.work)
    finally:
        rt.close()
        db.close()


def test_repeatable_repo_flag(tmp_path: pathlib.Path, owner: str, images: object) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one, two = GitRepo(tmp_path / "a"), GitRepo(tmp_path / "b")
    one.push({"apps/x.yaml": manifest("x")})
    two.push({"apps/y.yaml": manifest("y")})
    out = cli("sync", "--repo", one.url, "--repo", two.url, "--state", str(tmp_path / "state"), "--owner", owner)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "default/x\trunning" in out.stdout and "default/y\trunning" in out.stdout


def test_worktree_commit_back_touches_one_file(tmp_path: pathlib.Path) -> None:
    work = tmp_path / "w"
    (work / "apps").mkdir(parents=True)
    git("init", "-q", "-b", "main", str(work), cwd=tmp_path)
    (work / "apps" / "a.yaml").write_text("# mine\nname: a\nimage: x\n")
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "start", cwd=work)
    (work / "apps" / "b.yaml").write_text("name: b\nimage: x\n")
    git("add", "apps/b.yaml", cwd=work)  # the user's staged work in progress
    src = source.open_source(str(work), state_dir=tmp_path / "state")
    assert isinstance(src, source.WorkTreeSource)
    first = src.fetch()
    files, _ = src.files(first)
    assert [p for p, _ in files] == ["apps/a.yaml", "apps/b.yaml"]
    assert src.fetch() == first  # nothing changed, same id
    commit = src.commit_edit("apps/a.yaml", lambda old: (old or b"") + b"state: stopped\n", "stop default/a (by t)")
    assert commit is not None
    assert (work / "apps" / "a.yaml").read_text() == "# mine\nname: a\nimage: x\nstate: stopped\n"
    assert git("log", "-1", "--format=%an|%s", cwd=work).strip() == "cynchrod|stop default/a (by t)"
    assert git("show", "--name-only", "--format=", "HEAD", cwd=work).split() == ["apps/a.yaml"]
    status = git("status", "--porcelain", cwd=work)
    assert "A  apps/b.yaml" in status and "a.yaml" not in status  # b still staged, a clean
    assert src.fetch() != first


def test_a_worktree_source_is_whole_on_its_own(tmp_path: pathlib.Path) -> None:
    """It used to inherit the mirror's methods without its state (``_open``, ``export``,
    ``_push`` raised AttributeError). Now each kind is complete and nothing is inherited."""
    (tmp_path / "w").mkdir()
    work = GitRepo(tmp_path / "w").work
    (work / "apps").mkdir()
    (work / "apps" / "a.yaml").write_text(manifest("a"))
    followed = source.open_source(str(work), state_dir=tmp_path / "state")
    assert isinstance(followed, source.WorkTreeSource) and not isinstance(followed, source.Source)
    for name in ("_open", "export", "_push", "mirror"):
        assert not hasattr(followed, name), name
    commit = followed.fetch()
    assert [path for path, _ in followed.files(commit)[0]] == ["apps/a.yaml"]
    assert followed.commit_edit("apps/a.yaml", lambda old: (old or b"") + b"cpu: 0.5\n", "edit") is not None
    assert followed.fetch() != commit


def test_commit_back_never_moves_the_checked_out_branch_of_a_checkout(
        tmp_path: pathlib.Path, owner: str, images: object) -> None:
    """Issue 19: ``file://`` of a checkout is followed through a mirror (read: fine), but a push
    into it would move the branch under the user's work tree. Refused as ``git push`` refuses it
    (receive.denyCurrentBranch): ``repo_not_bare``, through the API, nothing touched."""
    import requests

    from tests.helpers import Daemon, wait_for

    work = tmp_path / "checkout"
    (work / "apps").mkdir(parents=True)
    git("init", "-q", "-b", "main", str(work), cwd=tmp_path)
    (work / "apps" / "web.yaml").write_text(manifest("web"))
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "start", cwd=work)
    (work / "apps" / "notes.txt").write_text("the user's work in progress\n")
    head = git("rev-parse", "HEAD", cwd=work).strip()
    state = tmp_path / "state"
    token = new_token(state, "default")
    daemon = Daemon(f"file://{work}", state, owner).start()
    auth = {"Authorization": f"Bearer {token}"}
    try:
        def web() -> dict[str, object] | None:
            try:
                apps = requests.get(daemon.api + "/apps", headers=auth, timeout=5).json()["apps"]
            except (requests.RequestException, ValueError):
                return None
            return next((a for a in apps if a["name"] == "web" and a["status"] == "running"), None)

        wait_for(web, 30, "web to run from the checkout")  # following it is fine
        app = web()
        assert app is not None
        r = requests.post(f"{daemon.api}/apps/{app['id']}/stop", headers=auth, timeout=30)
        assert r.status_code == 409 and r.json()["error"] == "repo_not_bare", r.text
        assert "checked out" in r.json()["message"] and "bare" in r.json()["message"]
    finally:
        assert daemon.stop() == 0
    assert git("rev-parse", "HEAD", cwd=work).strip() == head
    assert git("status", "--porcelain", cwd=work) == "?? apps/notes.txt\n"
    assert (work / "apps" / "web.yaml").read_text() == manifest("web")
    # Another branch of the same checkout is not under anyone's work tree: pushed to as before.
    git("branch", "deploy", cwd=work)
    other = source.Source(f"file://{work}", branch="deploy", state_dir=tmp_path / "state2")
    other.fetch()
    assert other.commit_edit("apps/web.yaml", lambda old: (old or b"") + b"state: stopped\n", "stop") is not None
    assert git("rev-parse", "HEAD", cwd=work).strip() == head
    assert git("rev-parse", "deploy", cwd=work).strip() != head


def test_push_rejected_is_replayed_on_the_new_tip(repo: GitRepo, tmp_path: pathlib.Path) -> None:
    """The deterministic form of the race: another push lands between our fetch and our push."""
    repo.push({"apps/a.yaml": "name: a\nimage: x\n"})
    src = source.Source(repo.url, state_dir=tmp_path / "state")
    calls: list[bytes | None] = []

    def edit(old: bytes | None) -> bytes | None:
        calls.append(old)
        if len(calls) == 1:
            repo.push({"apps/b.yaml": "name: b\nimage: x\n"}, "someone else")
        return (old or b"") + b"state: stopped\n"

    commit = src.commit_edit("apps/a.yaml", edit, "stop default/a (by test)")
    assert commit is not None and len(calls) == 2
    git("fetch", "-q", cwd=repo.work)
    log = git("log", "--format=%s", "origin/main", cwd=repo.work)
    assert log.splitlines()[:2] == ["stop default/a (by test)", "someone else"]
    assert git("show", "origin/main:apps/a.yaml", cwd=repo.work) == "name: a\nimage: x\nstate: stopped\n"
    assert git("show", "origin/main:apps/b.yaml", cwd=repo.work) == "name: b\nimage: x\n"


def test_a_push_landing_during_ours_is_never_overwritten(repo: GitRepo, tmp_path: pathlib.Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The race of ``test_commit_back_racing_an_external_push``, made deterministic: another
    ``git push`` lands after our push has read the remote's branch and before it moves it.
    libgit2's local transport (used before) wrote our commit over theirs there: it checked the
    fast-forward against the refs it read on connecting, then forced the update. The other
    push is made while our objects are copied, the window between the read and the update."""
    repo.push({"apps/a.yaml": "name: a\nimage: x\n"})
    src = source.Source(repo.url, state_dir=tmp_path / "state")
    landed: list[str] = []
    copy = push._copy_objects

    def racing(*args: Any) -> None:
        if not landed:
            landed.append(repo.push({"apps/b.yaml": "name: b\nimage: x\n"}, "someone else"))
        copy(*args)

    monkeypatch.setattr(push, "_copy_objects", racing)
    commit = src.commit_edit("apps/a.yaml", lambda old: (old or b"") + b"state: stopped\n", "stop default/a (by test)")
    assert landed and commit is not None
    git("fetch", "-q", cwd=repo.work)
    log = git("log", "--format=%s", "origin/main", cwd=repo.work)
    assert log.splitlines()[:2] == ["stop default/a (by test)", "someone else"]
    assert git("show", "origin/main:apps/a.yaml", cwd=repo.work) == "name: a\nimage: x\nstate: stopped\n"
    assert git("show", "origin/main:apps/b.yaml", cwd=repo.work) == "name: b\nimage: x\n"


def test_a_branch_locked_by_another_writer_is_a_rejection_not_a_crash(repo: GitRepo, tmp_path: pathlib.Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``git push`` holds ``refs/heads/<branch>.lock`` while it moves the branch: our compare-and-swap
    then fails on the lock (libgit2 raises OSError, not GitError), which is another writer winning
    the race, so the edit is replayed on the new tip (seen once as a 500 in
    ``test_commit_back_racing_an_external_push``). A lock that never goes away ends as
    ``push_conflict`` (503), not an uncaught error."""
    repo.push({"apps/a.yaml": "name: a\nimage: x\n"})
    src = source.Source(repo.url, state_dir=tmp_path / "state")
    lock = pathlib.Path(push.local_repo_path(repo.url) or "") / "refs" / "heads" / "main.lock"
    copy = push._copy_objects
    held: list[int] = []

    def locking_once(*args: Any) -> None:
        copy(*args)
        if not held:
            held.append(1)
            lock.write_text("")  # taken by another writer between our read and our update
        else:
            lock.unlink(missing_ok=True)

    monkeypatch.setattr(push, "_copy_objects", locking_once)
    commit = src.commit_edit("apps/a.yaml", lambda old: (old or b"") + b"state: stopped\n", "stop default/a (by test)")
    assert commit is not None and held
    assert git("show", f"{commit}:apps/a.yaml", cwd=str(push.local_repo_path(repo.url))) == \
        "name: a\nimage: x\nstate: stopped\n"

    monkeypatch.setattr(push, "_copy_objects", copy)
    monkeypatch.setattr(mirror, "PUSH_ATTEMPTS", 2)
    lock.write_text("")
    with pytest.raises(errors.SourceError) as failed:
        src.commit_edit("apps/a.yaml", lambda old: (old or b"") + b"cpu: 0.5\n", "edit (by test)")
    assert failed.value.code == "push_conflict"


def test_both_sources_list_every_file_of_a_compose_directory(tmp_path: pathlib.Path) -> None:
    """Under a directory holding compose.yaml every regular, visible file up to 1 MiB is listed (bind
    mounts may name it) and .env too; elsewhere YAML (and .env) only."""
    work = tmp_path / "w"
    files = {"apps/native.yaml": "name: n\nimage: x\n", "apps/notes.txt": "not listed\n", "apps/.env": "A=1\n",
             "apps/web/compose.yaml": "services: {web: {image: x}}\n", "apps/web/.env": "A=1\n",
             "apps/web/conf/nginx.conf": "server {}\n", "apps/web/.hidden": "no\n",
             "apps/web/big.bin": "x" * (1024 * 1024 + 1)}
    for path, text in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(text)
    git("init", "-q", "-b", "main", str(work), cwd=tmp_path)
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "start", cwd=work)
    expected = ["apps/.env", "apps/native.yaml", "apps/web/.env", "apps/web/compose.yaml", "apps/web/conf/nginx.conf"]
    tree = source.open_source(str(work), state_dir=tmp_path / "state")
    assert isinstance(tree, source.WorkTreeSource)
    listed, refused = tree.files(tree.fetch())
    assert (sorted(p for p, _ in listed), refused) == (expected, [])
    mirror = source.Source(f"file://{work}", state_dir=tmp_path / "state2")
    listed, refused = mirror.files(mirror.fetch())
    assert (sorted(p for p, _ in listed), refused) == (expected, [])
