"""Property-based fuzzing of the manifest parser: no input makes it raise, and what it accepts is sane.

Issue 13, item 2/3: one file must never stop a pass. The generators below make
manifest-shaped YAML with odd values in every position (shell strings with
unclosed quotes, NaN and infinities, huge integers, deep nesting, tags,
anchors and aliases, non-string keys, control characters, surrogate escapes)
and plain random bytes; the properties are that ``manifests.parse`` returns,
that every error is ``file:line: code: message`` with a documented code, and
that every accepted spec holds only finite numbers within the real limits and
can be recorded in a real store.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cynchrod import store
from cynchrod.core import specs
from cynchrod.desired import manifests

CODES = {
    "yaml_syntax", "yaml_alias", "yaml_too_deep", "manifest_too_large", "invalid_manifest", "invalid_type",
    "missing_key", "unknown_key", "invalid_value", "out_of_range", "policy_violation", "org_forbidden",
}
ERROR_LINE = re.compile(r"^apps/fuzz\.yaml:(\d+): ([a-z_]+): .+", re.S)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Raw YAML scalars that mean something odd to a YAML parser or to us.
ODD_SCALARS = [
    ".nan", ".NaN", ".inf", "-.inf", "+.inf", "1e400", "-1e400", "9" * 5000, "0x" + "f" * 300, "1e-300",
    "0.0000000001", "-0", "0o17", "~", "null", "yes", "no", "2001-12-14", "2001-12-14t21:59:43.10-05:00",
    "'unclosed", '"a \'b"', "\"echo 'x\"", "\"\\udcff\"", "\"a\\0b\"", "\"\\x01\"", "!!binary aGVsbG8=",
    "!!set {a, b}", "!!omap [{a: 1}]", "!foo bar", "!!python/object:os.system x", "&a x", "*a", "[*a]",
    "{? [a, b]: c}", "{1: 2}", "{null: 1}", "{[1]: 2}", "!!float nan", "!!int 1", "!!str 1", "|\n  x",
    "''", '""', "[]", "{}", "[[[[[[[]]]]]]]", "{a: {b: {c: {d: {}}}}}", "1_000", "0.5", "8.0000001",
    "63", "16385", "-1", "65536", "true", "\"$(id)\"", "\"a\\nb\"",
]
KEYS = ["name", "org", "image", "command", "port", "hostPort", "domain", "env", "cpu", "memory", "state",
        "restartedAt", "volumes", "secrets", "healthcheck", "services", "build", "privileged", "unknown",
        "1", "null", "? [x]", "\"\\udcff\"", "a\tb"]


def _flow(value: Any) -> str:
    """A value as YAML flow text; ``str`` values starting with '@raw:' are written as they are."""
    if isinstance(value, str) and value.startswith("@raw:"):
        return value[5:]
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flow(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return json.dumps(value)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
    st.sampled_from(ODD_SCALARS).map(lambda s: "@raw:" + s),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(KEYS)), inner,
                                                 max_size=4)), max_leaves=20)


def _service_like() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={
        "image": st.one_of(st.just("busybox:1"), values), "command": st.one_of(st.text(max_size=40), values),
        "port": st.one_of(st.integers(-5, 70000), values), "hostPort": st.integers(0, 70000),
        "cpu": st.one_of(st.floats(), st.integers(-2, 10), values), "memory": st.one_of(st.integers(), values),
        "env": st.dictionaries(st.text(max_size=8), values, max_size=3), "volumes": values, "secrets": values,
        "healthcheck": st.fixed_dictionaries({"test": st.one_of(st.text(max_size=20), values)}, optional={
            "interval": st.one_of(st.floats(), values), "timeout": st.floats(), "retries": st.integers(),
            "start_period": st.floats()}),
        "build": st.fixed_dictionaries({"repo": values}, optional={"context": values, "dockerfile": values}),
    })


manifest_like = st.builds(
    lambda base, top, extra: {**base, **top, **extra},
    st.fixed_dictionaries({"name": st.one_of(st.just("web"), st.text(max_size=70), values)}),
    _service_like(),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=3),
).flatmap(lambda m: st.one_of(st.just(m), st.fixed_dictionaries(
    {"name": st.just("shop"), "services": st.dictionaries(st.sampled_from(["db", "web", "x"]), _service_like(),
                                                          max_size=3)})))


def _block(manifest: dict[str, Any]) -> str:
    return "".join(f"{_flow(k)}: {_flow(v)}\n" for k, v in manifest.items())


def check(raw: bytes, db: store.Store | None = None) -> manifests.Result:
    result = manifests.parse("apps/fuzz.yaml", raw)  # the property: this returns
    if result.spec is None:
        assert result.errors
        for error in result.errors:
            match = ERROR_LINE.match(str(error))
            assert match, str(error)
            assert int(match.group(1)) >= 1 and match.group(2) in CODES, str(error)
        return result
    assert not result.errors
    spec = result.spec
    for service in spec.services:
        assert 0.01 <= service.cpu <= 8 and math.isfinite(service.cpu)
        assert 64 <= service.memory <= 16384
        assert service.command is None or all(isinstance(a, str) for a in service.command)
        if service.healthcheck is not None:
            h = service.healthcheck
            for seconds in (h.interval, h.timeout):
                assert math.isfinite(seconds) and 0.001 <= seconds <= 3600
            assert h.start_period == 0 or 0.001 <= h.start_period <= 3600
    assert spec.hash  # the spec hash (labels, drift) can be computed
    if db is not None:  # and recorded
        app = db.ensure_app(spec, commit="c" * 40)
        db.record_spec(app, spec, commit="c" * 40)
    return result


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> store.Store:
    return store.Store(tmp_path_factory.mktemp("fuzz") / "cynchrod.db")


@FUZZ
@given(manifest=manifest_like)
def test_manifest_shaped_yaml_never_raises(manifest: dict[str, Any], db: store.Store) -> None:
    check(_block(manifest).encode("utf-8", "surrogatepass"), db)


@FUZZ
@given(raw=st.binary(max_size=400))
def test_random_bytes_never_raise(raw: bytes) -> None:
    check(raw)


@FUZZ
@given(prefix=st.sampled_from(["", "name: web\nimage: i\n"]), text=st.text(max_size=200))
def test_random_text_never_raises(prefix: str, text: str) -> None:
    check((prefix + text).encode("utf-8", "surrogatepass"))


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(1, 20000), kind=st.sampled_from(["[", "{a: ", "- "]))
def test_deep_nesting_is_an_error_not_a_recursion(depth: int, kind: str) -> None:
    if kind == "- ":
        body = "".join("  " * i + "-\n" for i in range(min(depth, 3000)))
    else:
        body = kind * depth + ("]" if kind == "[" else "}") * depth
    result = check(f"name: web\nimage: i\nenv: {body}\n".encode())
    if depth > 40:
        assert result.spec is None


def test_the_issue_cases_are_located_errors() -> None:
    """The cases named in the issue, each with its code and line."""
    cases = {
        b"name: web\nimage: i\ncommand: \"echo 'unclosed\"\n": "apps/fuzz.yaml:3: invalid_value: command:",
        b"name: web\nimage: i\ncpu: .nan\n": "apps/fuzz.yaml:3: out_of_range: cpu: must be a finite number",
        b"name: web\nimage: i\ncpu: 0.0000000001\n": "apps/fuzz.yaml:3: out_of_range: cpu:",
        b"name: web\nimage: i\nhealthcheck: {test: x, interval: .nan}\n": "apps/fuzz.yaml:3: out_of_range:",
        b"name: web\nimage: i\nmemory: " + b"9" * 5000 + b"\n": "apps/fuzz.yaml:",
        b"name: web\nimage: i\nenv: " + b"[" * 50000 + b"\n": "apps/fuzz.yaml:3: yaml_",
        b"name: web\nimage: i\nenv: {A: \"\\udcff\"}\n": "apps/fuzz.yaml:3: invalid_value:",
        b"name: web\nimage: i\n1: 2\n": "apps/fuzz.yaml:3: invalid_type: keys must be strings",
    }
    for raw, start in cases.items():
        result = check(raw)
        assert result.spec is None and str(result.errors[0]).startswith(start), (raw[:60], result.errors)


def test_specs_record_as_json(tmp_path: pathlib.Path) -> None:
    """Sanity of the oracle: a good manifest passes every check, including being recorded."""
    result = check(b"name: web\nimage: i\ncpu: 0.01\nmemory: 64\ncommand: \"sh -c 'echo hi'\"\n",
                   store.Store(tmp_path / "db"))
    assert result.spec is not None and result.spec.services[0].command == ("sh", "-c", "echo hi")
    assert specs.DEFAULT_CPU == 1
