"""The error tree every layer raises, with the stable codes the CLI and API share.

Library errors (pygit2, docker, jsonschema, ruamel.yaml, sqlite3, OSError) are converted
into these at the module that owns the library, so callers only ever see our codes.
Every code is a member of ``cynchrod.core.codes.Code`` (its permanence, its HTTP
status); each class's ``permanent`` agrees with it (``tests/unit/test_codes.py``).

Every exception class of the package is defined here (``tests/unit/test_error_tree.py``);
a module may re-export one under the name its callers use (``edge.EdgeUnavailable``,
``runtime._docker.Conflict`` for ``EngineConflict``, ``desired.source.push.Rejected`` for
``PushRejected``, ``shell.builds.NotFetched``).

    CynchrodError (ApiError, ClientError)
    ├── PermanentError: ManifestError, YamlError, StoreError, StateLocked, ConfigError,
    │   SecretMissing, SecretError, StagingUnavailable, NotFound, Conflict, Forbidden,
    │   QuotaExceeded, InvalidManifest, AppExists, QuotaFull, NotFetched, UpdatePolicyError
    └── TemporaryError: SourceError (MirrorDamaged, PushRejected), StateUnwritable,
        ReconcilerUnavailable, EdgeUnavailable, BodyTimeout, RegistryError,
        RuntimeFailure (UnitGone, EngineUnavailable, EngineConflict)
"""

from __future__ import annotations

import errno
from typing import Any

from cynchrod.core.codes import Code

#: What a write into the state directory fails with when the disk is full or read-only.
UNWRITABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})
#: The same, as libgit2 and SQLite spell it in a message (pygit2 raises ``OSError`` and
#: ``GitError`` with no ``errno``; sqlite3 an ``OperationalError``).
UNWRITABLE_TEXTS = ("no space left", "read-only file system", "disk quota exceeded", "database or disk is full",
                    "readonly database")


def unwritable(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full or read-only (not some other failure to write)."""
    if isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNOS:
        return True
    text = str(exc).lower()
    return any(t in text for t in UNWRITABLE_TEXTS)


class CynchrodError(Exception):
    """Base of every error we raise on purpose.

    ``code`` is stable and documented in the README; ``message`` is for humans
    and never carries a secret or a token.
    """

    code: str = "error"
    #: Permanent errors wait for a new input (a new commit); temporary ones retry.
    permanent = True

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PermanentError(CynchrodError):
    """Retrying without a new input cannot help (bad manifest, quota, conflict)."""

    permanent = True


class TemporaryError(CynchrodError):
    """The world may fix itself (daemon or git unreachable): retry with backoff."""

    permanent = False
    code = "temporary"


class ManifestError(PermanentError):
    """A manifest is invalid; carries the file and line it came from."""

    code: str = Code.INVALID_MANIFEST

    def __init__(self, message: str, *, code: str = Code.INVALID_MANIFEST, path: str = "", line: int = 0) -> None:
        super().__init__(message, code=code)
        self.path = path
        self.line = line

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code}: {self.message}"


class UpdatePolicyError(PermanentError):
    """A manifest's ``update:`` block cannot be used; ``key`` names the key at fault (for file:line)."""

    code: str = Code.INVALID_UPDATE

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message, code=Code.INVALID_UPDATE)
        self.key = key


class ManifestErrors(ManifestError):
    """Several located errors of one compose app at once (desired/compose); ``errors`` holds them all."""

    def __init__(self, errors: list[ManifestError]) -> None:
        first = errors[0] if errors else ManifestError("failed")
        super().__init__(first.message, code=first.code, path=first.path, line=first.line)
        self.errors = errors


class InterpolationError(ManifestError):
    """A ``${VAR:?message}`` with VAR unset, or a ``$`` expression that cannot be read (compose files)."""

    code: str = Code.INTERPOLATION_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message, code=Code.INTERPOLATION_FAILED)


class SourceError(TemporaryError):
    """The manifests repository could not be fetched or read."""

    code: str = Code.SOURCE_UNAVAILABLE


class RegistryError(TemporaryError):
    """A registry could not answer an image update check (down, slow, refused, garbage): the check backs off."""

    code: str = Code.REGISTRY_UNREACHABLE


class RuntimeFailure(TemporaryError):
    """The container engine failed in a way that may pass."""

    code: str = Code.RUNTIME_ERROR


class UnitGone(RuntimeFailure):
    """A unit (or its network) vanished between observing and acting: the next pass sees the truth."""

    code: str = Code.UNIT_GONE


class EngineUnavailable(RuntimeFailure):
    """The engine did not answer (down, socket gone, deadline passed)."""

    code: str = Code.DOCKER_UNAVAILABLE


