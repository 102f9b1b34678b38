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
 - MX lookups go to L{Network.resolver} (a fake the test sets; never real
   DNS), and next hops of equal priority are ordered by L{Network.shuffle};
 - time is the network's L{ThreadlessReactor}: L{Network.run} moves bytes
   and due calls until nothing happens (or until a condition holds, to
   act in the middle of a delivery), L{Network.advance} and
   L{Network.run_until} move the clock from due call to due call, so
   retries and timeouts happen at their exact times.

So forwarding, failover, retries, expiry, DSNs and loops are tested in
milliseconds, over the real protocol code of both sides (modelled on
tahoe-lafs's C{no_network} grid).

L{NetNode.stop} is C{kill -9}: the node's timers, spool writes and events
stop at once and its connections drop; what its spool made durable is all
that L{NetNode.start} recovers. L{Network.endpoint} names a node before it
is added (its address is reserved), so routes can point both ways; a name
never added is an address that refuses connections.

    net = Network()
    a = net.add_node("a", routes=[{"domains": ["*"], "action": "relay",
                                   "next_hops": [net.endpoint("b")]}])
    b = net.add_node("b", local_domains=["b.test"])
    replies = a.submit("x@sender.test", ["user@b.test"], b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
    net.run()
    assert b.mailboxes.delivered("user@b.test")
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Mapping, Sequence

from attrs import define, field, frozen
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface import implementer

from relaynet.config import NextHop, NodeConfig, parse_config
from relaynet.delivery.attempt import Delivery
from relaynet.delivery.client import OutboundManager
from relaynet.delivery.dkim import Signer
from relaynet.delivery.mailbox import LocalResult
from relaynet.delivery.routing import resolve_local, split_address
from relaynet.events import EventLog
from relaynet.intake.server import Intake, RelayFactory
from relaynet.queue.spool import Envelope, QueueEntry, SpoolError
from relaynet.queue.window import Transfer, TransferWindow
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


@implementer(IReactorTime)
class NodeReactor:
    """
    One incarnation's view of the network's reactor: the same clock and
    threads, a C{connectTCP} that reaches the nodes of the network in memory,
    and a C{callLater} whose calls die with the incarnation (L{kill}), as a
    process's timers die with it.
    """

    def __init__(self, network: "Network", node: "NetNode") -> None:
        self._network = network
        self._node = node
        self.alive = True
        self._calls: list[IDelayedCall] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network.reactor, name)

    def seconds(self) -> float:
        """The network's simulated time."""
        return self._network.reactor.seconds()

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        """This incarnation's scheduled calls."""
        return [c for c in self._calls if c.active()]

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> IDelayedCall:
        """Schedule C{callable} on the network's clock, unless this incarnation is dead by then."""

        def call() -> None:
            if self.alive:
                callable(*args, **kw)

        delayed = self._network.reactor.callLater(delay, call)
        self._calls = [c for c in self._calls if c.active()]
        self._calls.append(delayed)
        return delayed

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> Any:
        """Record the connection attempt; it completes on a later turn, as on a real reactor."""
        reactor = self._network.reactor
        connector = reactor.connectTCP(host, port, factory, timeout, bindAddress)
        self.callLater(0, self._network._connect, self._node, host, port, factory, connector)
        return connector

    def kill(self) -> None:
        """The incarnation is dead: cancel its timers; nothing scheduled by it runs again."""
        self.alive = False
        for c in self._calls:
            if c.active():
                c.cancel()
        self._calls = []


class _SpoolGate:
    """
    One incarnation's handle on a node's L{MemorySpool}: once the
    incarnation is killed, what it still tries to write never happens (its
    Deferreds never fire), as a killed process writes nothing more.
    """

    def __init__(self, spool: MemorySpool, began: Callable[[], None]) -> None:
        self._spool = spool
        self._began = began
        self.open = True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._spool, name)

    def begin(self, envelope: Envelope) -> Any:
        """Start a message, unless the incarnation is dead."""
        if not self.open:
            raise SpoolError("the node was killed")
        writer = self._spool.begin(envelope)
        self._began()
        return writer

    def record(self, entry: QueueEntry) -> Deferred[None]:
        """Record a state, unless the incarnation is dead (then: never)."""
        return self._spool.record(entry) if self.open else Deferred()

    def hint_due(self, entry: QueueEntry, when: float) -> None:
        """Leave a due-time hint, unless the incarnation is dead."""
        if self.open:
            self._spool.hint_due(entry, when)

    def remove(self, entry: QueueEntry) -> Deferred[None]:
        """Remove a message, unless the incarnation is dead (then: never)."""
        return self._spool.remove(entry) if self.open else Deferred()


