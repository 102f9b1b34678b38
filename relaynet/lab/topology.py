# -*- test-case-name: tests.test_lab -*-
"""
Lab topologies: one TOML file describes a relay network (nodes, their
loopback addresses, listeners, local domains and mailboxes, routes between
them, pass-through node settings) and what the lab drives through it.

This module is pure: it parses and validates a topology, allocates addresses
and ports (through an injected port probe) and generates each node's config
as a mapping, which L{relaynet.config.parse_config} then validates. It starts
nothing and opens no socket itself. The format is in C{docs/topology.md}.

Errors are L{relaynet.config.ConfigError}s naming the file and the dotted key,
like the node's own config errors.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from attrs import field, frozen

from relaynet.config import ConfigError, NodeConfig, TableReader, parse_config, read_toml

NAME = re.compile(r"[a-z][a-z0-9-]{0,23}\Z")
LAYOUTS = ("layers", "circle")
DEFAULT_PORT = 2525
DEFAULT_FIRST_ADDRESS = "127.0.0.2"
NETNS_RANGE = ipaddress.ip_network("198.18.0.0/15")
"""RFC 2544 benchmarking range: used only inside namespaces the lab creates."""

LAB_QUEUE = {"minimal_backoff": 1, "maximal_backoff": 5, "delay_warning": 0}
LAB_OUTBOUND = {"connect_timeout": 5}
LAB_TRUSTED = ["127.0.0.0/8"]

# Keys of a node's raw config that the lab owns.
_LAB_OWNED = {("node", "name"), ("node", "spool"), ("local", "mailroot")}
# Keys of a route that are passed to the node config verbatim.
_ROUTE_PASSTHROUGH = (
    "ack", "concurrency", "tls", "source_address", "code", "enhanced", "text",
    "mx_port", "next_hops", "dkim", "source_pool",
)


@frozen
class Hop:
    """A next hop that is another lab node, with an MX-like priority."""

    node: str
    priority: int = 10


@frozen
class RouteSpec:
    """
    One route of a lab node: the node config's C{[[route]]} with next hops
    named by lab node (C{via}) instead of endpoint strings.

    @ivar extra: keys passed verbatim to the generated route.
    """

    domains: tuple[str, ...]
    action: str
    via: tuple[Hop, ...] = ()
    extra: Mapping[str, Any] = field(factory=dict)


@frozen
class ListenerSpec:
    """
    An additional listener of a lab node (the first, relay listener is
    implicit). C{port} L{None} means "any free port".
    """

    mode: str = "relay"
    port: int | None = None
    extra: Mapping[str, Any] = field(factory=dict)


@frozen
class NodeSpec:
    """One node of a topology, as written in the file (defaults applied)."""

    name: str
    role: str | None
    address: str | None
    port: int
    domains: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    aliases: Mapping[str, Any] = field(factory=dict)
    catch_all: bool = False
    routes: tuple[RouteSpec, ...] = ()
    listeners: tuple[ListenerSpec, ...] = ()
    config: Mapping[str, Any] = field(factory=dict)
    tls: bool = False
    auth_users: Mapping[str, str] = field(factory=dict)
    dkim: tuple[str, ...] = ()
    tlsa: str | None = None

    def neighbours(self) -> list[str]:
        """The nodes this node relays to, in route order, without repeats."""
        out: list[str] = []
        for r in self.routes:
            for h in r.via:
                if h.node not in out:
                    out.append(h.node)
        return out


@frozen
class Traffic:
    """Defaults of C{lab send} for this topology."""

    entry: tuple[str, ...]
    sender: str
    recipients: tuple[str, ...]
    rotate: bool = False
    count: int = 100
    size: int = 2048
    concurrency: int = 8


@frozen
class ChaosSpec:
    """Defaults of C{lab chaos} for this topology."""

    targets: tuple[str, ...] = ()
    duration: float = 15.0
    interval: tuple[float, float] = (1.0, 3.0)
    down: tuple[float, float] = (0.5, 2.0)
    restart: bool = True
    max_actions: int = 0
    start_after: float = 0.0
    links: bool = False


@frozen
class STSPolicySpec:
    """An MTA-STS policy the lab publishes for C{domain} (RFC 8461 3.2)."""

    domain: str
    mode: str
    mx: tuple[str, ...]
    max_age: int = 86400

    @property
    def text(self) -> str:
        """The policy file, as served at C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt}."""
        lines = ["version: STSv1", f"mode: {self.mode}"] + [f"mx: {m}" for m in self.mx]
        return "\r\n".join(lines + [f"max_age: {self.max_age}", ""])

    @property
    def policy_id(self) -> str:
        """The TXT record's C{id}: changes whenever the policy does."""
        import hashlib

        return hashlib.sha256(self.text.encode()).hexdigest()[:20]


