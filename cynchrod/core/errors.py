"""The error tree every layer raises, with the stable codes the CLI and API share.

Library errors (pygit2, docker, jsonschema, ruamel.yaml) are converted into
these at the module that owns the library, so callers only ever see our codes.
"""

from __future__ import annotations


class CynchrodError(Exception):
    """Base of every error we raise on purpose.

    ``code`` is stable and documented in the README; ``message`` is for humans
    and never carries a secret or a token.
    """

    code = "error"
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

    code = "invalid_manifest"

    def __init__(self, message: str, *, code: str = "invalid_manifest", path: str = "", line: int = 0) -> None:
        super().__init__(message, code=code)
        self.path = path
        self.line = line

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code}: {self.message}"


class SourceError(TemporaryError):
    """The manifests repository could not be fetched or read."""

    code = "source_unavailable"


class RuntimeFailure(TemporaryError):
    """The container engine failed in a way that may pass."""

    code = "runtime_error"


class UnitGone(RuntimeFailure):
    """A unit (or its network) vanished between observing and acting: the next pass sees the truth."""

    code = "unit_gone"


class EngineUnavailable(RuntimeFailure):
    """The engine did not answer (down, socket gone, deadline passed)."""

    code = "docker_unavailable"


class StateUnwritable(TemporaryError):
    """The state directory cannot be written (disk full, read-only): passes still heal,
    nothing new is recorded until it can be."""

    code = "state_unwritable"


class StoreError(PermanentError):
    """The store failed in a way a retry will not fix (a corrupt database)."""

    code = "store_error"


class StateLocked(PermanentError):
    """Another daemon holds the state directory."""

    code = "state_locked"
