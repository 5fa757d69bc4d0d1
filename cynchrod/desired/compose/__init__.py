"""Compose files as apps: a directory ``apps/<name>/`` holding ``compose.yaml`` is one app.

The second front end of the desired state (the first is ``desired.manifests``): the files of one
app directory in, the same frozen ``AppSpec`` a native manifest gives (or located errors) out, so
decisions, runtimes and the API never learn which format an app came from. Called by
``declared.Cache``, which groups the files of a compose directory and caches the result by their
blob ids, so a pass over an unchanged directory parses nothing.

The steps, in Compose's order: the directory's ``.env`` gives the variables (never the daemon's
environment); each file (``compose.yaml`` and ``compose.override.yaml``, or the ``x-cynchrod.files``
list) is read, interpolated and validated with the Compose Specification's own JSON Schema
(``schemas/compose-spec.json``, vendored); ``include:`` files are added; the files are merged;
``profiles`` are applied (``x-cynchrod.profiles``); then cynchrod's rules (``rules``) map the subset
it runs onto ``ServiceSpec`` and refuse the rest with a code naming the key. Errors are
``file:line: code: message`` with the repository-relative path of the file the key came from.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import posixpath
from collections.abc import Iterable, Mapping
from typing import Any

from cynchrod.core import errors, specs
from cynchrod.core.codes import Code
from cynchrod.core.errors import ManifestError
from cynchrod.desired import manifests, validation, yamlio
from cynchrod.desired.compose import interpolation, rules

log = logging.getLogger("cynchrod.compose")

#: The names Compose looks for, in its order of preference.
COMPOSE_NAMES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")
OVERRIDE_NAMES = ("compose.override.yaml", "compose.override.yml", "docker-compose.override.yaml",
                  "docker-compose.override.yml")
#: ``include:`` nested deeper than this is refused (Compose has no limit; a cycle would have none).
MAX_INCLUDE_DEPTH = 4

_SCHEMA = validation.Schema("compose-spec.json")


def is_compose_file(path: str) -> bool:
    return posixpath.basename(path) in COMPOSE_NAMES


def is_side_file(path: str) -> bool:
    """Files a compose app reads besides YAML: ``.env`` and ``*.env`` (``env_file:``)."""
    name = posixpath.basename(path)
    return name == ".env" or name.endswith(".env") or name.startswith(".env.")


def main_file(directory: str, paths: Iterable[str]) -> str | None:
    present = set(paths)
    return next((f"{directory}/{n}" for n in COMPOSE_NAMES if f"{directory}/{n}" in present), None)


@dataclasses.dataclass
class _File:
    path: str
    doc: Any
    data: dict[str, Any]


_Failed = errors.ManifestErrors


def parse(directory: str, files: Mapping[str, bytes], *, org: str | None = None,
          files_dir: pathlib.Path | None = None) -> manifests.Result:
    """Parse one compose app directory (``files``: repo path -> content of every file listed under it;
    ``files_dir``: where the repository files it bind-mounts are copied, see ``compose.files``).
    Never raises for bad input: whatever goes wrong is this app's error."""
    main = main_file(directory, files) or f"{directory}/{COMPOSE_NAMES[0]}"
    try:
        result = _Loader(directory, files, main, org=org, files_dir=files_dir).run()
    except _Failed as failed:
        result = manifests.Result(main, None, tuple(failed.errors))
    except Exception as exc:
        log.exception("compose app %s could not be parsed", directory)
        result = manifests.Result(main, None, (ManifestError(
            f"cannot be read ({type(exc).__name__})", code=Code.INVALID_MANIFEST, path=main, line=1),))
    if result.spec is None and result.org is None:
        result = dataclasses.replace(result, org=org or manifests.declared_org(b""))
    return result


