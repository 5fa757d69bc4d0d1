"""Image updates, the pure part: a manifest's ``update:`` block as a policy, image references
split into registry/repository/tag/digest, and the choice of the next tag from a registry's tag list.

Called by the manifests (``parse_policy``), the update checker in ``shell/updates.py`` (``choose``)
and the registry client (``parse_reference``). No I/O here: tags and digests come in as values.

Decisions written down here:
- ``semver`` ranges are npm's (``^1.4``, ``~1.4.2``, ``>=1.4 <2``), through node-semver; a leading ``v``
  in a tag is allowed (loose parsing); tags that are not versions are never candidates; pre-releases
  are candidates only when the range names one (npm's rule).
- ``regex`` + ``sort`` picks the greatest matching tag; ``sort`` is ``semver`` (default), ``numeric``
  (by the first capture group, or the whole tag, as an integer) or ``alpha``.
- ``digest: true`` follows the digest of the tag written in the manifest: the bump writes
  ``name:tag@sha256:...``. A digest in an image *without* ``digest: true`` is a person's pin and is
  never bumped.
- Only a newer tag than the one declared is a candidate: an update never goes backwards.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

import nodesemver

from cynchrod.core import errors

DEFAULT_INTERVAL = 300.0
MIN_INTERVAL = 5.0
MAX_INTERVAL = 24 * 3600.0
SORTS = ("semver", "numeric", "alpha")
DOCKER_HUB = "registry-1.docker.io"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")


#: An unusable ``update:`` block (its ``key`` names the key at fault).
PolicyError = errors.UpdatePolicyError


@dataclasses.dataclass(frozen=True)
class UpdatePolicy:
    """One service's ``update:`` block, normalised."""

    semver: str | None = None
    digest: bool = False
    regex: str | None = None
    sort: str = "semver"
    interval: float = DEFAULT_INTERVAL
    commit: bool = True

    @property
    def strategy(self) -> str:
        return "digest" if self.digest else "regex" if self.regex is not None else "semver"


def parse_duration(value: Any) -> float:
    """``5m``, ``30s``, ``1h``, ``1.5h``, ``500ms`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration (like 30s, 5m, 1h)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_policy(raw: Mapping[str, Any]) -> UpdatePolicy:
    """An ``update:`` mapping (already schema-checked for types) -> ``UpdatePolicy``, or ``PolicyError``."""
    semver = raw.get("semver")
    digest = bool(raw.get("digest", False))
    regex = raw.get("regex")
    given = [k for k, on in (("semver", semver is not None), ("digest", digest), ("regex", regex is not None)) if on]
    if len(given) != 1:
        key = given[1] if len(given) > 1 else "semver"
        raise PolicyError("give exactly one of semver, digest: true and regex", key=key)
    if semver is not None and nodesemver.valid_range(str(semver), loose=True) is None:
        raise PolicyError(f"{semver!r} is not a semver range (like ^1.4, ~1.4.2, >=1.4 <2)", key="semver")
    if regex is not None:
        try:
            compiled = re.compile(str(regex))
        except re.error as exc:
            raise PolicyError(f"{regex!r} is not a regular expression: {exc}", key="regex") from exc
        del compiled
    sort = str(raw.get("sort", "semver"))
    if "sort" in raw and regex is None:
        raise PolicyError("sort goes with regex", key="sort")
    if sort not in SORTS:
        raise PolicyError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}", key="sort")
    try:
        interval = parse_duration(raw.get("interval", DEFAULT_INTERVAL))
    except ValueError as exc:
        raise PolicyError(str(exc), key="interval") from exc
    if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
        raise PolicyError(f"interval must be between 5s and 24h, got {raw.get('interval')!r}", key="interval")
    return UpdatePolicy(semver=None if semver is None else str(semver), digest=digest,
                        regex=None if regex is None else str(regex), sort=sort, interval=interval,
                        commit=bool(raw.get("commit", True)))


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """``[registry[:port]/]repository[:tag][@digest]`` split up; Docker Hub names normalised."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None
    #: The name as written (without tag or digest), to rebuild the reference the way the user wrote it.
    name: str

    def with_tag(self, tag: str, *, digest: str | None = None) -> str:
        return f"{self.name}:{tag}" + (f"@{digest}" if digest else "")

    @property
    def key(self) -> tuple[str, str]:
        """What a registry check is batched by: one tag list per (registry, repository)."""
        return (self.registry, self.repository)


def parse_reference(image: str) -> ImageRef:
    """Split a Docker image reference. ``ValueError`` on one that is not a reference."""
    rest, _, digest = image.partition("@")
    if digest and not _DIGEST.match(digest):
        raise ValueError(f"{image!r}: {digest!r} is not a digest")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag = None
    name = rest
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1:]
    if not name or (tag is not None and not tag):
        raise ValueError(f"{image!r} is not an image reference")
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first, remainder
    else:
        registry, repository = DOCKER_HUB, name if sep else f"library/{name}"
    return ImageRef(registry=registry, repository=repository, tag=tag, digest=digest or None, name=name)


def _semver(tag: str) -> Any:
    try:
        return nodesemver.make_semver(tag, loose=True)
    except ValueError:
        return None


