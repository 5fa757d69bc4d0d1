"""One error tree: every exception class of the package is a ``CynchrodError`` defined in
``cynchrod/core/errors.py`` (other modules may re-export one under a name of their own), and the
front server's error table takes its statuses from the registry (issue 20, item 4)."""

from __future__ import annotations

import ast
import builtins
import importlib
import pathlib
import pkgutil
import subprocess
import sys

import cynchrod
from cynchrod.core import codes, errors
from cynchrod.core.codes import Code
from cynchrod.core.errors import CynchrodError
from cynchrod.daemon import apiworker

ROOT = pathlib.Path(__file__).resolve().parents[2]
ERRORS = ROOT / "cynchrod" / "core" / "errors.py"
#: Modules not imported here: they act on import (run the CLI, patch with gevent); the source scan covers them.
SKIP_IMPORT = {"cynchrod.__main__", "cynchrod.daemon.apiserver"}
#: Names a class may derive from that make it an exception: the builtin ones and the tree's.
EXCEPTION_NAMES = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)} \
    | {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, BaseException)}


def _subclasses(base: type) -> list[type]:
    out = []
    for sub in base.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_every_exception_class_of_the_package_is_in_the_tree() -> None:
    for info in pkgutil.walk_packages(cynchrod.__path__, "cynchrod."):
        if info.name not in SKIP_IMPORT:
            importlib.import_module(info.name)
    ours = {c for c in _subclasses(BaseException) if c.__module__.startswith("cynchrod")}
    assert len(ours) >= 30
    outside = sorted(f"{c.__module__}.{c.__qualname__}" for c in ours
                     if c.__module__ != "cynchrod.core.errors" or not issubclass(c, CynchrodError))
    assert outside == []


def test_no_module_but_errors_defines_an_exception_class() -> None:
    """The same by reading the source (modules not imported above, classes made under a condition)."""
    found = []
    for path in sorted((ROOT / "cynchrod").rglob("*.py")):
        if path == ERRORS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases}
                if bases & EXCEPTION_NAMES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: class {node.name}({', '.join(bases)})")
    assert found == []


def test_the_scan_would_see_one() -> None:
    tree = ast.parse("class Oops(RuntimeError):\n    pass\nclass Mine(errors.TemporaryError):\n    pass\n")
    names = [{ast.unparse(b).rsplit(".", 1)[-1] for b in n.bases} for n in tree.body if isinstance(n, ast.ClassDef)]
    assert all(b & EXCEPTION_NAMES for b in names)


def test_the_front_servers_errors_are_registered_with_their_status() -> None:
    seen = set()
    for kind, code, reason, _message in apiworker.FRONT_ERRORS:
        assert Code.of(code) is code and code.kind == codes.FRONT and code.http is not None, code
        status, said_reason, said_code, _ = apiworker.front_error(kind.__new__(kind))
        assert (status, said_reason, said_code) == (code.http, reason, code.value)
        seen.add(code)
    bad = apiworker.front_error(apiworker.http_errors.InvalidHeader.__new__(apiworker.http_errors.InvalidHeader))
    assert bad[0] == Code.BAD_REQUEST.http and bad[2] == Code.BAD_REQUEST
    assert apiworker.front_error(ValueError())[:3:2] == (Code.INTERNAL.http, Code.INTERNAL)
    # Every front code but bad_request (the parse errors' fallback) has its row.
    assert seen | {Code.BAD_REQUEST} == {c for c in Code if c.kind == codes.FRONT}


def test_a_body_that_does_not_arrive_is_body_timeout() -> None:
    """``api._deadline`` under gevent raises the tree's ``BodyTimeout`` (408), not a private exception."""
    script = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import gevent\n"
        "from cynchrod import api\n"
        "try:\n"
        "    with api._deadline(0.05):\n"
        "        gevent.sleep(5)\n"
        "except api.CynchrodError as exc:\n"
        "    print(type(exc).__name__, exc.code, api.status_of(exc))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.split() == ["BodyTimeout", "body_timeout", "408"], out.stderr
