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
import logging
import os
import pathlib
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO
from urllib.parse import urlparse

import pygit2

from cynchrod.core.errors import ManifestError, PermanentError, SourceError
from cynchrod.desired.config import local_repo_path
from cynchrod.desired.manifests import MAX_MANIFEST_BYTES, is_manifest_path

log = logging.getLogger("cynchrod.source")  # the name the logs have always shown

APPS_DIR = "apps"
#: Committed into an emptied apps/ so that deleting the last app is applied.
KEEP_FILE = ".keep"
#: Directories under apps/ nested deeper than this are refused (a tree can nest thousands deep).
MAX_DIR_DEPTH = 16
#: A corrupted mirror is re-cloned at most this often (a remote that is down fails the clone too).
HEAL_INTERVAL_S = 30.0
#: Names a checkout could not hold or a log line could not show: not UTF-8, control characters, "." and "..".
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f]|^\.{1,2}$|/")
_MANIFEST_MODES = (pygit2.enums.FileMode.BLOB, pygit2.enums.FileMode.BLOB_EXECUTABLE)
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
                if exc.code == "branch_not_found" or not self._heal(exc.message):
                    raise
            return self._fetch()

    def _fetch(self) -> str:
        repo = self._net()
        try:
            repo.remotes["origin"].fetch(prune=pygit2.enums.FetchPrune.PRUNE, callbacks=_callbacks(self.url))
            ref = repo.references.get(self._tracking_ref)
        except (pygit2.GitError, KeyError, ValueError) as exc:
            raise SourceError(f"cannot fetch {self._safe_url}: {exc}") from exc
        if ref is None:
            raise SourceError(f"branch {self.branch!r} not found in {self._safe_url}", code="branch_not_found")
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
                raise SourceError(f"branch {self.branch!r} not found in {self._safe_url}", code="branch_not_found")
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
              refused: list[ManifestError], depth: int) -> None:
        try:
            entries = list(tree)
        except (pygit2.GitError, ValueError, KeyError) as exc:
            raise _Damaged(f"{prefix}/ unreadable: {exc}") from exc
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
                    self._walk(repo, sub, path, found, refused, depth + 1)
                continue
            if not is_manifest_path(path):
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
        # The new tree is built from the old one along the path only (no index): an index refuses
        # a whole tree when any entry has a path it cannot hold (``apps/.git/x.yaml``, pushed as raw
        # objects), which would make every edit of every app fail.
        try:
            blob = None if new is None else repo.create_blob(new)
            tree = _replace_path(repo, commit.tree, path.split("/"), blob) or repo.TreeBuilder().write()
            if new is None and path.startswith(self.apps_prefix + "/"):
                # Deleting the last app must not remove apps/ itself: a commit without it reads as
                # source_empty (never pruned, for safety), so the deletion would never be applied.
                try:
                    repo[tree].peel(pygit2.Tree)[self.apps_prefix]
                except KeyError:
                    keep = [*self.apps_prefix.split("/"), KEEP_FILE]
                    tree = _replace_path(repo, repo[tree].peel(pygit2.Tree), keep, repo.create_blob(b"")) or tree
        except (pygit2.GitError, ValueError) as exc:
            raise PermanentError(f"Git cannot write {path!r} ({exc}); rename the file in the repository",
                                 code="path_unwritable") from exc
        if tree == commit.tree.id:
            return None
        author = pygit2.Signature(AUTHOR_NAME, AUTHOR_EMAIL)
        return str(repo.create_commit(None, author, author, message, tree, [commit.id]))

    def _push(self, commit: str) -> None:
        repo = self._net()
        local = local_repo_path(self.url)
        if local is not None:
            self._push_local(repo, local, commit)
            return
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


    def _push_local(self, repo: pygit2.Repository, path: pathlib.Path, commit: str) -> None:
        """Push ``commit`` to a repository on this machine as a compare-and-swap of its branch.

        libgit2's local transport checks the fast-forward against the refs it read when it
        connected and then writes the branch with a forced update, so a ``git push`` landing
        in between was silently overwritten (``test_a_push_landing_during_ours_is_never_
        overwritten``). Here the objects are copied first and the branch is moved only if it
        still names our commit's parent, under the ref's lock file (the same lock ``git``
        takes), so a concurrent writer makes this a rejection, never a lost commit.
        """
        new = repo[commit].peel(pygit2.Commit)
        ref_name = f"refs/heads/{self.branch}"
        try:
            remote = pygit2.Repository(str(path))
        except (pygit2.GitError, ValueError, KeyError) as exc:
            raise SourceError(f"push to {self._safe_url} failed: {exc}", code="push_failed") from exc
        try:
            _refuse_checked_out(remote, ref_name, self._safe_url)
            found = remote.references.get(ref_name)
            ref = None if found is None else found.resolve()
            if ref is None or list(new.parent_ids) != [ref.target]:
                raise _Rejected(f"{ref_name} moved on (stale info)")
            try:
                _copy_objects(repo, remote, new.id)
            except (pygit2.GitError, OSError) as exc:
                raise SourceError(f"push to {self._safe_url} failed: {exc}", code="push_failed") from exc
            try:
                # git_reference_set_target: written only if the ref still holds the target read
                # above, checked under its lock file.
                ref.set_target(new.id, f"push: {new.message.splitlines()[0] if new.message else ''}")
            except pygit2.GitError as exc:
                raise _Rejected(f"{ref_name} moved on while pushing (stale info): {exc}") from exc
        finally:
            remote.free()


