"""Long log lines (issue 24 item 7): the engine cuts a line into 16 KiB pieces, each its own
message with its own timestamp prefix. The tail and the live stream give whole lines joined from
the pieces, each at most 32 KiB with a visible marker and ``truncated`` past that, on the runtime
(both ways of reading) and through the API (REST tail, WebSocket), and no WebSocket message is
longer than 64 KiB, even for a line whose JSON escapes are six times its text.

Real dockerd and a real daemon; the app prints, each round: a short line, a 100 KiB line of ``a``,
a 40 KiB line of control characters (``\\x01``: ``\\u0001`` in JSON), a short line, a stderr line.
"""

from __future__ import annotations

import json
import pathlib
import re
import threading
import time

import requests

from cynchrod.cli.client import websocket
from cynchrod.runtime import CUT_MARK, LogLine
from tests.conftest import Harness
from tests.helpers import GitRepo, manifest, new_token, wait_for

PRINTER = ("[sh, -c, 'i=0; while true; do echo \"before $i\"; head -c 102400 /dev/zero | tr \"\\0\" a; echo;"
           " head -c 40960 /dev/zero | tr \"\\0\" \"\\001\"; echo; echo \"after $i\"; echo \"err $i\" >&2;"
           " i=$((i+1)); sleep 1; done']")
LONG_A = "a" * 32 * 1024 + CUT_MARK
LONG_CTRL = "\x01" * 32 * 1024 + CUT_MARK
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z")


def round_of(lines: list[tuple[str, bool]], i: int) -> list[tuple[str, bool]]:
    """The stdout lines of round ``i``, from its first line to its last, without the stderr lines.

    The engine reads stdout and stderr apart and stamps each line when it reads it, so a round's
    stderr line can come anywhere: inside the round (a followed stream may give it before the end
    of the 40 KiB line written before it) or before the round's first line (CI, on loaded cores:
    the round's 141 KiB of stdout waited in the shim's buffers and the engine's own log file has
    ``err 2`` 8 ms before ``before 2``). ``stderr_lines`` counts those."""
    out = [x for x in lines if not x[0].startswith("err ")]
    start = out.index((f"before {i}", False))
    return out[start:out.index((f"after {i}", False), start) + 1]


def stderr_lines(lines: list[tuple[str, bool]]) -> list[str]:
    return [text for text, _ in lines if text.startswith("err ")]


EXPECTED = [("before {i}", False), (LONG_A, True), (LONG_CTRL, True), ("after {i}", False)]


def expected(i: int) -> list[tuple[str, bool]]:
    return [(text.format(i=i) if len(text) < 100 else text, cut) for text, cut in EXPECTED]


def test_the_runtime_tail_and_follow_give_whole_lines_cut_at_32_kib(repo: GitRepo, harness: Harness) -> None:
    started = time.time() - 1
    repo.push({"apps/long.yaml": manifest("long", command=PRINTER)})
    assert harness.sync().ok
    wait_for(lambda: any(x.line == "after 1" for x in harness.rt.tail("default", "long", 40)), 30, "two rounds")
    tail = harness.rt.tail("default", "long", 40)
    assert all(not STAMP.search(x.line) for x in tail), "a piece's timestamp inside a line"
    assert round_of([(x.line, x.truncated) for x in tail], 1) == expected(1)
    assert next(x for x in tail if x.truncated).to_json()["truncated"] is True
    assert "truncated" not in tail[-1].to_json()

    follower = harness.rt.follow("default", "long", since=started)
    timer = threading.Timer(30, follower.close)  # a stream that stops short ends the test
    timer.start()
    got: list[LogLine] = []
    try:
        for batch in follower.batches():
            got += batch
            if {"after 2", "err 2"} <= {x.line for x in got}:
                break
    finally:
        timer.cancel()
        follower.close()
    followed = [(x.line, x.truncated) for x in got]
    assert all(not STAMP.search(text) for text, _ in followed)
    for i in range(3):
        assert round_of(followed, i) == expected(i)
        assert stderr_lines(followed).count(f"err {i}") == 1
    # Given once: no line of a round twice.
    assert [text for text, _ in followed].count("before 1") == 1


def test_the_api_tail_and_websocket_give_whole_lines_in_messages_of_at_most_64_kib(  # type: ignore[no-untyped-def]
        repo: GitRepo, daemons, tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    token = new_token(state, "default", "t")
    headers = {"Authorization": f"Bearer {token}"}
    repo.push({"apps/long.yaml": manifest("long", command=PRINTER)})
    daemon = daemons(interval=300, env={"CYNCHROD_WORKERS": "2"}).start()

    def app_id() -> str | None:
        try:
            apps = requests.get(daemon.api + "/apps", headers=headers, timeout=2).json()["apps"]
        except (requests.RequestException, ValueError, KeyError):
            return None
        return apps[0]["id"] if apps and apps[0]["status"] == "running" else None

    wait_for(app_id, 60, "the app to run")
    ident = app_id()

    def tail() -> list[dict[str, object]]:
        body = requests.get(f"{daemon.api}/apps/{ident}/logs?tail=40", headers=headers, timeout=10).json()
        return list(body["lines"])

    wait_for(lambda: any(x["line"] == "after 0" for x in tail()), 30, "a round in the tail")
    lines = tail()
    assert all(not STAMP.search(str(x["line"])) for x in lines)
    assert round_of([(str(x["line"]), bool(x.get("truncated"))) for x in lines], 0) == expected(0)

    ws = websocket(daemon.api.replace("http://", "ws://") + f"/apps/{ident}/logs/stream?token={token}")
    sizes: list[int] = []
    received: list[dict[str, object]] = []

    def a_whole_round() -> bool:  # its stdout lines (the stream may have begun after its stderr line)
        texts = [str(x["line"]) for x in received]
        starts = [i for i, text in enumerate(texts) if text.startswith("before ")]
        i = texts[starts[0]].split()[1] if starts else ""
        return bool(starts) and f"after {i}" in texts[starts[0]:]

    try:
        deadline = time.monotonic() + 30
        while not a_whole_round():
            assert time.monotonic() < deadline, "two rounds on the WebSocket"
            message = ws.receive(timeout=10)
            assert message is not None
            data = message.encode() if isinstance(message, str) else message
            sizes.append(len(data))
            received += json.loads(data)
    finally:
        ws.close()
    assert max(sizes) <= 64 * 1024, sorted(sizes)[-5:]
    texts = [str(x["line"]) for x in received]
    assert all(not STAMP.search(text) for text in texts)
    first = next(int(text.split()[1]) for text in texts if text.startswith("before "))
    whole = round_of([(str(x["line"]), bool(x.get("truncated"))) for x in received], first)
    assert [(t if not c else t[:1], c) for t, c in whole] == [
        (f"before {first}", False), ("a", True), ("\x01", True), (f"after {first}", False)]
    # The line of letters is the runtime's 32 KiB; the control characters' JSON (six bytes each)
    # is cut further to fit a message, with the same marker.
    assert whole[1][0] == LONG_A
    assert whole[2][0].endswith(CUT_MARK) and set(whole[2][0].removesuffix(CUT_MARK)) == {"\x01"}
