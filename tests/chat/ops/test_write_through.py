"""chat/ops/write_through.py: a write goes out at once when nothing is buffered; otherwise Twisted's buffering
(order, back-pressure, connection loss) holds. Real TCP sockets on loopback and a real (unstarted) reactor."""

import socket
import time

import pytest
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.selectreactor import SelectReactor

from chat.ops.write_through import WriteThroughServer, install


@pytest.fixture
def connection():
    """(transport, peer socket, reactor): the transport owns the accepted end of a loopback TCP connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    accepted, address = listener.accept()
    listener.close()
    reactor = SelectReactor()
    protocol = Protocol()
    transport = WriteThroughServer(accepted, protocol, address, None, 1, reactor)
    protocol.makeConnection(transport)
    yield transport, peer, reactor
    peer.close()
    accepted.close()


def receive(peer: socket.socket, size: int, reactor=None, timeout: float = 10) -> bytes:
    """Read `size` bytes from the peer, turning the reactor meanwhile (so buffered data gets sent)."""
    peer.settimeout(0.001)
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < size and time.monotonic() < deadline:
        if reactor is not None:
            reactor.iterate(0)
        try:
            data += peer.recv(size - len(data))
        except TimeoutError:
            pass
    return data


def test_a_write_on_an_empty_buffer_is_sent_without_a_reactor_turn(connection):
    transport, peer, reactor = connection
    transport.writeSequence([b"5\r\n", b"hello", b"\r\n"])
    transport.write(b"more")
    transport.writeSequence(part for part in (b"-", b"end"))  # any iterable, a generator too
    assert receive(peer, 18) == b"5\r\nhello\r\nmore-end"  # the reactor never ran
    assert transport not in reactor.getWriters()  # nothing registered, nothing left to send


def test_what_the_socket_does_not_take_is_buffered_and_sent_in_order(connection):
    transport, peer, reactor = connection
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    first = bytes(range(256)) * 256  # 64 KiB: more than the socket buffers hold while the peer does not read
    transport.write(first)
    assert transport in reactor.getWriters()  # the rest waits for the socket, as Twisted's own writes do
    received = receive(peer, 4096)  # the socket has room again, but the rest of `first` is still buffered
    transport.writeSequence([b"second", b"-", b"third"])  # so this goes behind it, not past it
    received += receive(peer, len(first) + 12 - len(received), reactor)
    assert received == first + b"second-third"
    reactor.iterate(0)
    assert transport not in reactor.getWriters()


def test_a_write_after_the_peer_went_away_closes_the_connection_as_twisted_would(connection):
    transport, peer, reactor = connection
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset on close
    peer.close()
    deadline = time.monotonic() + 5
    while not transport.disconnected and time.monotonic() < deadline:
        transport.write(b"x" * 100)  # raises nothing: a failed send is left to the buffered path, which reports it
        reactor.iterate(0.01)
    assert transport.disconnected


def test_install_makes_new_ports_accept_write_through_connections(monkeypatch):
    monkeypatch.setattr(tcp.Port, "transport", tcp.Server)
    install()
    assert tcp.Port.transport is WriteThroughServer
