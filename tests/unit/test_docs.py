"""docs/troubleshooting.md explains every error code the code can produce."""

from __future__ import annotations

import pathlib
import re

from cynchrod.api import STATUS

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Where codes are written in the source: code=..., class attributes, API errors, manifest
#: errors (fail/err helpers), error_code columns set in SQL and the HTTP error map.
PATTERNS = [r'code="([a-z_]+)"', r'code = "([a-z_]+)"', r'ApiError\("([a-z_]+)"', r'error_response\("([a-z_]+)"',
            r'fail\([^\n]*?"([a-z]+_[a-z_]+)"(?:, [^\n]*)?\)$', r'err\([^\n]*?", "([a-z_]+)"',
            r"error_code = '([a-z_]+)'", r'\d{3}: "([a-z_]+)"', r'f"(crash_loop|oom_killed):']
#: Base-class defaults that are always replaced before anyone sees them.
NEVER_SHOWN = {"error", "temporary"}


def test_every_error_code_is_explained() -> None:
    found: set[str] = set(STATUS)
    for path in (ROOT / "cynchrod").rglob("*.py"):
        text = path.read_text()
        for pattern in PATTERNS:
            found.update(re.findall(pattern, text, flags=re.MULTILINE))
    found -= NEVER_SHOWN
    assert {"yaml_syntax", "missing_key", "app_stopped", "usage", "superseded", "crash_loop"} <= found  # the scan works
    doc = (ROOT / "docs" / "troubleshooting.md").read_text()
    missing = sorted(code for code in found if f"`{code}`" not in doc)
    assert missing == []


def test_the_readme_links_it() -> None:
    assert "(docs/troubleshooting.md)" in (ROOT / "README.md").read_text()