@define
class NetNode:
    """
    One node of a L{Network}.

    @ivar address: the loopback address it "listens" on, port 25.
    @ivar up: it accepts connections and delivers (see L{stop}, L{start}).
    @ivar began: how many messages it began to store (an SMTP transaction
        reached DATA, or a DSN was composed), committed or not: with
        L{Network.run}'s C{until}, a test can stop a node in the middle of
        receiving a message.
    @ivar settle_delay: how long the outcome of a named transfer waits to
        be recorded (L{QueueRunner}'s C{settle_delay}). C{0} by default here:
        recorded in the next round of L{Network.run}, so that a run leaves
        every relay recorded; a node made with the real delay
        (L{relaynet.runner.SETTLE_DELAY}) needs the clock moved for it.
    """

    network: "Network"
    name: str
    config: NodeConfig
    address: str
    spool: MemorySpool
    events: list[dict[str, Any]] = field(factory=list)
    up: bool = False
    began: int = 0
    settle_delay: float = 0.0
    journal: list[Transfer] = field(factory=list)
    intake: Intake = field(init=False)
    runner: QueueRunner = field(init=False)
    window: TransferWindow = field(init=False)
    mailboxes: MemoryMailboxes = field(init=False)
    factory: RelayFactory = field(init=False)
    reactor: NodeReactor = field(init=False)
    _gate: _SpoolGate = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.mailboxes = MemoryMailboxes(self)
        self._build()

    def _build(self) -> None:
        reactor = self.reactor = NodeReactor(self.network, self)
        gate = self._gate = _SpoolGate(self.spool, self._begin)
        events = EventLog(None, self.config.name, clock=reactor.seconds)

        def observe(event: dict[str, Any]) -> None:
            if reactor.alive:
                self.events.append(event)

        events.observers.append(observe)
        threads = ManualThreadPool(immediate=True)
        self.window = TransferWindow(
            None, self.config.queue.duplicate_window, self.config.queue.duplicate_window_size,
            reactor.seconds, memory_journal=self.journal,
        )
        self.intake = Intake(
            config=self.config, spool=gate, events=events,  # type: ignore[arg-type]
            reactor=reactor, now=reactor.seconds, window=self.window,
        )
        outbound = OutboundManager(
            reactor, self.config.outbound, self.config.hostname, events=events,
            signer=Signer.from_settings(self.config.dkim),
            # The conversion and the signing run at once, as the node's other
            # "thread" work does here (ManualThreadPool(immediate=True)).
            run_in_thread=maybeDeferred,
        )
        self.runner = QueueRunner(
            self.config, gate, events, reactor, threads,  # type: ignore[arg-type]
            outbound=outbound, now=reactor.seconds, resolver=_NetworkResolver(self.network),
            window=self.window, settle_delay=self.settle_delay,
        )
        self.runner.delivery = Delivery(
            lambda: self.runner.table, outbound, self.mailboxes, self.runner.resolver,
            shuffle=lambda hops: self.network.shuffle(hops),
        )
        self.intake.queued = self.runner.enqueue
        self.intake.cut_through = self.runner.cut_through
        self.factory = RelayFactory(self.intake, self.config.listeners[0])

    def _begin(self) -> None:
        self.began += 1

    # -- driving ----------------------------------------------------------

    def start(self) -> None:
        """
        Start (or restart) the node: recover its spool and deliver.

        @raise RuntimeError: it is up already.
        """
        if self.up:
            raise RuntimeError(f"node {self.name} is up already")
        self.spool.prepare()
        self.window.load()
        recovered = list(self.spool.recover())
        for entry in recovered:
            self.window.note_envelope(entry.envelope)
        self.runner.start(recovered)
        self.up = True

    def stop(self) -> None:
        """
        Take the node down at once, as C{kill -9} would: open connections
        are cut, nothing more is delivered; only what its spool made
        durable survives (L{start} builds a fresh node over it).
        """
        self.up = False
        # First make the dead incarnation inert (no timer of it fires, no
        # write of it happens, no event of it is kept), then cut its
        # connections: what its objects do on hearing of the cut is lost.
        self.reactor.kill()
        self._gate.open = False
        self.network._cut(self)
        self.spool.crash()
        self._build()

    def submit(
        self, sender: str, recipients: Sequence[str], message: bytes,
        mail_params: str = "", client: str = "127.0.0.1", until: Callable[[], object] | None = None,
    ) -> list[tuple[int, str]]:
        """
        Send one message to this node over SMTP from C{client} (in memory),
        run the network until the session is over (see L{Network.smtp}),
        and return the replies.
        """
        return self.network.smtp(self, sender, recipients, message, mail_params, client, until)

    def queued(self) -> list[str]:
        """The queue ids of messages in this node's queue."""
        return [e.queue_id for e in self.runner.core]

    def event_names(self, **match: Any) -> list[str]:
        """The names of this node's events whose fields include C{match}."""
        return [e["event"] for e in self.events if all(e.get(k) == v for k, v in match.items())]

    def events_named(self, name: str, **match: Any) -> list[dict[str, Any]]:
        """This node's events called C{name} whose fields include C{match}, in order."""
        return [
            e for e in self.events
            if e["event"] == name and all(e.get(k) == v for k, v in match.items())
        ]


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


