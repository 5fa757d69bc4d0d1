"""Every error code cynchrod shows a user, in one table: where it is met, whether it is permanent,
the API's HTTP status for it, and a one-line summary.

Codes are a public API (the CLI, the API, the store's ``error_code`` and the docs share them):
a member's spelling never changes. ``Code`` is a ``StrEnum``, so a member equals its string
(``Code.QUOTA_EXCEEDED == "quota_exceeded"``), and rows, JSON answers and ``CynchrodError.code``
keep plain strings. ``cynchrod.api.STATUS`` is derived from ``http``; ``tests/unit/test_codes.py``
checks that every code the source can emit is here, that each is explained in
``docs/troubleshooting.md``, and that the OpenAPI document names no other.

``permanent``: retrying the same input cannot help (a new commit, a new request is needed); it
matches the ``permanent`` of the error class each is raised with (one exception: the engine's
``conflict`` inside the local driver is temporary, the API's is not). ``http`` is None for codes
the API never answers with (manifest lines, pass results, CLI errors) or answers with any status
(``http_error``): an error the table gives no status is 409 when permanent, else 503.
"""

from __future__ import annotations

import enum

#: Where a code is met first (several are met in more than one place: ``quota_exceeded``).
MANIFEST = "manifest"  # a line ``file:line: code: message`` of a manifest that fails
PASS = "pass"  # an app's ``last_error``, a deployment's ``error_code``
API = "api"  # an API answer ``{"error": code, "message": text}``
FRONT = "front"  # answered by the front server (gunicorn) before the API sees the request
STREAM = "stream"  # the reason of a log stream's WebSocket close
HEALTH = "health"  # a problem ``/healthz`` names
CLI = "cli"  # ``cynchrod: code: message`` of the command line
KINDS = (MANIFEST, PASS, API, FRONT, STREAM, HEALTH, CLI)


