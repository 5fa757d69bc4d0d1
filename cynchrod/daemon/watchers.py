"""What the daemon watches with watchfiles, and the threads that watch it.

``watches`` lists what changes wake a pass (local working trees' apps directories, local
repositories' refs) or reload the config file; ``run`` watches them, debounced, until the
daemon stops. Called by ``wiring.Daemon`` (``_watches``, ``_watch``).
"""

from __future__ import annotations

import logging
import pathlib
import threading
from collections.abc import Callable, Sequence

import watchfiles

from cynchrod.desired import config, source

log = logging.getLogger("cynchrod")
#: How long a watched repository's refs must be quiet before a push wakes a pass.
REF_QUIET_MS = 10
#: One watch: (paths, recursive, filter, action, quiet ms).
Watch = tuple[list[pathlib.Path], bool, Callable[[watchfiles.Change, str], bool], Callable[[], object], int]


def watches(settings: config.Settings, sources: Sequence[source.Followed], *, wake: Callable[[], object],
            reload: Callable[[], object]) -> list[Watch]:
    """What is watched, as (paths, recursive, filter, action, quiet ms), each as cheaply as it can be:

    * the apps directories of local working trees, recursively: a save wakes a pass
      once the folder has been quiet for 50 ms (an editor's save is several writes);
    * each local repository's ``refs/`` (recursively) and its folder (not recursively,
      for ``packed-refs``): a push moves a ref, after its objects are written, in one
      rename, so 10 ms of quiet is enough (watchfiles yields after one to two quiet
      periods: 50 ms made a push wait 50-100 ms for nothing);
    * the config file, through its folder (not recursively, filtered to its name: an
      editor's save replaces the file, which a watch on the file itself would lose).
    """
    plain = watchfiles.DefaultFilter()
    found: list[Watch] = []
    if settings.watch == "on":
        trees = [s.apps_dir for s in sources if isinstance(s, source.WorkTreeSource)]
        gits = [g for s in sources if (g := local_git_dir(s)) is not None]
        refs = [d for g in gits for d in (g / "refs", g / "reftable") if d.is_dir()]
        if trees:
            found.append((trees, True, lambda change, path: bool(plain(change, path)), wake, 50))
        if refs:
            found.append((refs, True, lambda change, path: bool(plain(change, path)), wake, REF_QUIET_MS))
        if gits:
            found.append((gits, False, lambda change, path: path.endswith("/packed-refs"), wake, REF_QUIET_MS))
    if settings.config_path:
        config_file = pathlib.Path(settings.config_path).resolve()
        only = str(config_file)
        found.append(([config_file.parent], False, lambda change, path: path == only, reload, 50))
    return [w for w in found if all(p.is_dir() for p in w[0])]


def run(watching: list[Watch], *, stop: threading.Event, poll_s: Callable[[], float]) -> None:
    """watchfiles, debounced, one thread per kind of watch (see ``watches``); ``poll_s``: the
    interval of the passes that pick up changes when a watcher stops."""
    def loop(paths: list[pathlib.Path], recursive: bool, wanted: Callable[[watchfiles.Change, str], bool],
             act: Callable[[], object], quiet_ms: int) -> None:
        try:
            for _ in watchfiles.watch(*paths, debounce=200, step=quiet_ms, stop_event=stop,
                                      raise_interrupt=False, recursive=recursive, watch_filter=wanted):
                log.debug("watch: %s changed", paths[0])
                act()
        except Exception:
            log.exception("the file watcher stopped; changes are picked up by the %ss poll", poll_s())

    first, *others = watching
    for watch in others:
        threading.Thread(target=loop, name="watch", daemon=True, args=watch).start()
    loop(*first)


def local_git_dir(src: source.Followed) -> pathlib.Path | None:
    """The git directory of a repository on this machine (bare or not) that ``src`` mirrors, else None.

    Its refs are watched, so a ``git push`` into it is applied at once without a webhook.
    """
    if isinstance(src, source.WorkTreeSource):
        return None  # its files on disk are watched instead
    url = src.url.removeprefix("file://")
    if "://" in url or not url.startswith("/"):
        return None
    root = pathlib.Path(url)
    for candidate in (root, root / ".git"):
        if (candidate / "HEAD").is_file() and (candidate / "refs").is_dir():
            return candidate.resolve()
    return None
