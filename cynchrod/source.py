"""The manifests repository, through pygit2 (the only module that imports it).

``Source.fetch()`` clones or fetches the remote into a bare mirror under the
state directory and resolves the branch to a commit; ``Source.files(commit)``
lists the manifests under ``<path>/apps/`` as (path, blob id) pairs and
``Source.read(blob id)`` returns a blob's bytes, so the manifest cache can skip
every blob it has already parsed.
"""

from __future__ import annotations

import _thread
import abc
import contextlib
import fcntl
import hashlib
import os
import pathlib
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO
from urllib.parse import urlparse

import pygit2

from cynchrod.errors import ManifestError, SourceError
from cynchrod.manifests import is_manifest_path

APPS_DIR = "apps"
#: Committed into an emptied apps/ so that deleting the last app is applied.
KEEP_FILE = ".keep"
AUTHOR_NAME = "cynchrod"
AUTHOR_EMAIL = "cynchrod@localhost"
PUSH_ATTEMPTS = 6
_SYMLINK = pygit2.enums.FileMode.LINK
_PUSH_REF = "refs/cynchrod/push"


def _credential(url: str) -> pygit2.UserPass | pygit2.Keypair | None:
    """Credentials from the environment; never logged, never stored in the mirror."""
    token = os.environ.get("CYNCHROD_GIT_TOKEN")
    key = os.environ.get("CYNCHROD_GIT_SSH_KEY")
    scheme = urlparse(url).scheme
    if scheme == "https" and token:
        return pygit2.UserPass("x-access-token", token)
    if (scheme == "ssh" or "@" in url.split(":", 1)[0]) and key:
        return pygit2.Keypair("git", key + ".pub", key, "")
    return None


def _callbacks(url: str) -> pygit2.RemoteCallbacks | None:
    credential = _credential(url)
    return pygit2.RemoteCallbacks(credentials=credential) if credential is not None else None


def _normalise(url: str) -> str:
    """Local paths become absolute so a daemon started elsewhere finds them."""
    if "://" in url or (":" in url and "@" in url.split(":", 1)[0]):
        return url
    return str(pathlib.Path(url).expanduser().resolve())


class Followed(abc.ABC):
    """What the reconciler and the imperative calls need of a followed repository.

    Two kinds: ``Source`` (a Git mirror under ``state/repos``) and ``WorkTreeSource``
    (a local working directory read from disk). Neither inherits the other's
    machinery, so nothing half-initialised can be called on the wrong one.
    """

    url: str
    org: str | None
    branch: str
    path: str

    @property
    def apps_prefix(self) -> str:
        return f"{self.path}/{APPS_DIR}" if self.path else APPS_DIR

    @abc.abstractmethod
    def fetch(self) -> str: ...

    @abc.abstractmethod
    def resolve(self) -> str: ...

    @abc.abstractmethod
    def files(self, commit: str) -> tuple[list[tuple[str, str]], list[ManifestError]]: ...

    @abc.abstractmethod
    def read(self, oid: str) -> bytes: ...

    @abc.abstractmethod
    def introduced(self, commit: str, paths: Iterable[str], *, limit: int = 1000) -> dict[str, int]: ...

    @abc.abstractmethod
    def file_at(self, commit: str, path: str) -> bytes | None: ...

    @abc.abstractmethod
    def commit_edit(self, path: str, edit: Callable[[bytes | None], bytes | None], message: str) -> str | None: ...


