"""Secrets: encrypted at rest (Fernet), staged as 0400 files for the containers that use them.

Values are set with ``cynchrod secret set ORG/NAME`` (stdin) or the API, and
can never be read back through either. The key comes from
``CYNCHROD_SECRET_KEY`` or is generated once as ``state/secret.key`` (0600).
A manifest names secrets; the reconciler stages each as
``state/secrets/<org>/<app>/<name>`` (mode 0400) and the runtime bind-mounts it
read-only at ``/run/secrets/<name>``. A keyed digest of the values goes into
the spec hash, so rotating a secret redeploys exactly the apps that use it;
the digest is an HMAC, so a label never reveals anything about a value.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import pathlib
import re
import shutil
import tempfile

from cryptography.fernet import Fernet, InvalidToken

from cynchrod import specs, store
from cynchrod.errors import PermanentError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_SECRET_BYTES = 64 * 1024
KEY_ENV = "CYNCHROD_SECRET_KEY"


class SecretMissing(PermanentError):
    code = "secret_missing"


class SecretError(PermanentError):
    code = "invalid_secret"


def load_key(state_dir: pathlib.Path) -> bytes:
    """The Fernet key: from the environment, or generated once under the state dir."""
    env = os.environ.get(KEY_ENV)
    if env:
        key = env.encode()
    else:
        path = state_dir / "secret.key"
        if not path.exists():
            # Written whole under another name, then linked into place: processes starting
            # at once all read the one complete key.
            state_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".secret-key-")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(Fernet.generate_key())
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                os.unlink(tmp)
        key = path.read_bytes().strip()
    try:
        Fernet(key)
    except ValueError as exc:
        raise SecretError(f"{KEY_ENV} (or state/secret.key) is not a Fernet key") from exc
    return key


class Secrets:
    def __init__(self, db: store.Store, *, state_dir: pathlib.Path) -> None:
        self.db = db
        self._key = load_key(state_dir)
        self._fernet = Fernet(self._key)
        self._mac_key = hashlib.sha256(b"cynchrod-secret-digest:" + self._key).digest()
        self.staging = state_dir / "secrets"

    @staticmethod
    def check_name(org: str, name: str) -> None:
        if not NAME_RE.match(name):
            raise SecretError(f"secret name {name!r} must be letters, digits, '_' or '-' (at most 64)")
        if not specs.NAME_RE.match(org):
            raise SecretError(f"org {org!r} is not a DNS label")

    def set(self, org: str, name: str, value: bytes) -> None:
        self.check_name(org, name)
        if len(value) > MAX_SECRET_BYTES:
            raise SecretError(f"a secret value is at most {MAX_SECRET_BYTES} bytes")
        self.db.put_secret(org, name, self._fernet.encrypt(value).decode())

    def delete(self, org: str, name: str) -> bool:
        self.check_name(org, name)
        return self.db.delete_secret(org, name)

    def _value(self, org: str, name: str) -> bytes | None:
        sealed = self.db.secret(org, name)
        if sealed is None:
            return None
        try:
            return self._fernet.decrypt(sealed.encode())
        except InvalidToken as exc:
            raise SecretError(f"secret {org}/{name} cannot be decrypted with this key") from exc

    def digest(self, spec: specs.AppSpec) -> dict[str, str]:
        """Per service, a keyed digest of the current values of its secrets.

        Raises ``SecretMissing`` naming every missing secret.
        """
        sealed = {name: self.db.secret(spec.org, name) for name in spec.secret_names}
        missing = sorted(n for n, v in sealed.items() if v is None)
        if missing:
            raise SecretMissing(f"secret(s) {', '.join(missing)} not set in org {spec.org} "
                                f"(cynchrod secret set {spec.org}/{missing[0]})")
        out = {}
        for service in spec.services:
            mac = hmac.new(self._mac_key, digestmod=hashlib.sha256)
            for name in service.secrets:
                mac.update(name.encode() + b"\0" + (sealed[name] or "").encode() + b"\0")
            out[service.name] = base64.b32encode(mac.digest()[:10]).decode().lower() if service.secrets else ""
        return out

    def new_app_webhook(self, app_id: str) -> str:
        """A new webhook secret for a repo app, stored sealed; returned this once only."""
        secret = "whs_" + base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
        self.db.put_app_webhook(app_id, self._fernet.encrypt(secret.encode()).decode())
        return secret

    def app_webhook(self, app_id: str) -> str | None:
        sealed = self.db.app_webhook(app_id)
        return None if sealed is None else self._fernet.decrypt(sealed.encode()).decode()

    def app_dir(self, org: str, app: str) -> pathlib.Path:
        return self.staging / org / app

    def stage(self, spec: specs.AppSpec) -> None:
        """Write the app's secrets as 0400 files (atomically) for the runtime to mount."""
        target = self.app_dir(spec.org, spec.name)
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in spec.secret_names:
            value = self._value(spec.org, name)
            if value is None:
                raise SecretMissing(f"secret {name} not set in org {spec.org}")
            tmp = target / f".{name}.tmp"
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as out:
                out.write(value)
            os.replace(tmp, target / name)

    def unstage(self, org: str, app: str) -> None:
        shutil.rmtree(self.app_dir(org, app), ignore_errors=True)