def _checked_out(repo: pygit2.Repository, ref_name: str) -> str | None:
    """The work tree that has ``ref_name`` checked out (the main one or a linked one), or None."""
    heads = [] if repo.is_bare else [(repo.workdir, pathlib.Path(repo.path) / "HEAD")]
    linked = pathlib.Path(repo.path) / "worktrees"  # ``git worktree add``: a bare repository may have them too
    if linked.is_dir():
        heads += [((d / "gitdir").read_text(errors="replace").strip().removesuffix("/.git"), d / "HEAD")
                  for d in sorted(linked.iterdir()) if (d / "HEAD").is_file() and (d / "gitdir").is_file()]
    for workdir, head in heads:
        with contextlib.suppress(OSError):
            if head.read_text(errors="replace").strip() == f"ref: {ref_name}":
                return str(workdir)
    return None


def _refuse_checked_out(repo: pygit2.Repository, ref_name: str, url: str) -> None:
    """Refuse to move a branch that is checked out in a work tree of a repository on this machine.

    ``file://`` of a checkout is followed through a mirror like any remote (reading it is harmless),
    but the local push writes the branch ref directly: the checked-out branch would move under
    the user's work tree, whose files and index would then show our commit undone as their own
    changes (and a later ``git commit -a`` would revert it). ``git push`` refuses the same push
    (``receive.denyCurrentBranch``, default ``refuse``), so we do as Git does: refused unless the
    repository's ``receive.denyCurrentBranch`` is ``ignore`` or ``warn`` (``updateInstead``, which
    would also update the work tree, is not something we do: refused too). Other branches of a
    checkout, and bare repositories, are pushed to as before.
    """
    workdir = _checked_out(repo, ref_name)
    if workdir is None:
        return
    try:
        policy = str(repo.config["receive.denyCurrentBranch"]).lower()
    except (KeyError, pygit2.GitError):
        policy = "refuse"
    if policy in ("ignore", "warn", "false", "no", "off", "0"):
        return
    raise PermanentError(
        f"{url} is not a bare repository and {ref_name.removeprefix('refs/heads/')} is checked out in {workdir}: "
        "pushing the commit would move that branch under its work tree (Git refuses the same push: "
        "receive.denyCurrentBranch). Follow a bare repository (git clone --bare), follow another branch, or "
        "give the checkout as a plain path (its files are then read and edited in place)", code="repo_not_bare")


def _copy_objects(src: pygit2.Repository, dst: pygit2.Repository, root: pygit2.Oid) -> None:
    """Write into ``dst`` the objects reachable from ``root`` that it lacks (an object it has is
    taken to come with everything it reaches, as Git's own connectivity rule has it)."""
    todo = [root]
    seen: set[pygit2.Oid] = set()
    while todo:
        oid = todo.pop()
        if oid in seen or oid in dst.odb:
            continue
        seen.add(oid)
        obj = src[oid]
        if isinstance(obj, pygit2.Commit):
            todo.append(obj.tree_id)
            todo.extend(obj.parent_ids)
        elif isinstance(obj, pygit2.Tree):
            todo.extend(entry.id for entry in obj if entry.filemode != pygit2.enums.FileMode.COMMIT)
        kind, data = src.odb.read(oid)
        dst.odb.write(kind, data)


def _replace_path(repo: pygit2.Repository, tree: pygit2.Tree | None, parts: list[str],
                  blob: pygit2.Oid | None) -> pygit2.Oid | None:
    """``tree`` with the file at ``parts`` set to ``blob`` (None removes it); None when the tree ends up empty."""
    builder = repo.TreeBuilder(tree) if tree is not None else repo.TreeBuilder()
    name, rest = parts[0], parts[1:]
    if not name:
        raise ValueError("empty path component")
    if not rest:
        if blob is None:
            if builder.get(name) is not None:
                builder.remove(name)
        else:
            builder.insert(name, blob, pygit2.enums.FileMode.BLOB)
    else:
        sub = None
        if tree is not None and name in tree:
            found = repo[tree[name].id]
            if not isinstance(found, pygit2.Tree):
                raise ValueError(f"{name} is a file, not a directory")
            sub = found
        child = _replace_path(repo, sub, rest, blob)
        if child is None:
            if builder.get(name) is not None:
                builder.remove(name)
        else:
            builder.insert(name, child, pygit2.enums.FileMode.TREE)
    if len(builder) == 0:
        return None
    oid: pygit2.Oid = builder.write()
    return oid


def _moved_on(message: str) -> bool:
    """Whether a push failed because the remote branch has commits we have not fetched."""
    return any(sign in message for sign in ("non-fast", "fetch first", "not present locally", "stale info"))


class _Damaged(Exception):
    """An object of the mirror cannot be read: the mirror is cloned again."""


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
