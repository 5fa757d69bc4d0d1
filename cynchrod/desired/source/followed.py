"""What every followed repository is (``Followed``) and what its two kinds share.

``Followed`` is what the reconciler and the imperative calls (``cynchrod.shell``) need
of a repository; ``mirror.Source`` and ``worktree.WorkTreeSource`` are its two kinds.
The credentials for the remote come from the environment (``credential``, used by the
mirror's fetches and by ``push``).
"""

from __future__ import annotations

import abc
import contextlib
import os
import pathlib
from collections.abc import Callable, Iterable
from urllib.parse import urlparse

import pygit2

from cynchrod.core.errors import Conflict, ManifestError, StateUnwritable, unwritable

APPS_DIR = "apps"
#: Committed into an emptied apps/ so that deleting the last app is applied.
KEEP_FILE = ".keep"
AUTHOR_NAME = "cynchrod"
AUTHOR_EMAIL = "cynchrod@localhost"


def credential(url: str) -> pygit2.UserPass | pygit2.Keypair | None:
    """Credentials from the environment; never logged, never stored in the mirror."""
    token = os.environ.get("CYNCHROD_GIT_TOKEN")
    key = os.environ.get("CYNCHROD_GIT_SSH_KEY")
    scheme = urlparse(url).scheme
    if scheme == "https" and token:
        return pygit2.UserPass("x-access-token", token)
    if (scheme == "ssh" or "@" in url.split(":", 1)[0]) and key:
        return pygit2.Keypair("git", key + ".pub", key, "")
    return None


def unwritable_mirror(repo: pygit2.Repository, exc: BaseException) -> StateUnwritable | None:
    """A ``StateUnwritable`` when libgit2 failed to write into ``repo`` (a mirror under the state dir)
    because its disk is full or read-only, else None.

    libgit2's message is not to be trusted after a failed write (a full disk showed ``reference
    'refs/heads/main' not found``, left over from an earlier lookup), so when it says nothing of the
    disk, a small write beside the objects decides."""
    where = f"the mirror {repo.path}"
    if unwritable(exc):
        return StateUnwritable.of(exc, where)
    probe = pathlib.Path(repo.path) / "objects" / f".probe-{os.getpid()}"
    try:
        with open(probe, "wb") as out:
            out.write(b"1")
            out.flush()
            os.fsync(out.fileno())
    except OSError as failed:
        return StateUnwritable.of(failed, where) if unwritable(failed) else None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
    return None


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

    def dir_at(self, commit: str, directory: str) -> dict[str, bytes] | None:
        """The files of a compose app's folder at a past commit (None: unknown here, as for a work tree)."""
        return None

    def restore_directory(self, directory: str, commit: str, message: str) -> str | None:
        """Commit a folder as it was at ``commit`` (a compose app's rollback); a work tree has no
        commits to go back to."""
        raise Conflict(f"{directory}/ cannot be rolled back here: the repository is a work tree read from disk",
                       code="not_in_repo")
