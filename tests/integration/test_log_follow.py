"""The local driver's live log follower against a real engine whose json-file logs rotate."""

from __future__ import annotations

import threading
import time

import pytest

from cynchrod import runtime
from cynchrod.runtime import CUT_MARK, _docker, local
from tests.conftest import Harness
from tests.helpers import TEST_IMAGE, breaks, numbers_until, wait_for


def test_a_rotation_that_sends_the_last_line_again_gives_it_once(repo, harness: Harness,  # type: ignore[no-untyped-def]
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Each line is its own write, so its own read and timestamp; the logs rotate every 20 KB
    (lowered here from the 10 MB apps get): four rotations, within the questions ``_Given``
    may ask at once. At each rotation the new file holds one line when
    the engine's follower reaches its end; Docker 20.10's follower then takes the new, smaller
    file for a truncated one and sends it from the start: that line again, with the timestamp
    given last, as the rest of a read would come. Each line comes once, none is lost."""
    monkeypatch.setattr(_docker, "LOG_CONFIG", {"type": "json-file", "config": {"max-size": "20k", "max-file": "3"}})
    writer = ("[sh, -c, 'x=$(printf %1000s | tr \" \" x); i=0;"
              " while [ $i -lt 80 ]; do echo \"line $i $x\"; i=$((i+1)); sleep 0.02; done; sleep 3600']")
    repo.push({"apps/writer.yaml": f"name: writer\nimage: {TEST_IMAGE}\ncommand: {writer}\nmemory: 64\n"})
    assert harness.sync().ok
    follower = harness.rt.follow("default", "writer", since=time.time() - 60)  # from its first line
    try:
        numbers = numbers_until(follower, 79)
    finally:
        # The writer is quiet now: closing ends the readers blocked on their streams at once.
        closing = threading.Thread(target=follower.close, daemon=True)
        closing.start()
        closing.join(10)
    assert not closing.is_alive(), "closing a quiet app's follower waited for its next line"
    assert (numbers[:1], numbers[-1:], breaks(numbers)) == ([0], [79], [])


def test_a_tty_containers_log_has_no_frame_headers_and_gives_whole_lines(  # type: ignore[no-untyped-def]
        docker_client, owner: str, images) -> None:
    """A container made with a TTY (by hand: labelled as an app's unit) logs one raw stream, no
    multiplexing headers, its lines ending in ``\\r\\n``: the tail, the last lines and the live
    follower give its lines whole, without the ``\\r``, a 40 KiB line joined from its pieces and cut."""
    rt = local.LocalRuntime(owner=owner, stop_timeout=1)
    script = ("echo 'hello 1'; echo 'hello 2'; head -c 40960 /dev/zero | tr '\\0' x; echo; echo after; echo END;"
              " sleep 3600")
    labels = {runtime.LABEL_OWNER: owner, runtime.LABEL_INSTANCE: rt.instance, runtime.LABEL_ORG: "default",
              runtime.LABEL_APP: "tty", runtime.LABEL_SERVICE: "main", runtime.LABEL_REPLICA: "0"}
    made = docker_client.api.create_container(TEST_IMAGE, ["sh", "-c", script], tty=True, labels=labels)
    docker_client.api.start(made["Id"])
    wait_for(lambda: b"END" in docker_client.api.logs(made["Id"], tail=1), 30, "the container's lines")
    expected = [("hello 1", False), ("hello 2", False), ("x" * 32 * 1024 + CUT_MARK, True), ("after", False),
                ("END", False)]
    assert [(line.line, line.truncated) for line in rt.tail("default", "tty", 10)] == expected
    assert [(line.line, line.truncated) for line in rt.tail("default", "tty", 2)] == expected[-2:]
    (unit,) = rt.app_units("default", "tty")
    assert rt.last_lines(unit, 3) == [text for text, _ in expected[-3:]]
    follower = rt.follow("default", "tty", since=time.time() - 60)
    timer = threading.Timer(30, follower.close)
    timer.start()
    got: list[tuple[str, bool]] = []
    try:
        for batch in follower.batches():
            got += [(line.line, line.truncated) for line in batch]
            if got and got[-1][0] == "END":
                break
    finally:
        timer.cancel()
        follower.close()
    assert got == expected


def test_the_repeat_check_counts_a_timestamp_the_last_lines_no_longer_reach(  # type: ignore[no-untyped-def]
        repo, harness: Harness) -> None:
    """The rotation check (``Given``'s ``verify``) asks how many lines the log holds with a
    timestamp. A follower behind a writer that went on (CI: a 16,000-line flood, the follower
    at line 9,253) asks about a line older than the log's last ``VERIFY_TAIL`` lines: the log
    is read from just before that timestamp instead of answering 'unknown' (which let a repeat
    through), and the read stops soon after it."""
    writer = "[sh, -c, 'i=0; while [ $i -lt 5000 ]; do echo \"line $i\"; i=$((i+1)); done; sleep 3600']"
    repo.push({"apps/writer.yaml": f"name: writer\nimage: {TEST_IMAGE}\ncommand: {writer}\nmemory: 64\n"})
    assert harness.sync().ok
    (unit,) = harness.rt.app_units("default", "writer")
    api = harness.rt.api
    wait_for(lambda: b"line 4999" in api.logs(unit.instance, tail=1), 30, "the writer's 5000 lines")
    with _docker.container_logs(api, unit.instance) as frames:
        keys = [_docker.stamp_key(head) for head, _, _ in _docker.whole_lines(frames)]
    assert len(keys) == 5000
    early = keys[10]
    assert keys.index(early) < 5000 - local._AppLogs.VERIFY_TAIL - 1  # beyond what the tail reads
    follower = harness.rt.follow("default", "writer", since=time.time())
    assert isinstance(follower, local._AppLogs)
    try:
        assert follower._logged_at(unit.instance, early, 1) == keys.count(early)
        last = keys[-1]
        assert follower._logged_at(unit.instance, last, 1) == keys.count(last)  # the tail's answer, as before
    finally:
        follower.close()