def _version_key(tag: str) -> tuple[Any, ...] | None:
    """A sortable key in semver precedence (a release above its pre-releases)."""
    version = _semver(tag)
    if version is None:
        return None
    pre = tuple((0, int(p), "") if str(p).isdigit() else (1, 0, str(p)) for p in version.prerelease)
    return (version.major, version.minor, version.patch, 0 if pre else 1, pre)


@dataclasses.dataclass(frozen=True)
class Choice:
    """What a check decided for one service: the newest candidate (or None) and why."""

    candidate: str | None
    #: ``newer`` (take it), ``up_to_date``, ``no_match`` (no tag fits the policy),
    #: ``pinned_digest``, ``no_tag``, ``paused`` (a person rolled back), ``failed_before``.
    reason: str


def _key(policy: UpdatePolicy, tag: str) -> Any:
    if policy.regex is not None and policy.sort == "numeric":
        match = re.search(policy.regex, tag)
        text = match.group(1) if match and match.groups() else tag
        return int(text) if text.isdigit() else None
    if policy.regex is not None and policy.sort == "alpha":
        return tag
    return _version_key(tag)


def candidates(policy: UpdatePolicy, tags: Iterable[str]) -> list[str]:
    """The tags the policy allows, best last."""
    keyed: list[tuple[Any, str]] = []
    for tag in tags:
        if policy.regex is not None:
            if not re.fullmatch(policy.regex, tag):
                continue
        elif policy.semver is not None:
            version = _semver(tag)
            if version is None or not nodesemver.satisfies(version.version, policy.semver, loose=True):
                continue
        key = _key(policy, tag)
        if key is not None:
            keyed.append((key, tag))
    keyed.sort(key=lambda kt: (kt[0], kt[1]))
    return [tag for _, tag in keyed]


def choose(policy: UpdatePolicy, image: str, tags: Iterable[str], *, failed: Iterable[str] = (),
           paused: bool = False) -> Choice:
    """The next tag for a service declared with ``image``, given the repository's ``tags``.

    ``failed`` are tags whose updated deployment failed (never proposed again); ``paused`` is set
    after a person rolled the app back. Digest following is decided by ``choose_digest``.
    """
    ref = parse_reference(image)
    if ref.digest is not None and not policy.digest:
        return Choice(None, "pinned_digest")
    if ref.tag is None:
        return Choice(None, "no_tag")
    allowed = candidates(policy, tags)
    if not allowed:
        return Choice(None, "no_match")
    current = _key(policy, ref.tag)
    skip = set(failed)
    best = next((t for t in reversed(allowed) if t not in skip), None)
    newest = allowed[-1]
    if ref.tag in skip and newest == ref.tag:
        return Choice(newest, "failed_before")  # running what failed: shown, never proposed again
    if current is not None and _key(policy, newest) is not None and not _key(policy, newest) > current:
        return Choice(None, "up_to_date")
    if newest == ref.tag:
        return Choice(None, "up_to_date")
    if paused:
        return Choice(newest, "paused")
    if best is None or best == ref.tag or (current is not None and not _key(policy, best) > current):
        return Choice(newest, "failed_before")
    return Choice(best, "newer")


def choose_digest(image: str, digest: str | None, *, failed: Iterable[str] = (), paused: bool = False) -> Choice:
    """For ``digest: true``: the reference to write when the tag now points at ``digest``."""
    ref = parse_reference(image)
    if ref.tag is None:
        return Choice(None, "no_tag")
    if digest is None:
        return Choice(None, "no_match")
    if digest == ref.digest:
        return Choice(None, "up_to_date")
    target = ref.with_tag(ref.tag, digest=digest)
    if paused:
        return Choice(target, "paused")
    if target in set(failed):
        return Choice(target, "failed_before")
    return Choice(target, "newer")


def bumped_image(image: str, choice: Choice) -> str:
    """The new image reference for a ``newer`` choice (a tag, or a full reference for digests)."""
    if choice.candidate is None:
        return image
    if "@" in choice.candidate or "/" in choice.candidate or ":" in choice.candidate:
        return choice.candidate
    return parse_reference(image).with_tag(choice.candidate)


def display_version(image: str) -> str:
    """``1.4.2`` for ``repo:1.4.2``, ``1.4.2@sha256:abcdef123456`` (short) for pinned digests."""
    ref = parse_reference(image)
    text = ref.tag or "latest"
    if ref.digest:
        text += "@" + ref.digest.split(":", 1)[-1][:12]
    return text


def is_rollback(policy: UpdatePolicy, *, before: str, after: str, bumped_to: str | None) -> bool:
    """Whether a change of the declared image from ``before`` to ``after`` (not made by the daemon)
    goes back: an older tag by the policy's order, or, when the daemon had bumped ``before``, any
    other reference of the same tag (a digest removed or replaced by hand)."""
    if after in (before, bumped_to):
        return False
    try:
        old, new = parse_reference(before), parse_reference(after)
    except ValueError:
        return False
    if old.key != new.key:
        return False  # another image: a person's new choice, not a rollback
    if old.tag is not None and new.tag is not None and old.tag != new.tag:
        older, newer = _key(policy, new.tag), _key(policy, old.tag)
        return older is not None and newer is not None and older < newer
    return bumped_to is not None and before == bumped_to
