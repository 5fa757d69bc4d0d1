"""Repository files a compose app bind-mounts, copied under the state dir by their content.

Called by ``compose.rules`` while a compose app is parsed (so once per change of its files, never
in a pass with nothing new). ``<files_dir>/<digest>/`` holds one copy per distinct content: the
same files give the same path (no container is recreated), changed files a new one (the spec hash
changes and the service is recreated). Copies are written to a temporary folder and renamed into
place, so a container never sees half a copy. Old copies are not removed yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import posixpath
import shutil
import threading
from collections.abc import Mapping

#: The path shown for a copy when there is no state dir (``cynchrod validate``).
NO_STATE = "<state>/files"


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