class _NetworkResolver:
    """
    The MX resolver of every node: whatever L{Network.resolver} is when a
    lookup is made, so that a test may set it at any time. With none set a
    lookup fails (never a real DNS query).
    """

    def __init__(self, network: "Network") -> None:
        self._network = network

    def _resolver(self) -> Any:
        resolver = self._network.resolver
        if resolver is None:
            raise RuntimeError("no resolver: an mx route needs Network.resolver set")
        return resolver

    def lookupMailExchange(self, name: str, timeout: Any = None) -> Any:
        """C{Network.resolver.lookupMailExchange(name)}."""
        return self._resolver().lookupMailExchange(name, timeout)

    def lookupAddress(self, name: str, timeout: Any = None) -> Any:
        """C{Network.resolver.lookupAddress(name)} (A records)."""
        return self._resolver().lookupAddress(name, timeout)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Any:
        """C{Network.resolver.lookupIPV6Address(name)} (AAAA records)."""
        return self._resolver().lookupIPV6Address(name, timeout)


class Network:
    """
    Nodes on one simulated clock, connected in memory.

    @ivar reactor: the network's reactor; its clock starts at L{EPOCH}.
    @ivar resolver: the DNS resolver every node uses (C{lookupMailExchange},
        C{lookupAddress}, C{lookupIPV6Address} of
        L{twisted.internet.interfaces.IResolver}, e.g. L{relaynet.zones.resolver}): a
        fake a test sets; looked up at each lookup. None by default: MX
        lookups fail.
    @ivar shuffle: how nodes order next hops of equal priority, in place (by
        default: not at all, so tests are deterministic); looked up at each
        attempt.
    """

    def __init__(self) -> None:
        self.reactor = ThreadlessReactor()
        self.reactor.advance(EPOCH)
        self.nodes: dict[str, NetNode] = {}
        self.resolver: Any = None
        self.shuffle: Callable[[list[NextHop]], None] = lambda hops: None
        self._pumps: list[tuple[iosim.IOPump, NetNode | None, NetNode | None]] = []
        self._addresses = itertools.count(2)
        self._reserved: dict[str, str] = {}
        self._ports = itertools.count(40000)

    # -- building -----------------------------------------------------------

    def endpoint(self, name: str) -> str:
        """
        The next-hop endpoint of node C{name} (for routes). The node need
        not exist yet: its address is reserved for it (a name no node ever
        takes is an address where connections are refused).
        """
        return f"tcp:{self.address_of(name)}:25"

    def address_of(self, name: str) -> str:
        """The address node C{name} listens on, reserved now if it is not added yet."""
        node = self.nodes.get(name)
        if node is not None:
            return node.address
        if name not in self._reserved:
            self._reserved[name] = self._free_address()
        return self._reserved[name]

    def _free_address(self) -> str:
        taken = {n.address for n in self.nodes.values()} | set(self._reserved.values())
        while True:
            address = f"127.0.0.{next(self._addresses)}"
            if address not in taken:
                return address

    def add_node(
        self,
        name: str,
        local_domains: Sequence[str] = (),
        users: Sequence[str] | None = None,
        routes: Sequence[Mapping[str, Any]] = (),
        address: str | None = None,
        start: bool = True,
        settle_delay: float = 0.0,
        **tables: Any,
    ) -> NetNode:
        """
        Add a node named C{name} listening on C{address}:25 (by default the
        address L{endpoint} reserved for it, else the next free 127.0.0.N).

        @param local_domains: its C{[local].domains}; a catch-all unless
            C{users} names the users.
        @param routes: its C{[[route]]} rules (parsed-TOML dicts).
        @param start: start it (else it is down until L{NetNode.start}).
        @param settle_delay: see L{NetNode.settle_delay}.
        @param tables: more configuration tables merged in, e.g.
            C{queue={"minimal_backoff": 60}} or C{limits={"max_hops": 5}}.
        """
        if name in self.nodes:
            raise ValueError(f"there is a node {name!r} already")
        address = address or self._reserved.get(name) or self._free_address()
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
        spool = MemorySpool(clock=self.reactor.seconds, suffix=name.upper()[:4].ljust(4, "0"))
        node = NetNode(self, name, config, address, spool, settle_delay=settle_delay)
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
        if node is None:
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError(host, port)))
            return
        client_addr = IPv4Address("TCP", origin.address, next(self._ports))
        server_addr = IPv4Address("TCP", host, port)
        server = node.factory.buildProtocol(client_addr)
        client = factory.buildProtocol(server_addr)
        self._attach(server, client, client_addr, server_addr, node, origin)

    def _attach(
        self, server: Any, client: Any, caddr: IPv4Address, saddr: IPv4Address, node: NetNode | None,
        origin: NetNode | None,
    ) -> iosim.IOPump:
        pump: iosim.IOPump = iosim.connect(
            server, iosim.FakeTransport(server, True, saddr, caddr),
            client, iosim.FakeTransport(client, False, caddr, saddr),
            greet=False, clock=self.reactor,
        )
        self._pumps.append((pump, node, origin))
        return pump

    def _cut(self, node: NetNode) -> None:
        """
        Drop every connection to or from C{node} (it went down): the peer
        sees the connection lost, bytes in flight are lost.
        """
        for entry in list(self._pumps):
            pump, server_node, origin = entry
            if node is server_node or node is origin:
                for io in (pump.clientIO, pump.serverIO):
                    if not io.disconnected:
                        io.disconnected = True
                        io.disconnectReason = ConnectionLost("the node went down")
                        io.reportDisconnect()
                self._pumps.remove(entry)

    # -- running ----------------------------------------------------------------

    def run(self, until: Callable[[], object] | None = None) -> int:
        """
        Move bytes over every connection and run every call that is due,
        until nothing more happens (the clock does not move).

        @param until: if given, stop as soon as it returns true, checked
            before each round (to act in the middle of a delivery, e.g. to
            kill a node that has sent a message but not heard the reply).
        @return: how many rounds moved something.
        """
        busy = 0
        for _ in range(_MAX_ROUNDS):
            if until is not None and until():
                return busy
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

    def next_call(self) -> float | None:
        """When the earliest scheduled call is due (network time), or C{None}."""
        return min((c.getTime() for c in self.reactor.getDelayedCalls()), default=None)

    def _step(self, end: float, step: float | None) -> None:
        """Move the clock to the next due call, C{end}, or by C{step}, whichever is first."""
        now = self.reactor.seconds()
        target = end if step is None else min(end, now + step)
        due = self.next_call()
        if due is not None:
            target = min(target, due)
        if target > now:
            self.reactor.advance(target - now)
        self.run()

    def advance(self, seconds: float, step: float | None = None) -> None:
        """
        Let C{seconds} pass, running the network at every due call (timers,
        retries and timeouts fire at their exact time), or at least every
        C{step} seconds if given.
        """
        self.run()
        end = self.reactor.seconds() + seconds
        for _ in range(_MAX_ROUNDS):
            if self.reactor.seconds() >= end:
                return
            self._step(end, step)
        raise AssertionError(f"{seconds} s did not pass in {_MAX_ROUNDS} steps")

    def run_until(
        self, condition: Callable[[], object], limit: float = 3600.0, step: float | None = None,
    ) -> float:
        """
        Advance the clock, from due call to due call (or by at most C{step}),
        until C{condition()} holds, at most C{limit} seconds; return the
        time it took. The clock stops at the due call after which it held.

        @raise AssertionError: it did not hold in time.
        """
        start = self.reactor.seconds()
        end = start + limit
        self.run()
        for _ in range(_MAX_ROUNDS):
            if condition():
                return self.reactor.seconds() - start
            if self.reactor.seconds() >= end:
                break
            self._step(end, step)
        raise AssertionError(f"condition not met within {limit} s")

    def smtp(
        self, node: NetNode, sender: str, recipients: Sequence[str], message: bytes,
        mail_params: str = "", client: str = "127.0.0.1", until: Callable[[], object] | None = None,
    ) -> list[tuple[int, str]]:
        """
        An SMTP client session to C{node}: EHLO, MAIL, RCPT..., DATA, QUIT.
        The network runs until nothing more happens (the clock does not
        move), or only until C{until()} holds (see L{run}).

        @return: the replies the client got (so far), multi-line replies
            by their last line.
        @raise ConnectionRefusedError: the node is down.
        """
        if not node.up:
            raise ConnectionRefusedError(node.address, 25)
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
        self.run(until)
        return session.replies