class Source(Followed):
    """One branch of one repository, mirrored under ``state/repos``."""

    def __init__(self, url: str, *, branch: str = "main", path: str = "", state_dir: pathlib.Path,
                 org: str | None = None) -> None:
        self.url = _normalise(url)
        #: When set, this repository may only declare apps of this org.
        self.org = org
        self.branch = branch
        self.path = path.strip("/")
        digest = hashlib.sha256(f"{self.url}#{branch}".encode()).hexdigest()[:16]
        self.mirror = state_dir / "repos" / f"{digest}.git"
        self._repo: pygit2.Repository | None = None
        #: The repository object that fetches, commits and pushes (a second one, so reads
        #: never wait for the network).
        self._net_repo: pygit2.Repository | None = None
        # Native locks (also under gevent, where writes run in a thread pool). ``_lock``
        # guards the reading repository object and is only held for local reads; writes to
        # the mirror (clone, fetch, commit, push) hold ``_writing`` in this process and an
        # fcntl lock on ``<mirror>.lock`` across processes (the reconciler and the API
        # workers share the mirror). Only other writers of this mirror wait for them.
        self._lock = _thread.RLock()
        self._writing = _thread.RLock()
        self._flock_depth = 0
        self._flock_file: IO[bytes] | None = None

    @contextlib.contextmanager
    def _mirror_locked(self) -> Iterator[None]:
        """This mirror's writer lock: one writer at a time in every process."""
        with self._writing:
            if self._flock_depth == 0:
                self.mirror.parent.mkdir(parents=True, exist_ok=True)
                handle = open(self.mirror.with_name(self.mirror.name + ".lock"), "ab")  # noqa: SIM115 (held open)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX)
                except BaseException:
                    handle.close()
                    raise
                self._flock_file = handle
            self._flock_depth += 1
            try:
                yield
            finally:
                self._flock_depth -= 1
                if self._flock_depth == 0 and self._flock_file is not None:
                    self._flock_file.close()  # releases the flock
                    self._flock_file = None

    def _clone_once(self) -> None:
        if (self.mirror / "HEAD").exists():
            return
        with self._mirror_locked():
            if (self.mirror / "HEAD").exists():
                return  # another process cloned it while this one waited
            try:
                pygit2.clone_repository(self.url, str(self.mirror), bare=True, callbacks=_callbacks(self.url))
            except (pygit2.GitError, ValueError, KeyError) as exc:
                raise SourceError(f"cannot clone {self._safe_url}: {exc}") from exc

    def _open(self) -> pygit2.Repository:
        """The repository object for local reads."""
        if self._repo is None:
            self._clone_once()
            self._repo = pygit2.Repository(str(self.mirror))
        return self._repo

    def _net(self) -> pygit2.Repository:
        """The repository object for fetch, commit and push (held under ``_mirror_locked``)."""
        if self._net_repo is None:
            self._clone_once()
            self._net_repo = pygit2.Repository(str(self.mirror))
        return self._net_repo

    @property
    def _safe_url(self) -> str:
        parsed = urlparse(self.url)
        if parsed.password:
            return self.url.replace(parsed.password, "***")
        return self.url

    def fetch(self) -> str:
        """Fetch and return the branch's commit id. Raises ``SourceError``."""
        with self._mirror_locked():
            repo = self._net()
            try:
                repo.remotes["origin"].fetch(prune=pygit2.enums.FetchPrune.PRUNE, callbacks=_callbacks(self.url))
            except (pygit2.GitError, KeyError) as exc:
                raise SourceError(f"cannot fetch {self._safe_url}: {exc}") from exc
            return self.resolve()

    def resolve(self) -> str:
        """The branch's commit in the mirror as last fetched, without fetching."""
        with self._lock:
            ref = self._open().references.get(self._tracking_ref)
            if ref is None:
                raise SourceError(f"branch {self.branch!r} not found in {self._safe_url}", code="branch_not_found")
            return str(ref.target)

    @property
    def _tracking_ref(self) -> str:
        return f"refs/remotes/origin/{self.branch}"

    def files(self, commit: str) -> tuple[list[tuple[str, str]], list[ManifestError]]:
        """Manifests under the apps directory at ``commit``, and entries refused.

        Raises ``SourceError`` (code ``source_empty``) when the commit has no
        apps directory at all, so that a wiped repository never prunes apps.
        """
        with self._lock:
            return self._files(commit)

    def _files(self, commit: str) -> tuple[list[tuple[str, str]], list[ManifestError]]:
        repo = self._open()
        try:
            tree = repo[commit].peel(pygit2.Tree)
            node = tree[self.apps_prefix]
        except (KeyError, ValueError, pygit2.GitError) as exc:
            raise SourceError(f"{self.apps_prefix}/ not found at commit {commit[:12]}", code="source_empty") from exc
        if not isinstance(node, pygit2.Tree):
            raise SourceError(f"{self.apps_prefix} is not a directory at commit {commit[:12]}", code="source_empty")
        found: list[tuple[str, str]] = []
        refused: list[ManifestError] = []
        self._walk(node, self.apps_prefix, found, refused)
        return found, refused

    def _walk(self, tree: pygit2.Tree, prefix: str, found: list[tuple[str, str]], refused: list[ManifestError]) -> None:
        for entry in tree:
            path = f"{prefix}/{entry.name}"
            if isinstance(entry, pygit2.Tree):
                self._walk(entry, path, found, refused)
            elif is_manifest_path(path):
                if entry.filemode == _SYMLINK:
                    refused.append(ManifestError("symlinks are not followed in the manifests repository",
                                                 code="policy_violation", path=path, line=1))
                else:
                    found.append((path, str(entry.id)))

    def introduced(self, commit: str, paths: Iterable[str], *, limit: int = 1000) -> dict[str, int]:
        """For each path, how many first-parent commits back it was added (larger = earlier).

        Used to admit new apps over an org's quota first-come: the walk stops
        once every path is absent or after ``limit`` commits.
        """
        with self._lock:
            repo = self._open()
            pending = set(paths)
            age = dict.fromkeys(pending, 0)
            current = repo[commit].peel(pygit2.Commit)
            depth = 0
            while pending and depth < limit and current.parents:
                current = current.parents[0]
                depth += 1
                for path in list(pending):
                    try:
                        current.tree[path]
                        age[path] = depth
                    except KeyError:
                        pending.discard(path)
            return age

    def file_at(self, commit: str, path: str) -> bytes | None:
        """A file's bytes at a commit already fetched, or None."""
        with self._lock:
            try:
                tree = self._open()[commit].peel(pygit2.Tree)
                return bytes(self._open()[tree[path].id].read_raw())
            except (KeyError, ValueError, pygit2.GitError):
                return None

    def read(self, oid: str) -> bytes:
        with self._lock:
            return bytes(self._open()[oid].read_raw())

    def export(self, commit: str, dest: pathlib.Path) -> None:
        """Write the tree of ``commit`` into ``dest`` (a build context). Symlinks are skipped."""
        with self._lock:
            repo = self._open()

            def write(tree: pygit2.Tree, into: pathlib.Path) -> None:
                into.mkdir(parents=True, exist_ok=True)
                for entry in tree:
                    name = str(entry.name)
                    if isinstance(entry, pygit2.Tree):
                        write(entry, into / name)
                    elif entry.filemode in (pygit2.enums.FileMode.BLOB, pygit2.enums.FileMode.BLOB_EXECUTABLE):
                        target = into / name
                        target.write_bytes(bytes(repo[entry.id].read_raw()))
                        if entry.filemode == pygit2.enums.FileMode.BLOB_EXECUTABLE:
                            target.chmod(0o755)

            write(repo[commit].peel(pygit2.Tree), dest)

    # -- writing: imperative calls become commits ---------------------------------

    def commit_edit(self, path: str, edit: Callable[[bytes | None], bytes | None], message: str) -> str | None:
        """Commit ``edit`` of the file at ``path`` on the branch tip and push it.

        ``edit(old)`` gets the file's bytes (None if absent) and returns the new
        bytes (None deletes the file); it may raise a ``CynchrodError``. Returns
        the pushed commit id, or None when the edit changes nothing (no empty
        commits). When the push is rejected because someone else pushed first,
        the edit is re-applied on the new tip and pushed again (bounded, with
        jitter); a push is never forced.
        """
        for attempt in range(PUSH_ATTEMPTS):
            with self._mirror_locked():
                tip = self.fetch()
                outcome = self._commit_on(tip, path, edit, message)
                if outcome is None:
                    return None
                try:
                    self._push(outcome)
                except _Rejected:
                    pass
                else:
                    self._net().references.create(self._tracking_ref, pygit2.Oid(hex=outcome), force=True)
                    return outcome
            time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))
        raise SourceError(f"push to {self._safe_url} rejected {PUSH_ATTEMPTS} times: others keep pushing",
                          code="push_conflict")

    def _commit_on(self, tip: str, path: str, edit: Callable[[bytes | None], bytes | None], message: str) -> str | None:
        repo = self._net()
        commit = repo[tip].peel(pygit2.Commit)
        try:
            entry = commit.tree[path]
            old: bytes | None = bytes(repo[entry.id].read_raw())
        except KeyError:
            old = None
        new = edit(old)
        if new == old:
            return None
        index = pygit2.Index()
        index.read_tree(commit.tree)
        if new is None:
            index.remove(path)
            prefix = self.apps_prefix + "/"
            if path.startswith(prefix) and not any(e.path.startswith(prefix) for e in index):
                # Removing the last app: keep an empty apps/, or the commit would read as
                # "no apps/ directory" (source_empty), which prunes nothing by design.
                index.add(pygit2.IndexEntry(prefix + KEEP_FILE, repo.create_blob(b""), pygit2.enums.FileMode.BLOB))
        else:
            index.add(pygit2.IndexEntry(path, repo.create_blob(new), pygit2.enums.FileMode.BLOB))
        tree = index.write_tree(repo)
        if tree == commit.tree.id:
            return None
        author = pygit2.Signature(AUTHOR_NAME, AUTHOR_EMAIL)
        return str(repo.create_commit(None, author, author, message, tree, [commit.id]))

    def _push(self, commit: str) -> None:
        repo = self._net()
        repo.references.create(_PUSH_REF, pygit2.Oid(hex=commit), force=True)
        callbacks = _PushCallbacks(_credential(self.url))
        try:
            repo.remotes["origin"].push([f"{_PUSH_REF}:refs/heads/{self.branch}"], callbacks=callbacks)
        except pygit2.GitError as exc:
            text = str(exc)
            if _moved_on(text):
                raise _Rejected(text) from exc
            raise SourceError(f"push to {self._safe_url} failed: {text}", code="push_failed") from exc
        if callbacks.rejection:
            if _moved_on(callbacks.rejection):
                raise _Rejected(callbacks.rejection)
            raise SourceError(f"push to {self._safe_url} rejected: {callbacks.rejection}", code="push_failed")