@frozen
class Topology:
    """A parsed, validated topology file."""

    name: str
    source: str
    description: str
    port: int
    first_address: str
    layout: str
    nodes: tuple[NodeSpec, ...]
    traffic: Traffic
    chaos: ChaosSpec
    zones: tuple[tuple[str, tuple[str, ...]], ...] = ()
    mta_sts: tuple[STSPolicySpec, ...] = ()
    dnssec: bool = False

    def node(self, name: str) -> NodeSpec:
        """The node called C{name}; @raise KeyError: no such node."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        """Node names in file order."""
        return [n.name for n in self.nodes]

    def links(self) -> list[tuple[str, str]]:
        """
        Undirected links between nodes (one per pair that routes to each
        other in either direction), in file order.
        """
        seen: list[tuple[str, str]] = []
        for n in self.nodes:
            for other in n.neighbours():
                pair = (n.name, other) if self.names.index(n.name) < self.names.index(other) else (other, n.name)
                if pair not in seen:
                    seen.append(pair)
        return seen

    def role(self, name: str) -> str:
        """The role shown for a node: its C{role}, or one derived from its routes."""
        n = self.node(name)
        if n.role:
            return n.role
        relays = any(r.via or r.action in ("relay", "mx") for r in n.routes)
        if name in self.traffic.entry:
            return "entry"
        if n.domains and not relays:
            return "delivery"
        if n.domains:
            return "relay+delivery"
        return "relay"


# -- reading -----------------------------------------------------------------


class _Reader(TableReader):
    """
    Typed access to one table of the topology: the node config's reader, plus
    a string-or-list form and C{[min, max]} pairs.
    """

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(name, (list, str), None)
        if value is None:
            return default
        if isinstance(value, str):
            return (value,)
        return super().strings(name, default)

    def pair(self, name: str, default: tuple[float, float]) -> tuple[float, float]:
        value = self.get(name, (list, int, float), None)
        if value is None:
            return default
        if isinstance(value, (int, float)):
            value = [value, value]
        if (len(value) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
                or value[0] < 0 or value[1] < value[0]):
            raise self.error(name, "must be [min, max] seconds with 0 <= min <= max")
        return (float(value[0]), float(value[1]))




def _port(value: Any) -> str | None:
    return None if 0 < value < 65536 else "must be a TCP port (1-65535)"


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def _loopback(value: str) -> str | None:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IPv4 address"
    if addr.version != 4 or not addr.is_loopback:
        return f"{value!r} is not a loopback address (127.0.0.0/8): labs run on loopback"
    if value in ("127.0.0.0", "127.255.255.255"):
        return f"{value!r} cannot be bound"
    return None


def _address_check(value: str) -> str | None:
    if "@" not in value or value.startswith("@") or value.endswith("@"):
        return f"{value!r} is not an address (user@domain)"
    return None


def _read_route(source: str, key: str, data: Any, names: list[str], me: str) -> RouteSpec:
    r = _Reader(source, key, data)
    domains = r.strings("domains")
    if not domains:
        raise r.error("domains", "is required: a list of 'domain', '*.domain' or '*'")
    via: list[Hop] = []
    raw_via = r.get("via", (list, str), [])
    if isinstance(raw_via, str):
        raw_via = [raw_via]
    for i, item in enumerate(raw_via):
        hkey = f"{key}.via[{i}]"
        if isinstance(item, str):
            hop = Hop(node=item)
        elif isinstance(item, dict):
            h = _Reader(source, hkey, item)
            node = h.get("node", str, None)
            if node is None:
                raise h.error("node", "is required: the name of a lab node")
            hop = Hop(node=node, priority=h.get("priority", int, 10))
            h.finish()
        else:
            raise ConfigError(source, hkey, "must be a node name or { node = NAME, priority = N }")
        if hop.node not in names:
            raise ConfigError(source, hkey, f"no node named {hop.node!r} (nodes: {', '.join(names)})")
        if hop.node == me:
            raise ConfigError(source, hkey, "a node cannot relay to itself (a mail loop)")
        via.append(hop)
    extra = {k: r.get(k, object, None) for k in _ROUTE_PASSTHROUGH if r.has(k)}
    action = r.get("action", str, "relay" if via or "next_hops" in extra else None)
    if action is None:
        raise r.error("action", "is required when there is no 'via' (relay, local, mx or reject)")
    if via and action != "relay":
        raise r.error("via", f"only a relay route has next hops (action is {action!r})")
    r.finish()
    return RouteSpec(domains=domains, action=action, via=tuple(via), extra=extra)


def _read_listener(source: str, key: str, data: Any) -> ListenerSpec:
    r = _Reader(source, key, data)
    mode = r.get("mode", str, "relay")
    port = r.get("port", (int, str), "auto")
    if isinstance(port, str):
        if port != "auto":
            raise r.error("port", "must be a port number or \"auto\"")
        port = None
    elif _port(port):
        raise r.error("port", "must be a TCP port (1-65535)")
    if r.has("endpoint"):
        raise r.error("endpoint", "is set by the lab (the node's address and 'port')")
    extra = {k: v for k, v in data.items() if k not in ("mode", "port")}
    return ListenerSpec(mode=mode, port=port, extra=extra)


def _read_config_table(source: str, key: str, data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(source, key, "must be a table of node settings (see docs/config.md)")
    for table, name in _LAB_OWNED:
        if isinstance(data.get(table), dict) and name in data[table]:
            raise ConfigError(source, f"{key}.{table}.{name}", "is set by the lab")
    return copy.deepcopy(data)


def _read_node(source: str, key: str, name: str, data: Any, defaults: _Reader,
               lab_port: int, names: list[str]) -> NodeSpec:
    n = _Reader(source, key, data)
    role = n.get("role", str, None)
    address = n.get("address", str, None, _loopback)
    port = n.get("port", int, defaults.data.get("port", lab_port), _port)
    domains = tuple(d.lower() for d in n.strings("domains"))
    for i, d in enumerate(domains):
        if not d or "*" in d or "@" in d or " " in d:
            raise ConfigError(source, f"{key}.domains[{i}]", f"{d!r} is not a domain name")
    users = n.strings("users", tuple(defaults.data.get("users", ())))
    aliases = n.get("aliases", dict, defaults.data.get("aliases", {}))
    catch_all = n.get("catch_all", bool, defaults.data.get("catch_all", False))
    routes = tuple(
        _read_route(source, f"{key}.route[{i}]", item, names, name)
        for i, item in enumerate(n.get("route", list, []))
    )
    listeners = tuple(
        _read_listener(source, f"{key}.listener[{i}]", item)
        for i, item in enumerate(n.get("listener", list, []))
    )
    config = _deep_merge(
        _read_config_table(source, "defaults.config", defaults.data.get("config", {})),
        _read_config_table(source, f"{key}.config", n.get("config", dict, {})),
    )
    tls = n.get("tls", bool, defaults.data.get("tls", False))
    dkim = tuple(d.strip().rstrip(".").lower() for d in n.strings("dkim"))
    for i, d in enumerate(dkim):
        if not d or "*" in d or "@" in d or " " in d or "." not in d:
            raise ConfigError(source, f"{key}.dkim[{i}]", f"{d!r} is not a domain name")
    tlsa = n.get("tlsa", str, None, lambda v: None if v in ("match", "mismatch") else "must be match or mismatch")
    if tlsa is not None and not tls:
        raise ConfigError(source, f"{key}.tlsa", "publishes the TLSA record of the node's certificate: needs tls = true")
    if dkim and "dkim" in config:
        raise ConfigError(source, f"{key}.dkim", "the lab makes [dkim] from this list; no [dkim] in config too")
    auth_users = n.get("auth_users", dict, {})
    for user, password in auth_users.items():
        if not isinstance(password, str) or not password:
            raise ConfigError(source, f"{key}.auth_users.{user}", "must be a non-empty password string")
        if ":" in user or not user.strip() or any(c.isspace() for c in user):
            raise ConfigError(source, f"{key}.auth_users.{user}", "a user name has no colon or white space")
    for i, lst in enumerate(listeners):
        if lst.mode in ("submission", "submissions"):
            if not tls and "tls" not in config:
                raise ConfigError(source, f"{key}.listener[{i}].mode",
                                  f"{lst.mode} needs TLS: set 'tls = true' on the node (the lab issues a certificate)")
            if not auth_users and "auth" not in config:
                raise ConfigError(source, f"{key}.listener[{i}].mode",
                                  f"{lst.mode} needs users: add [node.{name}.auth_users] user = \"password\"")
    n.finish()
    return NodeSpec(
        name=name, role=role, address=address, port=port, domains=domains, users=users,
        aliases=aliases, catch_all=catch_all, routes=routes, listeners=listeners, config=config,
        tls=tls, auth_users=auth_users, dkim=dkim, tlsa=tlsa,
    )


def parse_topology(data: Mapping[str, Any], source: str = "<topology>") -> Topology:
    """
    Build a L{Topology} from a parsed TOML document.

    @param source: the file name, for error messages.
    @raise ConfigError: on the first problem, naming the key.
    """
    top = _Reader(source, "", dict(data))
    lab = top.sub("lab")
    stem = Path(source).stem if source != "<topology>" else "lab"
    name = lab.get("name", str, stem, lambda v: None if NAME.match(v) else
                   "must be lower-case letters, digits and '-', starting with a letter (at most 24)")
    description = lab.get("description", str, "")
    port = lab.get("port", int, DEFAULT_PORT, _port)
    first = lab.get("first_address", str, DEFAULT_FIRST_ADDRESS, _loopback)
    layout = lab.get("layout", str, "layers",
                     lambda v: None if v in LAYOUTS else f"must be one of {', '.join(LAYOUTS)}")

    nodes_data = top.get("node", dict, None)
    if not nodes_data:
        raise ConfigError(source, "node", "is required: at least one [node.NAME] table")
    names = list(nodes_data)
    for nm in names:
        if not NAME.match(nm):
            raise ConfigError(source, f"node.{nm}",
                              "node names are lower-case letters, digits and '-', starting with a letter (at most 24)")
    defaults = top.sub("defaults")
    for k in defaults.data:
        if k not in ("port", "users", "aliases", "catch_all", "tls", "config"):
            raise defaults.error(k, "unknown key (defaults may set port, users, aliases, catch_all, tls, config)")
    if "port" in defaults.data:
        defaults.get("port", int, None, _port)
    defaults.strings("users")
    defaults.get("aliases", dict, {})
    defaults.get("catch_all", bool, False)
    defaults.get("tls", bool, False)
    defaults.get("config", dict, {})
    nodes = tuple(
        _read_node(source, f"node.{nm}", nm, nodes_data[nm], defaults, port, names) for nm in names
    )

    addrs: dict[str, str] = {}
    for n in nodes:
        if n.address is not None:
            if n.address in addrs:
                raise ConfigError(source, f"node.{n.name}.address",
                                  f"{n.address} is already node {addrs[n.address]}'s address")
            addrs[n.address] = n.name

    t = lab.sub("traffic")
    entry = t.strings("from", (names[0],))
    for i, e in enumerate(entry):
        if e not in names:
            raise ConfigError(source, f"lab.traffic.from[{i}]", f"no node named {e!r}")
    sender = t.get("sender", str, f"lab@{nodes[0].domains[0] if nodes[0].domains else 'lab.test'}", _address_check)
    recipients = t.strings("recipients")
    if not recipients:
        deliverers = [n for n in nodes if n.domains]
        if not deliverers:
            raise ConfigError(source, "lab.traffic.recipients", "is required (no node has local domains)")
        recipients = (f"{(deliverers[-1].users or ('user',))[0].split('@')[0]}@{deliverers[-1].domains[0]}",)
    for i, r in enumerate(recipients):
        problem = _address_check(r)
        if problem:
            raise ConfigError(source, f"lab.traffic.recipients[{i}]", problem)
    traffic = Traffic(
        entry=entry, sender=sender, recipients=recipients,
        rotate=t.get("rotate", bool, False),
        count=t.get("count", int, 100, _positive),
        size=t.get("size", int, 2048, _positive),
        concurrency=t.get("concurrency", int, 8, _positive),
    )
    t.finish()

    c = lab.sub("chaos")
    targets = c.strings("targets", ())
    for i, tg in enumerate(targets):
        if tg not in names:
            raise ConfigError(source, f"lab.chaos.targets[{i}]", f"no node named {tg!r}")
    chaos = ChaosSpec(
        targets=targets,
        duration=float(c.get("duration", (int, float), 15.0, _positive)),
        interval=c.pair("interval", (1.0, 3.0)),
        down=c.pair("down", (0.5, 2.0)),
        restart=c.get("restart", bool, True),
        max_actions=c.get("max_actions", int, 0, lambda v: None if v >= 0 else "must be 0 (no limit) or more"),
        start_after=float(c.get("start_after", (int, float), 0.0,
                                lambda v: None if v >= 0 else "must be 0 or more")),
        links=c.get("links", bool, False),
    )
    c.finish()
    dns_table = top.sub("dns")
    dnssec = dns_table.get("dnssec", bool, False)
    zones = _read_zones(source, dns_table, names)
    if dnssec and not zones:
        raise ConfigError(source, "dns.dnssec", "signs the lab's zones: needs [dns] zones")
    for n in nodes:
        if n.tlsa is not None and not dnssec:
            raise ConfigError(source, f"node.{n.name}.tlsa",
                              "TLSA records mean nothing without DNSSEC: set [dns] dnssec = true")
    mta_sts = _read_sts(source, top.sub("mta_sts"))
    if mta_sts and not zones:
        raise ConfigError(source, "mta_sts", "needs [dns] zones: the lab's DNS server publishes the policies")
    for n in nodes:
        if n.dkim and not zones:
            raise ConfigError(source, f"node.{n.name}.dkim",
                              "needs [dns] zones: the lab's DNS server publishes the DKIM keys")
    lab.finish()
    top.finish()
    return Topology(
        name=name, source=source, description=description, port=port, first_address=first,
        layout=layout, nodes=nodes, traffic=traffic, chaos=chaos, zones=zones, mta_sts=mta_sts,
        dnssec=dnssec,
    )


def _read_sts(source: str, t: TableReader) -> tuple[STSPolicySpec, ...]:
    """
    C{[mta_sts."DOMAIN"] mode = "enforce", mx = ["mx.DOMAIN"]}: the MTA-STS
    policies the lab serves (its DNS server: C{_mta-sts} TXT and the
    C{mta-sts} host; its HTTPS server: the policy file).
    """
    out = []
    for domain in list(t.data):
        key = f"mta_sts.{domain}"
        d = _Reader(source, key, t.get(domain, dict, {}))
        mode = d.get("mode", str, "enforce",
                     lambda v: None if v in ("enforce", "testing", "none") else "must be enforce, testing or none")
        mx = d.strings("mx", ())
        if not mx and mode != "none":
            raise d.error("mx", "is required: the MX host name patterns (e.g. \"mx.example.test\", \"*.example.test\")")
        for i, m in enumerate(mx):
            body = m[2:] if m.startswith("*.") else m
            if not body or "*" in body or " " in body or "." not in body:
                raise ConfigError(source, f"{key}.mx[{i}]", f"{m!r} is not a host name or *.domain pattern")
        max_age = d.get("max_age", int, 86400, lambda v: None if 0 <= v <= 31557600 else "must be 0 to 31557600")
        d.finish()
        out.append(STSPolicySpec(domain.rstrip(".").lower(), mode, tuple(m.lower() for m in mx), max_age))
    t.finish()
    return tuple(out)


def sts_records(topology: Topology) -> dict[str, list[str]]:
    """The DNS records of the lab's MTA-STS policies, by domain: the TXT and the policy host."""
    return {
        p.domain: [
            f'_mta-sts.{p.domain}. IN TXT "v=STSv1; id={p.policy_id}"',
            f"mta-sts.{p.domain}. IN A 127.0.0.1",
        ]
        for p in topology.mta_sts
    }


