"""Item 12: the config watcher watches the config file, not the tree of the folder it sits in (real daemon)."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable

from tests.helpers import Daemon, GitRepo, wait_for


def _inotify_watches(pid: int) -> int:
    """inotify watches held by the daemon's processes (gunicorn's master and its worker)."""
    pids = [pid]
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            pids.append(int(stat.parent.name))
    count = 0
    for p in pids:
        for info in pathlib.Path(f"/proc/{p}/fdinfo").glob("*"):
            try:
                count += info.read_text().count("inotify wd:")
            except OSError:
                continue
    return count


def test_the_config_watcher_ignores_its_neighbours(repo: GitRepo, daemons: Callable[..., Daemon],
                                                   tmp_path: pathlib.Path) -> None:
    repo.push({"apps/.keep": ""})
    etc = tmp_path / "etc"
    for i in range(30):
        (etc / f"sub{i}" / "deeper").mkdir(parents=True)
    config = etc / "cynchrod.yaml"
    config.write_text("webhook: {secret: first-secret-0123456789}\n")
    # The followed repository's refs are watched too (a few watches of their own): off here,
    # so every watch counted below is the config file's.
    daemon = daemons(interval=300, env={"CYNCHROD_WATCH": "off"})
    daemon.args += ["--config", str(config)]
    daemon.start()
    daemon.wait_healthy()
    wait_for(lambda: _inotify_watches(daemon.proc.pid) > 0, 10, "the watcher")  # type: ignore[union-attr]
    # One watch (the folder, not recursive: an editor's save replaces the file); not one per subfolder.
    assert _inotify_watches(daemon.proc.pid) <= 2  # type: ignore[union-attr]
    before = daemon.output().count("change")
    with open(etc / "noise.log", "a") as noise:  # a log file next to the config, written 20 times a second
        for i in range(40):
            noise.write(f"line {i}\n")
            noise.flush()
            (etc / "sub3" / "deeper" / "x").write_text(str(i))
            time.sleep(0.05)
    time.sleep(0.5)
    assert daemon.output().count("change") == before, daemon.output()[-2000:]
    # An editor's atomic save (write a temporary file, rename it over the config) is still seen.
    tmp = etc / ".cynchrod.yaml.swp"
    tmp.write_text("webhook: {secret: second-secret-0123456789}\n")
    os.replace(tmp, config)
    wait_for(lambda: "config reloaded" in daemon.output(), 10, "the reload")
    assert daemon.stop() == 0

