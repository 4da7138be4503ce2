"""TCP connections that send a write at once when nothing is waiting to be sent (for `manage.py serve`).

Twisted buffers every write and sends it on the reactor's next turn: per streamed token that is an
epoll registration, an extra loop iteration and an unregistration before the one `send()`, all on the
event loop thread that shares the CPU with the model's threads (measured: about a fifth of the loop's
time per token while streaming). asyncio's own transports try the send first and register only what is
left; this does the same for daphne's plain TCP connections. Order is kept: data goes out directly only
when nothing is buffered, and whatever the socket does not take is buffered exactly as before (so
back-pressure on a slow client, connection loss and TLS stay Twisted's).
"""

from __future__ import annotations

from twisted.internet import tcp


class WriteThroughServer(tcp.Server):
    """tcp.Server whose writes go straight to the socket while its send buffer is empty."""

    def write(self, data: bytes) -> None:
        rest = self._send_now(data) if isinstance(data, bytes) else data
        if rest:
            super().write(rest)

    def writeSequence(self, iovec) -> None:
        iovec = list(iovec)  # read twice below
        if all(isinstance(part, bytes) for part in iovec):
            rest = self._send_now(b"".join(iovec))
            if rest:
                super().write(rest)
            return
        super().writeSequence(iovec)  # Twisted's own type error for what is not bytes

    def _send_now(self, data: bytes) -> bytes:
        """Send what the socket takes now if nothing is queued before `data`; return what is left to buffer."""
        if (self.TLS or not self.connected or self.disconnecting or self._writeDisconnected
                or self._writeDisconnecting or self._tempDataBuffer or self.offset < len(self.dataBuffer)):
            return data
        sent = self.writeSomeData(data)
        if not isinstance(sent, int) or sent <= 0:
            return data  # would block, or the connection is lost: the buffered path finds out and reports it
        return data[sent:]


def install() -> None:
    """Make every TCP port opened from now on hand its connections to WriteThroughServer (Twisted picks the
    connection class from `Port.transport`; daphne opens its ports through endpoint strings)."""
    tcp.Port.transport = WriteThroughServer
