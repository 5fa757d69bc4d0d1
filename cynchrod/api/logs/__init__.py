"""Logs: a bounded tail over HTTP and a live stream over a WebSocket (flask-sock).

Both go through the runtime protocol (``Runtime.tail`` / ``Runtime.follow``), so
they work the same on every runtime. One engine follower per app for all the API
worker processes (``hub.Hub``: the first worker with a client of the app follows the
engine and relays to the others through an abstract Unix socket) feeds every
client of that app. Each batch of lines is JSON-encoded once per worker, and each
WebSocket message is a JSON array of line objects: the lines gathered for at most
``BATCH_WAIT_S`` after the first and at most about ``BATCH_BYTES``, made once for
all the worker's clients of the app. The stream follows the app through restarts
and redeploys; it ends when the app is deleted (``1000 app_removed``), the token is
revoked (checked every second), or the client leaves; the follower is closed with
its last client in any worker: nothing outlives the sockets.

The package: ``routes`` (the blueprint and the WebSocket route), ``frames`` (the wire
encoding: lines as JSON pieces, messages framed once), ``hub`` (one engine follower per app,
its subscribers, the batching), ``relay`` (the abstract Unix socket between workers) and
``pump`` (one client's loop). Importing the package registers the routes on ``api.sock``.
"""

from __future__ import annotations

from cynchrod.api.logs.frames import PIECE_BYTES, Frame, encode_lines
from cynchrod.api.logs.relay import relay_address
from cynchrod.api.logs.routes import bp

__all__ = ["PIECE_BYTES", "Frame", "bp", "encode_lines", "relay_address"]
