# -*- test-case-name: tests.test_network -*-
"""
An in-process network of relaynet nodes: no sockets, no threads, no disk,
one simulated clock.

Each L{NetNode} is a real node's middle and edges -- the ESMTP intake
(L{relaynet.intake.server.RelayESMTP}), a L{MemorySpool}, the
L{QueueRunner} with its L{QueueCore} and L{Delivery} stage, and the ESMTP
client (L{relaynet.delivery.client.OutboundManager}) -- wired as
L{relaynet.node.RelayNode} wires them, except that:

 - connections are made in memory: the network's reactor answers every
   C{connectTCP} to a node's address and port with a L{twisted.test.iosim}
   pair to that node's intake, and refuses it when nothing listens there
   (a node that is L{down<NetNode.stop>}, or an address no node has);
 - local mail is delivered into L{MemoryMailboxes}, not Maildir files;
 - time is the network's L{ThreadlessReactor}: L{Network.run} moves bytes
   and due calls until nothing happens, L{Network.advance} moves the clock.

So forwarding, failover, retries, expiry, DSNs and loops are tested in
milliseconds, over the real protocol code of both sides (modelled on
tahoe-lafs's C{no_network} grid).

    net = Network()
    a = net.add_node("a", routes=[{"domains": ["*"], "action": "relay",
                                   "next_hops": [net.endpoint("b")]}])
    b = net.add_node("b", local_domains=["b.test"])
    qid = a.submit("x@sender.test", ["user@b.test"], b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
    net.run()
    assert b.mailboxes.delivered("user@b.test")
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Mapping, Sequence

from attrs import define, field, frozen
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.python.failure import Failure
from twisted.test import iosim

from relaynet.config import NodeConfig, parse_config
from relaynet.delivery.attempt import Delivery
from relaynet.delivery.client import OutboundManager
from relaynet.delivery.mailbox import LocalResult
from relaynet.delivery.routing import resolve_local, split_address
from relaynet.events import EventLog
from relaynet.intake.server import Intake, RelayFactory
from relaynet.queue.spool import QueueEntry
from relaynet.runner import QueueRunner
from relaynet.testing import EPOCH, ManualThreadPool, ThreadlessReactor, _merge
from relaynet.testing.spool import MemorySpool

__all__ = ["MemoryMailboxes", "NetNode", "Network", "StoredMail"]

_MAX_ROUNDS = 100_000
"""Bound on the rounds of one L{Network.run}: a livelock fails the test."""


@frozen
class StoredMail:
    """One message delivered into a L{MemoryMailboxes} mailbox."""

    mailbox: str
    sender: str
    data: bytes
    queue_id: str


class MemoryMailboxes:
    """
    Local delivery into memory: an L{IMailboxes<relaynet.delivery.attempt.IMailboxes>}
    that expands aliases and refuses unknown users exactly as Maildir
    delivery does, and keeps each copy.

    @ivar fail_with: if set, a C{(permanent, dsn, text)} every delivery
        fails with (a full or broken mailbox store).
    """

    def __init__(self, node: "NetNode") -> None:
        self._node = node
        self.mail: list[StoredMail] = []
        self.fail_with: tuple[bool, str, str] | None = None

    def deliver(self, entry: QueueEntry, addresses: list[str]) -> Deferred[list[LocalResult]]:
        local = self._node.config.local
        with entry.open_message() as f:
            data = f.read()
        out = []
        for address in addresses:
            if self.fail_with is not None:
                permanent, dsn, text = self.fail_with
                out.append(LocalResult(address, ok=False, permanent=permanent, dsn=dsn, diagnostic=text))
                continue
            localpart, domain = split_address(address)
            boxes = resolve_local(local, localpart, domain)
            if not boxes:
                out.append(LocalResult(address, ok=False, permanent=True, dsn="5.1.1",
                                       diagnostic="user unknown"))
                continue
            for dom, user in boxes:
                self.mail.append(StoredMail(f"{user}@{dom}", entry.envelope.sender, data, entry.queue_id))
            out.append(LocalResult(address, ok=True, mailboxes=tuple(f"{u}@{d}" for d, u in boxes)))
        return succeed(out)

    def delivered(self, mailbox: str) -> list[StoredMail]:
        """The messages in C{mailbox} (C{user@domain}, lower case)."""
        return [m for m in self.mail if m.mailbox == mailbox.lower()]


class NodeReactor:
    """
    One node's view of the network's reactor: the same clock and threads,
    and a C{connectTCP} that reaches the nodes of the network in memory and
    remembers which node connected (so that its connections drop with it).
    """

    def __init__(self, network: "Network", node: "NetNode") -> None:
        self._network = network
        self._node = node

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network.reactor, name)

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> Any:
        """Record the connection attempt; it completes on a later turn, as on a real reactor."""
        reactor = self._network.reactor
        connector = reactor.connectTCP(host, port, factory, timeout, bindAddress)
        reactor.callLater(0, self._network._connect, self._node, host, port, factory, connector)
        return connector


@define
class NetNode:
    """
    One node of a L{Network}.

    @ivar address: the loopback address it "listens" on, port 25.
    @ivar up: it accepts connections and delivers (see L{stop}, L{start}).
    """

    network: "Network"
    name: str
    config: NodeConfig
    address: str
    spool: MemorySpool
    events: list[dict[str, Any]] = field(factory=list)
    up: bool = False
    intake: Intake = field(init=False)
    runner: QueueRunner = field(init=False)
    mailboxes: MemoryMailboxes = field(init=False)
    factory: RelayFactory = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.mailboxes = MemoryMailboxes(self)
        self._build()

    def _build(self) -> None:
        reactor: Any = NodeReactor(self.network, self)
        events = EventLog(None, self.config.name, clock=reactor.seconds)
        events.observers.append(self.events.append)
        self.intake = Intake(
            config=self.config, spool=self.spool, events=events,  # type: ignore[arg-type]
            reactor=reactor, now=reactor.seconds,
        )
        outbound = OutboundManager(reactor, self.config.outbound, self.config.hostname)
        self.runner = QueueRunner(
            self.config, self.spool, events, reactor, ManualThreadPool(immediate=True),  # type: ignore[arg-type]
            outbound=outbound, now=reactor.seconds, resolver=self.network.resolver,
        )
        self.runner.delivery = Delivery(
            lambda: self.runner.table, outbound, self.mailboxes, self.runner.resolver,
            shuffle=self.network.shuffle,
        )
        self.intake.queued = self.runner.enqueue
        self.intake.cut_through = self.runner.cut_through
        self.factory = RelayFactory(self.intake, self.config.listeners[0])

    # -- driving ----------------------------------------------------------

    def start(self) -> None:
        """Start (or restart) the node: recover its spool and deliver."""
        self.spool.prepare()
        self.runner.start(list(self.spool.recover()))
        self.up = True

    def stop(self) -> None:
        """
        Take the node down at once, as C{kill -9} would: open connections
        are cut, nothing more is delivered; only what its spool made
        durable survives (L{start} builds a fresh node over it).
        """
        self.up = False
        self.runner._started = False
        self.runner._timetable.clear()
        self.runner.outbound.close()
        self.network._cut(self)
        self.spool.crash()
        self._build()

    def submit(
        self, sender: str, recipients: Sequence[str], message: bytes,
        mail_params: str = "", client: str = "127.0.0.1",
    ) -> list[tuple[int, str]]:
        """
        Send one message to this node over SMTP from C{client} (in memory),
        run the network until the session is over, and return the replies.
        """
        return self.network.smtp(self, sender, recipients, message, mail_params, client)

    def queued(self) -> list[str]:
        """The queue ids of messages in this node's queue."""
        return [e.queue_id for e in self.runner.core]

    def event_names(self, **match: Any) -> list[str]:
        """The names of this node's events whose fields include C{match}."""
        return [e["event"] for e in self.events if all(e.get(k) == v for k, v in match.items())]