def zone_names(topology: Topology, name: str) -> list[str]:
    """
    The host names the topology's zones give node C{name} (C{"mx A {mx-a}"}
    in zone alpha.test: mx.alpha.test): its certificate names them, so that
    a sender checking the MX name (MTA-STS, tls = "verify") accepts it.
    """
    from relaynet.zones import _absolute

    out = []
    for origin, lines in topology.zones:
        for line in lines:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "{" + name + "}" and parts[-2].upper() in ("A", "AAAA"):
                host = _absolute(parts[0], origin).rstrip(".")
                if host not in out:
                    out.append(host)
    return out


_NODE_REF = re.compile(r"\{([a-z][a-z0-9-]*)\}")


def _read_zones(source: str, d: TableReader, names: list[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """
    C{[dns] zones = { "dest.test" = ["@ MX 10 mx1", "mx1 A {hop3}"] }}: the
    zones the lab's DNS server answers for (record lines of
    L{relaynet.zones}; C{{NODE}} stands for that node's address).
    """
    from relaynet.zones import ZoneError, parse_record

    raw = d.get("zones", dict, {})
    out = []
    for origin, lines in raw.items():
        key = f"dns.zones.{origin}"
        if not isinstance(lines, list) or not all(isinstance(x, str) for x in lines):
            raise ConfigError(source, key, "must be an array of record lines, e.g. \"@ MX 10 mx1\"")
        for i, line in enumerate(lines):
            for ref in _NODE_REF.findall(line):
                if ref not in names:
                    raise ConfigError(source, f"{key}[{i}]", f"no node named {ref!r} (nodes: {', '.join(names)})")
            try:
                parse_record(_NODE_REF.sub("127.0.0.1", line), origin.rstrip(".").lower())
            except ZoneError as e:
                raise ConfigError(source, f"{key}[{i}]", str(e)) from None
        out.append((origin.rstrip(".").lower(), tuple(lines)))
    d.finish()
    return tuple(out)


def zone_spec(
    topology: Topology, addresses: Mapping[str, str], extra: Mapping[str, Sequence[str]] = {},
) -> dict[str, list[str]]:
    """
    The topology's zones with each C{{NODE}} replaced by that node's address.

    @param extra: more record lines (absolute owner names) by domain: each
        goes into the zone of that domain or of its closest enclosing one,
        or a zone of its own (the lab's DKIM key records).
    """
    spec = {
        origin: [_NODE_REF.sub(lambda m: addresses[m.group(1)], line) for line in lines]
        for origin, lines in topology.zones
    }
    for domain, lines in extra.items():
        labels = domain.split(".")
        enclosing = [".".join(labels[i:]) for i in range(len(labels)) if ".".join(labels[i:]) in spec]
        spec.setdefault(enclosing[0] if enclosing else domain, []).extend(lines)
    return spec


def load_topology(path: str | Path) -> Topology:
    """
    Read and validate a topology file.

    @raise ConfigError: unreadable, not TOML, or invalid (naming the key).
    """
    p = Path(path)
    return parse_topology(read_toml(p), source=str(p))


# -- allocation --------------------------------------------------------------


@frozen
class NodePlan:
    """
    Where one node of a running lab lives.

    @ivar address: the address its relay listener binds (loopback mode), or
        C{127.0.0.1} inside its namespace (netns mode).
    @ivar ports: the port of each listener, the relay listener first.
    @ivar link_addresses: netns mode: peer node -> this node's address on
        the link to that peer.
    """

    name: str
    address: str
    ports: tuple[int, ...]
    link_addresses: Mapping[str, str] = field(factory=dict)

    @property
    def port(self) -> int:
        return self.ports[0]


PortProbe = Callable[[str, int], bool]
FreePort = Callable[[str], int]


def allocate(topology: Topology, port_ok: PortProbe, free_port: FreePort,
             netns: bool = False) -> dict[str, NodePlan]:
    """
    Give every node an address and ports.

    Loopback mode: explicit addresses are kept; the others are taken in file
    order from C{[lab].first_address} up, skipping taken ones. A node's port
    is its C{port} when C{port_ok(address, port)}, else C{free_port(address)}.

    Netns mode: each node has a namespace of its own, so addresses and ports
    never collide: the node listens on 127.0.0.1 and on one address per link
    (a /30 of L{NETNS_RANGE} per link, see L{link_subnets}).

    A topology with C{[dns]} zones routes by MX, and an MX record has no
    port: every node's relay port is then the same one, C{[lab].port} or
    the next port free on every node's address.

    @param port_ok: whether a port can be bound on an address now.
    @param free_port: a free port on an address.
    """
    plans: dict[str, NodePlan] = {}
    if netns:
        link_addr: dict[str, dict[str, str]] = {n: {} for n in topology.names}
        for (a, b), (addr_a, addr_b) in zip(topology.links(), link_subnets(len(topology.links()))):
            link_addr[a][b] = addr_a
            link_addr[b][a] = addr_b
        for n in topology.nodes:
            ports = [n.port] + [
                lst.port if lst.port is not None else n.port + 62 + i
                for i, lst in enumerate(n.listeners)
            ]
            plans[n.name] = NodePlan(n.name, "127.0.0.1", tuple(ports), link_addr[n.name])
        return plans
    taken = {n.address for n in topology.nodes if n.address}
    nxt = ipaddress.ip_address(topology.first_address)
    addresses: dict[str, str] = {}
    for n in topology.nodes:
        address = n.address
        if address is None:
            while str(nxt) in taken:
                nxt += 1
            address = str(nxt)
            taken.add(address)
            nxt += 1
            if not ipaddress.ip_address(address).is_loopback:
                raise ConfigError(topology.source, f"node.{n.name}.address",
                                  "ran out of loopback addresses from lab.first_address")
        addresses[n.name] = address
    common: int | None = None
    if topology.zones:
        for candidate in range(topology.port, min(topology.port + 500, 65536)):
            if all(port_ok(a, candidate) for a in addresses.values()):
                common = candidate
                break
        else:
            raise ConfigError(topology.source, "lab.port",
                              f"no port from {topology.port} on is free on every node's address (an MX lab needs one)")
    for n in topology.nodes:
        address = addresses[n.name]
        used: set[int] = set()
        ports = []
        for wanted in [common if common is not None else n.port] + [lst.port for lst in n.listeners]:
            port = wanted if wanted is not None and wanted not in used and port_ok(address, wanted) else None
            for _ in range(20):
                if port is not None and port not in used:
                    break
                port = free_port(address)
            assert port is not None
            used.add(port)
            ports.append(port)
        plans[n.name] = NodePlan(n.name, address, tuple(ports))
    return plans


def link_subnets(count: int) -> list[tuple[str, str]]:
    """The two host addresses of the /30 of each of C{count} links, in L{NETNS_RANGE}."""
    out = []
    base = int(NETNS_RANGE.network_address)
    for i in range(count):
        net = base + 4 * i
        out.append((str(ipaddress.ip_address(net + 1)), str(ipaddress.ip_address(net + 2))))
    return out


# -- generation --------------------------------------------------------------


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """
    Merge C{extra} into a copy of C{base}: tables merge key by key, arrays of
    tables (C{route}, C{listener}) are appended to, anything else is replaced.
    """
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, list) and isinstance(out.get(k), list) and k in ("route", "listener"):
            out[k] = out[k] + copy.deepcopy(v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def endpoint_to(plans: Mapping[str, NodePlan], src: str, dst: str, netns: bool) -> str:
    """The client endpoint string node C{src} uses to reach node C{dst}."""
    p = plans[dst]
    if netns:
        return f"tcp:{p.link_addresses[src]}:{p.port}"
    return f"tcp:{p.address}:{p.port}"


def node_config(topology: Topology, plans: Mapping[str, NodePlan], name: str,
                node_dir: Path, netns: bool = False, dns: str | None = None,
                policy_port: int | None = None) -> dict[str, Any]:
    """
    The node config (a TOML-ready mapping) of node C{name}.

    Lab settings (listeners on the node's address, short retries, loopback
    trust, the lab's DNS server C{dns} as C{HOST:PORT}) come first; the
    topology's C{[defaults.config]} and C{[node.NAME.config]} tables are
    merged over them verbatim.
    """
    n = topology.node(name)
    plan = plans[name]
    hosts = [plan.address] + (sorted(set(plan.link_addresses.values())) if netns else [])
    listeners: list[dict[str, Any]] = [
        {"endpoint": f"tcp:{plan.ports[0]}:interface={h}", "mode": "relay"} for h in hosts
    ]
    for lst, port in zip(n.listeners, plan.ports[1:]):
        for h in hosts:
            listeners.append({"endpoint": f"tcp:{port}:interface={h}", "mode": lst.mode, **lst.extra})
    local: dict[str, Any] = {
        "mailroot": str(node_dir / "mailboxes"),
        "domains": list(n.domains),
        "catch_all": n.catch_all,
        "users": list(n.users),
    }
    if n.aliases:
        local["aliases"] = copy.deepcopy(dict(n.aliases))
    routes = []
    for r in n.routes:
        route: dict[str, Any] = {"domains": list(r.domains), "action": r.action}
        if r.via:
            route["next_hops"] = [
                {"endpoint": endpoint_to(plans, name, h.node, netns), "priority": h.priority}
                for h in r.via
            ] + list(r.extra.get("next_hops", []))
        route.update({k: v for k, v in r.extra.items() if k != "next_hops" or not r.via})
        if r.action == "mx" and "mx_port" not in route:
            # Exchangers are lab nodes, listening on the lab's common relay port.
            route["mx_port"] = plan.ports[0]
        if r.via and not netns and "source_address" not in route and "source_pool" not in route:
            # Connect from the node's own address, so each hop is seen as itself.
            route["source_address"] = plan.address
        routes.append(route)
    trusted = LAB_TRUSTED + ([str(NETNS_RANGE)] if netns else [])
    files = node_files(topology, name, node_dir)
    base: dict[str, Any] = {
        "node": {
            "name": name,
            "hostname": f"{name}.{topology.name}.test",
            "spool": str(node_dir / "spool"),
            # One process per lab node (a node's [node] workers in the
            # topology says otherwise): labs count and trace processes.
            "workers": 1,
        },
        "listener": listeners,
        "local": local,
        "relay": {"trusted_networks": trusted},
        "queue": dict(LAB_QUEUE),
        "outbound": dict(LAB_OUTBOUND),
    }
    if routes:
        base["route"] = routes
    if dns is not None:
        base["dns"] = {"servers": [dns]}
        if topology.dnssec:
            # The lab's resolver validates the signed zones: DANE is on.
            base["dns"]["dnssec_resolver"] = dns
    if policy_port is not None:
        # The lab's MTA-STS policies are served on this port, not 443.
        base["mta_sts"] = {"policy_port": policy_port}
    if "ca_file" in files:
        base["tls"] = {k: str(files[k]) for k in ("cert", "key", "ca_file") if k in files}
    if "password_file" in files:
        base["auth"] = {"password_file": str(files["password_file"])}
    keys = dkim_keys(topology, name, node_dir)
    if keys:
        base["dkim"] = {"sign": True, "keys": [
            {"domain": domain, "selector": selector, "key_file": str(path)}
            for domain, selector, _, path in keys
        ]}
    return _deep_merge(base, n.config)


def node_files(topology: Topology, name: str, node_dir: Path) -> dict[str, Path]:
    """
    The TLS and AUTH files the lab makes for a node: C{cert} and C{key} (a
    node with C{tls = true}), C{ca_file} (the lab CA, for every node once
    any node has TLS, so C{tls = "verify"} routes work), C{password_file}
    (a node with C{auth_users}).
    """
    n = topology.node(name)
    out: dict[str, Path] = {}
    if any(m.tls for m in topology.nodes) or topology.mta_sts:
        out["ca_file"] = node_dir.parent / "ca" / "ca.pem"
    if n.tls:
        host = f"{name}.{topology.name}.test"
        out["cert"] = node_dir / "tls" / f"{host}.pem"
        out["key"] = node_dir / "tls" / f"{host}.key"
    if n.auth_users:
        out["password_file"] = node_dir / "passwd"
    return out


DKIM_SELECTORS = (("lab-rsa", "rsa"), ("lab-ed", "ed25519"))
"""The lab signs with an RSA and an Ed25519 key per domain (dual signing)."""


def dkim_keys(topology: Topology, name: str, node_dir: Path) -> list[tuple[str, str, str, Path]]:
    """
    The DKIM keys the lab makes for a node with C{dkim = [domains]}:
    C{(domain, selector, algorithm, key file)}, an RSA and an Ed25519 key
    per domain, in C{<node>/dkim/}.
    """
    return [
        (domain, selector, algorithm, node_dir / "dkim" / f"{domain}.{selector}.key")
        for domain in topology.node(name).dkim for selector, algorithm in DKIM_SELECTORS
    ]


def validate_node_config(topology: Topology, name: str, data: Mapping[str, Any],
                         node_dir: Path) -> NodeConfig:
    """
    Check a generated node config with the node's own parser.

    @raise ConfigError: naming the topology file, the node and the key of the
        generated config.
    """
    source = f"{topology.source} (node {name}, generated {node_dir / 'node.toml'})"
    return parse_config(copy.deepcopy(dict(data)), source=source, base=node_dir)
