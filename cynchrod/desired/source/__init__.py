"""The manifests repositories, through pygit2 (this package is the only one that imports it).

A followed repository (``Followed``) is one of two kinds, chosen by ``open_source``:

* ``mirror.Source``: a Git remote (or a bare repository on this machine) mirrored under
  ``state/repos``; clone, fetch, heal, and read trees and blobs;
* ``worktree.WorkTreeSource``: a local checkout, read from disk as saved.

``push`` is the mirror's commit-back (an imperative call as a commit on the tip, pushed as a
compare-and-swap and replayed on a rejection); ``followed`` holds what both kinds share.
Callers import the package (``from cynchrod.desired import source``) and use the names below.
"""

from __future__ import annotations

import pathlib

from cynchrod.desired.source.followed import APPS_DIR, KEEP_FILE, Followed
from cynchrod.desired.source.mirror import Source
from cynchrod.desired.source.worktree import WorkTreeSource

__all__ = ["APPS_DIR", "KEEP_FILE", "Followed", "Source", "WorkTreeSource", "open_source"]


def open_source(url: str, *, branch: str = "main", path: str = "", state_dir: pathlib.Path,
                org: str | None = None) -> Followed:
    """A working directory is read from disk (and watched); anything else is mirrored from Git."""
    local = pathlib.Path(url).expanduser()
    if "://" not in url and local.is_dir() and (local / ".git").exists():
        return WorkTreeSource(url, path=path, org=org)
    return Source(url, branch=branch, path=path, state_dir=state_dir, org=org)
