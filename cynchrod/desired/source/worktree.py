"""A local working directory followed as it is on disk (``WorkTreeSource``): no mirror, no push.

Chosen by ``open_source`` (``cynchrod.desired.source``) when ``--repo`` is a checkout;
the daemon watches its apps directory (``cynchrod.daemon.watchers``).
"""

from __future__ import annotations

import _thread
import fcntl
import hashlib
import os
import pathlib
from collections.abc import Callable, Iterable

import pygit2

from cynchrod.core.errors import ManifestError, SourceError
from cynchrod.desired.compose import COMPOSE_NAMES
from cynchrod.desired.manifests import MAX_MANIFEST_BYTES, is_manifest_path
from cynchrod.desired.source.followed import AUTHOR_EMAIL, AUTHOR_NAME, Followed


class WorkTreeSource(Followed):
    """A local working directory, read as it is on disk (saved, not committed).

    Chosen when ``--repo`` is a local directory with a work tree (not a bare
    repository). Each pass scans ``<path>/apps/`` on disk; blob ids are computed
    from file contents (cached by mtime and size, so unchanged files are not even
    read) and the "commit" is a digest of that listing, ``worktree:<hex>``.
    The daemon watches the directory with watchfiles, so a saved file is applied
    at once. Imperative calls edit the file in place and commit just that file
    on the current branch (the user's other staged changes are left alone);
    nothing is pushed anywhere.
    """

    def __init__(self, url: str, *, path: str = "", org: str | None = None) -> None:
        self.root = pathlib.Path(url).expanduser().resolve()
        self.url = str(self.root)
        self.org = org
        self.path = path.strip("/")
        self._lock = _thread.RLock()  # native: imperative edits may run in a worker's thread pool
        self._stat: dict[str, tuple[int, int, str]] = {}
        self._paths: dict[str, str] = {}
        self._listing: tuple[list[tuple[str, str]], list[ManifestError]] = ([], [])
        self._id = ""
        try:
            self._git: pygit2.Repository | None = pygit2.Repository(str(self.root))
        except pygit2.GitError:
            self._git = None
        head = self._git.head.shorthand if self._git is not None and not self._git.head_is_unborn else "main"
        self.branch = head

    @property
    def apps_dir(self) -> pathlib.Path:
        return self.root / self.apps_prefix

    def fetch(self) -> str:
        with self._lock:
            if not self.apps_dir.is_dir():
                raise SourceError(f"{self.apps_dir} is not a directory", code="source_empty")
            found: list[tuple[str, str]] = []
            refused: list[ManifestError] = []
            paths: dict[str, str] = {}
            stat_cache: dict[str, tuple[int, int, str]] = {}
            listed = sorted(self.apps_dir.rglob("*"))
            # Under a compose app's directory every regular file is listed (a bind mount may name it).
            compose_dirs = {f.parent for f in listed if f.name in COMPOSE_NAMES and f.is_file()}
            for file in listed:
                rel = file.relative_to(self.root).as_posix()
                if not is_manifest_path(rel) and any(d in file.parents for d in compose_dirs):
                    if file.is_file() and not file.is_symlink() and file.stat().st_size <= MAX_MANIFEST_BYTES and \
                            not any(p.startswith(".") for p in file.relative_to(self.apps_dir).parts):
                        oid = str(pygit2.hash(file.read_bytes()))
                        found.append((rel, oid))
                        paths[oid] = rel
                    continue
                parts = file.relative_to(self.apps_dir).parts
                # Hidden files and folders are not read, but for a compose app's .env (and .env.*).
                hidden = any(p.startswith(".") for p in parts[:-1]) or (
                    parts[-1].startswith(".") and not parts[-1].startswith(".env"))
                if not is_manifest_path(rel) or hidden:
                    continue
                if file.is_symlink():
                    refused.append(ManifestError("symlinks are not followed in the manifests directory",
                                                 code="policy_violation", path=rel, line=1))
                    continue
                if not file.is_file():
                    continue
                st = file.stat()
                cached = self._stat.get(rel)
                if cached is not None and cached[:2] == (st.st_mtime_ns, st.st_size):
                    oid = cached[2]
                else:
                    oid = str(pygit2.hash(file.read_bytes()))
                stat_cache[rel] = (st.st_mtime_ns, st.st_size, oid)
                found.append((rel, oid))
                paths[oid] = rel
            self._stat, self._paths, self._listing = stat_cache, paths, (found, refused)
            listing = "\n".join(f"{p} {o}" for p, o in found).encode()
            self._id = "worktree:" + hashlib.sha1(listing).hexdigest()[:12]
            return self._id

    def resolve(self) -> str:
        if not self._id:
            raise SourceError(f"{self.apps_dir} was not read yet", code="source_unavailable")
        return self._id

    def files(self, commit: str) -> tuple[list[tuple[str, str]], list[ManifestError]]:
        with self._lock:
            return list(self._listing[0]), list(self._listing[1])

    def read(self, oid: str) -> bytes:
        with self._lock:
            return (self.root / self._paths[oid]).read_bytes()

    def introduced(self, commit: str, paths: Iterable[str], *, limit: int = 1000) -> dict[str, int]:
        """No history here: older files (by modification time) come first."""
        newest = max((s[0] for s in self._stat.values()), default=0)
        return {p: newest - self._stat[p][0] for p in paths if p in self._stat}

    def file_at(self, commit: str, path: str) -> bytes | None:
        """Only the working copy is known; a past commit of the local branch is read from Git."""
        if self._git is None or commit.startswith("worktree:"):
            return None
        try:
            tree = self._git[commit].peel(pygit2.Tree)
            return bytes(self._git[tree[path].id].read_raw())
        except (KeyError, ValueError, pygit2.GitError):
            return None

    def commit_edit(self, path: str, edit: Callable[[bytes | None], bytes | None], message: str) -> str | None:
        # API workers in several processes may edit the same working copy: one at a time.
        lock_dir = self.root / ".git" if (self.root / ".git").is_dir() else self.root
        with self._lock, open(lock_dir / "cynchrod-edit.lock", "ab") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            target = self.root / path
            old = target.read_bytes() if target.exists() else None
            new = edit(old)
            if new == old:
                return None
            if new is None:
                target.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.cynchrod-tmp")
                tmp.write_bytes(new)
                os.replace(tmp, target)
            if self._git is None:
                return self.fetch()
            return self._commit_one(path, new, message)

    def _commit_one(self, path: str, new: bytes | None, message: str) -> str:
        """Commit this one file on HEAD; other staged changes stay staged, not committed."""
        repo = self._git
        assert repo is not None
        parents = [] if repo.head_is_unborn else [repo.head.target]
        base = pygit2.Index()
        if parents:
            base.read_tree(repo[parents[0]].peel(pygit2.Tree))
        index = repo.index
        index.read()
        if new is None:
            base.remove(path)
            index.remove(path)
        else:
            blob = repo.create_blob(new)
            base.add(pygit2.IndexEntry(path, blob, pygit2.enums.FileMode.BLOB))
            index.add(pygit2.IndexEntry(path, blob, pygit2.enums.FileMode.BLOB))
        tree = base.write_tree(repo)
        author = pygit2.Signature(AUTHOR_NAME, AUTHOR_EMAIL)
        ref = "HEAD" if parents else f"refs/heads/{self.branch}"
        commit = repo.create_commit(ref, author, author, message, tree, parents)
        index.write()
        return str(commit)
