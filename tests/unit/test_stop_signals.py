"""The daemon's SIGTERM handling takes no lock.

Its first form called ``threading.Event.set()`` from the handler; Python runs a handler between
two bytecodes of the main thread, and when those were inside the Event's own ``wait`` (which
holds the Event's lock across a few bytecodes) the handler blocked on that lock for ever: a
daemon ignored SIGTERM in CI. These run in a child process, as a signal handler must.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

PRELUDE = textwrap.dedent("""
    import os, signal, threading, time
    from cynchrod.daemon import StopSignals
    stop = StopSignals(signal.SIGTERM, signal.SIGINT)
""")


def run(body: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True,
                          text=True, timeout=20)


def test_a_signal_in_the_middle_of_any_lock_is_only_a_flag() -> None:
    """The moment that hung the Event version: the handler runs while the waiting thread holds a lock."""
    out = run("""
        lock = threading.Lock()
        with lock:
            os.kill(os.getpid(), signal.SIGTERM)
            x = 1  # the handler runs about here
        started = time.monotonic()
        print(stop.wait(30), stop.received == signal.SIGTERM, time.monotonic() - started < 1)
    """)
    assert out.stdout.split() == ["True", "True", "True"], out.stderr


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_ends_a_long_wait_at_once(sig: str) -> None:
    out = run(f"""
        threading.Timer(0.2, os.kill, (os.getpid(), signal.{sig})).start()
        started = time.monotonic()
        print(stop.wait(30), round(time.monotonic() - started, 1))
    """)
    said, took = out.stdout.split()
    assert said == "True" and float(took) < 5, out.stderr


def test_no_signal_is_a_timeout() -> None:
    started = time.monotonic()
    out = run("print(stop.wait(0.3), stop.received)")
    assert out.stdout.split() == ["False", "None"], out.stderr
    assert time.monotonic() - started >= 0.3


def test_a_busy_process_stops_on_every_signal() -> None:
    """Signals at random moments of a loop of short waits, beside a thread that wants the GIL."""
    script = PRELUDE + textwrap.dedent("""
        import sys
        def busy():
            while True:
                sum(range(10000))
        threading.Thread(target=busy, daemon=True).start()
        print("ready", flush=True)
        while not stop.wait(0.001):
            pass
    """)
    for i in range(20):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.01 * (i % 7))
        proc.terminate()
        try:
            assert proc.wait(10) == 0
        finally:
            proc.kill()


def test_ctrl_c_before_a_command_handles_it_is_130_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's Ctrl-C reached ``serve`` while it still imported its modules: a traceback."""
    from cynchrod import cli

    def interrupted(argv: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    assert cli.main(["serve"]) == 130
    assert "Traceback" not in capsys.readouterr().err
