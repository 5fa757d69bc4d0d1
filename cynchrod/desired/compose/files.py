"""Repository files a compose app bind-mounts (or builds from), copied under the state dir.

Called by ``compose.rules`` while a compose app is parsed (so once per change of its files, never
in a pass with nothing new). Two kinds of copies:

- ``<files_dir>/<digest>/``: one read-only copy per distinct content (bind mounts, configs, build
  contexts): the same files give the same path (no container is recreated), changed files a new one
  (the spec hash changes and the service is recreated). Written to a temporary folder and renamed
  into place, so a container never sees half a copy. ``prune`` removes those no app refers to any
  more (the reconciler calls it after a pass that read a new commit, a bounded number at a time).
- ``<files_dir>/rw/<org>/<app>/<path>``: a mount marked ``rw`` (or ``read_only: false``) is the app's
  own writable copy, seeded from the repository the first time (when the path does not exist yet)
  and kept as the containers left it across redeploys, restarts and new commits: the app's data
  from then on, like a named volume (never pruned, kept when the app is deleted).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import posixpath
import re
import shutil
import threading
from collections.abc import Iterable, Mapping

#: The path shown for a copy when there is no state dir (``cynchrod validate``).
NO_STATE = "<state>/files"
#: Where the writable copies are, under the files dir (never pruned).
WRITABLE = "rw"
#: At most this many unused copies are removed by one ``prune`` (the rest by the next ones).
PRUNE_BATCH = 64
_COPY_NAME = re.compile(r"^[0-9a-f]{32}$")

log = logging.getLogger("cynchrod.compose")


def materialise(root: pathlib.Path | None, inside: str, members: Mapping[str, bytes]) -> str:
    """The host path of a copy of ``members`` (repo path -> content): the file itself when the
    mount names one file (``inside``), else the folder that holds the files below ``inside``."""
    single = list(members) == [inside]
    digest = hashlib.sha256(b"file\0" if single else b"dir\0")
    for path in sorted(members):
        rel = posixpath.basename(path) if single else path[len(inside) + 1:]
        digest.update(rel.encode() + b"\0" + hashlib.sha256(members[path]).digest())
    name = digest.hexdigest()[:32]
    leaf = posixpath.basename(inside) if single else ""
    if root is None:
        return posixpath.join(NO_STATE, name, leaf) if leaf else posixpath.join(NO_STATE, name)
    base = root / name
    if not base.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{name}.{os.getpid()}.{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o755)
        for path, data in members.items():
            target = tmp / (leaf if single else path[len(inside) + 1:])
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(0o644)
        try:
            os.rename(tmp, base)
        except OSError:  # another writer put the same content in place first
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp)
    return str(base / leaf) if leaf else str(base)


def writable(root: pathlib.Path | None, *, org: str, app: str, directory: str, inside: str,
             members: Mapping[str, bytes]) -> str:
    """The host path of the app's writable copy of ``inside`` (a file or folder of the app's
    ``directory``), seeded from ``members`` when it does not exist yet and left as it is after that."""
    rel = posixpath.relpath(inside, directory)
    single = list(members) == [inside]
    if root is None:
        return posixpath.join(NO_STATE, WRITABLE, org, app, rel)
    target = root / WRITABLE / org / app / rel
    if os.path.lexists(target):
        return str(target)
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if single:
        tmp.write_bytes(members[inside])
        tmp.chmod(0o644)
    else:
        tmp.mkdir(mode=0o755)
        for path, data in members.items():
            file = tmp / path[len(inside) + 1:]
            file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            file.write_bytes(data)
            file.chmod(0o644)
    try:
        os.rename(tmp, target)
    except OSError:  # another writer seeded it first
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return str(target)


def prune(root: pathlib.Path, referenced: Iterable[str], *, limit: int = PRUNE_BATCH) -> list[str]:
    """Remove the read-only copies under ``root`` that no text of ``referenced`` names (the specs,
    as JSON, of every app's current, last healthy and desired version), at most ``limit`` of them;
    the names removed. Writable copies (``rw/``) are never removed."""
    try:
        names = [e.name for e in os.scandir(root) if _COPY_NAME.match(e.name)]
    except FileNotFoundError:
        return []
    if not names:
        return []
    used = set(re.findall(re.escape(str(root)) + r"/([0-9a-f]{32})", "\n".join(referenced)))
    removed = []
    for name in sorted(set(names) - used)[:limit]:
        try:
            shutil.rmtree(root / name)
        except OSError as exc:
            log.warning("the unused copy %s could not be removed: %s", root / name, exc)
            continue
        removed.append(name)
    return removed