class _Loader:
    def __init__(self, directory: str, files: Mapping[str, bytes], main: str, *, org: str | None,
                 files_dir: pathlib.Path | None = None) -> None:
        self.files_dir = files_dir
        self.directory = directory
        self.files = files
        self.main = main
        self.org = org
        self.loaded: list[_File] = []
        self.env: dict[str, str] = {}

    def fail(self, message: str, code: str, path: str, line: int = 1) -> _Failed:
        return _Failed([ManifestError(message, code=code, path=path, line=line)])

    def resolve(self, name: str, *, at: str, line: int, what: str) -> str:
        """A path named in a file, relative to the app directory, as a repository path."""
        joined = posixpath.normpath(posixpath.join(self.directory, name))
        if name.startswith(("/", "~")) or not joined.startswith(self.directory + "/"):
            raise self.fail(f"{what}: {name!r} must be a file of the app's directory {self.directory}/",
                            Code.POLICY_VIOLATION, at, line)
        if joined not in self.files:
            raise self.fail(f"{what}: {name!r} is not a file of {self.directory}/", Code.FILE_NOT_FOUND, at, line)
        return joined

    def run(self) -> manifests.Result:
        envpath = f"{self.directory}/.env"
        if envpath in self.files:
            try:
                self.env = interpolation.parse_env_file(self._text(envpath))
            except interpolation.InterpolationError as exc:
                raise self.fail(exc.message, Code.INTERPOLATION_FAILED, envpath, exc.line or 1) from exc
        first = self.load(self.main)
        ext = first.data.get("x-cynchrod")
        ext = ext if isinstance(ext, dict) else {}
        listed = ext.get("files")
        if listed is not None:
            if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed) or not listed:
                raise self.fail("x-cynchrod.files: a list of file names in the app's directory", Code.INVALID_TYPE,
                                self.main, yamlio.line_of(first.doc, ["x-cynchrod", "files"]))
            paths = [self.resolve(x, at=self.main, line=yamlio.line_of(first.doc, ["x-cynchrod", "files", i]),
                                  what=f"x-cynchrod.files[{i}]") for i, x in enumerate(listed)]
        else:
            paths = [self.main, *[f"{self.directory}/{n}" for n in OVERRIDE_NAMES
                                  if f"{self.directory}/{n}" in self.files][:1]]
        own = [first if p == self.main else self.load(p) for p in paths]
        self.validate(own)
        included = self.includes(own, depth=0)
        self.loaded = [*included, *own]
        merged: dict[str, Any] = {}
        for loaded in included:
            for name in loaded.data.get("services") or {}:
                if any(name in (o.data.get("services") or {}) for o in own):
                    raise self.fail(f"services.{name}: also defined by the included file {loaded.path}",
                                    Code.INVALID_VALUE, *self.locate(["services", name]))
        for loaded in self.loaded:
            merged = rules.merge(merged, {k: v for k, v in loaded.data.items() if k != "include"})
        merged["x-cynchrod"] = ext
        return rules.to_result(self, merged)

    def _text(self, path: str) -> str:
        raw = self.files[path]
        if len(raw) > manifests.MAX_MANIFEST_BYTES:
            raise self.fail(f"{len(raw)} bytes, over the {manifests.MAX_MANIFEST_BYTES} byte limit",
                            Code.MANIFEST_TOO_LARGE, path)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"not UTF-8 ({exc.reason})", Code.INVALID_MANIFEST, path) from exc

    def load(self, path: str, env: Mapping[str, str] | None = None) -> _File:
        try:
            doc = yamlio.load_roundtrip(self.files[path], aliases=True)  # plain() bounds what they expand to
            data = yamlio.plain(doc)
        except yamlio.YamlError as exc:
            message = exc.message
            code = Code.MANIFEST_TOO_LARGE if exc.code == Code.TOO_LARGE else exc.code
            raise self.fail(message, code, path, exc.line) from exc
        if doc is None or not yamlio.is_mapping(doc) or not isinstance(data, dict):
            raise self.fail("a compose file must be a mapping of keys to values", Code.INVALID_TYPE, path)
        errors: list[ManifestError] = []
        data = self._interpolated(path, doc, data, [], errors, self.env if env is None else env)
        if errors:
            raise _Failed(errors)
        return _File(path, doc, data)

    def _interpolated(self, path: str, doc: Any, value: Any, where: list[Any], errors: list[ManifestError],
                      env: Mapping[str, str]) -> Any:
        if isinstance(value, str):
            try:
                return interpolation.interpolate(value, env)
            except interpolation.InterpolationError as exc:
                field = ".".join(map(str, where)) or "file"
                errors.append(ManifestError(f"{field}: {exc.message}", code=Code.INTERPOLATION_FAILED, path=path,
                                            line=yamlio.line_of(doc, where)))
                return value
        if isinstance(value, dict):
            return {k: self._interpolated(path, doc, v, [*where, k], errors, env) for k, v in value.items()}
        if isinstance(value, list):
            return [self._interpolated(path, doc, v, [*where, i], errors, env) for i, v in enumerate(value)]
        return value

    def validate(self, files: list[_File]) -> None:
        errors: list[ManifestError] = []
        for loaded in files:
            for problem in _SCHEMA.problems(loaded.data):
                errors.extend(self._problem(loaded, problem))
        if errors:
            raise _Failed(sorted(errors, key=lambda e: (e.path, e.line)))

    def _problem(self, loaded: _File, problem: validation.Problem) -> list[ManifestError]:
        where = list(problem.path)
        line = yamlio.line_of(loaded.doc, where)
        field = ".".join(map(str, where)) or "file"
        if problem.rule == "additionalProperties":
            parent: Any = loaded.data
            for part in where:
                parent = parent[part]
            allowed = problem.allowed or frozenset()
            return [ManifestError(f"{'.'.join(map(str, [*where, key]))} is not a Compose key"
                                  + manifests._did_you_mean(key, allowed), code=Code.UNKNOWN_KEY, path=loaded.path,
                                  line=yamlio.line_of(loaded.doc, [*where, key]))
                    for key in parent if key not in allowed and not str(key).startswith("x-")]
        return [ManifestError(f"{field}: {problem.message}", code=problem.code, path=loaded.path, line=line)]

    def includes(self, files: list[_File], *, depth: int) -> list[_File]:
        found: list[_File] = []
        for loaded in files:
            entries = loaded.data.get("include") or []
            for i, entry in enumerate(entries):
                line = yamlio.line_of(loaded.doc, ["include", i])
                if depth >= MAX_INCLUDE_DEPTH:
                    raise self.fail(f"include: nested more than {MAX_INCLUDE_DEPTH} deep (a cycle?)",
                                    Code.INVALID_VALUE, loaded.path, line)
                if isinstance(entry, dict):
                    extra = sorted(set(entry) - {"path", "env_file"})
                    if extra:
                        raise self.fail(f"include[{i}].{extra[0]}: not supported (path and env_file are)",
                                        Code.UNSUPPORTED_KEY, loaded.path, line)
                    names = entry["path"] if isinstance(entry["path"], list) else [entry["path"]]
                    env_files = entry.get("env_file") or []
                    env_files = env_files if isinstance(env_files, list) else [env_files]
                else:
                    names, env_files = [entry], []
                env = dict(self.env)
                for name in env_files:
                    where = self.resolve(str(name), at=loaded.path, line=line, what=f"include[{i}].env_file")
                    try:
                        env.update(interpolation.parse_env_file(self._text(where)))
                    except interpolation.InterpolationError as exc:
                        raise self.fail(exc.message, Code.INTERPOLATION_FAILED, where, exc.line or 1) from exc
                group = [self.load(self.resolve(str(n), at=loaded.path, line=line, what=f"include[{i}]"), env)
                         for n in names]
                self.validate(group)
                found.extend([*self.includes(group, depth=depth + 1), *group])
        return found

    def locate(self, where: list[Any]) -> tuple[str, int]:
        """The file and line a key of the merged model came from: the last file that sets it (else
        the nearest parent key that one sets)."""
        for depth in range(len(where), -1, -1):
            for loaded in reversed(self.loaded):
                if _has(loaded.data, where[:depth]):
                    return loaded.path, yamlio.line_of(loaded.doc, where[:depth])
        return self.main, 1

    def raw_value(self, where: list[Any]) -> tuple[str, Any]:
        """The file that sets a key of the merged model and its value there as written (before
        interpolation): what an edit of that file would find."""
        path, _ = self.locate(where)
        loaded = next(f for f in reversed(self.loaded) if f.path == path)
        node: Any = loaded.doc
        for part in where:
            if not _has(node, [part]):
                return path, None
            node = node[part]
        return path, node

    def env_file(self, name: str, *, required: bool, at: list[Any]) -> dict[str, str]:
        path, line = self.locate(at)
        joined = posixpath.normpath(posixpath.join(self.directory, name))
        if not required and joined not in self.files:
            return {}
        resolved = self.resolve(name, at=path, line=line, what=".".join(map(str, at)))
        try:
            return interpolation.parse_env_file(self._text(resolved), base=self.env)
        except interpolation.InterpolationError as exc:
            raise self.fail(exc.message, Code.INTERPOLATION_FAILED, resolved, exc.line or 1) from exc

    def app_name(self, merged: Mapping[str, Any]) -> str:
        return str(merged.get("name") or posixpath.basename(self.directory))

    def default_org(self) -> str:
        return self.org or specs.DEFAULT_ORG


def _has(data: Any, where: list[Any]) -> bool:
    node = data
    for part in where:
        if (isinstance(node, dict) and part in node) or (
                isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
        else:
            return False
    return True
