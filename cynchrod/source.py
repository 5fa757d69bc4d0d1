"""The manifests repository, through pygit2 (the only module that imports it).

``Source.fetch()`` clones or fetches the remote into a bare mirror under the
state directory and resolves the branch to a commit; ``Source.files(commit)``
lists the manifests under ``<path>/apps/`` as (path, blob id) pairs and
``Source.read(blob id)`` returns a blob's bytes, so the manifest cache can skip
every blob it has already parsed.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from urllib.parse import urlparse

import pygit2

from cynchrod.errors import ManifestError, SourceError
from cynchrod.manifests import is_manifest_path

APPS_DIR = "apps"
_SYMLINK = pygit2.enums.FileMode.LINK


def _callbacks(url: str) -> pygit2.RemoteCallbacks | None:
    """Credentials from the environment; never logged, never stored in the mirror."""
    token = os.environ.get("CYNCHROD_GIT_TOKEN")
    key = os.environ.get("CYNCHROD_GIT_SSH_KEY")
    scheme = urlparse(url).scheme
    if scheme == "https" and token:
        return pygit2.RemoteCallbacks(credentials=pygit2.UserPass("x-access-token", token))
    if (scheme == "ssh" or "@" in url.split(":", 1)[0]) and key:
        return pygit2.RemoteCallbacks(credentials=pygit2.Keypair("git", key + ".pub", key, ""))
    return None


def _normalise(url: str) -> str:
    """Local paths become absolute so a daemon started elsewhere finds them."""
    if "://" in url or (":" in url and "@" in url.split(":", 1)[0]):
        return url
    return str(pathlib.Path(url).expanduser().resolve())


class Source:
    """One branch of one repository, mirrored under ``state/repos``."""

    def __init__(self, url: str, *, branch: str = "main", path: str = "", state_dir: pathlib.Path) -> None:
        self.url = _normalise(url)
        self.branch = branch
        self.path = path.strip("/")
        digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self.mirror = state_dir / "repos" / f"{digest}.git"
        self._repo: pygit2.Repository | None = None

    @property
    def apps_prefix(self) -> str:
        return f"{self.path}/{APPS_DIR}" if self.path else APPS_DIR

    def _open(self) -> pygit2.Repository:
        if self._repo is None:
            if (self.mirror / "HEAD").exists():
                self._repo = pygit2.Repository(str(self.mirror))
            else:
                self.mirror.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self._repo = pygit2.clone_repository(
                        self.url, str(self.mirror), bare=True, callbacks=_callbacks(self.url))
                except (pygit2.GitError, ValueError, KeyError) as exc:
                    raise SourceError(f"cannot clone {self._safe_url}: {exc}") from exc
                return self._repo
        return self._repo

    @property
    def _safe_url(self) -> str:
        parsed = urlparse(self.url)
        if parsed.password:
            return self.url.replace(parsed.password, "***")
        return self.url

    def fetch(self) -> str:
        """Fetch and return the branch's commit id. Raises ``SourceError``."""
        repo = self._open()
        try:
            repo.remotes["origin"].fetch(prune=pygit2.enums.FetchPrune.PRUNE, callbacks=_callbacks(self.url))
        except (pygit2.GitError, KeyError) as exc:
            raise SourceError(f"cannot fetch {self._safe_url}: {exc}") from exc
        return self.resolve()

    def resolve(self) -> str:
        """The branch's commit in the mirror as last fetched, without fetching."""
        repo = self._open()
        ref = repo.references.get(f"refs/remotes/origin/{self.branch}")
        if ref is None:
            raise SourceError(f"branch {self.branch!r} not found in {self._safe_url}", code="branch_not_found")
        return str(ref.target)

    def files(self, commit: str) -> tuple[list[tuple[str, str]], list[ManifestError]]:
        """Manifests under the apps directory at ``commit``, and entries refused.

        Raises ``SourceError`` (code ``source_empty``) when the commit has no
        apps directory at all, so that a wiped repository never prunes apps.
        """
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

    def read(self, oid: str) -> bytes:
        blob = self._open()[oid]
        return bytes(blob.read_raw())