class MirrorDamaged(SourceError):
    """An object of a mirror cannot be read: the mirror is cloned again (``desired.source.mirror``)."""


class PushRejected(SourceError):
    """The remote moved on: fetch, re-apply, push again (``desired.source.push``; ``Source.commit_edit``
    raises ``push_conflict`` when it keeps happening)."""

    code: str = Code.PUSH_CONFLICT


class EngineConflict(RuntimeFailure):
    """The engine answered 409 (a name or a network taken mid-pass): the drivers look at why, the
    next pass retries (``runtime._docker``). Temporary, unlike the API's permanent ``conflict``."""

    code: str = Code.CONFLICT


class EdgeUnavailable(TemporaryError):
    """Caddy's admin API did not answer, or refused a change (``edge``)."""

    code: str = Code.EDGE_UNAVAILABLE


class StateUnwritable(TemporaryError):
    """The state directory cannot be written (disk full, read-only): passes still heal,
    nothing new is recorded until it can be; an API call that must write answers 507."""

    code: str = Code.STATE_UNWRITABLE

    @classmethod
    def of(cls, exc: BaseException, what: str) -> StateUnwritable:
        """``what`` (``"the mirror of URL"``) could not be written: ``exc`` said why."""
        return cls(f"the state directory cannot be written ({what}): {exc}")


class StoreError(PermanentError):
    """The store failed in a way a retry will not fix (a corrupt database)."""

    code: str = Code.STORE_ERROR


class StateLocked(PermanentError):
    """Another daemon holds the state directory."""

    code: str = Code.STATE_LOCKED


class YamlError(PermanentError):
    """Bad YAML, with the 1-based line it was found at (raised by ``desired.yamlio``)."""

    code: str = Code.YAML_SYNTAX

    def __init__(self, message: str, *, code: str = Code.YAML_SYNTAX, line: int = 1) -> None:
        super().__init__(message, code=code)
        self.line = line


class ConfigError(PermanentError):
    """The ``--config`` file is not valid (``desired.config``)."""

    code: str = Code.INVALID_CONFIG


class SecretMissing(PermanentError):
    """A secret an app lists is not set for its org (``desired.secrets``): the app is held."""

    code: str = Code.SECRET_MISSING


class SecretError(PermanentError):
    """A secret's name or org is malformed, or its value too large (``desired.secrets``)."""

    code: str = Code.INVALID_SECRET


class StagingUnavailable(PermanentError):
    """No tmpfs to stage secret files on (``desired.secrets``)."""

    code: str = Code.SECRET_STAGING_UNAVAILABLE


class NotFetched(PermanentError):
    """A build repository no pass has fetched yet, asked for by a caller that may not fetch it
    (a preview: ``shell.builds``); the app waits for a pass that fetches it."""

    code: str = Code.BUILD_SOURCE_UNAVAILABLE


class AppExists(PermanentError):
    """A reservation for an org/name that exists or is reserved (``store``)."""

    code: str = Code.APP_EXISTS


class QuotaFull(PermanentError):
    """A reservation over the org's cap (``store``)."""

    code: str = Code.QUOTA_EXCEEDED


class ReconcilerUnavailable(TemporaryError):
    """An API worker could not reach the reconciler process (``shell.channel``)."""

    code: str = Code.RECONCILER_UNAVAILABLE


class NotFound(PermanentError):
    """An imperative call's app (or deployment) does not exist (``shell.control``)."""

    code: str = Code.NOT_FOUND


class Conflict(PermanentError):
    """An imperative call the app's state refuses (``shell.control``; its code says which)."""

    code: str = Code.CONFLICT


class QuotaExceeded(PermanentError):
    """``POST /apps`` over the org's cap (``shell.control``)."""

    code: str = Code.QUOTA_EXCEEDED


class Forbidden(PermanentError):
    """The token's org may not do this (``shell.control``)."""

    code: str = Code.FORBIDDEN


class InvalidManifest(PermanentError):
    """``POST /apps`` with a manifest that fails; ``errors`` are its ``body:LINE: code: message`` lines."""

    code: str = Code.INVALID_MANIFEST

    def __init__(self, message: str, errors: list[str]) -> None:
        super().__init__(message)
        self.errors = errors


class BodyTimeout(TemporaryError):
    """A request's body did not arrive in time (``api``, under the gevent workers)."""

    code: str = Code.BODY_TIMEOUT


class ApiError(CynchrodError):
    """An error the API answers as JSON with ``STATUS[code]``; ``extra`` joins the body."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message, code=code)
        self.extra = extra


class ClientError(CynchrodError):
    """An error answer of the API (its code and message), or the API out of reach (``cli.client``)."""
