"""The error-code registry (``cynchrod.core.codes``) against the code base, the API and the docs:
every code the source emits is in it (and it holds no other), the API's status map is derived
from it, the error classes agree with its permanence, and the OpenAPI document and the
troubleshooting page name no code it lacks, with the statuses it gives."""

from __future__ import annotations

import ast
import importlib
import json
import pathlib
import pkgutil
import re
from typing import Any

import pytest

import cynchrod
from cynchrod.api import STATUS
from cynchrod.core import codes
from cynchrod.core.codes import Code
from cynchrod.core.errors import CynchrodError
from tests.unit.test_docs import emitted_codes

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: A class whose code the registry knows with the other permanence, and why.
PERMANENCE_EXCEPTIONS = {
    # The engine's 409 (a name or a network taken mid-pass) inside the drivers: the next pass retries.
    ("cynchrod.core.errors", "EngineConflict"),
}
#: Error classes raised with a ``code=`` keyword, and the permanence that gives (``ClientError`` and
#: ``ApiError`` carry codes met elsewhere, so their own flag is not the code's).
RAISERS = {"PermanentError": True, "TemporaryError": False, "SourceError": False, "ManifestError": True,
           "YamlError": True, "Conflict": True}
#: Modules not imported to find the error classes: they act on import (run the CLI, patch with gevent).
SKIP_IMPORT = {"cynchrod.__main__", "cynchrod.daemon.apiserver"}
#: Words in the OpenAPI document's error descriptions that look like codes and are not.
NOT_CODES = {"deployment_id", "include_removed"}


def test_spellings_are_unique_and_lowercase() -> None:
    assert len({c.value for c in Code}) == len(Code)
    for code in Code:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", code.value), code
        assert code.name == code.value.upper()
        assert code.kind in codes.KINDS and code.summary


def test_members_are_their_strings() -> None:
    assert Code.QUOTA_EXCEEDED == "quota_exceeded"
    assert f"{Code.DOMAIN_TAKEN}: x" == "domain_taken: x"
    assert Code("crash_loop") is Code.CRASH_LOOP
    assert Code.of("unit_gone") is Code.UNIT_GONE and Code.of("nope") is None and Code.of(None) is None


def test_every_emitted_code_is_registered_and_every_registered_one_emitted() -> None:
    found = emitted_codes()
    assert {c: sorted(w) for c, w in found.items() if Code.of(c) is None} == {}
    assert sorted(c.value for c in Code if c.value not in found) == []


def test_the_api_status_map_is_the_registry() -> None:
    assert {c: Code(c).http for c in STATUS} == STATUS
    assert {c.value: c.http for c in Code if c.http is not None} == STATUS


def _classes(base: type) -> list[type]:
    out = []
    for sub in base.__subclasses__():
        out += [sub, *_classes(sub)]
    return out


def test_error_classes_agree_with_the_registry() -> None:
    for info in pkgutil.walk_packages(cynchrod.__path__, "cynchrod."):
        if info.name not in SKIP_IMPORT:
            importlib.import_module(info.name)
    seen = 0
    for cls in _classes(CynchrodError):
        if "code" not in vars(cls) or cls.code in ("error", "temporary"):
            continue
        code = Code.of(cls.code)
        assert code is not None, f"{cls.__module__}.{cls.__qualname__}: {cls.code}"
        if (cls.__module__, cls.__qualname__) not in PERMANENCE_EXCEPTIONS:
            assert code.permanent == cls.permanent, f"{cls.__qualname__}: {code} permanent={code.permanent}"
        seen += 1
    assert seen >= 20


def test_raising_sites_agree_with_the_registry() -> None:
    """``PermanentError(..., code="x")`` and the like: x is registered with that permanence."""
    wrong = []
    for path in (ROOT / "cynchrod").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func).rsplit(".", 1)[-1]
            for kw in node.keywords:
                if kw.arg == "code" and isinstance(kw.value, ast.Constant) and name in RAISERS:
                    code = Code.of(kw.value.value)
                    if code is None or code.permanent != RAISERS[name]:
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}(code={kw.value.value!r})")
    assert wrong == []


def _walk(value: Any, path: tuple[str, ...] = ()) -> Any:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, (*path, str(k)))
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, path)
    else:
        yield path, value


