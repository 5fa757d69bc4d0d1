"""What one commit declares: every app of a tree of files, parsed once per blob.

``Cache.load`` takes a source's listing (path, blob id) and gives a ``Desired``: the good apps and
each failed file's located errors. A native manifest (``manifests.parse``) is cached by its blob
id; a compose app (``compose.parse``: a directory holding ``compose.yaml``) by the ids of all its
directory's files, so a pass over a commit whose files did not change parses nothing, and a
commit touching one file re-parses that app alone. Called by the reconciler's desired stage
(``shell/desired_state.py``) and by ``cynchrod validate``.

It sits above both parsers (they share ``manifests``' helpers, so this is where the two meet).
"""

from __future__ import annotations

import dataclasses
import pathlib
import posixpath
from collections.abc import Callable, Iterable, Mapping

from cynchrod.core import specs
from cynchrod.core.errors import ManifestError
from cynchrod.desired import compose
from cynchrod.desired.manifests import MANIFEST_SUFFIXES, Result, parse


@dataclasses.dataclass(frozen=True)
class Desired:
    """The desired state one commit declares: good apps plus per-file errors."""

    apps: dict[tuple[str, str], specs.AppSpec]
    errors: tuple[ManifestError, ...]
    #: Paths of files that failed, so their last good spec can be kept.
    failed_paths: frozenset[str]
    #: Each failed file's org as far as it can be read (``Result.org``; None: unknown).
    failed_orgs: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
    #: A compose app's errors found in its other files (an override, an included file, its ``.env``):
    #: that file's path -> the app's path (its compose file), so the app keeps its last good spec.
    owners: Mapping[str, str] = dataclasses.field(default_factory=dict)


def _compose_groups(files: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Compose app directories (those holding a ``compose.yaml`` or one of its other names) and the
    files listed under each: one app per directory, parsed and cached as one."""
    dirs = sorted({posixpath.dirname(p) for p, _ in files if compose.is_compose_file(p)})
    groups: dict[str, list[tuple[str, str]]] = {d: [] for d in dirs}
    for path, oid in files:
        parent, up = posixpath.dirname(path), ""
        while parent not in groups and parent != up:  # up to "" (relative) or "/" (absolute: cynchrod validate)
            parent, up = posixpath.dirname(parent), parent
        if parent in groups:
            groups[parent].append((path, oid))
    return groups


class Cache:
    """Parse results keyed by blob id (a compose app: by the ids of its directory's files); only
    those seen in the last load are kept."""

    def __init__(self, *, org: str | None = None, files_dir: pathlib.Path | None = None) -> None:
        self._results: dict[str, Result] = {}
        self._unreadable = ""
        #: Where compose apps' bind-mounted repository files are copied (None: not copied, ``validate``).
        self.files_dir = files_dir
        self.parses = 0
        self.org = org

    def load(self, files: Iterable[tuple[str, str]], read: Callable[[str], bytes], *,
             incumbents: Mapping[tuple[str, str], str] | None = None) -> Desired:
        """``files`` is (path, blob id) pairs; ``read(blob id)`` is called on a miss only.

        Two files declaring one org/name: the file the app was deployed from
        (``incumbents``: key -> path) keeps it, else the first by path; the other is
        ``duplicate_app``. A newcomer never takes over a running app.
        """
        kept: dict[str, Result] = {}
        apps: dict[tuple[str, str], specs.AppSpec] = {}
        errors: list[ManifestError] = []
        failed: set[str] = set()
        orgs: dict[str, str | None] = {}
        claims: dict[tuple[str, str], list[specs.AppSpec]] = {}
        listed = sorted(files)
        groups = _compose_groups(listed)
        in_group = {path for members in groups.values() for path, _ in members}
        singles = [(p, o) for p, o in listed if p not in in_group and p.endswith(MANIFEST_SUFFIXES)]
        loaded: list[Result] = []
        for directory, members in sorted(groups.items()):
            key = "compose:" + directory + "\0" + "\0".join(f"{o}:{p}" for p, o in members)
            result = self._results.get(key)
            if result is None:
                result = self._compose(directory, members, read)
                if result is None:
                    errors.append(ManifestError(f"cannot be read from the repository: {self._unreadable}",
                                                code="unreadable", path=directory, line=1))
                    failed.add(directory)
                    orgs[directory] = self.org
                    continue
                self.parses += 1
            kept[key] = result
            loaded.append(result)
        for path, oid in singles:
            key = f"{oid}:{path}"
            result = self._results.get(key)
            if result is None:
                try:
                    raw = read(oid)
                except Exception as exc:
                    # Not cached: a blob that cannot be read now may be readable next pass.
                    err = ManifestError(f"cannot be read from the repository: {exc}", code="unreadable",
                                        path=path, line=1)
                    errors.append(err)
                    failed.add(path)
                    orgs[path] = self.org
                    continue
                result = parse(path, raw, org=self.org)
                self.parses += 1
            kept[key] = result
            loaded.append(result)
        owners: dict[str, str] = {}
        for result in loaded:
            path = result.path
            if result.spec is None:
                owners.update({e.path: path for e in result.errors if e.path != path})
                errors.extend(result.errors)
                failed.add(path)
                orgs[path] = result.org
                continue
            claims.setdefault(result.spec.key, []).append(result.spec)
        for app_key, found in claims.items():
            home = (incumbents or {}).get(app_key)
            winner = next((s for s in found if s.path == home), found[0])
            apps[app_key] = winner
            for other in found:
                if other is not winner:
                    errors.append(ManifestError(
                        f"app {other.org}/{other.name} is already declared in {winner.path}",
                        code="duplicate_app", path=other.path, line=1))
                    failed.add(other.path)
                    orgs[other.path] = other.org
        self._results = kept
        return Desired(apps=apps, errors=tuple(errors), failed_paths=frozenset(failed), failed_orgs=orgs,
                       owners=owners)

    def spec_texts(self) -> list[str]:
        """The specs of the last load, as JSON (what ``compose.files.prune`` keeps the copies of)."""
        return [r.spec.json_text for r in self._results.values() if r.spec is not None]

    def _compose(self, directory: str, members: list[tuple[str, str]], read: Callable[[str], bytes]
                 ) -> Result | None:
        """Parse one compose directory; None (not cached: may be readable next pass) when a blob cannot be read."""

        contents: dict[str, bytes] = {}
        for path, oid in members:
            try:
                contents[path] = read(oid)
            except Exception as exc:
                self._unreadable = f"{path}: {exc}"
                return None
        return compose.parse(directory, contents, org=self.org, files_dir=self.files_dir)
