"""Compose's variable interpolation and ``.env`` files, without the daemon's environment.

Called by ``compose.load`` for every file of a compose app. The variables come from the app
directory's ``.env`` file only: never from cynchrod's own environment, which holds the daemon's
settings and may hold its secrets. The grammar is Compose's: ``$$`` is a literal ``$``; ``$VAR`` and
``${VAR}``; ``${VAR:-default}`` (unset or empty) and ``${VAR-default}`` (unset); ``${VAR:?message}`` and
``${VAR?message}`` (an error); ``${VAR:+alternative}`` and ``${VAR+alternative}``; defaults may hold
further ``${...}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from cynchrod.core import errors

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENV_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*(?:=\s*(.*?))?\s*$")


InterpolationError = errors.InterpolationError


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``text`` with every variable replaced, as Compose does."""
    out, _ = _scan(text, 0, env, closing=False)
    return out


def _scan(text: str, i: int, env: Mapping[str, str], *, closing: bool) -> tuple[str, int]:
    """Expand from ``i``; with ``closing``, stop at the ``}`` that ends the enclosing ``${...}``."""
    parts: list[str] = []
    while i < len(text):
        ch = text[i]
        if closing and ch == "}":
            return "".join(parts), i
        if ch != "$":
            parts.append(ch)
            i += 1
            continue
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt == "$":
            parts.append("$")
            i += 2
        elif nxt == "{":
            value, i = _braced(text, i + 2, env)
            parts.append(value)
        elif (found := _NAME.match(text, i + 1)) is not None:
            parts.append(env.get(found.group(0), ""))
            i = found.end()
        else:
            raise InterpolationError(f"invalid interpolation format for {text!r}: a lone $ (write $$ for a $)")
    if closing:
        raise InterpolationError(f"invalid interpolation format for {text!r}: a ${{ without its }}")
    return "".join(parts), i


def _braced(text: str, i: int, env: Mapping[str, str]) -> tuple[str, int]:
    found = _NAME.match(text, i)
    if found is None:
        raise InterpolationError(f"invalid interpolation format for {text!r}: ${{ needs a variable name")
    name, i = found.group(0), found.end()
    if i >= len(text):
        raise InterpolationError(f"invalid interpolation format for {text!r}: a ${{ without its }}")
    if text[i] == "}":
        return env.get(name, ""), i + 1
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if text.startswith(op, i):
            break
    else:
        raise InterpolationError(f"invalid interpolation format for {text!r}: unexpected text after ${{{name}")
    arg, end = _scan(text, i + len(op), env, closing=True)
    value = env.get(name)
    unset_or_empty = not value
    missing = unset_or_empty if op.startswith(":") else value is None
    if op.endswith("-"):
        result = arg if missing else str(value)
    elif op.endswith("+"):
        result = "" if missing else arg
    else:
        if missing:
            raise InterpolationError(f"required variable {name} is missing a value: {arg}" if arg
                                     else f"required variable {name} is missing a value")
        result = str(value)
    return result, end + 1


def parse_env_file(text: str, *, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``KEY=VALUE`` lines as Compose reads them: ``#`` comments, ``export`` prefixes, single quotes
    literal, double quotes with ``\\n`` escapes, unquoted values ending at `` #``; values may use the
    variables defined above them (and those of ``base``). Raises ``InterpolationError`` with the line."""
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        found = _ENV_LINE.match(line)
        if found is None:
            raise _at(InterpolationError(f"expected KEY=VALUE, got {line.strip()[:60]!r}"), number)
        key, raw = found.group(1), found.group(2)
        if raw is None:
            continue  # a bare KEY: taken from the environment by Compose; there is none here
        scope = {**(base or {}), **env}
        try:
            if len(raw) >= 2 and raw[0] == raw[-1] == "'":
                value = raw[1:-1]
            elif len(raw) >= 2 and raw[0] == raw[-1] == '"':
                value = interpolate(raw[1:-1].replace("\\n", "\n").replace('\\"', '"'), scope)
            else:
                value = interpolate(re.split(r"\s+#", raw, maxsplit=1)[0].strip(), scope)
        except InterpolationError as exc:
            raise _at(exc, number) from None
        env[key] = value
    return env


def _at(exc: errors.InterpolationError, line: int) -> errors.InterpolationError:
    exc.line = line
    return exc