class Code(enum.StrEnum):
    """A stable error code, with its kind, permanence, HTTP status and summary."""

    _value_: str
    kind: str
    permanent: bool
    http: int | None
    summary: str

    def __new__(cls, value: str, kind: str = "", permanent: bool = True, http: int | None = None,
                summary: str = "") -> Code:
        member = str.__new__(cls, value)
        member._value_ = value
        member.kind, member.permanent, member.http, member.summary = kind, permanent, http, summary
        return member

    @classmethod
    def of(cls, text: str | None) -> Code | None:
        """The member spelt ``text`` (a stored ``error_code``, a ``last_error``'s prefix), or None."""
        found = cls._value2member_map_.get(text or "")
        return found if isinstance(found, Code) else None

    # -- manifest errors (permanent: a new commit fixes them) ------------------------------------
    YAML_SYNTAX = ("yaml_syntax", MANIFEST, True, None, "not valid YAML (or not UTF-8, or a duplicate key)")
    YAML_ALIAS = ("yaml_alias", MANIFEST, True, None, "YAML anchors/aliases are refused")
    YAML_TOO_DEEP = ("yaml_too_deep", MANIFEST, True, None, "mappings or lists nested over 32 levels")
    TOO_LARGE = ("too_large", MANIFEST, True, None, "a value or document over its size limit")
    MANIFEST_TOO_LARGE = ("manifest_too_large", MANIFEST, True, None, "a manifest file over 1 MiB")
    INVALID_MANIFEST = ("invalid_manifest", MANIFEST, True, 400, "not exactly one YAML document; over the API: "
                        "a manifest that fails (its lines in ``errors``)")
    INVALID_TYPE = ("invalid_type", MANIFEST, True, None, "a value (or the file) has the wrong type")
    MISSING_KEY = ("missing_key", MANIFEST, True, None, "a required key is missing")
    UNKNOWN_KEY = ("unknown_key", MANIFEST, True, None, "a key the schema does not know")
    INVALID_VALUE = ("invalid_value", MANIFEST, True, None, "a value has the wrong form")
    OUT_OF_RANGE = ("out_of_range", MANIFEST, True, None, "a number outside its bounds, or not finite")
    POLICY_VIOLATION = ("policy_violation", MANIFEST, True, None, "refused for the host's safety")
    INVALID_PATH = ("invalid_path", MANIFEST, True, None, "a tree entry under apps/ that is not a manifest file")
    UNREADABLE = ("unreadable", MANIFEST, True, None, "the file's blob cannot be read from the mirror")
    DUPLICATE_APP = ("duplicate_app", MANIFEST, True, None, "another file already declares this org/name")
    ORG_FORBIDDEN = ("org_forbidden", MANIFEST, True, None, "a repository pinned to one org declares another's app")
    DUPLICATE_DOMAIN = ("duplicate_domain", MANIFEST, True, None, "one app names the same host name twice")

    # -- pass and deployment errors ----------------------------------------------------------------
    SOURCE_UNAVAILABLE = ("source_unavailable", PASS, False, 503, "the repository could not be cloned or fetched")
    BRANCH_NOT_FOUND = ("branch_not_found", PASS, False, 503, "the followed branch does not exist")
    SOURCE_EMPTY = ("source_empty", PASS, False, None, "the commit has no apps/ directory")
    IMAGE_NOT_FOUND = ("image_not_found", PASS, True, None, "a local image tag is not on the host")
    IMAGE_PULL_FAILED = ("image_pull_failed", PASS, True, None, "a registry image could not be pulled")
    IMAGE_PUSH_FAILED = ("image_push_failed", PASS, True, None, "swarm: a built image could not be pushed")
    NAME_CONFLICT = ("name_conflict", PASS, True, None, "a container not made by cynchrod has the app's name")
    OWNER_CONFLICT = ("owner_conflict", PASS, True, None, "another cynchrod instance's container has the name")
    NAME_IN_USE = ("name_in_use", PASS, False, None, "the name is held by a container of ours on its way out")
    UNIT_GONE = ("unit_gone", PASS, False, None, "a unit vanished between observing and acting")
    UNSCHEDULABLE = ("unschedulable", PASS, False, None, "swarm: no node can take a task")
    UPDATE_FAILED = ("update_failed", PASS, True, None, "swarm: the rolling update failed and was rolled back")
    IN_USE = ("in_use", PASS, False, None, "swarm: a secret or network is still used by a task")
    QUOTA_EXCEEDED = ("quota_exceeded", PASS, True, 403, "a new app over its org's max_apps")
    DOMAIN_TAKEN = ("domain_taken", PASS, True, None, "another app holds this domain")
    SECRET_MISSING = ("secret_missing", PASS, True, None, "a secret the app lists is not set")
    SECRET_STAGING_UNAVAILABLE = ("secret_staging_unavailable", PASS, True, None, "no tmpfs to stage secrets on")
    BUILD_FAILED = ("build_failed", PASS, True, None, "a repo app's image did not build")
    BUILD_SOURCE_UNAVAILABLE = ("build_source_unavailable", PASS, True, None, "a repo app's source was never fetched")
    NOT_READY = ("not_ready", PASS, True, None, "a zero-downtime deploy's new unit was not ready in time")
    OOM_KILLED = ("oom_killed", PASS, False, None, "a container was killed for exceeding its memory")
    CRASH_LOOP = ("crash_loop", PASS, False, None, "a unit keeps dying; its restarts back off")
    DOCKER_UNAVAILABLE = ("docker_unavailable", PASS, False, 503, "the engine did not answer")
    RUNTIME_ERROR = ("runtime_error", PASS, False, 502, "the engine refused a call")
    EDGE_UNAVAILABLE = ("edge_unavailable", PASS, False, None, "Caddy's admin API did not answer or refused")
    STATE_UNWRITABLE = ("state_unwritable", PASS, False, 507, "the state directory cannot be written (disk full, "
                        "read-only): a call that must write there is refused, nothing of it is kept")
    STORE_BUSY = ("store_busy", PASS, False, None, "the store was locked past its busy timeout")
    STORE_ERROR = ("store_error", PASS, True, None, "the store failed in a way a retry will not fix")
    INTERRUPTED = ("interrupted", PASS, False, None, "the daemon stopped during this deployment")
    SUPERSEDED = ("superseded", PASS, True, None, "a queued deployment was replaced by a newer one")

    # -- API errors ------------------------------------------------------------------------------------
    INVALID_BODY = ("invalid_body", API, True, 400, "the body is not valid JSON/YAML, or has the wrong shape")
    INVALID_TAIL = ("invalid_tail", API, True, 400, "tail is not an integer in range")
    INVALID_QUERY = ("invalid_query", API, True, 400, "a query parameter has the wrong form")
    INVALID_SECRET = ("invalid_secret", API, True, 400,
                      "a secret's name or org is malformed, or its value empty or too large")
    UNAUTHORIZED = ("unauthorized", API, True, 401, "no token, a wrong or revoked one, or a wrong signature")
    FORBIDDEN = ("forbidden", API, True, 403, "the token's org may not do this")
    CSRF_FAILED = ("csrf_failed", API, True, 403, "a dashboard form without the page's CSRF token")
    NOT_FOUND = ("not_found", API, True, 404, "no such app, deployment, secret or route (or another org's)")
    METHOD_NOT_ALLOWED = ("method_not_allowed", API, True, 405, "the path exists, not with this method")
    BODY_TIMEOUT = ("body_timeout", API, False, 408, "the body did not arrive within 30 s")
    APP_EXISTS = ("app_exists", API, True, 409, "POST /apps for an org/name that exists")
    APP_REMOVED = ("app_removed", API, True, 409, "the app was deleted")
    APP_STOPPED = ("app_stopped", API, True, 409, "restart of a stopped app")
    NOT_IN_REPO = ("not_in_repo", API, True, 409, "the app has no manifest file on the branch")
    NO_PREVIOUS_DEPLOYMENT = ("no_previous_deployment", API, True, 409, "rollback found no earlier deployment")
    CONFLICT = ("conflict", API, True, 409, "another state conflict")
    PATH_UNWRITABLE = ("path_unwritable", API, True, 409, "a manifest path Git cannot write")
    NOT_A_REPO_APP = ("not_a_repo_app", API, True, 409, "the app is not built from a source repository")
    REPO_NOT_BARE = ("repo_not_bare", API, True, 409, "a push into a checkout with the branch checked out")
    BODY_TOO_LARGE = ("body_too_large", API, True, 413, "the body is over 1 MiB")
    TOO_MANY_STREAMS = ("too_many_streams", API, False, 429, "256 log streams are open on this API worker")
    PUSH_FAILED = ("push_failed", API, False, 502, "the commit could not be pushed")
    PUSH_CONFLICT = ("push_conflict", API, False, 503, "others kept pushing: re-applying the edit failed")
    RECONCILER_UNAVAILABLE = ("reconciler_unavailable", API, False, 503, "the reconciler process did not answer")
    INTERNAL = ("internal", API, False, 500, "a bug: the daemon's log has the traceback")
    HTTP_ERROR = ("http_error", API, True, None, "an HTTP error with no code of its own")

    # -- answered by the front server ------------------------------------------------------------------
    BAD_REQUEST = ("bad_request", FRONT, True, 400, "the request could not be parsed")
    URI_TOO_LONG = ("uri_too_long", FRONT, True, 414, "the request line is over 4094 bytes")
    EXPECTATION_FAILED = ("expectation_failed", FRONT, True, 417, "an Expect other than 100-continue")
    HEADERS_TOO_LARGE = ("headers_too_large", FRONT, True, 431, "a header over 8190 bytes, or over 100 headers")
    NOT_IMPLEMENTED = ("not_implemented", FRONT, True, 501, "a Transfer-Encoding other than chunked")

    # -- a log stream's close reasons (besides unauthorized, not_found, too_many_streams ...) ---------
    TOKEN_REVOKED = ("token_revoked", STREAM, True, None, "the stream's token was revoked")
    SIGNED_OUT = ("signed_out", STREAM, True, None, "the dashboard session that opened the stream ended")
    STREAM_ENDED = ("stream_ended", STREAM, False, None, "the followed unit's log ended")

    # -- /healthz problems (besides docker_unavailable, state_unwritable, reconciler_unavailable) -----
    PASS_CRASHED = ("pass_crashed", HEALTH, False, None, "the last pass crashed (a bug)")
    PASSES_STALLED = ("passes_stalled", HEALTH, False, None, "no pass has finished for too long")

    # -- the command line --------------------------------------------------------------------------------
    USAGE = ("usage", CLI, True, None, "a flag or argument is missing or wrong")
    INVALID_CONFIG = ("invalid_config", CLI, True, None, "the --config file is not valid")
    STATE_LOCKED = ("state_locked", CLI, True, None, "another daemon holds the state directory")
    API_UNREACHABLE = ("api_unreachable", CLI, False, None, "a client command could not reach the API")
    STREAM_CLOSED = ("stream_closed", CLI, False, None, "logs -f lost its stream")

    # issue 24: hardening, third round
    PORT_IN_USE = ("port_in_use", PASS, False, None, "the hostPort is held by something else on the host")
    INVALID_MOUNT = ("invalid_mount", MANIFEST, True, None, "a volume's mount path is not absolute and normalised, "
                     "is /, covers /proc, /sys, /dev, /etc, /bin, /sbin, /usr or /lib{,32,64,x32}, or is given twice")
    # --- hardening: authentication back-off (issue 24 item 10) ---
    TOO_MANY_ATTEMPTS = ("too_many_attempts", API, False, 429, "this client address failed to authenticate too "
                         "often: wait Retry-After seconds")
    NOT_A_WEBSOCKET = ("not_a_websocket", API, True, 400, "a plain GET of the log stream's URL, which only "
                       "answers a WebSocket upgrade")

    # --- notify: notifications, commit statuses, webhooks that tell the truth ---
    WAIT_TIMEOUT = ("wait_timeout", CLI, False, None, "cynchrod wait saw no outcome of the commit in time")

    # --- health-gated deploys (issue 22) ---
    CRASHED = ("crashed", PASS, False, None, "a unit of a deployment exited before it was ready (with its exit code)")
    UNHEALTHY = ("unhealthy", PASS, True, None, "a unit's healthcheck reports unhealthy, or it was not ready within "
                 "health_timeout")

    # --- image updates (issue 23) ---
    INVALID_UPDATE = ("invalid_update", MANIFEST, True, None, "an update: block with no or several strategies, "
                      "a bad semver range or regex, a sort without regex, or an interval outside 5s..24h")
    REGISTRY_UNREACHABLE = ("registry_unreachable", PASS, False, None, "an image update check could not reach the "
                            "registry, it timed out, or it answered an error (the check backs off and retries)")
    REGISTRY_UNAUTHORIZED = ("registry_unauthorized", PASS, False, None, "the registry refused the credentials (or "
                             "their absence) for the repository")
    REGISTRY_GARBAGE = ("registry_garbage", PASS, False, None, "the registry answered something that is not a tag "
                        "list or a manifest digest")
    IMAGE_UPDATE_FAILED = ("image_update_failed", PASS, True, None, "an image update was not committed: the "
                           "manifest changed meanwhile (a person's change wins) or cannot be edited")

    # --- compose files as apps (issue 21) ---
    UNSUPPORTED_KEY = ("unsupported_key", MANIFEST, True, None, "a Compose key outside the subset cynchrod runs "
                       "(docs/compose.md lists the supported keys)")
    INTERPOLATION_FAILED = ("interpolation_failed", MANIFEST, True, None, "a ${VAR:?message} with VAR unset, or a "
                            "malformed ${...} in a compose file")
    FILE_NOT_FOUND = ("file_not_found", MANIFEST, True, None, "an env_file, include or x-cynchrod.files entry that "
                      "is not a file of the app's directory")


def status_map() -> dict[str, int]:
    """code -> HTTP status, for every code the API answers with a status of its own."""
    return {code.value: code.http for code in Code if code.http is not None}

