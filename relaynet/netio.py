# -*- test-case-name: tests.test_netio -*-
"""
Socket-level helpers shared by the server (intake) and client (outbound)
sides: Nagle off, and sending small writes at once.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def no_delay(transport: Any) -> None:
    """
    Turn Nagle's algorithm off: SMTP is request/response, and a small final
    write (".\\r\\n", a reply) held back until the peer's delayed ACK costs
    ~40 ms per message.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is None:  # TLS layered over TCP (implicit TLS)
        set_no_delay = getattr(getattr(transport, "transport", None), "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass


def send_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}, sending it immediately when that is safe.

    Twisted's TCP transport queues every write and arms C{EPOLLOUT}; the
    bytes go out on the next reactor iteration, and the writer is disarmed
    again: two C{epoll_ctl} calls and a poll pass per SMTP reply (py-spy: 8%
    of the reactor thread on the accept path). When the transport is a plain
    (not TLS) TCP connection with nothing queued, we call C{send} ourselves
    and hand only what the socket did not take to C{transport.write}, which
    keeps ordering, flow control and error handling Twisted's. Anything
    else (TLS, UNIX sockets, test transports, a non-empty buffer) goes
    through C{transport.write} unchanged.
    """
    if (
        type(transport) in _PLAIN_TCP
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            # EAGAIN, or an error the transport will find and report itself.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


_PLAIN_TCP = (tcp.Server, tcp.Client)
