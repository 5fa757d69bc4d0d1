"""Commit-back: an imperative call's edit as a commit on the branch tip, pushed as a compare-and-swap.

Called by ``mirror.Source.commit_edit``, which holds the mirror's writers' lock, fetches the
tip, and on ``Rejected`` (someone else pushed first) fetches and re-applies the edit on the
new tip (a rebase of one commit), a bounded number of times; a push is never forced. A
repository on this machine is pushed to by moving its branch only if it still names our
commit's parent (``_push_local``), and never while that branch is checked out in a work tree.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Callable

import pygit2

from cynchrod.core.errors import Conflict, PermanentError, PushRejected, SourceError
from cynchrod.desired.config import local_repo_path
from cynchrod.desired.source.followed import AUTHOR_EMAIL, AUTHOR_NAME, KEEP_FILE, credential, unwritable_mirror

_PUSH_REF = "refs/cynchrod/push"


#: The remote moved on: fetch, re-apply, push again (caught by ``Source.commit_edit``).
Rejected = PushRejected


class _PushCallbacks(pygit2.RemoteCallbacks):
    def __init__(self, credential: pygit2.UserPass | pygit2.Keypair | None) -> None:
        super().__init__(credentials=credential)
        self.rejection: str | None = None

    def push_update_reference(self, refname: str, message: str | None) -> None:
        if message:
            self.rejection = message


def commit_on(repo: pygit2.Repository, tip: str, path: str, edit: Callable[[bytes | None], bytes | None],
              message: str, *, apps_prefix: str) -> str | None:
    """A commit of ``edit`` of the file at ``path`` on ``tip`` (not on any branch yet), or None when
    the edit changes nothing (no empty commits). ``edit`` may raise a ``CynchrodError``."""
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
        if new is None and path.startswith(apps_prefix + "/"):
            # Deleting the last app must not remove apps/ itself: a commit without it reads as
            # source_empty (never pruned, for safety), so the deletion would never be applied.
            try:
                repo[tree].peel(pygit2.Tree)[apps_prefix]
            except KeyError:
                keep = [*apps_prefix.split("/"), KEEP_FILE]
                tree = _replace_path(repo, repo[tree].peel(pygit2.Tree), keep, repo.create_blob(b"")) or tree
    except (pygit2.GitError, OSError, ValueError) as exc:
        full = unwritable_mirror(repo, exc)  # libgit2 could not write an object into the mirror
        if full is not None:
            raise full from exc
        raise PermanentError(f"Git cannot write {path!r} ({exc}); rename the file in the repository",
                             code="path_unwritable") from exc
    if tree == commit.tree.id:
        return None
    return _commit(repo, commit, tree, message)


def restore_on(repo: pygit2.Repository, tip: str, directory: str, old: str, message: str) -> str | None:
    """A commit on ``tip`` whose folder ``directory`` is as it was at commit ``old`` (every file of it,
    byte for byte, with its mode: a compose app's rollback), or None when it already is. Raises
    ``Conflict`` (``not_in_repo``) when ``old`` has no such folder."""
    commit = repo[tip].peel(pygit2.Commit)
    try:
        then = repo[old].peel(pygit2.Commit).tree[directory]
    except KeyError:
        then = None
    if then is None or then.filemode != pygit2.enums.FileMode.TREE:
        raise Conflict(f"{directory}/ is not a folder of commit {old[:12]}", code="not_in_repo")
    try:
        tree = _replace_path(repo, commit.tree, directory.split("/"), then.id, pygit2.enums.FileMode.TREE)
    except (pygit2.GitError, OSError, ValueError) as exc:
        full = unwritable_mirror(repo, exc)
        if full is not None:
            raise full from exc
        raise PermanentError(f"Git cannot write {directory!r} ({exc})", code="path_unwritable") from exc
    if tree is None or tree == commit.tree.id:
        return None
    return _commit(repo, commit, tree, message)


def _commit(repo: pygit2.Repository, parent: pygit2.Commit, tree: pygit2.Oid, message: str) -> str:
    """A commit of ``tree`` on ``parent`` by cynchrod (not on any branch yet: ``push_to`` moves one)."""
    author = pygit2.Signature(AUTHOR_NAME, AUTHOR_EMAIL)
    try:
        return str(repo.create_commit(None, author, author, message, tree, [parent.id]))
    except (pygit2.GitError, OSError) as exc:
        raise (unwritable_mirror(repo, exc) or exc) from exc


def push_to(repo: pygit2.Repository, commit: str, *, url: str, branch: str, safe_url: str) -> None:
    """Push ``commit`` to ``branch`` of ``url``, never forced. Raises ``Rejected`` when the remote
    moved on (the caller fetches, re-applies and pushes again), ``SourceError`` when it failed."""
    local = local_repo_path(url)
    if local is not None:
        _push_local(repo, local, commit, branch=branch, safe_url=safe_url)
        return
    repo.references.create(_PUSH_REF, pygit2.Oid(hex=commit), force=True)
    callbacks = _PushCallbacks(credential(url))
    try:
        repo.remotes["origin"].push([f"{_PUSH_REF}:refs/heads/{branch}"], callbacks=callbacks)
    except pygit2.GitError as exc:
        text = str(exc)
        if _moved_on(text):
            raise Rejected(text) from exc
        raise SourceError(f"push to {safe_url} failed: {text}", code="push_failed") from exc
    if callbacks.rejection:
        if _moved_on(callbacks.rejection):
            raise Rejected(callbacks.rejection)
        raise SourceError(f"push to {safe_url} rejected: {callbacks.rejection}", code="push_failed")


def _push_local(repo: pygit2.Repository, path: pathlib.Path, commit: str, *, branch: str, safe_url: str) -> None:
    """Push ``commit`` to a repository on this machine as a compare-and-swap of its branch.

    libgit2's local transport checks the fast-forward against the refs it read when it
    connected and then writes the branch with a forced update, so a ``git push`` landing
    in between was silently overwritten (``test_a_push_landing_during_ours_is_never_
    overwritten``). Here the objects are copied first and the branch is moved only if it
    still names our commit's parent, under the ref's lock file (the same lock ``git``
    takes), so a concurrent writer makes this a rejection, never a lost commit.
    """
    new = repo[commit].peel(pygit2.Commit)
    ref_name = f"refs/heads/{branch}"
    try:
        remote = pygit2.Repository(str(path))
    except (pygit2.GitError, ValueError, KeyError) as exc:
        raise SourceError(f"push to {safe_url} failed: {exc}", code="push_failed") from exc
    try:
        _refuse_checked_out(remote, ref_name, safe_url)
        found = remote.references.get(ref_name)
        ref = None if found is None else found.resolve()
        if ref is None or list(new.parent_ids) != [ref.target]:
            raise Rejected(f"{ref_name} moved on (stale info)")
        try:
            _copy_objects(repo, remote, new.id)
        except (pygit2.GitError, OSError) as exc:
            raise SourceError(f"push to {safe_url} failed: {exc}", code="push_failed") from exc
        try:
            # git_reference_set_target: written only if the ref still holds the target read
            # above, checked under its lock file.
            ref.set_target(new.id, f"push: {new.message.splitlines()[0] if new.message else ''}")
        except pygit2.GitError as exc:
            raise Rejected(f"{ref_name} moved on while pushing (stale info): {exc}") from exc
        except OSError as exc:
            # libgit2 reports the ref's lock file held by another writer (a ``git push`` moving
            # the branch right now) as an OS error: that writer won the race, as above.
            if "lock" in str(exc):
                raise Rejected(f"{ref_name} is being moved by another writer: {exc}") from exc
            raise SourceError(f"push to {safe_url} failed: {exc}", code="push_failed") from exc
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
                  blob: pygit2.Oid | None, mode: int = pygit2.enums.FileMode.BLOB) -> pygit2.Oid | None:
    """``tree`` with the entry at ``parts`` set to ``blob`` (a file, or with ``mode`` TREE a folder;
    None removes it); None when the tree ends up empty."""
    builder = repo.TreeBuilder(tree) if tree is not None else repo.TreeBuilder()
    name, rest = parts[0], parts[1:]
    if not name:
        raise ValueError("empty path component")
    if not rest:
        if blob is None:
            if builder.get(name) is not None:
                builder.remove(name)
        else:
            builder.insert(name, blob, mode)
    else:
        sub = None
        if tree is not None and name in tree:
            found = repo[tree[name].id]
            if not isinstance(found, pygit2.Tree):
                raise ValueError(f"{name} is a file, not a directory")
            sub = found
        child = _replace_path(repo, sub, rest, blob, mode)
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
