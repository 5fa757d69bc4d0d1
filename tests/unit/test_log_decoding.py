"""Reading Docker's log messages into whole lines (the engine's 16 KiB pieces joined, a line cut
at 32 KiB), giving each line once, and encoding lines for the WebSocket."""

from __future__ import annotations

import collections
import json

from cynchrod.api.logs import PIECE_BYTES, encode_lines
from cynchrod.runtime import LogLine, _docker

S1, S2 = "2026-11-29T20:00:00.100000000Z", "2026-11-29T20:00:00.200000000Z"


def msg(head: str, text: bytes, *, ended: bool = True) -> bytes:
    """One engine message as docker-py's ``logs(stream=True)`` gives it: one frame's payload."""
    return head.encode() + b" " + text + (b"\n" if ended else b"")


def pieces(head: str, text: bytes) -> list[bytes]:
    """A long line as the engine cuts it: 16 KiB pieces, each with the first piece's head, the
    last alone ending in a newline."""
    parts = [text[i:i + 16384] for i in range(0, len(text), 16384)]
    return [msg(head, part, ended=i == len(parts) - 1) for i, part in enumerate(parts)]


def test_pieces_are_joined_by_head_and_a_line_past_32_kib_is_cut_with_a_marker() -> None:
    long_out, long_err = b"o" * 100 * 1024, b"e" * 40 * 1024
    out, err = pieces(S1, long_out), pieces(S2, long_err)
    # stdout's and stderr's pieces interleave, and a short line falls between them.
    frames = [msg("2026-11-29T20:00:00.000000001Z", b"first"), out[0], err[0], out[1],
              msg("2026-11-29T20:00:00.300000000Z", "short \u2603".encode()), *err[1:], *out[2:],
              msg("2026-11-29T20:00:00.400000000Z", b"")]
    lines = list(_docker.whole_lines(frames))
    assert [(head, len(text), cut) for head, text, cut in lines] == [
        ("2026-11-29T20:00:00.000000001Z", 5, False), ("2026-11-29T20:00:00.300000000Z", 7, False),
        (S2, 32 * 1024 + len(_docker.CUT_MARK), True), (S1, 32 * 1024 + len(_docker.CUT_MARK), True),
        ("2026-11-29T20:00:00.400000000Z", 0, False)]
    assert lines[2][1] == "e" * 32 * 1024 + _docker.CUT_MARK
    assert lines[1][1] == "short \u2603"
    # Exactly 32 KiB is whole; a byte more is cut.
    assert list(_docker.whole_lines(pieces(S1, b"x" * 32 * 1024))) == [(S1, "x" * 32 * 1024, False)]
    assert next(_docker.whole_lines(pieces(S1, b"x" * (32 * 1024 + 1))))[2] is True


