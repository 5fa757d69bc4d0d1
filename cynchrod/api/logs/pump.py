"""The pump of a log stream: one WebSocket client's loop, from its subscription to its close.

Called by the stream route (``routes.stream``). While it waits with nothing queued, the hub
writes messages to the client's socket itself (``hub.Client.offer``); what is left waits for
this loop. It also ends the stream when the token is revoked, the dashboard session that opened
it signs out or expires, or the app is removed (checked every second), with the close codes of ``frames``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from cynchrod import store
from cynchrod.api.logs.frames import CLOSE_NORMAL, CLOSE_UNAUTHORIZED, Frame, dropped_frame
from cynchrod.api.logs.hub import Client, subscribe, take, unsubscribe
from cynchrod.core.errors import CynchrodError

if TYPE_CHECKING:
    from cynchrod.shell.front import Front


def _send(sub: Client, frames: list[Frame]) -> None:
    """What the hub could not write at once, then these frames, written to this client's socket."""
    if not sub.ws.connected:
        raise ConnectionError("the client left")
    rest, sub.rest = sub.rest, b""
    sub.ws.sock.sendall(rest + sub.data(frames))


def pump(ws: Any, d: Front, token: store.Token, app: store.App, *, session: str | None = None) -> None:
    """Serve one client until it leaves; ``session`` (a hash) is the dashboard session that opened it."""
    sub = Client(ws)
    try:
        hub = subscribe(d, app, sub)
    except CynchrodError:
        ws.close(1011, "docker_unavailable")
        return
    last_check = time.monotonic()
    try:
        while ws.connected:
            sub.idle = True  # the hub may write to the socket while this waits (``Client.offer``)
            woke = sub.ready.wait(0.5)
            sub.idle = False
            if woke:  # the hub gathered lines it could not write itself (``Hub._flush``)
                sub.ready.clear()
                if sub.pieces or sub.dropped or sub.rest:
                    frames, dropped = take(sub)
                    _send(sub, [dropped_frame(dropped), *frames] if dropped else frames)
                elif sub.ended:
                    break
            if time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                if not d.store.is_live_token(token.id):
                    ws.close(CLOSE_UNAUTHORIZED, "token_revoked")
                    return
                if session is not None and not d.store.is_live_session(session):
                    ws.close(CLOSE_UNAUTHORIZED, "signed_out")
                    return
                now = d.store.app(app.id)
                if now is None or now.status == store.REMOVED:
                    ws.close(CLOSE_NORMAL, "app_removed")
                    return
        if ws.connected:
            ws.close(CLOSE_NORMAL, "stream_ended")
    except OSError:  # the client left (a reset, a broken pipe, the socket closed by its reader)
        pass
    finally:
        unsubscribe(hub, sub)