def _moved_on(message: str) -> bool:
    """Whether a push failed because the remote branch has commits we have not fetched."""
    return any(sign in message for sign in ("non-fast", "fetch first", "not present locally", "stale info"))


class _Rejected(Exception):
    """The remote moved on: fetch, re-apply, push again."""


class _PushCallbacks(pygit2.RemoteCallbacks):
    def __init__(self, credential: pygit2.UserPass | pygit2.Keypair | None) -> None:
        super().__init__(credentials=credential)
        self.rejection: str | None = None

    def push_update_reference(self, refname: str, message: str | None) -> None:
        if message:
            self.rejection = message


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
            for file in sorted(self.apps_dir.rglob("*")):
                rel = file.relative_to(self.root).as_posix()
                if not is_manifest_path(rel) or any(p.startswith(".") for p in file.relative_to(self.apps_dir).parts):
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


def open_source(url: str, *, branch: str = "main", path: str = "", state_dir: pathlib.Path,
                org: str | None = None) -> Followed:
    """A working directory is read from disk (and watched); anything else is mirrored from Git."""
    local = pathlib.Path(url).expanduser()
    if "://" not in url and local.is_dir() and (local / ".git").exists():
        return WorkTreeSource(url, path=path, org=org)
    return Source(url, branch=branch, path=path, state_dir=state_dir, org=org)
