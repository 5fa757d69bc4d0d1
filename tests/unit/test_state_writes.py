"""Writes into a state directory that is full or read-only are ``state_unwritable`` (issue 24, item 4):
the store (SQLite), the secrets (the key file, the sealed values) and a commit in a Git mirror.

Real filesystems: a 1 MiB tmpfs filled with a file, or remounted read-only (nothing is open on
it then). Nothing written before is lost, and the same write works once there is room. The
daemon's API answer (507) is ``tests/reliability/test_full_state.py``.
"""

from __future__ import annotations

import errno
import pathlib
import sqlite3
import subprocess
from collections.abc import Iterator

import pygit2
import pytest

from cynchrod import store
from cynchrod.core.errors import StateUnwritable, unwritable
from cynchrod.desired import secrets
from cynchrod.desired.source import push
from tests.helpers import tmpfs


@pytest.fixture
def small(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    with tmpfs(tmp_path / "small", "1m") as path:
        yield path


def fill(where: pathlib.Path) -> pathlib.Path:
    full = where / "fill"
    subprocess.run(["dd", "if=/dev/zero", f"of={full}", "bs=64k"], capture_output=True)
    return full


def read_only(where: pathlib.Path, on: bool) -> None:
    subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(where)], check=True)


@pytest.mark.parametrize(("exc", "expected"), [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EROFS, "Read-only file system"), True),
    (OSError("failed to write out file: No space left on device"), True),  # pygit2: no errno
    (pygit2.GitError("could not write: read-only file system"), True),
    (sqlite3.OperationalError("database or disk is full"), True),
    (sqlite3.OperationalError("attempt to write a readonly database"), True),
    (OSError(errno.ENOENT, "No such file or directory"), False),
    (pygit2.GitError("invalid path 'apps/.git/x.yaml'"), False),
])
def test_unwritable_tells_a_full_or_read_only_disk(exc: BaseException, expected: bool) -> None:
    assert unwritable(exc) is expected


def test_the_store_on_a_full_disk(small: pathlib.Path) -> None:
    db = store.Store(small / "cynchrod.db")
    try:
        db.put_secret("acme", "before", "sealed")
        full = fill(small)
        with pytest.raises(StateUnwritable):
            for i in range(200):  # the WAL may take a few small writes into space it already has
                db.put_secret("acme", f"s{i}", "x" * 4096)
        full.unlink()
        db.put_secret("acme", "after", "sealed")
        names = [n for n, _ in db.secret_names("acme")]
        assert "before" in names and "after" in names
        assert db._query("PRAGMA integrity_check")[0][0] == "ok"
    finally:
        db.close()


def test_the_store_and_the_key_on_a_read_only_disk(small: pathlib.Path) -> None:
    db = store.Store(small / "cynchrod.db")
    db.put_secret("acme", "before", "sealed")
    db.close()
    read_only(small, True)
    try:
        with pytest.raises(StateUnwritable):
            secrets.load_key(small / "state")
        with pytest.raises(StateUnwritable):
            store.Store(small / "cynchrod.db").put_secret("acme", "x", "sealed")
    finally:
        read_only(small, False)
    db = store.Store(small / "cynchrod.db")
    try:
        assert [n for n, _ in db.secret_names("acme")] == ["before"]
    finally:
        db.close()


def test_a_secret_key_on_a_full_disk(small: pathlib.Path) -> None:
    full = fill(small)
    with pytest.raises(StateUnwritable):
        secrets.load_key(small)
    assert not (small / "secret.key").exists()  # never an empty key left behind
    full.unlink()
    assert secrets.load_key(small) == (small / "secret.key").read_bytes().strip()


def test_a_commit_in_a_full_mirror(small: pathlib.Path) -> None:
    repo = pygit2.init_repository(str(small / "mirror.git"), bare=True)
    author = pygit2.Signature("t", "t@localhost")
    tree = repo.TreeBuilder()
    tree.insert("a.yaml", repo.create_blob(b"name: a\n"), pygit2.enums.FileMode.BLOB)
    tip = str(repo.create_commit("refs/heads/main", author, author, "first", tree.write(), []))
    full = fill(small)
    with pytest.raises(StateUnwritable):
        push.commit_on(repo, tip, "a.yaml", lambda old: b"name: a\nstate: stopped\n" + b"#" * 65536, "stop",
                       apps_prefix="apps")
    assert str(repo.references["refs/heads/main"].target) == tip
    full.unlink()
    assert push.commit_on(repo, tip, "a.yaml", lambda old: b"name: a\nstate: stopped\n", "stop",
                          apps_prefix="apps") is not None