def test_the_openapi_document_names_registered_codes_with_their_status() -> None:
    doc = json.loads((ROOT / "cynchrod" / "api" / "openapi.json").read_text())
    named: set[str] = set()
    wrong = []
    for path, value in _walk(doc):
        if not isinstance(value, str):
            continue
        if "code" in path and "enum" in path:  # /healthz problems
            named.add(value)
            if Code.of(value) is None:
                wrong.append(f"{'/'.join(path)}: {value}")
        if path[-1] != "description" or len(path) < 2:
            continue
        status = next((p for p in reversed(path) if re.fullmatch(r"[45]\d\d", p)), None)
        for word in re.findall(r"\b[a-z]+(?:_[a-z]+)+\b", value):
            if word in NOT_CODES or (status is None and Code.of(word) is None):
                continue
            named.add(word)
            code = Code.of(word)
            if code is None:
                wrong.append(f"{'/'.join(path)}: {word} is not a registered code")
            elif status is not None and code.http is not None and str(code.http) != status \
                    and f"or {word}" not in value and f"; {word}" not in value:
                wrong.append(f"{'/'.join(path)}: {word} is {code.http}, listed under {status}")
    assert wrong == []
    assert {"uri_too_long", "app_exists", "push_conflict", "pass_crashed", "quota_exceeded"} <= named


@pytest.mark.parametrize("page", ["troubleshooting.md", "errors.md", "api.md"])
def test_the_docs_name_registered_codes_with_their_status(page: str) -> None:
    """Every code a docs table names is registered; in an API table (a status column) with its status."""
    wrong = []
    for line in (ROOT / "docs" / page).read_text().splitlines():
        row = re.match(r"\| (\d{3}) \| ((?:`[a-z_]+`(?:, )?)+) \|", line)
        plain = re.match(r"\| `([a-z_]+)` \|", line)
        if row:
            for code_text in re.findall(r"`([a-z_]+)`", row.group(2)):
                code = Code.of(code_text)
                if code is None or code.http != int(row.group(1)):
                    wrong.append(f"{row.group(1)} {code_text}: registry says {code and code.http}")
        elif plain and Code.of(plain.group(1)) is None:
            wrong.append(plain.group(1))
    assert wrong == []


def _bare_code_compares(source: str) -> list[tuple[int, str]]:
    """Comparisons (``==``, ``!=``, ``in``) and ``startswith`` against a registered code's spelling."""
    found = []
    for node in ast.walk(ast.parse(source)):
        texts: list[ast.expr] = []
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                texts += side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("startswith", "endswith"):
            for arg in node.args:
                texts += arg.elts if isinstance(arg, ast.Tuple) else [arg]
        for t in texts:
            if isinstance(t, ast.Constant) and isinstance(t.value, str) \
                    and Code.of(t.value.split(":", 1)[0].strip()) is not None:
                found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_code_is_compared_as_a_bare_string() -> None:
    """Codes are compared as registry members (``Code.QUOTA_EXCEEDED``), never as strings a typo
    would silently never match; stored codes are read back from columns, never from text."""
    wrong = [f"{path.relative_to(ROOT)}:{line}: {text}" for path in sorted((ROOT / "cynchrod").rglob("*.py"))
             for line, text in _bare_code_compares(path.read_text())]
    assert wrong == []
    assert [t for _, t in _bare_code_compares(
        'a == "domain_taken"\nb in ("x", "quota_exceeded")\nc.startswith("oom_killed:")\nd == Code.X\n')] == [
        "a == 'domain_taken'", "b in ('x', 'quota_exceeded')", "c.startswith('oom_killed:')"]


def test_the_healthz_enum_is_every_problem_healthz_names() -> None:
    """The OpenAPI document's ``/healthz`` problem codes are exactly those the daemon can report:
    the registry's health codes and the ones ``Daemon.health`` and ``Front.health`` write."""
    doc = json.loads((ROOT / "cynchrod" / "api" / "openapi.json").read_text())
    [enum] = [v for p, v in _walk_lists(doc) if p[-3:] == ("properties", "code", "enum") and "Health" in p]
    written = set()
    for module in ("daemon/wiring.py", "shell/front.py"):
        written |= {Code[n].value for n in re.findall(r'\{"code": Code\.([A-Z_]+)', (ROOT / "cynchrod" / module)
                                                                                   .read_text())}
    assert {c.value for c in Code if c.kind == codes.HEALTH} <= written
    assert sorted(enum) == sorted(written)


def _walk_lists(value: Any, path: tuple[str, ...] = ()) -> Any:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_lists(v, (*path, str(k)))
    elif isinstance(value, list):
        yield path, value
        for v in value:
            yield from _walk_lists(v, path)


def test_a_code_the_readme_names_is_registered() -> None:
    """The README keeps no list of codes (it links troubleshooting, which explains every one); a code
    it names in passing is a registered one. Snake-case words in backticks that are not codes are named here."""
    not_codes: set[str] = set()
    named = set(re.findall(r"`([a-z]+(?:_[a-z]+)+)`", (ROOT / "README.md").read_text()))
    assert sorted(n for n in named - not_codes if Code.of(n) is None) == []


def test_the_manifest_error_page_lists_every_manifest_code() -> None:
    page = (ROOT / "docs" / "errors.md").read_text()
    assert sorted(c.value for c in Code if c.kind == codes.MANIFEST and f"| `{c.value}` |" not in page) == []
