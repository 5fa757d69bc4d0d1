"""docs/troubleshooting.md explains every error code the code can produce.

``emitted_codes`` is the scan of the source for codes; ``tests/unit/test_codes.py`` checks it
against the registry (``cynchrod.core.codes``), and this file the registry against the page."""

from __future__ import annotations

import pathlib
import re

from cynchrod.api import STATUS
from cynchrod.core.codes import Code

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Where codes are written in the source: code=..., class attributes, API errors, manifest
#: errors (fail/err/refuse helpers), error_code columns set in SQL, the front server's and the
#: HTTP error maps, WebSocket close reasons, /healthz problems, jsonschema's keyword map, and
#: registry members (``Code.NAME``, turned into their spelling).
PATTERNS = [r'code="([a-z_]+)"', r'code = "([a-z_]+)"', r'ApiError\("([a-z_]+)"', r'error_response\("([a-z_]+)"',
            r'code="[a-z_]+" if [^\n]*? else "([a-z_]+)"',
            r'fail\([^\n]*?"([a-z]+_[a-z_]+)"(?:, [^\n]*)?\)$', r'err\([^\n]*?", "([a-z_]+)"',
            r'^\s+"([a-z]+_[a-z_]+)", where\)$', r'refuse\([^()]*?"([a-z]+_[a-z_]+)"(?:, \w+)?\)',
            r"error_code = '([a-z_]+)'", r'\d{3}: "([a-z_]+)"', r'f"(crash_loop|oom_killed):',
            r'return "([a-z]+_[a-z_]+)", \(f"', r'ws\.close\([^,\n]+, "([a-z_]+)"\)',
            r'\(http_errors\.\w+, \d{3}, "[^"]+", "([a-z_]+)"', r'return \d{3}, "[^"]+", "([a-z_]+)"',
            r'codes\.get\([^\n]*, "([a-z_]+)"\)', r'code, message = "([a-z_]+)"', r'\{"code": "([a-z_]+)"',
            r'^    "\w+": "([a-z]+_[a-z_]+)",$']
#: Base-class defaults that are always replaced before anyone sees them.
NEVER_SHOWN = {"error", "temporary"}


def emitted_codes() -> dict[str, set[str]]:
    """Every code the source can emit -> the files that emit it (the API's STATUS map included)."""
    found: dict[str, set[str]] = {code: {"STATUS"} for code in STATUS}
    for path in (ROOT / "cynchrod").rglob("*.py"):
        text = path.read_text()
        where = str(path.relative_to(ROOT))
        for pattern in PATTERNS:
            for code in re.findall(pattern, text, flags=re.MULTILINE):
                found.setdefault(code, set()).add(where)
        for name in re.findall(r"\bCode\.([A-Z][A-Z_]+)\b", text):
            found.setdefault(Code[name].value, set()).add(where)
    for code in NEVER_SHOWN:
        found.pop(code, None)
    return found


def test_the_scan_finds_codes_of_every_kind() -> None:
    found = emitted_codes()
    assert {"yaml_syntax", "missing_key", "unknown_key", "out_of_range", "duplicate_domain", "invalid_path",
            "app_stopped", "usage", "superseded", "crash_loop", "oom_killed", "uri_too_long", "bad_request",
            "http_error", "token_revoked", "stream_ended", "pass_crashed", "passes_stalled"} <= set(found)


def test_every_error_code_is_explained() -> None:
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    missing = sorted(code for code in {*emitted_codes(), *(c.value for c in Code)} if f"`{code}`" not in doc)
    assert missing == []


def test_the_readme_links_it() -> None:
    assert "(docs/troubleshooting.md)" in (ROOT / "README.md").read_text()
