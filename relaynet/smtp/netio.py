# -*- test-case-name: tests.test_netio -*-
"""
Socket-level helpers shared by the server (intake) and client (outbound)
sides: Nagle off, sending small writes at once, listening with
C{SO_REUSEPORT}, and a service that listens on an endpoint.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer


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

    This and L{ReusePortEndpoint.from_string} are the only places relaynet
    reads private attributes of Twisted (the TCP transport's write buffers;
    the parsed endpoint's port, interface and backlog), for want of a public
    way; both were checked against Twisted 26.10, and tests/test_netio.py
    fails if the buffers change meaning.
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


def tcp_listening_socket(
    family: int, interface: str, port: int, backlog: int, reuse_port: bool = False
) -> socket.socket:
    """
    A listening TCP socket (C{SO_REUSEADDR}, and C{SO_REUSEPORT} if asked),
    non-blocking, for the reactor to adopt (L{adopt}) or to pass to workers.

    @raise OSError: it cannot listen (address in use, ...).
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def adopt(reactor: Any, sock: socket.socket, factory: Any) -> Deferred[Any]:
    """
    Serve C{factory} on the listening C{sock}: the reactor listens on a
    duplicate of its descriptor, and C{sock} is closed.
    """
    try:
        sock.setblocking(False)
        port = reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
    except OSError as e:
        return fail(e)
    finally:
        sock.close()
    return succeed(port)


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP server endpoint that listens with C{SO_REUSEPORT}: several processes
    (relaynet nodes, each with its own spool) bind the same address and port,
    and the kernel spreads incoming connections between them. This is how
    one host runs a node per core behind one port (Twisted's TCP endpoints
    have no such option, so the socket is made here and adopted).
    """

    def __init__(self, reactor: Any, port: int, interface: str, backlog: int, family: int) -> None:
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._backlog = backlog
        self._family = family

    @classmethod
    def from_string(cls, reactor: Any, description: str) -> "ReusePortEndpoint":
        """
        From a C{tcp:} or C{tcp6:} endpoint string (Twisted parses it).

        @raise ValueError: any other kind of endpoint.
        """
        endpoint = serverFromString(reactor, description)
        if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
            raise ValueError(f"SO_REUSEPORT needs a tcp: or tcp6: endpoint, not {description!r}")
        # TCP4/6ServerEndpoint keep what serverFromString parsed in private
        # attributes only (Twisted 26.10): read them here, nowhere else.
        interface = endpoint._interface
        family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) or ":" in interface else socket.AF_INET
        return cls(reactor, endpoint._port, interface or ("::" if family == socket.AF_INET6 else ""),
                   endpoint._backlog, family)

    def listen(self, factory: Any) -> Deferred[Any]:
        try:
            sock = tcp_listening_socket(self._family, self._interface, self._port, self._backlog, reuse_port=True)
        except OSError as e:
            return fail(e)
        return adopt(self._reactor, sock, factory)


class EndpointService(Service):
    """
    Serves C{factory} on C{endpoint} while running.

    A failure to listen that the endpoint reports at once (TCP and UNIX
    endpoints do: address in use, a port below 1024 without privileges, no
    directory for a socket) raises from the start, so a node fails to start
    rather than run without a listener.
    L{twisted.application.internet.StreamServerEndpointService} only logs it,
    unless told otherwise through a private attribute, and keeps the port it
    bound in another; this service has neither.

    @ivar port: the listening port, once listening (a C{tcp:0} listener's
        real port number is C{port.getHost().port}).
    @ivar privileged: listen in C{privilegedStartService} (before twistd
        drops privileges: SMTP ports below 1024), not in C{startService}.
    """

    log = Logger()

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, what: str,
        privileged: bool = False,
    ) -> None:
        """
        @param what: what listens, for the log: the endpoint as configured,
            and what it serves if not SMTP.
        """
        self.endpoint = endpoint
        self.factory = factory
        self.what = what
        self.privileged = privileged
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort | None] | None = None

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        if self.privileged:
            self._listen()

    def startService(self) -> None:
        Service.startService(self)
        if self._listening is None:
            self._listen()

    def _listen(self) -> None:
        starting = True
        failed: list[Failure] = []

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            self.log.info("Listening on {what} ({address})", what=self.what, address=port.getHost())
            return port

        def not_listening(f: Failure) -> None:
            if starting:
                failed.append(f)
            elif not f.check(CancelledError):
                self.log.failure("{what} cannot listen on {endpoint}", f, what=self.what, endpoint=self.endpoint)

        self._listening = self.endpoint.listen(self.factory).addCallbacks(listening, not_listening)
        starting = False
        if failed:
            self.running = False
            self._listening = None
            failed[0].raiseException()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        listening, self._listening = self._listening, None
        self.port = None
        if listening is None:
            return succeed(None)
        listening.cancel()

        def stop(port: IListeningPort | None) -> Deferred[None] | None:
            return None if port is None else port.stopListening()

        return listening.addCallback(stop)


FIRST_INHERITED_FD = 3
"""A worker's listening sockets are descriptors 3, 4, ... in listener order (L{relaynet.supervisor})."""


@implementer(IStreamServerEndpoint)
class AdoptedEndpoint:
    """
    A listening socket this process inherited (a worker's, from its
    supervisor: L{relaynet.supervisor}), served with C{adoptStreamPort}.
    The descriptor is closed once adopted (the reactor serves a duplicate).
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def listen(self, factory: Any) -> Deferred[Any]:
        try:
            sock = socket.socket(fileno=self._fd)
        except OSError as e:
            return fail(e)
        return adopt(self._reactor, sock, factory)
