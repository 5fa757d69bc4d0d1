"""Secrets: encrypted at rest (Fernet), staged as 0400 files for the containers that use them.

Values are set with ``cynchrod secret set ORG/NAME`` (stdin) or the API, and
can never be read back through either. The key comes from
``CYNCHROD_SECRET_KEY`` or is generated once as ``state/secret.key`` (0600).
A manifest names secrets; the reconciler stages each as
``<staging>/<org>/<app>/<name>`` (mode 0400) and the runtime bind-mounts it
read-only at ``/run/secrets/<name>``.

Plaintext never touches a disk: the staging folder is on a tmpfs, never under
the state dir — ``/run/cynchrod/<state-id>`` when ``/run`` is a tmpfs, else
``/dev/shm/cynchrod-<state-id>``, else a tmpfs cynchrod mounts itself at
``/run/cynchrod/<state-id>`` (root only); with none of these, apps that use
secrets fail with ``secret_staging_unavailable`` rather than write plaintext to
disk. ``<state-id>`` is a digest of the state dir's path, so the CLI finds the
same folder. The daemon re-stages every live app's secrets at start-up (a
reboot empties a tmpfs), and deleting a secret removes its staged copies at
once. A keyed digest of the values goes into
the spec hash, so rotating a secret redeploys exactly the apps that use it;
the digest is an HMAC, so a label never reveals anything about a value.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import logging
import os
import pathlib
import re
import shutil
import stat
import subprocess
import tempfile

from cryptography.fernet import Fernet, InvalidToken

from cynchrod import store
from cynchrod.core import specs
from cynchrod.core.errors import PermanentError, StateUnwritable
from cynchrod.core.errors import SecretError as SecretError
from cynchrod.core.errors import SecretMissing as SecretMissing
from cynchrod.core.errors import StagingUnavailable as StagingUnavailable

log = logging.getLogger("cynchrod.secrets")  # the name the logs have always shown
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_SECRET_BYTES = 64 * 1024
KEY_ENV = "CYNCHROD_SECRET_KEY"


def filesystem_type(path: pathlib.Path) -> str:
    """The type of the filesystem ``path`` is on (``tmpfs``, ``ext4`` ...), from /proc/self/mountinfo."""
    target = path.resolve()
    best, kind = -1, ""
    try:
        lines = pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = pathlib.Path(fields[4].replace("\\040", " "))
        if (target == mount or target.is_relative_to(mount)) and len(mount.parts) >= best:
            best, kind = len(mount.parts), right.split()[0]
    return kind


def state_id(state_dir: pathlib.Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]


def staging_candidates(state_dir: pathlib.Path) -> list[pathlib.Path]:
    """Where secrets may be staged, best first (see the module docstring)."""
    ident = state_id(state_dir)
    return [pathlib.Path("/run/cynchrod") / ident, pathlib.Path("/dev/shm") / f"cynchrod-{ident}"]


def choose_staging(state_dir: pathlib.Path) -> pathlib.Path:
    """The staging folder for this state dir (no side effect): the first candidate on a tmpfs,
    else the /run one (for cynchrod to mount a tmpfs on)."""
    run, shm = staging_candidates(state_dir)
    if filesystem_type(run) == "tmpfs":
        return run
    if filesystem_type(shm) == "tmpfs":
        return shm
    return run


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
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".secret-key-")
                try:
                    with os.fdopen(fd, "wb") as out:
                        out.write(Fernet.generate_key())
                        out.flush()
                        os.fsync(out.fileno())  # a full disk says so here, not as an empty key later
                    with contextlib.suppress(FileExistsError):
                        os.link(tmp, path)
                finally:
                    os.unlink(tmp)
            except OSError as exc:
                raise StateUnwritable.of(exc, str(path)) from exc
        key = path.read_bytes().strip()
    try:
        Fernet(key)
    except ValueError as exc:
        raise SecretError(f"{KEY_ENV} (or state/secret.key) is not a Fernet key") from exc
    return key


class Secrets:
    def __init__(self, db: store.Store, *, state_dir: pathlib.Path, files: bool = True) -> None:
        self.db = db
        #: Stage values as files for bind mounts (one host); the swarm runtime reads them
        #: with ``value`` instead and hands them to the swarm's own store.
        self.files = files
        self._key = load_key(state_dir)
        self._fernet = Fernet(self._key)
        self._mac_key = hashlib.sha256(b"cynchrod-secret-digest:" + self._key).digest()
        self.state_dir = state_dir
        self.staging = choose_staging(state_dir)
        self._ready = False

    @staticmethod
    def check_name(org: str, name: str) -> None:
        if not NAME_RE.match(name):
            raise SecretError(f"secret name {name!r} must be letters, digits, '_' or '-' (at most 64)")
        if not specs.NAME_RE.match(org):
            raise SecretError(f"org {org!r} is not a DNS label")

    def set(self, org: str, name: str, value: bytes) -> None:
        self.check_name(org, name)
        if not value:  # an unset shell variable, a missing file: an app would start with an empty password
            raise SecretError("a secret value must not be empty")
        if len(value) > MAX_SECRET_BYTES:
            raise SecretError(f"a secret value is at most {MAX_SECRET_BYTES} bytes")
        self.db.put_secret(org, name, self._fernet.encrypt(value).decode())

    def delete(self, org: str, name: str) -> bool:
        """Delete a secret and, at once, every staged copy of it (running containers keep the
        file they had open until they are recreated; the app is then held with ``secret_missing``)."""
        self.check_name(org, name)
        deleted = self.db.delete_secret(org, name)
        org_dir = self.staging / org
        if org_dir.is_dir():
            for staged in org_dir.glob(f"*/{name}"):
                staged.unlink(missing_ok=True)
        return deleted

    def _value(self, org: str, name: str) -> bytes | None:
        sealed = self.db.secret(org, name)
        if sealed is None:
            return None
        try:
            return self._fernet.decrypt(sealed.encode())
        except InvalidToken as exc:
            raise SecretError(f"secret {org}/{name} cannot be decrypted with this key") from exc

    def value(self, org: str, name: str) -> bytes:
        """A secret's value, for a runtime that stores it itself (swarm); never for an API."""
        value = self._value(org, name)
        if value is None:
            raise SecretMissing(f"secret {name} not set in org {org}")
        return value

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

    def _prepare(self) -> None:
        """Make sure the staging folder exists, is ours alone (0700, not a symlink) and is on a tmpfs."""
        if self._ready:
            return
        root = self.staging
        if filesystem_type(root) != "tmpfs" and root.parent == pathlib.Path("/run/cynchrod"):
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.geteuid() == 0:
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700,nosuid,nodev,noexec",
                                "cynchrod-secrets", str(root)], capture_output=True, timeout=10, check=False)
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise StagingUnavailable(f"cannot make the secrets staging folder {root}: {exc.strerror}") from exc
        info = os.lstat(root)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise StagingUnavailable(f"{root} is not a folder of this user: secrets are not staged there")
        os.chmod(root, 0o700)
        if filesystem_type(root) != "tmpfs":
            raise StagingUnavailable(f"no tmpfs for secrets ({root} is not on one, and none could be mounted): "
                                     "plaintext is never written to a disk")
        self._ready = True

    def restage_all(self) -> int:
        """At start-up: remove plaintext an older version left under the state dir, and stage the
        secrets of every live app again (a reboot empties the tmpfs). Returns the apps staged."""
        shutil.rmtree(self.state_dir / "secrets", ignore_errors=True)
        staged = 0
        for app in self.db.live_apps().values():
            spec = app.spec
            if spec is None or not spec.secret_names:
                continue
            try:
                self.stage(spec)
                staged += 1
            except PermanentError as exc:
                log.warning("secrets of %s/%s not staged: %s", spec.org, spec.name, exc)
        return staged

    def stage(self, spec: specs.AppSpec) -> None:
        """Write the app's secrets as 0400 files (atomically) for the runtime to mount."""
        if not self.files:
            return
        self._prepare()
        target = self.app_dir(spec.org, spec.name)
        values = []
        for name in spec.secret_names:
            value = self._value(spec.org, name)
            if value is None:
                raise SecretMissing(f"secret {name} not set in org {spec.org}")
            values.append((name, value))
        # The staging folder is the host's to break (a file in the way, a full tmpfs, a folder of another
        # user): that fails this app with a code, never the pass or start-up's restage_all.
        try:
            target.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name, value in values:
                tmp = target / f".{name}.tmp"
                tmp.unlink(missing_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
                with os.fdopen(fd, "wb") as out:
                    out.write(value)
                os.replace(tmp, target / name)
        except OSError as exc:
            raise StagingUnavailable(f"cannot stage the secrets of {spec.org}/{spec.name} in {target}: "
                                     f"{exc.strerror or exc}") from exc

    def unstage(self, org: str, app: str) -> None:
        shutil.rmtree(self.app_dir(org, app), ignore_errors=True)