def test_a_cut_inside_a_character_keeps_whole_characters_and_a_stream_ending_mid_line_gives_it() -> None:
    text = "\u2603".encode() * 20000  # 3 bytes each: 32 KiB falls inside one
    (_, line, cut), = _docker.whole_lines(pieces(S1, text))
    assert cut and line == "\u2603" * (32 * 1024 // 3) + _docker.CUT_MARK
    # A container's last output with no newline comes as a piece that never ends.
    assert list(_docker.whole_lines([msg(S1, b"a"), msg(S2, b"no newline", ended=False)])) == [
        (S1, "a", False), (S2, "no newline", False)]


def test_service_messages_join_by_task_and_details() -> None:
    task1, task2 = f"{S1} com.docker.swarm.task.id=t1", f"{S1} com.docker.swarm.task.id=t2"
    frames = [*pieces(task1, b"a" * 20000)[:1], *pieces(task2, b"b" * 20000), *pieces(task1, b"a" * 20000)[1:]]
    assert [(head, len(text)) for head, text, _ in _docker.whole_lines(frames, details=True)] == [
        (task2, 20000), (task1, 20000)]


def framed(message: bytes, output: int = 1) -> bytes:
    """One message as the engine's multiplexed stream sends it: an 8-byte header, then the message."""
    return bytes((output, 0, 0, 0)) + len(message).to_bytes(4, "big") + message


def cut_into(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def test_a_multiplexed_stream_read_in_chunks_of_any_size_gives_the_lines_of_its_messages() -> None:
    """The engine's stream as the HTTP client reads it: frames cut anywhere (a header too)."""
    messages = [msg(S1, b"short"), *pieces(S2, b"\xe2\x98\x83" * 15000), msg(S2, b""), msg(S1, b"x" * 40000),
                msg(S2, b"\xff bad utf-8"), msg(S1, b"tail, no newline", ended=False)]
    stream = b"".join(framed(m) for m in messages) + framed(b"")  # an empty frame: nothing
    expected = list(_docker.whole_lines(messages))
    assert [text[:5] for _, text, _ in expected] == ["short", "\u2603" * 5, "", "xxxxx", "\ufffd bad", "tail,"]
    for size in (1, 3, 8, 9, 4096, 16397, 65536):
        assert list(_docker.stream_lines(cut_into(stream, size))) == expected, size
    assert list(_docker.stream_lines([])) == []


def test_a_multiplexed_stream_joins_pieces_per_output_and_per_task() -> None:
    """stdout and stderr (the header's first byte) each with a long line begun under one head: two lines."""
    out, err = pieces(S1, b"o" * 20000), pieces(S1, b"e" * 20000)
    stream = framed(out[0], 1) + framed(err[0], 2) + framed(err[1], 2) + framed(out[1], 1)
    assert [(head, text[:1], len(text)) for head, text, _ in _docker.stream_lines([stream])] == [
        (S1, "e", 20000), (S1, "o", 20000)]
    task1, task2 = f"{S1} com.docker.swarm.task.id=t1", f"{S1} com.docker.swarm.task.id=t2"
    frames = [*pieces(task1, b"a" * 20000)[:1], *pieces(task2, b"b" * 20000), *pieces(task1, b"a" * 20000)[1:]]
    counts: dict[str, int] = collections.defaultdict(int)
    lines = list(_docker.stream_lines(cut_into(b"".join(map(framed, frames)), 1000), details=True, counts=counts))
    assert [(head, len(text)) for head, text, _ in lines] == [(task2, 20000), (task1, 20000)]
    assert counts == {"com.docker.swarm.task.id=t1": 2, "com.docker.swarm.task.id=t2": 2}


def test_a_tty_stream_has_no_headers_its_pieces_are_16_kib_and_its_lines_end_in_cr_lf() -> None:
    """A TTY's stream: messages one after the other; a piece of a long line is 16 KiB of text
    (the engine's copier's buffer) with no newline, followed by the next piece's head."""
    long = b"y" * 40000 + b"\r"
    parts = [long[i:i + 16384] for i in range(0, len(long), 16384)]
    stream = (S1.encode() + b" hello\r\n" + b"".join(S2.encode() + b" " + part for part in parts) + b"\n"
              + S1.encode() + b" \r\n" + S2.encode() + b" exactly\n" + S1.encode() + b" " + b"z" * 16384
              + S1.encode() + b" \n" + S2.encode() + b" the end, no newline")
    expected = [(S1, "hello", False), (S2, "y" * 32 * 1024 + _docker.CUT_MARK, True), (S1, "", False),
                (S2, "exactly", False), (S1, "z" * 16384, False), (S2, "the end, no newline", False)]
    for size in (1, 30, 31, 4096, 16384, 65536):
        assert list(_docker.stream_lines(cut_into(stream, size))) == expected, size
    counts: dict[str, int] = collections.defaultdict(int)
    assert list(_docker.stream_lines(cut_into(stream, 100), counts=counts)) == expected
    assert counts == {"": 9}


def test_a_tail_drops_a_first_line_that_may_have_begun_before_its_read_and_reads_further() -> None:
    """``tail=k`` counts the engine's messages: the window can begin inside a long line."""
    log = [msg(f"2026-11-29T20:00:0{i}.000000000Z", b"line %d" % i) for i in range(3)]
    log += pieces("2026-11-29T20:00:05.000000000Z", b"L" * 70000)  # five pieces
    log += [msg(f"2026-11-29T20:00:0{i}.500000000Z", b"line %d" % i) for i in range(6, 8)]
    asked: list[int] = []

    def read(k: int) -> list[bytes]:
        asked.append(k)
        return log[-k:]

    lines = _docker.tail_lines(read, 3)
    assert [text[:6] for _, text, _ in lines] == ["LLLLLL", "line 6", "line 7"] and lines[0][2]
    assert asked == [4, 16]  # 4 messages held only a piece of the long line: read again
    asked.clear()
    assert [text for _, text, _ in _docker.tail_lines(read, 2)] == ["line 6", "line 7"] and asked == [3]
    assert [text[:6] for _, text, _ in _docker.tail_lines(read, 50)] == ["line 0", "line 1", "line 2", "LLLLLL",
                                                                         "line 6", "line 7"]


def test_encoded_pieces_are_the_lines_json() -> None:
    kinds = [lambda i: LogLine("web", "2026-11-29T20:00:00.1Z", f'line {i} "quoted" \\ \t \u2603 \x00'),
             lambda i: LogLine("db", "2026-11-29T20:00:00.2Z", "", replica=2),
             lambda i: LogLine("api", "2026-11-29T20:00:00.3Z", f"x{i}", node="node-1")]
    lines = [kinds[i % 3](i) for i in range(3000)]
    pieces = encode_lines(lines)
    assert len(pieces) > 1
    assert all(len(text) < PIECE_BYTES + 200 for text, _ in pieces)
    assert sum(n for _, n in pieces) == len(lines)
    decoded = json.loads("[" + ",".join(text for text, _ in pieces) + "]")
    assert decoded == [line.to_json() for line in lines]
    assert encode_lines([]) == []


def stamp(ns: int) -> str:
    """Docker's form: RFC 3339 with the fraction's trailing zeros trimmed."""
    frac = f"{ns:09d}".rstrip("0")
    return f"2026-11-29T22:54:26{'.' + frac if frac else ''}Z"


def test_a_stream_opened_again_gives_no_line_twice_and_loses_none() -> None:
    """The engine's stream of one container, ended and opened again from a little before the
    last line given: lines sharing timestamps (one read from the container stamps them all)."""
    from cynchrod.runtime._docker import Given

    lines = [(stamp(ns), f"line {i}") for i, ns in enumerate([100, 100, 100, 200, 500000000, 500000000, 500000001,
                                                            600000000, 600000000, 700000000])]
    given, out = Given(), []
    for s, text in lines[:8]:  # ... up to the first line at .6
        if given.fresh(s):
            out.append(text)
    given.reopened()
    for s, text in lines[5:]:  # the new stream starts a little earlier
        if given.fresh(s):
            out.append(text)
    assert out == [text for _, text in lines]
    # Trailing zeros trimmed still sort in time order: .5 after .000000100, before .500000001.
    assert stamp(500000000) == "2026-11-29T22:54:26.5Z"


def test_a_repeat_after_a_rotation_is_dropped_and_a_line_out_of_order_is_kept() -> None:
    """json-file rotating under a follower: the engine sends the new file's first lines again
    (measured: 32 lines over 0.3 ms, 1,325 over 28 ms). A stderr line stamped a little before
    the stdout line given last is a line, not a repeat: its timestamp was never given."""
    from cynchrod.runtime._docker import Given

    given = Given()
    sent = [(100, "a"), (200, "b"), (200, "c"), (5000, "out"), (4000, "err"), (9000, "d")]
    assert [given.fresh(stamp(ns)) for ns, _ in sent] == [True] * 6
    # The rotation: back to the line at 200, then every line given again, then new ones.
    assert [given.fresh(stamp(ns)) for ns, _ in sent[1:]] == [False] * 5
    assert given.fresh(stamp(9500)) is True
    assert given.fresh(stamp(9400)) is True  # never given: a line a little out of order
    # Far back (more than WINDOW_S), whatever it is, is a repeat.
    assert given.fresh(stamp(300_000_000)) is True
    assert given.fresh(stamp(100)) is False


def test_remembered_timestamps_are_bounded() -> None:
    from cynchrod.runtime._docker import Given

    given = Given()
    for ns in range(0, 900_000_000, 100_000):  # 9,000 lines over 0.9 s
        given.fresh(stamp(ns))
        if ns % 10_000_000 == 0:
            given.forget()
    given.forget()
    assert len(given.recent) == len(given.recent_keys) <= 2600  # about WINDOW_S of them


def test_a_flowing_stream_is_given_as_the_engine_sends_it() -> None:
    """Past the point where it was opened, nothing is filtered: stdout and stderr lines may be a
    little out of time order, and lines may share a timestamp and a text (two blank lines)."""
    from cynchrod.runtime._docker import Given

    given = Given()
    sent = [stamp(7), stamp(7), stamp(9), stamp(8), stamp(9)]
    assert [given.fresh(s) for s in sent] == [True] * 5
    given.reopened()
    assert [given.fresh(s) for s in [stamp(8), stamp(9), stamp(9), stamp(9), stamp(10)]] == [False, False, False,
                                                                                             True, True]


def test_lines_sharing_a_timestamp_are_all_given() -> None:
    from cynchrod.runtime._docker import Given

    given = Given()
    assert [given.fresh(stamp(7)) for _ in range(5)] == [True] * 5
    given.reopened()
    assert [given.fresh(stamp(7)) for _ in range(6)] == [False] * 5 + [True]  # the five again, then a sixth


class Log:
    """``Given``'s question to the engine, answered from a list of the timestamps it holds."""

    def __init__(self, stamps: list[str]) -> None:
        self.stamps = stamps
        self.asked: list[tuple[str, int]] = []

    def __call__(self, key: str, given: int) -> int | None:
        from cynchrod.runtime._docker import stamp_key

        self.asked.append((key, given))
        return [stamp_key(s) for s in self.stamps].count(key)


def test_a_repeat_with_the_last_timestamp_is_dropped_when_the_log_holds_no_more() -> None:
    """A rotation whose new file held only lines stamped like the last one given: they come
    again with that timestamp. The log holds as many such lines as were given: a repeat."""
    from cynchrod.runtime._docker import Given, stamp_key

    log = Log([stamp(100), stamp(200), stamp(200), stamp(200)])
    given = Given(log)
    sent = [(100, "a"), (200, "b"), (200, "c"), (200, "d")]
    assert [given.fresh(stamp(ns), text) for ns, text in sent] == [True] * 4
    assert log.asked == []  # a line not seen with that timestamp is never asked about
    # The new file held "c" and "d": both again, then a newer line.
    assert [given.fresh(stamp(200), text) for text in ("c", "d")] == [False, False]
    assert log.asked == [(stamp_key(stamp(200)), 3)]
    assert given.fresh(stamp(300), "e") is True
    # A line in another stamp's texts is nothing: "e" at 300 is the last, "b" was at 200.
    assert given.fresh(stamp(300), "b") is True


def test_a_line_repeating_the_one_before_in_the_same_read_is_given() -> None:
    """Two blank lines written at once share a timestamp; the engine may send them in two
    parts. The log holds both: the second is a line, not a repeat."""
    from cynchrod.runtime._docker import Given

    log = Log([stamp(100), stamp(100)])
    given = Given(log)
    assert given.fresh(stamp(100), "") is True
    assert given.fresh(stamp(100), "") is True
    assert len(log.asked) == 1


def test_without_an_answer_or_past_the_budget_a_possible_repeat_is_given() -> None:
    """No engine to ask (the Swarm follower), an answer that does not reach back, or more
    questions than the budget: the line is given. A repeat may pass; a line is never lost."""
    from cynchrod.runtime._docker import Given

    given = Given()
    assert [given.fresh(stamp(100), "a") for _ in range(2)] == [True, True]
    unknown = Given(lambda key, n: None)
    assert [unknown.fresh(stamp(100), "a") for _ in range(2)] == [True, True]
    asked: list[str] = []

    def one_line(key: str, n: int) -> int:  # the log holds one line a timestamp: every second line repeats
        asked.append(key)
        return 1

    budget, answers = Given(one_line), []
    for i in range(1, Given.VERIFY_BURST + 4):
        assert budget.fresh(stamp(i * 100), "a") is True
        answers.append(budget.fresh(stamp(i * 100), "a"))
    # The first VERIFY_BURST asks (in a moment: none earned back) find the repeats; then they pass.
    assert answers == [False] * Given.VERIFY_BURST + [True] * 3
    assert len(asked) == Given.VERIFY_BURST


def test_a_service_stream_is_opened_again_from_before_its_least_chatty_task() -> None:
    """Swarm: one stream a service, a ``Given`` a task. Opened again from a little before the
    newest line given, a task whose last line given is older lost what it wrote in between;
    from before the oldest (within ``REOPEN_LOOKBACK_S`` of the newest) it loses nothing."""
    from cynchrod.runtime._docker import Given, stamp_seconds
    from cynchrod.runtime.swarm import REOPEN_LOOKBACK_S, reopen_since

    quiet, chatty = Given(), Given()
    assert quiet.fresh(stamp(100_000_000)) and chatty.fresh(stamp(900_000_000))
    since = reopen_since([quiet.last, chatty.last], start=0.0)
    assert since == stamp_seconds(stamp(100_000_000)) - 0.001
    # Opened again from there: each task drops what it gave and keeps what it had not.
    quiet.reopened()
    chatty.reopened()
    assert [quiet.fresh(stamp(ns)) for ns in (100_000_000, 500_000_000)] == [False, True]
    assert [chatty.fresh(stamp(ns)) for ns in (300_000_000, 900_000_000, 950_000_000)] == [False, False, True]
    # A task quiet (or gone) for long is not waited for; nothing given: the follower's start.
    old = "2026-11-29T22:40:00Z"
    assert reopen_since([old, chatty.last], 7.0) == stamp_seconds(chatty.last) - REOPEN_LOOKBACK_S - 0.001
    assert reopen_since(["", ""], 7.0) == 7.0
