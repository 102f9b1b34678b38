"""
A TCP forwarder for tests: listens on a loopback address, connects each
client it accepts to a target port on 127.0.0.1, and passes the bytes
through both ways (threads of the calling process; no reactor).

A subclass may watch or change the stream (L{TcpForwarder.serve}): the
MTA-STS tests count connections to tell that a node did not even connect,
the workers' tests lose a reply on purpose.

Part of the test harness (not shipped). Loopback only; every thread is a
daemon and every socket is closed by L{TcpForwarder.stop}.
"""

from __future__ import annotations

import socket
import threading
from typing import Self

HOST = "127.0.0.1"


class TcpForwarder:
    """
    @ivar port: the port it listens on.
    @ivar connections: the connections it accepted so far.
    """

    def __init__(self, target_port: int, host: str = HOST, port: int = 0) -> None:
        """
        @param host: the (IPv4 loopback) address to listen on.
        @param port: the port (0: a free one).
        @raise OSError: C{host:port} cannot be bound.
        """
        assert host.startswith("127."), "loopback only"
        self.target_port = target_port
        self.connections = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._listener.bind((host, port))
        except OSError:
            self._listener.close()
            raise
        self._listener.listen(16)
        self._listener.settimeout(0.05)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name=f"forwarder :{self.port}", daemon=True)

    def count(self) -> int:
        with self._lock:
            return self.connections

    def start(self) -> Self:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                self.connections += 1
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            self.serve(client, upstream)

    def serve(self, client: socket.socket, upstream: socket.socket) -> None:
        """Start passing one connection's bytes through: a thread each way."""
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(src: socket.socket, dst: socket.socket) -> None:
        """C{src} to C{dst} until either end closes."""
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            close(src, dst)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                s.close()


def close(*sockets: socket.socket) -> None:
    """Shut C{sockets} down both ways (the other thread's C{recv} returns)."""
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
