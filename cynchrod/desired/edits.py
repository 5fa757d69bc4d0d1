"""Round-trip edits of manifest files for imperative calls (stop, start, restart, create).

ruamel.yaml's round-trip mode keeps the user's comments, key order and quoting;
only the keys we set change. Called by ``control`` through ``Source.commit_edit``.
"""

from __future__ import annotations

from typing import Any

from cynchrod.core.errors import PermanentError
from cynchrod.desired import compose, manifests, yamlio


def set_keys(raw: bytes, values: dict[str, Any], *, path: str = "") -> bytes:
    """Set top-level keys of a manifest, keeping everything else as written; in a compose file
    (``path`` named ``compose.yaml`` ...), the keys of its ``x-cynchrod`` block (made when missing).

    The file is read through ``yamlio`` (alias, size and depth guards); a file
    that cannot be read as one mapping is a ``PermanentError`` naming it.
    """
    try:
        doc = yamlio.load_roundtrip(raw)
    except yamlio.YamlError as exc:
        raise PermanentError(f"the manifest cannot be edited: line {exc.line}: {exc.message}; fix it in Git first",
                             code="invalid_manifest") from exc
    if not yamlio.is_mapping(doc):
        raise PermanentError("the manifest is not a mapping; fix it in Git first", code="invalid_manifest")
    target = doc
    if compose.is_compose_file(path):
        if not yamlio.is_mapping(doc.get("x-cynchrod")):
            doc["x-cynchrod"] = yamlio.new_mapping(())
        target = doc["x-cynchrod"]
    for key, value in values.items():
        target[key] = yamlio.double_quoted(value) if key == "restartedAt" else value
    return yamlio.dump_roundtrip(doc, indent=yamlio.guess_indent(raw.decode("utf-8")))  # the file's own indentation


def set_image(raw: bytes, service: str | None, expected: str, image: str) -> bytes:
    """Replace the ``image`` of the app (``service`` None) or of ``services.<service>``, keeping the
    file's comments, layout and the value's quoting. The image must still be ``expected`` (what the
    update was chosen from): else a ``PermanentError`` (``image_update_failed``) and nothing is written,
    so a person's concurrent change always wins."""
    try:
        doc = yamlio.load_roundtrip(raw)
    except yamlio.YamlError as exc:
        raise PermanentError(f"the manifest cannot be edited: line {exc.line}: {exc.message}",
                             code="image_update_failed") from exc
    node = doc
    if service is not None:
        node = (doc.get("services") or {}).get(service) if yamlio.is_mapping(doc) else None
    if not yamlio.is_mapping(node) or node.get("image") != expected:
        where = "image" if service is None else f"services.{service}.image"
        raise PermanentError(f"{where} is no longer {expected!r} in the manifest: the update is not applied",
                             code="image_update_failed")
    node["image"] = yamlio.same_style(node["image"], image)
    return yamlio.dump_roundtrip(doc, indent=yamlio.guess_indent(raw.decode("utf-8")))


def declared_state(path: str, raw: bytes | None) -> str | None:
    """The ``state`` a manifest (or a compose file's ``x-cynchrod``) declares; None when it cannot be read."""
    if not compose.is_compose_file(path):
        parsed = manifests.parse(path, raw or b"")
        return None if parsed.spec is None else parsed.spec.state
    try:
        data = yamlio.load(raw or b"")
    except yamlio.YamlError:
        return None
    block = data.get("x-cynchrod") if isinstance(data, dict) else None
    state = (block if isinstance(block, dict) else {}).get("state", "running")
    return state if isinstance(state, str) else None


def new_manifest(data: dict[str, Any], *, header: str | None = None) -> bytes:
    """A manifest file for ``POST /apps``: keys in the documented order."""
    order = ["name", "org", "image", "command", "port", "hostPort", "domain", "env", "cpu", "memory", "state",
             "restartedAt", "services"]
    keys = sorted(data, key=lambda k: (order.index(k) if k in order else len(order), k))
    return yamlio.dump_roundtrip(yamlio.new_mapping(((k, data[k]) for k in keys), header=header))
