"""A repository mirrored from Git (``Source``): clone, fetch, heal, and read trees and blobs.

``Source.fetch()`` clones or fetches the remote into a bare mirror under the
state directory and resolves the branch to a commit; ``Source.files(commit)``
lists the manifests under ``<path>/apps/`` as (path, blob id) pairs and
``Source.read(blob id)`` returns a blob's bytes, so the manifest cache can skip
every blob it has already parsed. ``Source.commit_edit`` holds the mirror's
writers' lock around commit-back (``push``): fetch the tip, commit, push, and
on a rejection do it again on the new tip.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import hashlib
import logging
import os
import pathlib
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any
from urllib.parse import urlparse

import pygit2

from cynchrod.core.codes import Code
from cynchrod.core.errors import ManifestError, SourceError, StateUnwritable
from cynchrod.core.errors import MirrorDamaged as _Damaged
from cynchrod.desired.compose import COMPOSE_NAMES
from cynchrod.desired.manifests import MAX_MANIFEST_BYTES, is_manifest_path
from cynchrod.desired.source import push
from cynchrod.desired.source.followed import Followed, credential, unwritable_mirror

log = logging.getLogger("cynchrod.source")  # the name the logs have always shown

#: Directories under apps/ nested deeper than this are refused (a tree can nest thousands deep).
MAX_DIR_DEPTH = 16
#: A corrupted mirror is re-cloned at most this often (a remote that is down fails the clone too).
HEAL_INTERVAL_S = 30.0
#: Names a checkout could not hold or a log line could not show: not UTF-8, control characters, "." and "..".
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f]|^\.{1,2}$|/")
_MANIFEST_MODES = (pygit2.enums.FileMode.BLOB, pygit2.enums.FileMode.BLOB_EXECUTABLE)
PUSH_ATTEMPTS = 6
_SYMLINK = pygit2.enums.FileMode.LINK
_COMPOSE_NAMES = frozenset(n.encode() for n in COMPOSE_NAMES)


def _callbacks(url: str) -> pygit2.RemoteCallbacks | None:
    found = credential(url)
    return pygit2.RemoteCallbacks(credentials=found) if found is not None else None


def _normalise(url: str) -> str:
    """Local paths become absolute so a daemon started elsewhere finds them."""
    if "://" in url or (":" in url and "@" in url.split(":", 1)[0]):
        return url
    return str(pathlib.Path(url).expanduser().resolve())


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
        self._healed_at = -HEAL_INTERVAL_S
        #: How many times a corrupted mirror was replaced by a fresh clone.
        self.heals = 0
        #: Blobs a fresh clone did not have either: the remote lacks them, cloning again cannot help.
        self._absent: set[str] = set()

    @contextlib.contextmanager
    def _mirror_locked(self) -> Iterator[None]:
        """This mirror's writer lock: one writer at a time in every process."""
        with self._writing:
            if self._flock_depth == 0:
                handle = self._lock_file()
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

    def _lock_file(self) -> IO[bytes]:
        """The writers' lock file, opened (a read-only state dir still takes a lock: flock needs no write)."""
        lock = self.mirror.with_name(self.mirror.name + ".lock")
        try:
            self.mirror.parent.mkdir(parents=True, exist_ok=True)
            return open(lock, "ab")
        except OSError as exc:
            if lock.exists():
                with contextlib.suppress(OSError):
                    return open(lock, "rb")
            raise StateUnwritable.of(exc, f"the mirror of {self._safe_url}") from exc

    def _clone_once(self) -> None:
        if (self.mirror / "HEAD").exists():
            return
        with self._mirror_locked():
            if (self.mirror / "HEAD").exists():
                return  # another process cloned it while this one waited
            self._clone(self.mirror).free()

    def _open(self) -> pygit2.Repository:
        """The repository object for local reads."""
        if self._repo is None:
            self._repo = self._open_mirror()
        return self._repo

    def _net(self) -> pygit2.Repository:
        """The repository object for fetch, commit and push (held under ``_mirror_locked``)."""
        if self._net_repo is None:
            self._net_repo = self._open_mirror()
        return self._net_repo

    def _open_mirror(self) -> pygit2.Repository:
        self._clone_once()
        try:
            return pygit2.Repository(str(self.mirror))
        except (pygit2.GitError, ValueError, KeyError) as exc:
            # A mirror that cannot even be opened (a garbled config or HEAD) is rebuilt.
            if not self._heal(f"cannot open the mirror: {exc}"):
                raise SourceError(f"the mirror of {self._safe_url} is damaged and the repository cannot "
                                  f"be cloned again now: {exc}") from exc
            return pygit2.Repository(str(self.mirror))

    def _clone(self, dest: pathlib.Path) -> pygit2.Repository:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            return pygit2.clone_repository(self.url, str(dest), bare=True, callbacks=_callbacks(self.url))
        except (pygit2.GitError, ValueError, KeyError) as exc:
            shutil.rmtree(dest, ignore_errors=True)
            raise SourceError(f"cannot clone {self._safe_url}: {exc}") from exc

    def _heal(self, why: str) -> bool:
        """Replace a damaged mirror with a fresh clone; False (mirror unchanged) when that is not possible now.

        The clone is made beside the mirror and swapped in, under the writers' lock, only
        once it is complete, so a remote that is down leaves the old mirror (and the last
        good commit) in place. At most one attempt per ``HEAL_INTERVAL_S``. Both repository
        objects are dropped (plain assignments: the readers' lock is not taken here, so
        a reader healing and a writer fetching never wait for each other in turn).
        """
        now = time.monotonic()
        if now - self._healed_at < HEAL_INTERVAL_S:
            return False
        self._healed_at = now
        with self._mirror_locked():
            fresh = self.mirror.with_name(self.mirror.name + ".heal")
            shutil.rmtree(fresh, ignore_errors=True)
            try:
                self._clone(fresh).free()
            except SourceError as exc:
                log.warning("the mirror of %s looks damaged (%s); cloning it again failed: %s", self._safe_url, why,
                            exc.message)
                return False
            self._repo = self._net_repo = None
            old = self.mirror.with_name(self.mirror.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            if self.mirror.exists():
                os.replace(self.mirror, old)
            os.replace(fresh, self.mirror)
            shutil.rmtree(old, ignore_errors=True)
        self.heals += 1
        log.warning("the mirror of %s was damaged (%s): cloned it again", self._safe_url, why)
        return True

    @property
    def _safe_url(self) -> str:
        parsed = urlparse(self.url)
        if parsed.password:
            return self.url.replace(parsed.password, "***")
        return self.url

    def fetch(self) -> str:
        """Fetch and return the branch's commit id. Raises ``SourceError``.

        When the fetch fails, the mirror may be what is broken (a corrupted
        object or reference): it is cloned again, and the fetch fails only if
        that fails too (the remote is really unreachable). Only the writers'
        lock is held: reads of the mirror never wait for the network.
        """
        with self._mirror_locked():
            try:
                return self._fetch()
            except SourceError as exc:
                if exc.code == Code.BRANCH_NOT_FOUND or not self._heal(exc.message):
                    raise
            return self._fetch()

    def _fetch(self) -> str:
        repo = self._net()
        try:
            repo.remotes["origin"].fetch(prune=pygit2.enums.FetchPrune.PRUNE, callbacks=_callbacks(self.url))
            ref = repo.references.get(self._tracking_ref)
        except (pygit2.GitError, OSError, KeyError, ValueError) as exc:
            full = unwritable_mirror(repo, exc)  # the mirror's refs or objects: the state dir, not the remote
            if full is not None:
                raise full from exc
            raise SourceError(f"cannot fetch {self._safe_url}: {exc}") from exc
        if ref is None:
            raise SourceError(f"branch {self.branch!r} not found in {self._safe_url}", code=Code.BRANCH_NOT_FOUND)
        return str(ref.target)

    def resolve(self) -> str:
        """The branch's commit in the mirror as last fetched, without fetching."""
        with self._lock:
            try:
                ref = self._open().references.get(self._tracking_ref)
                target = None if ref is None else str(ref.target)
            except (pygit2.GitError, ValueError) as exc:
                raise SourceError(f"cannot read branch {self.branch!r} of {self._safe_url}: {exc}") from exc
            if target is None:
                raise SourceError(f"branch {self.branch!r} not found in {self._safe_url}", code=Code.BRANCH_NOT_FOUND)
            return target

    @property
    def _tracking_ref(self) -> str:
        return f"refs/remotes/origin/{self.branch}"

    def files(self, commit: str) -> tuple[list[tuple[str, str]], list[ManifestError]]:
        """Manifests under the apps directory at ``commit``, and entries refused.

        Raises ``SourceError`` (code ``source_empty``) when the commit has no
        apps directory at all, so that a wiped repository never prunes apps.
        Every odd entry a commit can hold (a submodule, a symlink, a directory
        named ``x.yaml``, a name that is not UTF-8, a file over 1 MiB, a
        missing object) is refused as that entry's error. A mirror whose
        objects cannot be read is cloned again once.
        """
        with self._lock:
            try:
                return self._files(commit)
            except _Damaged as exc:
                if not self._heal(str(exc)):
                    raise SourceError(f"cannot read commit {commit[:12]} of {self._safe_url}: {exc}") from exc
            try:
                return self._files(commit)
            except _Damaged as exc:
                raise SourceError(f"cannot read commit {commit[:12]} of {self._safe_url}: {exc}") from exc

    def _files(self, commit: str) -> tuple[list[tuple[str, str]], list[ManifestError]]:
        repo = self._open()
        try:
            tree = repo[commit].peel(pygit2.Tree)
        except (KeyError, ValueError, pygit2.GitError) as exc:
            raise _Damaged(f"commit {commit[:12]} unreadable: {exc}") from exc
        try:
            node = tree[self.apps_prefix]
        except KeyError as exc:
            raise SourceError(f"{self.apps_prefix}/ not found at commit {commit[:12]}", code="source_empty") from exc
        except (ValueError, pygit2.GitError) as exc:
            raise _Damaged(str(exc)) from exc
        if not isinstance(node, pygit2.Tree):
            raise SourceError(f"{self.apps_prefix} is not a directory at commit {commit[:12]}", code="source_empty")
        found: list[tuple[str, str]] = []
        refused: list[ManifestError] = []
        self._walk(repo, node, self.apps_prefix, found, refused, 0)
        return found, refused

    def _walk(self, repo: pygit2.Repository, tree: pygit2.Tree, prefix: str, found: list[tuple[str, str]],
              refused: list[ManifestError], depth: int, compose_dir: bool = False) -> None:
        """``compose_dir``: under a compose app's directory, where every regular file up to the size
        limit is listed (a bind mount may name it); one that is not is left out without an error."""
        try:
            entries = list(tree)
        except (pygit2.GitError, ValueError, KeyError) as exc:
            raise _Damaged(f"{prefix}/ unreadable: {exc}") from exc
        compose_dir = compose_dir or any(bytes(e.raw_name or b"") in _COMPOSE_NAMES for e in entries)
        for entry in entries:
            raw = bytes(entry.raw_name or b"")
            shown = f"{prefix}/{raw.decode('utf-8', 'replace')}"

            def refuse(message: str, code: str = "policy_violation", at: str = shown) -> None:
                # The path is shown with U+FFFD for bytes that are not UTF-8: it is stored and logged.
                refused.append(ManifestError(message, code=code, path=at.encode("utf-8", "replace").decode(), line=1))

            mode = entry.filemode
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError:
                name = None
            if name is None or _BAD_NAME.search(name):
                if mode == pygit2.enums.FileMode.TREE or is_manifest_path(shown):
                    refuse("file names under apps/ must be UTF-8 text without control characters", "invalid_path")
                continue
            path = f"{prefix}/{name}"
            if mode == pygit2.enums.FileMode.TREE:
                if depth >= MAX_DIR_DEPTH:
                    refuse(f"directories nested more than {MAX_DIR_DEPTH} deep under apps/ are not read",
                           "invalid_path", path)
                    continue
                try:
                    sub = repo[entry.id]
                except (KeyError, ValueError, pygit2.GitError) as exc:
                    raise _Damaged(f"{path}/ unreadable: {exc}") from exc
                if isinstance(sub, pygit2.Tree):
                    self._walk(repo, sub, path, found, refused, depth + 1, compose_dir)
                continue
            if not is_manifest_path(path):
                if compose_dir and not name.startswith(".") and mode in _MANIFEST_MODES and \
                        self._size(repo, entry.id) <= MAX_MANIFEST_BYTES:
                    found.append((path, str(entry.id)))
                continue
            if mode == _SYMLINK:
                refuse("symlinks are not followed in the manifests repository", at=path)
            elif mode not in _MANIFEST_MODES:
                refuse("not a regular file (a submodule?): only files are manifests", "invalid_path", path)
            else:
                try:
                    size = repo.odb.read_header(entry.id)[1]
                except (KeyError, ValueError, pygit2.GitError):
                    size = 0  # missing: reading it says so, as this file's error
                if size > MAX_MANIFEST_BYTES:
                    refuse(f"manifest is {size} bytes, over the {MAX_MANIFEST_BYTES} byte limit",
                           "manifest_too_large", path)
                else:
                    found.append((path, str(entry.id)))

    @staticmethod
    def _size(repo: pygit2.Repository, oid: Any) -> int:
        try:
            return int(repo.odb.read_header(oid)[1])
        except (KeyError, ValueError, pygit2.GitError):
            return 0  # missing: reading it says so, as this file's error

    def introduced(self, commit: str, paths: Iterable[str], *, limit: int = 1000) -> dict[str, int]:
        """For each path, how many first-parent commits back it was added (larger = earlier).

        Used to admit new apps over an org's quota first-come: the walk stops
        once every path is absent or after ``limit`` commits.
        """
        with self._lock:
            repo = self._open()
            pending = set(paths)
            age = dict.fromkeys(pending, 0)
            depth = 0
            try:
                current = repo[commit].peel(pygit2.Commit)
                while pending and depth < limit and current.parents:
                    current = current.parents[0]
                    depth += 1
                    for path in list(pending):
                        try:
                            current.tree[path]
                            age[path] = depth
                        except KeyError:
                            pending.discard(path)
            except (KeyError, ValueError, pygit2.GitError) as exc:
                # History the mirror cannot read (damaged, or a shallow remote): the ages found so far.
                log.warning("history of %s unreadable past %d commits: %s", self._safe_url, depth, exc)
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
        """A blob's bytes; a blob the mirror cannot give is looked for in a fresh clone once."""
        with self._lock:
            try:
                return bytes(self._open()[oid].read_raw())
            except (KeyError, ValueError, pygit2.GitError) as exc:
                first = exc
            if oid not in self._absent and self._heal(f"object {oid[:12]} unreadable: {first}"):
                try:
                    return bytes(self._open()[oid].read_raw())
                except (KeyError, ValueError, pygit2.GitError) as exc:
                    first = exc
                    self._absent.add(oid)  # not in a fresh clone either: the remote lacks it
            raise SourceError(f"object {oid[:12]} cannot be read from {self._safe_url}: {first}")

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
        return self._commit_and_push(
            lambda repo, tip: push.commit_on(repo, tip, path, edit, message, apps_prefix=self.apps_prefix))

    def restore_directory(self, directory: str, commit: str, message: str) -> str | None:
        """Commit the folder ``directory`` as it was at ``commit`` (a compose app's rollback: its
        compose files, ``.env``, env files and bound files, byte for byte) and push it, as
        ``commit_edit`` does; None when it already is."""
        return self._commit_and_push(lambda repo, tip: push.restore_on(repo, tip, directory, commit, message))

    def dir_at(self, commit: str, directory: str) -> dict[str, bytes] | None:
        """The files of a compose app's folder at a fetched commit, as a pass lists and reads them
        (``files``); None when the commit has no such folder."""
        with self._lock:
            repo = self._open()
            try:
                node = repo[repo[commit].peel(pygit2.Tree)[directory].id]
            except (KeyError, ValueError, pygit2.GitError):
                return None
            if not isinstance(node, pygit2.Tree):
                return None
            found: list[tuple[str, str]] = []
            depth = directory.count("/") - self.apps_prefix.count("/")
            try:
                self._walk(repo, node, directory, found, [], depth, compose_dir=True)
                return {path: bytes(repo[oid].read_raw()) for path, oid in found}
            except (_Damaged, KeyError, ValueError, pygit2.GitError):
                return None

    def _commit_and_push(self, make: Callable[[pygit2.Repository, str], str | None]) -> str | None:
        for attempt in range(PUSH_ATTEMPTS):
            with self._mirror_locked():
                tip = self.fetch()
                outcome = make(self._net(), tip)
                if outcome is None:
                    return None
                try:
                    push.push_to(self._net(), outcome, url=self.url, branch=self.branch, safe_url=self._safe_url)
                except push.Rejected:
                    pass
                else:
                    try:
                        self._net().references.create(self._tracking_ref, pygit2.Oid(hex=outcome), force=True)
                    except (pygit2.GitError, OSError) as exc:
                        # The commit is pushed (Git has it): the next fetch moves the ref.
                        log.warning("the mirror of %s did not record the pushed commit %s: %s", self._safe_url,
                                    outcome[:12], exc)
                    return outcome
            time.sleep(random.uniform(0.02, 0.1) * (attempt + 1))
        raise SourceError(f"push to {self._safe_url} rejected {PUSH_ATTEMPTS} times: others keep pushing",
                          code="push_conflict")