class _Client:
    """A scripted SMTP client session: sends a transaction, keeps the replies."""

    def __init__(self, script: list[bytes]) -> None:
        self.script = script
        self.replies: list[tuple[int, str]] = []
        self.transport: Any = None
        self._buffer = b""
        self._step = 0

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            code, sep, text = line[:3], line[3:4], line[4:]
            if sep == b"-":
                continue
            self.replies.append((int(code), text.decode("utf-8", "replace")))
            if self._step == len(self.script) - 2 and int(code) != 354:
                self._step += 1  # DATA refused: no message body, just QUIT
            if self._step < len(self.script):
                self.transport.write(self.script[self._step])
                self._step += 1

    def connectionLost(self, reason: Any = None) -> None:
        pass


class Network:
    """
    Nodes on one simulated clock, connected in memory.

    @ivar reactor: the network's reactor; its clock starts at L{EPOCH}.
    @ivar resolver: the MX resolver every node uses (a fake, if a test sets one).
    @ivar shuffle: how nodes order next hops of equal priority (by default:
        not at all, so tests are deterministic).
    """

    def __init__(self) -> None:
        self.reactor = ThreadlessReactor()
        self.reactor.advance(EPOCH)
        self.nodes: dict[str, NetNode] = {}
        self.resolver: Any = None
        self.shuffle: Any = lambda hops: None
        self._pumps: list[tuple[iosim.IOPump, NetNode | None, NetNode | None]] = []
        self._addresses = itertools.count(2)
        self._ports = itertools.count(40000)

    # -- building -----------------------------------------------------------

    def endpoint(self, name: str) -> str:
        """The next-hop endpoint of node C{name} (for routes)."""
        return f"tcp:{self.nodes[name].address}:25"

    def address_of(self, name: str) -> str:
        """The address node C{name} listens on (for routes added before it)."""
        return self.nodes[name].address

    def add_node(
        self,
        name: str,
        local_domains: Sequence[str] = (),
        users: Sequence[str] | None = None,
        routes: Sequence[Mapping[str, Any]] = (),
        address: str | None = None,
        start: bool = True,
        **tables: Any,
    ) -> NetNode:
        """
        Add a node named C{name} listening on C{address}:25 (the next free
        127.0.0.N by default).

        @param local_domains: its C{[local].domains}; a catch-all unless
            C{users} names the users.
        @param routes: its C{[[route]]} rules (parsed-TOML dicts).
        @param tables: more configuration tables merged in, e.g.
            C{queue={"minimal_backoff": 60}} or C{limits={"max_hops": 5}}.
        """
        address = address or f"127.0.0.{next(self._addresses)}"
        local: dict[str, Any] = {"domains": list(local_domains), "mailroot": "/nonexistent"}
        if users is None:
            local["catch_all"] = True
        else:
            local["users"] = list(users)
        data: dict[str, Any] = {
            "node": {"name": name, "hostname": f"{name}.test", "spool": "/nonexistent"},
            "listener": [{"endpoint": f"tcp:25:interface={address}"}],
            "local": local,
            "relay": {"trusted_networks": ["127.0.0.0/8"]},
            "route": [dict(r) for r in routes],
            "admin": {"enabled": False},
        }
        data = _merge(data, tables)
        config = parse_config(data, source=f"<network node {name}>")
        node = NetNode(self, name, config, address, MemorySpool(clock=self.reactor.seconds, suffix=name.upper()[:4].ljust(4, "0")))
        self.nodes[name] = node
        if start:
            node.start()
        return node

    # -- connections ----------------------------------------------------------

    def _listening(self, host: str, port: int) -> NetNode | None:
        for node in self.nodes.values():
            if node.up and node.address == host and port == 25:
                return node
        return None

    def _connect(self, origin: NetNode, host: str, port: int, factory: Any, connector: Any) -> None:
        node = self._listening(host, port)
        if node is None or not origin.up:
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError(host, port)))
            return
        client_addr = IPv4Address("TCP", origin.address, next(self._ports))
        server_addr = IPv4Address("TCP", host, port)
        server = node.factory.buildProtocol(client_addr)
        client = factory.buildProtocol(server_addr)
        self._attach(server, client, client_addr, server_addr, node, origin)

    def _attach(
        self, server: Any, client: Any, caddr: Any, saddr: Any, node: NetNode | None,
        origin: NetNode | None,
    ) -> iosim.IOPump:
        pump = iosim.connect(
            server, iosim.FakeTransport(server, True, saddr, caddr),
            client, iosim.FakeTransport(client, False, caddr, saddr),
            greet=False, clock=self.reactor,
        )
        self._pumps.append((pump, node, origin))
        return pump

    def _cut(self, node: NetNode) -> None:
        """Drop every connection to or from C{node} (it went down)."""
        for entry in list(self._pumps):
            pump, server_node, origin = entry
            if node is server_node or node is origin:
                for io in (pump.clientIO, pump.serverIO):
                    if not io.disconnected:
                        io.disconnected = True
                        io.reportDisconnect()
                self._pumps.remove(entry)

    # -- running ----------------------------------------------------------------

    def run(self) -> int:
        """
        Move bytes over every connection and run every call that is due,
        until nothing more happens (the clock does not move).

        @return: how many rounds moved something.
        """
        busy = 0
        for _ in range(_MAX_ROUNDS):
            moved = False
            self.reactor.advance(0)
            for entry in list(self._pumps):
                pump = entry[0]
                if pump.pump(advanceClock=False):
                    moved = True
                elif pump.clientIO.disconnected and pump.serverIO.disconnected:
                    self._pumps.remove(entry)
            if not moved and not self._due_now():
                return busy
            busy += 1
        raise AssertionError(f"the network did not settle in {_MAX_ROUNDS} rounds")

    def _due_now(self) -> bool:
        now = self.reactor.seconds()
        return any(c.getTime() <= now for c in self.reactor.getDelayedCalls())

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """
        Let C{seconds} pass, in steps of at most C{step}, running the network
        after each (timers, retries and timeouts fire at their time).
        """
        self.run()
        end = self.reactor.seconds() + seconds
        for _ in range(int(seconds / step) + 2):
            now = self.reactor.seconds()
            if now >= end:
                break
            self.reactor.advance(min(step, end - now))
            self.run()

    def run_until(self, condition: Any, limit: float = 3600.0, step: float = 1.0) -> float:
        """
        Advance the clock until C{condition()} holds, at most C{limit}
        seconds; return the time it took.

        @raise AssertionError: it did not hold in time.
        """
        start = self.reactor.seconds()
        self.run()
        for _ in range(int(limit / step) + 2):
            if condition():
                return self.reactor.seconds() - start
            if self.reactor.seconds() - start >= limit:
                break
            self.reactor.advance(step)
            self.run()
        raise AssertionError(f"condition not met within {limit} s")

    def smtp(
        self, node: NetNode, sender: str, recipients: Sequence[str], message: bytes,
        mail_params: str = "", client: str = "127.0.0.1",
    ) -> list[tuple[int, str]]:
        """An SMTP client session to C{node}: EHLO, MAIL, RCPT..., DATA, QUIT."""
        body = message.replace(b"\r\n.", b"\r\n..")
        if body.startswith(b"."):
            body = b"." + body
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        script = [
            b"EHLO client.test\r\n",
            f"MAIL FROM:<{sender}>{' ' + mail_params if mail_params else ''}\r\n".encode(),
            *(f"RCPT TO:<{r}>\r\n".encode() for r in recipients),
            b"DATA\r\n",
            body + b".\r\n",
            b"QUIT\r\n",
        ]
        session = _Client(script)
        caddr = IPv4Address("TCP", client, next(self._ports))
        saddr = IPv4Address("TCP", node.address, 25)
        server = node.factory.buildProtocol(caddr)
        self._attach(server, session, caddr, saddr, node, None)
        self.run()
        return session.replies

