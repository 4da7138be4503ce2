"""WebSocket connections that close rather than queue many unhandled messages (for `manage.py serve`).

daphne puts every frame a client sends on the application's queue at once, without bound, while the consumer
handles one message at a time (a credential check, a rate-limit call, parsing up to API_MAX_REQUEST_BYTES):
a socket that sent faster than that grew the server's memory by about 75 MB a second (measured), and a user
may hold WS_MAX_CONNECTIONS_PER_USER sockets. A chat client waits for its answers; a socket with
MAX_PENDING_MESSAGES messages still waiting is closed with CLOSE_FLOODED, and what it sends meanwhile dropped.
"""

from __future__ import annotations

import logging

from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol

logger = logging.getLogger(__name__)

MAX_PENDING_MESSAGES = 8
CLOSE_FLOODED = 4008  # an application's own code (autobahn sends only 1000 or 3000-4999): 1008, policy violation


class BoundedWebSocketProtocol(WebSocketProtocol):
    flooded = False

    def onMessage(self, payload, isBinary):
        if self.flooded:
            return
        queue = getattr(self, "application_queue", None)
        if queue is not None and queue.qsize() >= MAX_PENDING_MESSAGES:
            self.flooded = True
            logger.warning("WebSocket %s sent %d messages the server has not handled yet: closed",
                           self.client_addr, MAX_PENDING_MESSAGES)
            self.sendClose(code=CLOSE_FLOODED, reason="too many messages waiting")
            return
        super().onMessage(payload, isBinary)


def install() -> None:
    """Make daphne's WebSocket factory build BoundedWebSocketProtocol connections."""
    WebSocketFactory.protocol = BoundedWebSocketProtocol
