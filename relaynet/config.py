# -*- test-case-name: tests.test_config -*-
"""
Node configuration: TOML (stdlib L{tomllib}) into frozen attrs classes.

Every error names the file, the dotted key and what is wrong. Unknown keys are
errors. Relative paths in a file are taken relative to that file's directory;
the embedded default (no file) is relative to the working directory, so
C{twistd -n relaynet} in an empty directory is a working mail drop under
C{./var/relaynet}.

The format is documented in C{docs/config.md}.
"""

from __future__ import annotations

import ipaddress
import math
import re
import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from attrs import field, frozen


T = TypeVar("T")

LISTENER_MODES = ("relay", "submission", "submissions")
BARE_NEWLINES = ("reject", "normalize")
ROUTE_ACTIONS = ("local", "relay", "mx", "lmtp", "reject")
ACK_MODES = ("queued", "cut-through")
TLS_POLICIES = ("none", "opportunistic", "required", "verify")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
ADMIN_ENDPOINT_KINDS = ("unix", "tcp", "tcp6")
TLS_RPT_SEND = ("mail", "https", "both", "none")


class ConfigError(Exception):
    """
    The configuration is invalid.

    @ivar source: the file (or C{<default>}) the error is in.
    @ivar key: the dotted key, e.g. C{limits.max_message_size}.
    @ivar problem: what is wrong with it.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


@frozen
class Listener:
    """
    One listening endpoint.

    @ivar endpoint: a Twisted server endpoint string.
    @ivar mode: C{relay} (port 25 style: STARTTLS offered when C{[tls]} is
        set), C{submission} (RFC 6409, port 587: AUTH required before MAIL,
        offered only over TLS) or C{submissions} (port 465: implicit TLS, AUTH
        required).
    @ivar reuse_port: listen with C{SO_REUSEPORT} (C{tcp:}/C{tcp6:} only), so
        that several nodes, each with its own spool, share one address and
        port and the kernel spreads connections between them.
    """

    endpoint: str
    mode: str = "relay"
    reuse_port: bool = False


@frozen
class Limits:
    """
    Intake limits, with RFC 5321 / Postfix-like defaults.

    @ivar recipient_overshoot_limit: 452 4.5.3 replies past C{max_recipients}
        that do not count toward C{max_errors}, per transaction (Postfix's
        smtpd_recipient_overshoot_limit).
    @ivar forbid_unauth_pipelining: a client that has not authenticated and
        sends more after a command that must end a pipelined group gets
        554 5.5.0 and is disconnected (Postfix's smtpd_forbid_unauth_pipelining).
    """

    max_message_size: int = 10_240_000
    max_recipients: int = 1000
    recipient_overshoot_limit: int = 1000
    max_hops: int = 50
    idle_timeout: float = 300.0
    data_timeout: float = 600.0
    max_line_length: int = 1000
    max_command_length: int = 2048
    max_errors: int = 20
    max_connections: int = 500
    max_connections_per_ip: int = 50
    bare_newlines: str = "reject"
    forbid_unauth_pipelining: bool = True


@frozen
class TLSSettings:
    """
    Certificate and key for the node's listeners, and the CA bundle that
    C{tls = "verify"} routes check next hops against.
    """

    cert: Path | None = None
    key: Path | None = None
    ca_file: Path | None = None


@frozen
class EgressPoolSpec:
    """
    C{[egress.NAME]}: source addresses a route's connections leave from,
    with weights (L{relaynet.delivery.egress}).
    """

    name: str
    addresses: tuple[tuple[str, int], ...]


@frozen
class MTASTSSettings:
    """
    MTA-STS (RFC 8461) for mx routes (L{relaynet.delivery.mtasts}).

    @ivar enabled: look policies up and apply them.
    @ivar policy_port: the policy hosts' HTTPS port (443; labs and tests
        serve policies elsewhere).
    @ivar fetch_timeout: seconds for a whole policy fetch.
    @ivar refresh: when the TXT id changes while a cached policy is still
        valid: C{wait} for the new policy before delivering (RFC 8461 5.1:
        a new id usually means new MX hosts), or deliver under the cached
        one and fetch in the C{background}.
    """

    enabled: bool = True
    policy_port: int = 443
    fetch_timeout: float = 60.0
    refresh: str = "wait"


@frozen
class TLSRPTSettings:
    """
    SMTP TLS reporting (RFC 8460) of mx deliveries
    (L{relaynet.delivery.tlsrpt}).

    @ivar enabled: count TLS outcomes per policy domain and day.
    @ivar organization_name: the reports' C{organization-name}.
    @ivar contact_info: the reports' C{contact-info} (an address or URI).
    @ivar submitter: the reports' submitter (C{TLS-Report-Submitter}, file
        names); the node's hostname by default.
    @ivar send: deliver the reports to the domains' C{rua} by C{mail},
        C{https}, C{both}, or C{none} (written to the spool only).
    @ivar report_sender: envelope sender and C{From:} of mailed reports;
        C{postmaster@<hostname>} by default.
    @ivar send_interval: seconds between looks for finished days' reports
        to send (and retries of failed ones).
    @ivar flush_interval: seconds between writes of the counters to disk
        (what a crash can lose).
    """

    enabled: bool = False
    organization_name: str = ""
    contact_info: str = ""
    submitter: str = ""
    send: str = "mail"
    report_sender: str = ""
    flush_interval: float = 60.0
    send_interval: float = 3600.0


@frozen
class DKIMSettings:
    """
    DKIM signing of mail leaving by relay and mx routes
    (L{relaynet.delivery.dkim}).

    @ivar sign: routes sign unless they say C{dkim = false}.
    @ivar keys: L{relaynet.delivery.dkim.SigningKey}s, read at load time.
    @ivar signing_table: C{(From: domain pattern, signing domain)} pairs.
    """

    sign: bool = False
    keys: tuple[Any, ...] = ()
    signing_table: tuple[tuple[str, str], ...] = ()


@frozen
class AuthSettings:
    """
    SMTP AUTH (submission): the password file, failure handling and which
    envelope senders each user may use.
    """

    password_file: Path | None = None
    max_failures: int = 3
    failure_delay: float = 1.0
    senders: Mapping[str, tuple[str, ...]] = field(factory=dict)


@frozen
class LocalDelivery:
    """
    Local domains and their mailboxes.

    @ivar mailroot: directory holding C{<domain>/<user>/Maildir}.
    @ivar domains: domains delivered here (lower case).
    @ivar catch_all: accept any local part of a local domain.
    @ivar users: known users; C{"name"} is valid in every local domain,
        C{"name@domain"} only in that one.
    @ivar aliases: address or bare local part -> list of target addresses or
        bare local parts.
    """

    mailroot: Path
    domains: tuple[str, ...] = ()
    catch_all: bool = False
    users: frozenset[str] = frozenset()
    aliases: Mapping[str, tuple[str, ...]] = field(factory=dict)


@frozen
class NextHop:
    """A next hop of a relay route: an endpoint string and an MX-like priority."""

    endpoint: str
    priority: int = 10


@frozen
class RouteRule:
    """
    One routing rule: the first rule whose pattern matches a recipient's domain
    decides what happens to it.
    """

    domains: tuple[str, ...]
    action: str
    next_hops: tuple[NextHop, ...] = ()
    code: int = 550
    enhanced: str = "5.7.1"
    text: str = "Relay access denied"
    ack: str = "queued"
    concurrency: int = 20
    source_address: str | None = None
    tls: str = "none"
    mx_port: int = 25
    auth_file: Path | None = None
    auth: tuple[str, str] | None = field(default=None, repr=False)
    auth_cleartext: bool = False
    dkim: bool | None = None
    """Sign what this route sends (C{None}: as C{[dkim] sign} says)."""
    source_pool: str | None = None
    """The C{[egress]} pool its connections leave from (instead of C{source_address})."""


@frozen
class QueuePolicy:
    """
    Retry, lifetime and notification settings (Postfix-like defaults).
    """

    minimal_backoff: float = 300.0
    maximal_backoff: float = 4000.0
    lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0
    concurrency: int = 64
    duplicate_window: float = 86400.0
    duplicate_window_size: int = 1_000_000


@frozen
class Outbound:
    """
    The SMTP client: per-step timeouts (RFC 5321 4.5.3.2), connection reuse,
    and what it does for a next hop that lacks an extension.

    @ivar eight_bit: a message with 8-bit content for a hop without 8BITMIME:
        C{"convert"} it to 7-bit MIME (quoted-printable, base64; Postfix's
        C{disable_mime_output_conversion = no}) or C{"bounce"} it (5.6.3).
    @ivar chunking: send with BDAT (RFC 3030) to a hop offering CHUNKING;
        C{False}: always DATA.
    @ivar hop_down_time: seconds a next hop that could not be connected to
        (or whose greeting refused) is marked down: no connection is tried,
        its mail is deferred at once (or fails over); doubled while probes
        keep failing, up to 10 times this; at most C{[queue] minimal_backoff}.
        C{0}: no hop-state cache.
    """

    connect_timeout: float = 30.0
    helo_timeout: float = 300.0
    mail_timeout: float = 300.0
    rcpt_timeout: float = 300.0
    data_timeout: float = 120.0
    data_block_timeout: float = 180.0
    data_done_timeout: float = 600.0
    connection_reuse: bool = True
    reuse_idle_time: float = 2.0
    max_messages_per_connection: int = 1000
    helo_name: str | None = None
    address_preference: str = "any"
    mx_address_limit: int = 5
    mx_session_limit: int = 2
    eight_bit: str = "convert"
    chunking: bool = True
    hop_down_time: float = 60.0


@frozen
class AdminSettings:
    """
    The node's web service: the admin API (C{/api/}), Prometheus metrics
    (C{/metrics}) and the status page (C{/}), see C{docs/admin-api.md}.

    @ivar endpoint: a local-only server endpoint string (C{unix:...} or
        C{tcp:PORT:interface=<loopback>}); C{None} for the default,
        C{unix:<spool>/admin.sock:mode=600} (L{NodeConfig.admin_endpoint}).
    @ivar metrics_endpoint: an optional second, read-only listener (metrics
        and status page only) that may be on any interface, for scrapers.
    """

    enabled: bool = True
    endpoint: str | None = None
    metrics_endpoint: str | None = None


@frozen
class HTTPAPISettings:
    """
    The HTTP injection API (C{POST /api/v1/messages}, L{relaynet.intake.http},
    C{docs/http-api.md}): its own listener, which may face the network.

    @ivar endpoint: a server endpoint string (C{tcp:8025:interface=0.0.0.0},
        C{ssl:8443:...}); C{None}: no HTTP API.
    @ivar tokens_file: the bearer tokens (C{relaynet api-token}); required
        with an endpoint.
    @ivar max_request_size: the largest request body in octets (413 above).
    @ivar max_recipients: the most recipients of one request (422 above).
    """

    endpoint: str | None = None
    tokens_file: Path | None = None
    max_request_size: int = 10_240_000
    max_recipients: int = 1000


@frozen
class LogSettings:
    """The node's own log: C{text} or C{json} lines, and the least level shown."""

    format: str = "text"
    level: str = "info"


#: The bounce classes (L{relaynet.queue.classify.BounceClass}'s values, in order).
BOUNCE_CLASSES: tuple[str, ...] = (
    "invalid-recipient", "mailbox-full", "policy", "reputation", "dns", "tls", "content", "rate-limit", "other",
)


@frozen
class SuppressionSettings:
    """
    The C{[suppression]} table (docs/suppression.md).

    @ivar enabled: refuse suppressed recipients at C{RCPT}, and add
        recipients whose delivery failed permanently with one of
        C{classes}. Off (the default, as a relay that is not a bulk
        sender's wants: an address that bounced once, a mailbox not made
        yet, is not refused for a year): the list is kept and administered,
        nothing is added by bounces and nothing is refused.
    @ivar expiry_days: how long an entry lasts unless given its own expiry
        (0: for ever).
    @ivar classes: the bounce classes that put a recipient on the list (a
        5xx outcome of one of them).
    @ivar patterns: C{(class, regular expression)} pairs tried before the
        built-in rules of L{relaynet.queue.classify}, in order.
    """

    enabled: bool = False
    expiry_days: float = 365.0
    classes: tuple[str, ...] = ("invalid-recipient",)
    patterns: tuple[tuple[str, str], ...] = ()


@frozen
class SinkRule:
    """One rule: the pattern, the reply (C{None}: accept), its delay and how many times it applies."""

    match: str
    code: int | None = None
    enhanced: str = ""
    text: str = ""
    delay: float = 0.0
    times: int = 0


@frozen
class SinkSettings:
    """C{[sink]}: a test sink's rules (L{relaynet.intake.sink}); none: a normal node."""

    rules: tuple[SinkRule, ...] = ()


# -- traffic shaping settings ([shaping]; relaynet.delivery.shaping applies them)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|m|h|sec|second|min|minute|hour)\s*$", re.IGNORECASE)


@frozen
class Rate:
    """
    A message rate: C{count} per C{per} seconds.

    @ivar text: as configured, normalised (C{"10/s"}).
    """

    count: int
    per: float

    @property
    def per_second(self) -> float:
        return self.count / self.per

    @property
    def text(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.per]
        return f"{self.count}/{unit}"

    @classmethod
    def parse(cls, text: str) -> Rate:
        """
        C{"10/s"}, C{"600/m"}, C{"3600/h"} (also C{/sec}, C{/min}, C{/hour}).

        @raise ValueError: anything else, or a count of 0.
        """
        m = _RATE.match(text)
        if m is None:
            raise ValueError(f"{text!r} is not a rate like '10/s', '600/m' or '3600/h'")
        count = int(m.group(1))
        if count <= 0:
            raise ValueError("the count must be positive")
        return cls(count, _UNITS[m.group(2)[0].lower()])


def domain_matches(pattern: str, domain: str) -> bool:
    """C{"*"}, C{"*.sub.example"} (strict subdomains) or an exact domain (as routing's)."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


def _parts_prefix(prefix: str, enhanced: str) -> bool:
    """C{"4.7"} is a prefix of C{"4.7.28"} by whole parts (not of C{"4.70.1"})."""
    want = [p for p in prefix.split(".") if p]
    have = enhanced.split(".")
    return len(want) <= len(have) and have[: len(want)] == want


@frozen
class ThrottleRule:
    """
    A reply that pauses (or slows) a destination.

    @ivar code: the reply code that matches (C{None}: any).
    @ivar enhanced: a prefix of the RFC 3463 code, by parts (C{None}: any).
    @ivar pattern: a regular expression searched in the reply text (C{None}: any).
    @ivar pause: for how long, in seconds.
    @ivar rate: slow down to this rate for C{pause} instead of stopping.
    """

    pause: float
    code: int | None = None
    enhanced: str | None = None
    pattern: str | None = None
    rate: Rate | None = None
    _regex: re.Pattern[str] | None = field(default=None, eq=False, repr=False, alias="regex")

    @classmethod
    def make(cls, pause: float, code: int | None = None, enhanced: str | None = None,
             pattern: str | None = None, rate: Rate | None = None) -> ThrottleRule:
        """One with its pattern compiled. @raise re.error: a bad pattern."""
        return cls(pause, code, enhanced, pattern, rate, regex=re.compile(pattern) if pattern else None)

    def matches(self, code: int, enhanced: str, text: str) -> bool:
        """Whether the reply C{code enhanced text} matches (only 4xx replies ever do)."""
        if not 400 <= code < 500:
            return False
        if self.code is not None and code != self.code:
            return False
        if self.enhanced is not None and not _parts_prefix(self.enhanced, enhanced):
            return False
        return self._regex is None or self._regex.search(f"{code} {enhanced} {text}") is not None


DEFAULT_THROTTLE = (ThrottleRule.make(60.0, code=421), ThrottleRule.make(60.0, enhanced="4.7"))


@frozen
class ShapingRule:
    """
    The limits of one destination (a rule of C{[[shaping.rule]]}, or
    C{[shaping.default]}).

    @ivar name: in events and views.
    @ivar domains: recipient domain patterns it matches.
    @ivar mx: MX host name patterns it matches (any of the MX hosts; for a
        C{relay} route, its next hops' host names).
    @ivar max_connections: at once, across all hops (0: no limit).
    @ivar messages_per_connection: then the connection QUITs (0: C{[outbound]}'s).
    @ivar rate: messages started per unit of time (C{None}: no limit).
    @ivar burst: the token bucket's size.
    @ivar throttle: replies that pause or slow it, the first matching wins.
    """

    name: str = "default"
    domains: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()
    max_connections: int = 0
    messages_per_connection: int = 0
    rate: Rate | None = None
    burst: int = 0
    throttle: tuple[ThrottleRule, ...] = DEFAULT_THROTTLE

    def matches(self, domain: str, mx_hosts: Sequence[str]) -> bool:
        if any(domain_matches(p, domain) for p in self.domains):
            return True
        return any(domain_matches(p, h.lower().rstrip(".")) for p in self.mx for h in mx_hosts)

    @property
    def bucket_size(self) -> int:
        """C{burst}, or one second's worth of the rate (at least 1)."""
        if self.burst:
            return self.burst
        return max(1, math.ceil(self.rate.per_second)) if self.rate is not None else 0

    def throttle_for(self, code: int, enhanced: str, text: str) -> ThrottleRule | None:
        for t in self.throttle:
            if t.matches(code, enhanced, text):
                return t
        return None

    @property
    def limits(self) -> tuple[Any, ...]:
        """What a reload compares to keep a destination's state."""
        return (self.max_connections, self.messages_per_connection, self.rate, self.burst, self.throttle)


@frozen
class ShapingSettings:
    """The C{[shaping]} table: the default and the rules, in order."""

    default: ShapingRule = ShapingRule()
    rules: tuple[ShapingRule, ...] = ()


def _pattern(t: TableReader, name: str, value: str, i: int) -> str:
    p = value.strip().lower().rstrip(".")
    body = p.removeprefix("*.")
    if p != "*" and (not body or "*" in body or " " in body or ".." in body):
        raise t.error(f"{name}[{i}]", f"{value!r} is not a domain, '*.domain' or '*'")
    return p


def _parse_rate(t: TableReader, name: str) -> Rate | None:
    text = t.get(name, str, None)
    if text is None:
        return None
    try:
        return Rate.parse(text)
    except ValueError as e:
        raise t.error(name, str(e)) from None


def _parse_throttle(t: TableReader) -> tuple[ThrottleRule, ...]:
    items = t.get("throttle", list, None)
    if items is None:
        return DEFAULT_THROTTLE
    out = []
    for i, item in enumerate(items):
        r = type(t)(t.source, f"{t.key('throttle')}[{i}]", item)
        code = r.get("code", int, None, lambda v: None if 400 <= v < 500 else "must be a 4xx reply code")
        enhanced = r.get(
            "enhanced", str, None,
            lambda v: None if re.fullmatch(r"4(\.\d{1,3}){0,2}", v) else "must be like '4.7' or '4.7.1'",
        )
        pattern = r.get("pattern", str, None)
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise r.error("pattern", f"not a regular expression: {e}") from None
        pause = float(r.get("pause", (int, float), 60.0, lambda v: None if v > 0 else "must be positive"))
        rate = _parse_rate(r, "rate")
        if code is None and enhanced is None and pattern is None:
            raise r.error("code", "a throttle entry needs code, enhanced or pattern")
        r.finish()
        out.append(ThrottleRule.make(pause, code, enhanced, pattern, rate))
    return tuple(out)


def _parse_limits(t: TableReader, name: str, matching: bool) -> ShapingRule:
    domains = tuple(_pattern(t, "domains", d, i) for i, d in enumerate(t.strings("domains", ()))) if matching else ()
    mx = tuple(_pattern(t, "mx", d, i) for i, d in enumerate(t.strings("mx", ()))) if matching else ()
    if matching and not domains and not mx:
        raise t.error("domains", "a rule needs domains or mx patterns")
    non_negative = (lambda v: None if v >= 0 else "must not be negative")
    rule = ShapingRule(
        name=name, domains=domains, mx=mx,
        max_connections=t.get("max_connections", int, 0, non_negative),
        messages_per_connection=t.get("messages_per_connection", int, 0, non_negative),
        rate=_parse_rate(t, "rate"),
        burst=t.get("burst", int, 0, lambda v: None if v > 0 else "must be positive"),
        throttle=_parse_throttle(t),
    )
    if rule.burst and rule.rate is None:
        raise t.error("burst", "needs a rate")
    t.finish()
    return rule


def parse_shaping(table: TableReader) -> ShapingSettings:
    """
    The C{[shaping]} table (see the module docstring).

    @param table: C{top.sub("shaping")} of L{relaynet.config.parse_config}.
    @raise relaynet.config.ConfigError: naming the file and the key (C{shaping.rule[0].rate}).
    """
    default = _parse_limits(table.sub("default"), "default", matching=False)
    rules: list[ShapingRule] = []
    for i, item in enumerate(table.get("rule", list, [])):
        r = type(table)(table.source, f"{table.key('rule')}[{i}]", item)
        name = r.get("name", str, f"rule[{i}]", lambda v: None if v.strip() else "must not be empty")
        if name == "default" or any(x.name == name for x in rules):
            raise r.error("name", f"{name!r} is used twice")
        rules.append(_parse_limits(r, name, matching=True))
    table.finish()
    return ShapingSettings(default, tuple(rules))


def describe_shaping(settings: ShapingSettings) -> list[str]:
    """TOML lines for C{relaynet check-config} (loading them gives the same settings)."""

    def limits(rule: ShapingRule) -> list[str]:
        out = []
        if rule.max_connections:
            out.append(f"max_connections = {rule.max_connections}")
        if rule.messages_per_connection:
            out.append(f"messages_per_connection = {rule.messages_per_connection}")
        if rule.rate is not None:
            out.append(f'rate = "{rule.rate.text}"')
        if rule.burst:
            out.append(f"burst = {rule.burst}")
        items = []
        for t in rule.throttle:
            parts = [f"pause = {t.pause!r}"]
            if t.code is not None:
                parts.append(f"code = {t.code}")
            if t.enhanced is not None:
                parts.append(f'enhanced = "{t.enhanced}"')
            if t.pattern is not None:
                parts.append("pattern = " + '"' + t.pattern.replace("\\", "\\\\").replace('"', '\\"') + '"')
            if t.rate is not None:
                parts.append(f'rate = "{t.rate.text}"')
            items.append("{ " + ", ".join(parts) + " }")
        out.append(f"throttle = [{', '.join(items)}]")
        return out

    def strings(values: tuple[str, ...]) -> str:
        return "[" + ", ".join(f'"{v}"' for v in values) + "]"

    lines = ["[shaping.default]", *limits(settings.default), ""]
    for rule in settings.rules:
        lines += ["[[shaping.rule]]", f'name = "{rule.name}"']
        if rule.domains:
            lines.append(f"domains = {strings(rule.domains)}")
        if rule.mx:
            lines.append(f"mx = {strings(rule.mx)}")
        lines += [*limits(rule), ""]
    return lines


@frozen
class NodeConfig:
    """
    The whole configuration of one node.
    """

    name: str
    hostname: str
    spool: Path
    listeners: tuple[Listener, ...]
    limits: Limits
    local: LocalDelivery
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    routes: tuple[RouteRule, ...]
    relay_domains: tuple[str, ...] = ()
    queue: QueuePolicy = QueuePolicy()
    outbound: Outbound = Outbound()
    dns_servers: tuple[tuple[str, int], ...] = ()
    tls: TLSSettings = TLSSettings()
    auth: AuthSettings = AuthSettings()
    admin: AdminSettings = AdminSettings()
    http_api: HTTPAPISettings = HTTPAPISettings()
    log: LogSettings = LogSettings()
    dkim: DKIMSettings = DKIMSettings()
    mta_sts: MTASTSSettings = MTASTSSettings()
    tls_rpt: TLSRPTSettings = TLSRPTSettings()
    suppression: SuppressionSettings = SuppressionSettings()
    sink: SinkSettings = SinkSettings()
    dnssec_resolver: tuple[str, int] | None = None
    egress: tuple[EgressPoolSpec, ...] = ()
    shaping: ShapingSettings | None = None
    webhooks: tuple["WebhookSettings", ...] = ()
    source: str = "<default>"
    workers: int = 0
    shard: int | None = None

    @property
    def worker_count(self) -> int:
        """
        How many worker processes serve the node: C{[node] workers}, or for
        C{"auto"} (0) the CPUs this process may run on.
        """
        if self.workers:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)

    @property
    def listen_addresses(self) -> list[tuple[str, int]]:
        """
        The C{(address, port)} of each TCP listener (C{0.0.0.0} or C{::} for
        every address): where an MX that points at this node would lead.
        """
        out = []
        for lst in self.listeners:
            kind, args, kw = split_endpoint(lst.endpoint)
            if kind not in ("tcp", "tcp6"):
                continue
            port = args[0] if args else kw.get("port", "")
            if port.isdigit():
                out.append((kw.get("interface") or ("::" if kind == "tcp6" else "0.0.0.0"), int(port)))
        return out

    @property
    def admin_endpoint(self) -> str:
        """The admin web service's endpoint: C{[admin].endpoint} or a socket in the spool."""
        if self.admin.endpoint is not None:
            return self.admin.endpoint
        return default_admin_endpoint(self.spool)

    @property
    def queue_dir(self) -> Path:
        """
        The maildir queue, C{<spool>/queue}; in worker K > 0 of a node with
        workers, its shard C{<spool>/queue.K} (L{shard_queue_dir}).
        """
        return shard_queue_dir(self.spool, self.shard or 0)

    @property
    def lock_file(self) -> Path:
        """
        The lock a running node holds, C{<spool>/node.lock}; worker K holds
        C{<spool>/queue.K.lock} (C{queue.lock} for K = 0) for its shard.
        """
        if self.shard is None:
            return self.spool / "node.lock"
        return self.spool / f"{self.queue_dir.name}.lock"

    @property
    def event_log(self) -> Path:
        """The JSON lines event log, C{<spool>/events.jsonl}."""
        return self.spool / "events.jsonl"


def shard_queue_dir(spool: Path, shard: int) -> Path:
    """
    Shard C{shard}'s queue: C{<spool>/queue} for 0 (a node without workers
    uses the same one, so turning workers on or off strands no mail), else
    C{<spool>/queue.<shard>}.
    """
    return spool / ("queue" if shard == 0 else f"queue.{shard}")


_SHARD_QUEUE = re.compile(r"^queue\.([1-9][0-9]*)$")


def shard_queue_dirs(spool: Path) -> dict[int, Path]:
    """
    The shard queues in C{spool} now, by shard (whatever the number of
    workers): C{queue} as 0 and every C{queue.K} directory (see
    L{shard_queue_dir}). Lists the spool only, never a queue itself.
    """
    found: dict[int, Path] = {}
    try:
        entries = list(os.scandir(spool))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        match = _SHARD_QUEUE.match(entry.name)
        if (entry.name == "queue" or match) and entry.is_dir():
            found[int(match.group(1)) if match else 0] = Path(entry.path)
    return dict(sorted(found.items()))


def worker_admin_endpoint(spool: Path, shard: int) -> str:
    """Worker C{shard}'s private admin site, C{unix:<spool>/worker-<shard>.sock:mode=600}."""
    path = str(spool / f"worker-{shard}.sock").replace("\\", "\\\\").replace(":", "\\:")
    return f"unix:{path}:mode=600"


def default_admin_endpoint(spool: Path) -> str:
    """C{unix:<spool>/admin.sock:mode=600}, with C{:} and C{\\} escaped for Twisted."""
    path = str(spool / "admin.sock").replace("\\", "\\\\").replace(":", "\\:")
    return f"unix:{path}:mode=600"


def split_endpoint(endpoint: str) -> tuple[str, list[str], dict[str, str]]:
    """
    Split a Twisted endpoint string into its kind, positional arguments and
    keyword arguments (C{\\} escapes a colon, as in Twisted).
    """
    parts, cur, escaped = [], "", False
    for ch in endpoint:
        if escaped:
            cur += ch
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    args = [p for p in parts[1:] if "=" not in p]
    kw = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return parts[0], args, kw


def hop_name(endpoint: str) -> str:
    """
    A readable C{host:port} for an endpoint string (escaped colons of IPv6
    addresses honoured; IPv6 hosts in brackets): the name a next hop has in
    events, DSNs, metrics and the admin API.
    """
    _, args, kw = split_endpoint(endpoint)
    host = kw.get("host") or (args[0] if args else "?")
    port = kw.get("port") or (args[1] if len(args) > 1 else "?")
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def _check_admin_endpoint(value: str, local_only: bool) -> str | None:
    kind, args, kw = split_endpoint(value)
    if kind not in ADMIN_ENDPOINT_KINDS:
        return f"must be a {', '.join(ADMIN_ENDPOINT_KINDS)} endpoint, not {kind!r}"
    problem = endpoint_problem(value, server=True)
    if problem is not None:
        return problem
    if kind == "unix":
        path = args[0] if args else kw.get("address", "")
        if not path:
            return "a unix endpoint needs a path, e.g. 'unix:/run/relaynet/admin.sock:mode=600'"
        if len(os.fsencode(path)) > 107:
            return f"socket path {path!r} is longer than 107 bytes (the AF_UNIX limit)"
        return None
    port = args[0] if args else kw.get("port", "")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        return f"{value!r}: no valid port"
    if not local_only:
        return None
    interface = kw.get("interface", "")
    try:
        loopback = ipaddress.ip_address(interface).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return (
            f"{value!r} is not local-only: the admin API can delete mail, so a TCP endpoint "
            "must name a loopback interface (interface=127.0.0.1 or interface=\\:\\:1)"
        )
    return None


def _resolve_unix(base: Path | None, endpoint: str) -> str:
    """A unix endpoint with a relative path made relative to the config file's directory."""
    kind, args, kw = split_endpoint(endpoint)
    if kind != "unix" or not args or os.path.isabs(args[0]) or base is None:
        return endpoint
    path = str(_resolve(base, args[0])).replace("\\", "\\\\").replace(":", "\\:")
    rest = "".join(f":{k}={v}" for k, v in kw.items())
    return f"unix:{path}{rest}"


def toml_kind(value: Any) -> str:
    """How a TOML value is named in error messages ("a table", "an array", ...)."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return "a boolean"
    return type(value).__name__


class TableReader:
    """
    A TOML table being read: typed access with full key names, and a check
    that every key was used. The topology reader of the lab extends it.
    """

    def __init__(self, source: str, prefix: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(source, prefix or "<top>", "must be a table")
        self.source = source
        self.prefix = prefix
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(
        self,
        name: str,
        kind: type | tuple[type, ...],
        default: Any,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        """
        The value of C{name} (C{default} when absent), which must be of
        C{kind} (C{object}: anything) and pass C{check} (a problem or None).
        """
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if kind is not object and (
            (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds)
        ):
            names = " or ".join(
                "a table" if k is dict else "an array" if k is list else k.__name__ for k in kinds
            )
            raise self.error(name, f"must be {names}, not {toml_kind(value)}")
        if check is not None:
            problem = check(value)
            if problem:
                raise self.error(name, problem)
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, None)
        if value is None:
            return default
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(self.source, f"{self.key(name)}[{i}]", f"must be a string, not {toml_kind(item)}")
        return tuple(value)

    def sub(self, name: str) -> Any:
        self.used.add(name)
        return type(self)(self.source, self.key(name), self.data.get(name, {}))

    def finish(self, allowed: Any = ()) -> None:
        """Every key was read (or is in C{allowed}); else an "unknown key" error."""
        unknown = sorted(set(self.data) - self.used - set(allowed))
        if unknown:
            raise self.error(unknown[0], "unknown key")


_Table = TableReader


def _check_address(value: str) -> str | None:
    local, _, domain = value.partition("@")
    if not local or not domain or "@" in domain or any(c.isspace() or c in "<>,;" for c in value):
        return "must be an address, local@domain"
    return None


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def _domain_pattern(source: str, key: str, pattern: str) -> str:
    pattern = pattern.strip().lower().rstrip(".")
    if pattern == "*":
        return pattern
    body = pattern[2:] if pattern.startswith("*.") else pattern
    if not body or "*" in body or " " in body or ".." in body:
        raise ConfigError(source, key, f"{pattern!r} is not a domain, '*.domain' or '*'")
    return pattern


def _resolve(base: Path | None, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and base is not None:
        path = base / path
    return path


def _parse_listener(source: str, key: str, data: Any) -> Listener:
    table = _Table(source, key, data)
    endpoint = table.get("endpoint", str, None)
    if not endpoint:
        raise table.error("endpoint", "is required (e.g. 'tcp:2525:interface=127.0.0.1')")
    check_endpoint(source, table.key("endpoint"), endpoint, server=True)
    mode = table.get(
        "mode", str, "relay",
        lambda v: None if v in LISTENER_MODES else f"must be one of {', '.join(LISTENER_MODES)}",
    )
    reuse_port = table.get("reuse_port", bool, False)
    if reuse_port and endpoint.split(":", 1)[0] not in ("tcp", "tcp6"):
        raise table.error("reuse_port", "needs a tcp: or tcp6: endpoint")
    table.finish()
    return Listener(endpoint=endpoint, mode=mode, reuse_port=reuse_port)


def read_credentials(path: Path) -> tuple[str, str]:
    """
    The SMTP AUTH credentials of a route: the first line of C{path},
    C{username:password} (as Postfix's C{smtp_sasl_password_maps} values).
    The file must be readable by its owner only.

    @raise ValueError: one line saying what is wrong.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if st.st_mode & 0o077:
        raise ValueError(
            f"{path} is readable by group or others (mode {st.st_mode & 0o777:04o}):"
            f" it holds a password; chmod 600 {path}"
        )
    try:
        first = path.read_text("utf-8").splitlines()[0].strip() if path.stat().st_size else ""
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    user, sep, password = first.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"{path}: the first line must be username:password")
    return user, password


def _parse_route(source: str, key: str, data: Any, base: Path | None = None) -> RouteRule:
    table = _Table(source, key, data)
    domains = table.strings("domains", ())
    if not domains:
        raise table.error("domains", "is required: a list of 'domain', '*.domain' or '*'")
    domains = tuple(
        _domain_pattern(source, f"{key}.domains[{i}]", d) for i, d in enumerate(domains)
    )
    action = table.get(
        "action", str, None,
        lambda v: None if v in ROUTE_ACTIONS else f"must be one of {', '.join(ROUTE_ACTIONS)}",
    )
    if action is None:
        raise table.error("action", f"is required: one of {', '.join(ROUTE_ACTIONS)}")
    hops: list[NextHop] = []
    for i, hop in enumerate(table.get("next_hops", list, [])):
        hkey = f"{key}.next_hops[{i}]"
        if isinstance(hop, str):
            _check_client_endpoint(source, hkey, hop)
            hops.append(NextHop(endpoint=hop))
            continue
        htable = _Table(source, hkey, hop)
        endpoint = htable.get("endpoint", str, None)
        if not endpoint:
            raise htable.error("endpoint", "is required")
        _check_client_endpoint(source, f"{hkey}.endpoint", endpoint)
        priority = htable.get("priority", int, 10)
        htable.finish()
        hops.append(NextHop(endpoint=endpoint, priority=priority))
    if action in ("relay", "lmtp") and not hops:
        raise table.error("next_hops", f"a{'n' if action == 'lmtp' else ''} {action} route needs at least one next hop")
    code = table.get(
        "code", int, 550,
        lambda v: None if 400 <= v <= 599 else "must be a 4xx or 5xx reply code",
    )
    enhanced = table.get("enhanced", str, f"{code // 100}.7.1")
    if not enhanced.startswith(f"{code // 100}."):
        raise table.error("enhanced", f"must agree with code {code} (class {code // 100})")
    text = table.get("text", str, "Relay access denied")
    ack = table.get(
        "ack", str, "queued",
        lambda v: None if v in ACK_MODES else f"must be one of {', '.join(ACK_MODES)}",
    )
    concurrency = table.get("concurrency", int, 20, _positive)
    source_address = table.get("source_address", str, None, _ip_literal)
    tls = table.get(
        "tls", str, "none",
        lambda v: None if v in TLS_POLICIES else f"must be one of {', '.join(TLS_POLICIES)}",
    )
    mx_port = table.get("mx_port", int, 25, lambda v: None if 0 < v < 65536 else "must be a port")
    auth_file = table.get("auth_file", str, None)
    auth_path = _resolve(base, auth_file) if auth_file is not None else None
    auth = None
    if auth_path is not None:
        if action not in ("relay", "mx"):
            raise table.error("auth_file", "only relay and mx routes authenticate (SMTP AUTH)")
        try:
            auth = read_credentials(auth_path)
        except ValueError as e:
            raise table.error("auth_file", str(e)) from None
    auth_cleartext = table.get("auth_cleartext", bool, False)
    source_pool = table.get("source_pool", str, None)
    if source_pool is not None and action not in ("relay", "mx"):
        raise table.error("source_pool", "only relay and mx routes connect out")
    if source_pool is not None and source_address is not None:
        raise table.error("source_pool", "a route has a source_address or a source_pool, not both")
    dkim = table.get("dkim", bool, None)
    if dkim is not None and action not in ("relay", "mx"):
        raise table.error("dkim", "only relay and mx routes sign (mail leaving the node)")
    table.finish()
    return RouteRule(
        domains=domains, action=action, next_hops=tuple(hops),
        code=code, enhanced=enhanced, text=text, ack=ack, concurrency=concurrency,
        source_address=source_address, tls=tls, mx_port=mx_port,
        auth_file=auth_path, auth=auth, auth_cleartext=auth_cleartext, dkim=dkim, source_pool=source_pool,
    )


def _endpoint_port(endpoint: Any) -> int | None:
    """
    The port number a parsed TCP/SSL endpoint keeps, or C{None} for other
    kinds. Twisted stores what it parsed only in private attributes and does
    not check the range: read it here, nowhere else.
    """
    port = vars(endpoint).get("_port")
    return port if isinstance(port, int) else None


def endpoint_problem(endpoint: str, server: bool) -> str | None:
    """
    What is wrong with an endpoint string, or C{None} when it is usable.

    The string is parsed by Twisted's own parser
    (L{serverFromString}/L{clientFromString}) on a reactor that does nothing
    (L{MemoryReactor}: nothing is bound or connected), so whatever the node
    would refuse at start is refused at check time; then the port range,
    which Twisted does not check (a server port is 0..65535, C{0} meaning any
    free port; a client port 1..65535).

    @param endpoint: the endpoint string.
    @param server: a listening (server) endpoint, else a client one.
    @return: the problem, one line, or C{None}.
    """
    from twisted.internet.endpoints import clientFromString, serverFromString
    from twisted.internet.testing import MemoryReactor

    example = "'tcp:2525:interface=127.0.0.1'" if server else "'tcp:192.0.2.1:25'"
    what = "a server" if server else "a client"
    parse: Callable[[Any, str], Any] = serverFromString if server else clientFromString
    reactor: Any = MemoryReactor()
    try:
        parsed = parse(reactor, endpoint)
    except Exception as e:  # noqa: BLE001 -- Twisted's parsers raise ValueError, TypeError, KeyError, OSError, ...
        return f"{endpoint!r} is not {what} endpoint (e.g. {example}): {e}"
    port = _endpoint_port(parsed)
    low = 0 if server else 1
    if port is not None and not low <= port <= 65535:
        return f"{endpoint!r}: port {port} is out of range ({low}..65535)"
    return None


def check_endpoint(source: str, key: str, endpoint: str, server: bool) -> None:
    """
    Check an endpoint string (L{endpoint_problem}).

    @param source: the file (or option) it comes from, for the error.
    @param key: the dotted key, for the error.
    @raise ConfigError: it is not usable.
    """
    problem = endpoint_problem(endpoint, server)
    if problem is not None:
        raise ConfigError(source, key, problem)


def _check_client_endpoint(source: str, key: str, endpoint: str) -> None:
    """A next hop must be a client endpoint string Twisted can parse."""
    check_endpoint(source, key, endpoint, server=False)


def _ip_literal(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not an IP address"
    return None


def _host_port(value: str, default_port: int) -> tuple[str, int] | None:
    """Parse C{IP}, C{IPv4:port}, C{IPv6} or C{[IPv6]:port}."""
    host, port = value, default_port
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        if rest:
            if not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif value.count(":") == 1:
        host, _, p = value.partition(":")
        if not p.isdigit():
            return None
        port = int(p)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return (host, port) if 0 < port < 65536 else None


def _endpoint_address(endpoint: str) -> tuple[str, int] | None:
    """
    C{(host, port)} of a TCP endpoint string (client or server form), or
    C{None} when it is not TCP or cannot be read.
    """
    parts = endpoint.split(":")
    if parts[0] not in ("tcp", "tcp6"):
        return None
    args = [p for p in parts[1:] if "=" not in p]
    kw = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    try:
        if "port" in kw:
            return kw.get("host", kw.get("interface", "")), int(kw["port"])
        if len(args) >= 2:
            return args[0], int(args[1])
        if len(args) == 1:
            return kw.get("interface", ""), int(args[0])
    except ValueError:
        return None
    return None


MAX_WORKERS = 256


def _check_workers(value: int | str) -> str | None:
    if isinstance(value, bool):
        return 'must be a number of processes or "auto"'
    if isinstance(value, str):
        return None if value == "auto" else 'must be a number of processes or "auto"'
    return None if 1 <= value <= MAX_WORKERS else f'must be 1 to {MAX_WORKERS} or "auto"'


def parse_config(
    data: Mapping[str, Any], source: str = "<default>", base: Path | None = None
) -> NodeConfig:
    """
    Build a L{NodeConfig} from parsed TOML.

    @param data: the parsed TOML document.
    @param source: the file name, for error messages.
    @param base: the directory relative paths are resolved against (C{None}: the
        working directory).
    @raise ConfigError: on the first problem found.
    """
    top = _Table(source, "", dict(data))

    node = top.sub("node")
    name = node.get("name", str, "relaynet")
    hostname = node.get("hostname", str, None) or socket.gethostname() or "localhost"
    spool = _resolve(base, node.get("spool", str, "var/relaynet"))
    workers = node.get("workers", (int, str), "auto", _check_workers)
    node.finish()

    listeners_data = top.get("listener", list, [{"endpoint": "tcp:2525:interface=127.0.0.1"}])
    listeners = tuple(
        _parse_listener(source, f"listener[{i}]", item) for i, item in enumerate(listeners_data)
    )

    lim = top.sub("limits")
    defaults = Limits()
    limits = Limits(
        max_message_size=lim.get("max_message_size", int, defaults.max_message_size, _positive),
        max_recipients=lim.get(
            "max_recipients", int, defaults.max_recipients,
            lambda v: None if v >= 100 else "must be at least 100 (RFC 5321 4.5.3.1.8)",
        ),
        recipient_overshoot_limit=lim.get(
            "recipient_overshoot_limit", int, defaults.recipient_overshoot_limit,
            lambda v: None if v >= 0 else "must not be negative",
        ),
        max_hops=lim.get("max_hops", int, defaults.max_hops, _positive),
        idle_timeout=float(lim.get("idle_timeout", (int, float), defaults.idle_timeout, _positive)),
        data_timeout=float(lim.get("data_timeout", (int, float), defaults.data_timeout, _positive)),
        max_line_length=lim.get(
            "max_line_length", int, defaults.max_line_length,
            lambda v: None if v >= 1000 else "must be at least 1000 (RFC 5321 4.5.3.1.6)",
        ),
        max_command_length=lim.get(
            "max_command_length", int, defaults.max_command_length,
            lambda v: None if v >= 512 else "must be at least 512 (RFC 5321 4.5.3.1.4)",
        ),
        max_errors=lim.get("max_errors", int, defaults.max_errors, _positive),
        max_connections=lim.get("max_connections", int, defaults.max_connections, _positive),
        max_connections_per_ip=lim.get(
            "max_connections_per_ip", int, defaults.max_connections_per_ip, _positive
        ),
        bare_newlines=lim.get(
            "bare_newlines", str, defaults.bare_newlines,
            lambda v: None if v in BARE_NEWLINES else f"must be one of {', '.join(BARE_NEWLINES)}",
        ),
        forbid_unauth_pipelining=lim.get(
            "forbid_unauth_pipelining", bool, defaults.forbid_unauth_pipelining
        ),
    )
    lim.finish()

    loc = top.sub("local")
    has_local = "local" in data
    mailroot = _resolve(base, loc.get("mailroot", str, "")) if "mailroot" in loc.data else spool / "mailboxes"
    domains = tuple(
        _domain_pattern(source, f"local.domains[{i}]", d)
        for i, d in enumerate(loc.strings("domains", () if has_local else ("localhost",)))
    )
    for i, d in enumerate(domains):
        if "*" in d:
            raise ConfigError(source, f"local.domains[{i}]", "local domains cannot be wildcards")
    catch_all = loc.get("catch_all", bool, not has_local)
    users = frozenset(u.lower() for u in loc.strings("users", ()))
    aliases_data = loc.get("aliases", dict, {})
    aliases: dict[str, tuple[str, ...]] = {}
    for alias, target in aliases_data.items():
        akey = f"local.aliases.{alias}"
        if isinstance(target, str):
            targets: tuple[str, ...] = (target,)
        elif isinstance(target, list) and target and all(isinstance(t, str) for t in target):
            targets = tuple(target)
        else:
            raise ConfigError(source, akey, "must be an address or a non-empty list of addresses")
        aliases[alias.lower()] = tuple(t.lower() for t in targets)
    loc.finish()
    local = LocalDelivery(
        mailroot=mailroot, domains=domains, catch_all=catch_all, users=users, aliases=aliases
    )

    relay = top.sub("relay")
    nets = []
    for i, net in enumerate(relay.strings("trusted_networks", ("127.0.0.0/8", "::1/128"))):
        try:
            nets.append(ipaddress.ip_network(net, strict=False))
        except ValueError as e:
            raise ConfigError(source, f"relay.trusted_networks[{i}]", str(e)) from None
    relay_domains = tuple(
        _domain_pattern(source, f"relay.relay_domains[{i}]", d)
        for i, d in enumerate(relay.strings("relay_domains", ()))
    )
    relay.finish()

    routes = tuple(
        _parse_route(source, f"route[{i}]", item, base)
        for i, item in enumerate(top.get("route", list, []))
    )
    _check_loops(source, listeners, routes)
    egress = _parse_egress(source, top.sub("egress"))
    shaping = parse_shaping(top.sub("shaping")) if "shaping" in data else None
    webhooks = parse_webhooks(source, top.get("webhook", list, []), base)
    suppression = parse_suppression(top.sub("suppression"))
    sink = _parse_sink(source, top.sub("sink"))
    pools = {p.name for p in egress}
    for i, rule in enumerate(routes):
        if rule.source_pool is not None and rule.source_pool not in pools:
            raise ConfigError(source, f"route[{i}].source_pool",
                              f"no [egress.{rule.source_pool}] pool (pools: {', '.join(sorted(pools)) or 'none'})")

    q = top.sub("queue")
    qd = QueuePolicy()
    queue = QueuePolicy(
        minimal_backoff=float(q.get("minimal_backoff", (int, float), qd.minimal_backoff, _positive)),
        maximal_backoff=float(q.get("maximal_backoff", (int, float), qd.maximal_backoff, _positive)),
        lifetime=float(q.get("lifetime", (int, float), qd.lifetime, _positive)),
        delay_warning=float(q.get(
            "delay_warning", (int, float), qd.delay_warning,
            lambda v: None if v >= 0 else "must be 0 (off) or positive",
        )),
        concurrency=q.get("concurrency", int, qd.concurrency, _positive),
        duplicate_window=float(q.get(
            "duplicate_window", (int, float), qd.duplicate_window,
            lambda v: None if v >= 0 else "must be 0 (off) or positive",
        )),
        duplicate_window_size=q.get("duplicate_window_size", int, qd.duplicate_window_size, _positive),
    )
    if queue.maximal_backoff < queue.minimal_backoff:
        raise ConfigError(source, "queue.maximal_backoff", "must not be below queue.minimal_backoff")
    q.finish()

    o = top.sub("outbound")
    od = Outbound()
    timeouts = {
        name: float(o.get(name, (int, float), getattr(od, name), _positive))
        for name in (
            "connect_timeout", "helo_timeout", "mail_timeout", "rcpt_timeout",
            "data_timeout", "data_block_timeout", "data_done_timeout", "reuse_idle_time",
        )
    }
    outbound = Outbound(
        # Never longer than a message's first retry: a hop is probed again
        # no later than its mail would be (labs retry within seconds).
        hop_down_time=min(queue.minimal_backoff, float(o.get(
            "hop_down_time", (int, float), od.hop_down_time,
            lambda v: None if v >= 0 else "must be 0 (off) or positive",
        ))),
        connection_reuse=o.get("connection_reuse", bool, od.connection_reuse),
        max_messages_per_connection=o.get(
            "max_messages_per_connection", int, od.max_messages_per_connection, _positive
        ),
        helo_name=o.get("helo_name", str, None),
        address_preference=o.get(
            "address_preference", str, od.address_preference,
            lambda v: None if v in ("any", "ipv4", "ipv6") else "must be any, ipv4 or ipv6",
        ),
        mx_address_limit=o.get(
            "mx_address_limit", int, od.mx_address_limit,
            lambda v: None if v >= 0 else "must be 0 (no limit) or positive",
        ),
        mx_session_limit=o.get(
            "mx_session_limit", int, od.mx_session_limit,
            lambda v: None if v >= 0 else "must be 0 (no limit) or positive",
        ),
        eight_bit=o.get(
            "eight_bit", str, od.eight_bit,
            lambda v: None if v in ("convert", "bounce") else "must be convert or bounce",
        ),
        chunking=o.get("chunking", bool, od.chunking),
        **timeouts,
    )
    o.finish()

    dns = top.sub("dns")
    servers = []
    for i, server in enumerate(dns.strings("servers", ())):
        parsed = _host_port(server, 53)
        if parsed is None:
            raise ConfigError(source, f"dns.servers[{i}]", f"{server!r} is not IP, IP:port or [IPv6]:port")
        servers.append(parsed)
    dnssec_resolver = None
    if "dnssec_resolver" in dns.data:
        raw = dns.get("dnssec_resolver", str, "")
        dnssec_resolver = _host_port(raw, 53)
        if dnssec_resolver is None:
            raise dns.error("dnssec_resolver", f"{raw!r} is not IP, IP:port or [IPv6]:port")
        try:
            loopback = ipaddress.ip_address(dnssec_resolver[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise dns.error(
                "dnssec_resolver", "must be a loopback address: the AD bit is trusted only from a"
                " validating resolver on this host (RFC 6698 4, RFC 7672 2.1)",
            )
    dns.finish()
    st = top.sub("mta_sts")
    std = MTASTSSettings()
    mta_sts = MTASTSSettings(
        enabled=st.get("enabled", bool, std.enabled),
        policy_port=st.get("policy_port", int, std.policy_port,
                           lambda v: None if 0 < v < 65536 else "must be a port"),
        fetch_timeout=float(st.get("fetch_timeout", (int, float), std.fetch_timeout, _positive)),
        refresh=st.get("refresh", str, std.refresh,
                       lambda v: None if v in ("wait", "background") else "must be wait or background"),
    )
    st.finish()
    rp = top.sub("tls_rpt")
    rpd = TLSRPTSettings()
    tls_rpt = TLSRPTSettings(
        enabled=rp.get("enabled", bool, rpd.enabled),
        organization_name=rp.get("organization_name", str, "").strip(),
        contact_info=rp.get("contact_info", str, "").strip(),
        submitter=rp.get("submitter", str, "").strip().rstrip(".").lower() or hostname,
        send=rp.get("send", str, rpd.send,
                    lambda v: None if v in TLS_RPT_SEND else f"must be one of {', '.join(TLS_RPT_SEND)}"),
        report_sender=rp.get("report_sender", str, "", _check_address) or f"postmaster@{hostname}",
        flush_interval=float(rp.get("flush_interval", (int, float), rpd.flush_interval, _positive)),
        send_interval=float(rp.get("send_interval", (int, float), rpd.send_interval, _positive)),
    )
    if tls_rpt.enabled:
        for required in ("organization_name", "contact_info"):
            if not getattr(tls_rpt, required):
                raise rp.error(required, "is required when enabled (RFC 8460 4.4 report field)")
    rp.finish()

    t = top.sub("tls")
    tls = TLSSettings(
        cert=_resolve(base, t.get("cert", str, "")) if "cert" in t.data else None,
        key=_resolve(base, t.get("key", str, "")) if "key" in t.data else None,
        ca_file=_resolve(base, t.get("ca_file", str, "")) if "ca_file" in t.data else None,
    )
    t.finish()
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError(source, "tls.cert" if tls.cert is None else "tls.key",
                          "cert and key go together")
    for i, lst in enumerate(listeners):
        if lst.mode in ("submission", "submissions") and tls.cert is None:
            raise ConfigError(source, f"listener[{i}].mode",
                              f"{lst.mode} needs [tls] cert and key (AUTH is only offered over TLS)")
    a = top.sub("auth")
    senders_data = a.get("senders", dict, {})
    senders: dict[str, tuple[str, ...]] = {}
    for user, value in senders_data.items():
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(source, f"auth.senders.{user}", "must be an address, '@domain' or a list of them")
        senders[user] = tuple(v.lower() for v in value)
    auth = AuthSettings(
        password_file=_resolve(base, a.get("password_file", str, "")) if "password_file" in a.data else None,
        max_failures=a.get("max_failures", int, 3, _positive),
        failure_delay=float(a.get("failure_delay", (int, float), 1.0,
                                  lambda v: None if v >= 0 else "must not be negative")),
        senders=senders,
    )
    a.finish()
    for i, lst in enumerate(listeners):
        if lst.mode in ("submission", "submissions") and auth.password_file is None:
            raise ConfigError(source, f"listener[{i}].mode", f"{lst.mode} needs [auth] password_file")

    adm = top.sub("admin")
    admin_endpoint = adm.get("endpoint", str, None, lambda v: _check_admin_endpoint(v, True))
    metrics_endpoint = adm.get("metrics_endpoint", str, None, lambda v: _check_admin_endpoint(v, False))
    admin = AdminSettings(
        enabled=adm.get("enabled", bool, True),
        endpoint=None if admin_endpoint is None else _resolve_unix(base, admin_endpoint),
        metrics_endpoint=None if metrics_endpoint is None else _resolve_unix(base, metrics_endpoint),
    )
    adm.finish()
    if admin.enabled and admin.endpoint is None:
        problem = _check_admin_endpoint(default_admin_endpoint(spool), True)
        if problem:
            raise ConfigError(source, "admin.endpoint", f"the default {problem}; set one")

    ha = top.sub("http_api")
    had = HTTPAPISettings()
    http_endpoint = ha.get("endpoint", str, None)
    if http_endpoint is not None:
        check_endpoint(source, ha.key("endpoint"), http_endpoint, server=True)
    http_api = HTTPAPISettings(
        endpoint=http_endpoint,
        tokens_file=_resolve(base, ha.get("tokens_file", str, "")) if "tokens_file" in ha.data else None,
        max_request_size=ha.get("max_request_size", int, had.max_request_size, _positive),
        max_recipients=ha.get("max_recipients", int, had.max_recipients, _positive),
    )
    if http_api.endpoint is not None and http_api.tokens_file is None:
        raise ha.error("tokens_file", "is required with an endpoint (make one with `relaynet api-token add`)")
    ha.finish()

    lg = top.sub("log")
    log = LogSettings(
        format=lg.get("format", str, "text",
                      lambda v: None if v in LOG_FORMATS else f"must be one of {', '.join(LOG_FORMATS)}"),
        level=lg.get("level", str, "info",
                     lambda v: None if v in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}"),
    )
    lg.finish()
    dkim = _parse_dkim(source, top.sub("dkim"), base)
    if not dkim.keys:
        for i, rule in enumerate(routes):
            if rule.dkim:
                raise ConfigError(source, f"route[{i}].dkim", "signs, but [dkim] has no keys")
    top.finish()

    return NodeConfig(
        name=name, hostname=hostname, spool=spool, listeners=listeners, limits=limits,
        local=local, trusted_networks=tuple(nets), routes=routes, relay_domains=relay_domains,
        queue=queue,
        outbound=outbound, dns_servers=tuple(servers), tls=tls, auth=auth, admin=admin, http_api=http_api, log=log,
        dkim=dkim, mta_sts=mta_sts, egress=egress, shaping=shaping, webhooks=webhooks, suppression=suppression, sink=sink, tls_rpt=tls_rpt, dnssec_resolver=dnssec_resolver, source=source, workers=0 if workers == "auto" else int(workers),
    )


DELIVERY_EVENTS = (
    "received", "sent", "delivered", "deferred", "bounced", "expired", "suppressed", "dsn", "duplicate",
)
"""The events sent by default: a message's life (docs/events.md)."""

@frozen
class WebhookSettings:
    """
    One C{[[webhook]]}: where, which events, how.

    @ivar secret: the HMAC-SHA256 key (from C{secret_file}).
    """

    name: str
    url: str
    secret: bytes = field(repr=False)
    events: frozenset[str] = frozenset(DELIVERY_EVENTS)
    secret_file: Path | None = None
    batch_size: int = 100
    flush_interval: float = 1.0
    timeout: float = 10.0


def parse_webhooks(source: str, items: Iterable[Any], base: Path | None) -> tuple[WebhookSettings, ...]:
    """
    C{[[webhook]]} tables: C{name}, C{url} (http or https), C{secret_file}
    (the HMAC key, first line; mode 0600 or stricter), C{events},
    C{batch_size}, C{flush_interval}, C{timeout}.

    @raise ConfigError: naming the key.
    """
    out: list[WebhookSettings] = []
    for i, data in enumerate(items):
        t = TableReader(source, f"webhook[{i}]", data)
        name = t.get("name", str, "")
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise t.error("name", "is required: letters, digits, '-' and '_'")
        if any(w.name == name for w in out):
            raise t.error("name", f"{name!r} is used twice")
        url = t.get("url", str, "")
        if not url.startswith(("http://", "https://")):
            raise t.error("url", "is required: an http:// or https:// URL")
        secret_file = t.get("secret_file", str, "")
        if not secret_file:
            raise t.error("secret_file", "is required: the file holding the HMAC-SHA256 key")
        path = Path(os.path.expanduser(secret_file))
        if not path.is_absolute() and base is not None:
            path = base / path
        try:
            if os.stat(path).st_mode & 0o077:
                raise t.error("secret_file", f"{path} may be read by others: chmod 600 it")
            secret = path.read_text("utf-8").splitlines()[0].strip().encode("utf-8") if path.stat().st_size else b""
        except OSError as e:
            raise t.error("secret_file", f"cannot read {path}: {e.strerror}") from None
        if len(secret) < 16:
            raise t.error("secret_file", f"{path}: the key must be at least 16 characters")
        events = t.strings("events", DELIVERY_EVENTS)
        unknown = sorted(set(events) - set(DELIVERY_EVENTS) - {"hop_down", "hop_up", "auth_failed", "reject",
                                                                "dkim_signed", "dkim_unsigned", "egress_unavailable"})
        if unknown:
            raise t.error("events", f"unknown event {unknown[0]!r} (docs/events.md)")
        settings = WebhookSettings(
            name=name, url=url, secret=secret, events=frozenset(events), secret_file=path,
            batch_size=t.get("batch_size", int, 100, lambda v: None if 1 <= v <= 10000 else "must be 1 to 10000"),
            flush_interval=float(t.get("flush_interval", (int, float), 1.0,
                                       lambda v: None if v > 0 else "must be positive")),
            timeout=float(t.get("timeout", (int, float), 10.0, lambda v: None if v > 0 else "must be positive")),
        )
        t.finish()
        out.append(settings)
    return tuple(out)


def parse_suppression(table: TableReader) -> SuppressionSettings:
    """
    Read C{[suppression]}::

        [suppression]
        enabled = true
        expiry_days = 365
        classes = ["invalid-recipient"]
        [suppression.patterns]
        reputation = ["listed at rbl\\\\.example"]

    @raise ConfigError: a key of the wrong type, an unknown class, an
        invalid regular expression, an unknown key.
    """
    import re

    known = ", ".join(BOUNCE_CLASSES)
    d = SuppressionSettings()
    enabled = table.get("enabled", bool, d.enabled)
    expiry = float(table.get(
        "expiry_days", (int, float), d.expiry_days, lambda v: None if v >= 0 else "must be 0 or more",
    ))
    classes = table.strings("classes", d.classes)
    for i, name in enumerate(classes):
        if name not in BOUNCE_CLASSES:
            raise ConfigError(table.source, f"{table.key('classes')}[{i}]", f"{name!r} is not a bounce class ({known})")
    pt = table.sub("patterns")
    pairs: list[tuple[str, str]] = []
    for name in list(pt.data):
        if name not in BOUNCE_CLASSES:
            raise pt.error(name, f"not a bounce class ({known})")
        for i, expr in enumerate(pt.strings(name, ())):
            try:
                re.compile(expr)
            except re.error as e:
                raise ConfigError(table.source, f"{pt.key(name)}[{i}]",
                                  f"{expr!r} is not a regular expression: {e}") from None
            pairs.append((name, expr))
    pt.finish()
    table.finish()
    return SuppressionSettings(enabled=enabled, expiry_days=expiry, classes=tuple(classes), patterns=tuple(pairs))


def describe_suppression(settings: SuppressionSettings) -> list[str]:
    """The C{[suppression]} table as TOML lines, for C{relaynet check-config} (JSON strings are TOML strings)."""
    import json

    lines = [
        "[suppression]",
        f"enabled = {'true' if settings.enabled else 'false'}",
        f"expiry_days = {settings.expiry_days!r}",
        "classes = [" + ", ".join(json.dumps(c) for c in settings.classes) + "]",
        "",
    ]
    if settings.patterns:
        lines.append("[suppression.patterns]")
        grouped: dict[str, list[str]] = {}
        for name, expr in settings.patterns:
            grouped.setdefault(name, []).append(expr)
        for name, exprs in grouped.items():
            lines.append(f"{json.dumps(name)} = [" + ", ".join(json.dumps(e) for e in exprs) + "]")
        lines.append("")
    return lines


def parse_reply(reply: str) -> tuple[int | None, str, str]:
    """
    C{"accept"} or C{"CODE X.Y.Z text"} (a 4xx or 5xx code; the enhanced
    status must agree with its class).

    @raise ValueError: anything else.
    """
    if reply.strip().lower() == "accept":
        return None, "", ""
    parts = reply.split(None, 2)
    if len(parts) < 2 or not parts[0].isdigit() or not 400 <= int(parts[0]) <= 599:
        raise ValueError(f"{reply!r}: 'accept' or 'CODE X.Y.Z text' with a 4xx or 5xx code")
    code, enhanced = int(parts[0]), parts[1]
    pieces = enhanced.split(".")
    if len(pieces) != 3 or not all(p.isdigit() for p in pieces) or pieces[0] != str(code // 100):
        raise ValueError(f"{reply!r}: the enhanced status must be {code // 100}.X.Y (RFC 3463)")
    return code, enhanced, parts[2] if len(parts) > 2 else "refused by the test sink"


def _parse_sink(source: str, t: TableReader) -> SinkSettings:
    """C{[sink] rules = [{ match, reply, delay, times }, ...]} (L{relaynet.intake.sink})."""
    rules = []
    for i, item in enumerate(t.get("rules", list, [])):
        r = TableReader(source, f"sink.rules[{i}]", item)
        match = r.get("match", str, "")
        if not match:
            raise r.error("match", "is required: a shell pattern of addresses, e.g. 'gone*@*' or '*'")
        try:
            code, enhanced, text = parse_reply(r.get("reply", str, "accept"))
        except ValueError as e:
            raise r.error("reply", str(e)) from None
        delay = float(r.get("delay", (int, float), 0.0, lambda v: None if 0 <= v <= 600 else "must be 0 to 600"))
        times = r.get("times", int, 0, lambda v: None if v >= 0 else "must be 0 (always) or more")
        r.finish()
        rules.append(SinkRule(match, code, enhanced, text, delay, times))
    t.finish()
    return SinkSettings(tuple(rules))


def _parse_egress(source: str, e: TableReader) -> tuple[EgressPoolSpec, ...]:
    """C{[egress.NAME] addresses = ["192.0.2.10", { address = "192.0.2.11", weight = 2 }]}."""
    out = []
    for name in list(e.data):
        t = TableReader(source, f"egress.{name}", e.get(name, dict, {}))
        items = t.get("addresses", list, [])
        if not items:
            raise t.error("addresses", "is required: the pool's source addresses")
        addresses: list[tuple[str, int]] = []
        for i, item in enumerate(items):
            key = f"addresses[{i}]"
            if isinstance(item, str):
                address, weight = item, 1
            else:
                a = TableReader(source, t.key(key), item)
                address = a.get("address", str, "")
                weight = a.get("weight", int, 1, lambda v: None if 1 <= v <= 1000 else "must be 1 to 1000")
                a.finish()
            problem = _ip_literal(address)
            if problem:
                raise t.error(key, problem)
            if any(address == x for x, _ in addresses):
                raise t.error(key, f"{address} is in the pool twice")
            addresses.append((address, weight))
        t.finish()
        out.append(EgressPoolSpec(name, tuple(addresses)))
    e.finish()
    return tuple(out)


def _parse_dkim(source: str, d: TableReader, base: Path | None) -> DKIMSettings:
    """
    C{[dkim]}: the switch, the keys (each read now: a key that cannot be
    read is an error of the configuration, so the node does not start) and
    the signing table.
    """
    from relaynet.dkimkeys import KeyFileError, load_key

    sign = d.get("sign", bool, False)
    keys = []
    seen = set()
    for i, item in enumerate(d.get("keys", list, [])):
        k = TableReader(source, f"dkim.keys[{i}]", item)
        domain = k.get("domain", str, "").strip().rstrip(".").lower()
        if not domain:
            raise k.error("domain", "is required: the signing domain (d=)")
        domain = _domain_pattern(source, k.key("domain"), domain)
        if domain.startswith("*"):
            raise k.error("domain", "must be a domain, not a pattern (use [dkim.signing_table])")
        selector = k.get("selector", str, "")
        if not selector or not all(
            part and part.isascii() and all(c.isalnum() or c == "-" for c in part)
            for part in selector.split(".")
        ):
            raise k.error("selector", "is required: DNS labels of letters, digits and '-'")
        if (domain, selector.lower()) in seen:
            raise k.error("selector", f"{selector!r} of {domain} is already configured")
        seen.add((domain, selector.lower()))
        key_file = k.get("key_file", str, None)
        if not key_file:
            raise k.error("key_file", "is required: the private key (PEM), e.g. from 'relaynet dkim keygen'")
        try:
            keys.append(load_key(_resolve(base, key_file), domain, selector))
        except KeyFileError as e:
            raise k.error("key_file", str(e)) from None
        k.finish()
    table = []
    st = d.get("signing_table", dict, {})
    domains = {k.domain for k in keys}
    for pattern, target in st.items():
        key = f"dkim.signing_table.{pattern}"
        if not isinstance(target, str):
            raise ConfigError(source, key, f"must be a signing domain, not {toml_kind(target)}")
        pattern = _domain_pattern(source, key, pattern.lower())
        target = target.strip().rstrip(".").lower()
        if target not in domains:
            raise ConfigError(source, key, f"{target!r} has no key in [[dkim.keys]]")
        table.append((pattern, target))
    if sign and not keys:
        raise d.error("sign", "is true, but there are no [[dkim.keys]]")
    d.finish()
    return DKIMSettings(sign=sign, keys=tuple(keys), signing_table=tuple(table))


def _check_loops(source: str, listeners: tuple[Listener, ...], routes: tuple[RouteRule, ...]) -> None:
    """A relay route whose next hop is one of our own listeners is a mail loop."""
    ours = set()
    for lst in listeners:
        addr = _endpoint_address(lst.endpoint)
        if addr is not None and addr[1] != 0:
            ours.add(addr)
    for i, rule in enumerate(routes):
        for j, hop in enumerate(rule.next_hops):
            addr = _endpoint_address(hop.endpoint)
            if addr is None:
                continue
            host, port = addr
            names = {host}
            if host.lower() in ("localhost", "localhost."):
                names = {"127.0.0.1", "::1", "localhost"}
            for lhost, lport in ours:
                wildcard = lhost in ("", "0.0.0.0", "::")
                if port == lport and (wildcard or lhost in names):
                    raise ConfigError(
                        source, f"route[{i}].next_hops[{j}]",
                        f"{hop.endpoint!r} is this node's own listener: a mail loop",
                    )


def load_config(path: str | os.PathLike[str] | None) -> NodeConfig:
    """
    Load a node configuration file, or the embedded default when C{path} is
    C{None}.

    @raise ConfigError: the file cannot be read, is not TOML, or is invalid.
    """
    if path is None:
        return parse_config({})
    p = Path(path)
    return parse_config(read_toml(p), source=str(p), base=p.resolve().parent)


def read_toml(path: Path) -> dict[str, Any]:
    """
    Read a TOML file.

    @raise ConfigError: unreadable, not UTF-8 or not TOML (naming the file).
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), "<file>", f"cannot read: {e.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), "<file>", f"not UTF-8: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), "<file>", f"invalid TOML: {e}") from None


def _toml(value: Any) -> str:
    """A TOML rendering of a config value (strings, numbers, booleans, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple, frozenset, set)):
        items = sorted(value) if isinstance(value, (frozenset, set)) else value
        return "[" + ", ".join(_toml(v) for v in items) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _table(name: str, obj: Any, skip: tuple[str, ...] = ()) -> list[str]:
    lines = [f"[{name}]"]
    for a in obj.__attrs_attrs__:
        value = getattr(obj, a.name)
        if a.name in skip or value is None or isinstance(value, dict):
            continue
        lines.append(f"{a.name} = {_toml(value)}")
    return lines + [""]


def describe(config: NodeConfig) -> str:
    """
    Render the effective configuration as TOML for C{relaynet check-config};
    loading the output again gives the same configuration.
    """
    lines = [
        f"# effective configuration from {config.source}",
        "[node]",
        f"name = {_toml(config.name)}",
        f"hostname = {_toml(config.hostname)}",
        f"spool = {_toml(config.spool)}",
        f"workers = {_toml(config.workers or 'auto')}",
        "",
    ]
    for lst in config.listeners:
        lines += ["[[listener]]", f"endpoint = {_toml(lst.endpoint)}", f"mode = {_toml(lst.mode)}"]
        lines += [f"reuse_port = {_toml(lst.reuse_port)}", ""] if lst.reuse_port else [""]
    lines += _table("limits", config.limits)
    lines += ["[relay]", f"trusted_networks = {_toml([str(n) for n in config.trusted_networks])}",
              f"relay_domains = {_toml(list(config.relay_domains))}", ""]
    lines += _table("local", config.local)
    if config.local.aliases:
        lines.append("[local.aliases]")
        for alias, targets in sorted(config.local.aliases.items()):
            lines.append(f"{_toml(alias)} = {_toml(list(targets))}")
        lines.append("")
    if config.tls.cert or config.tls.ca_file:
        lines += _table("tls", config.tls)
    if config.auth.password_file:
        lines += _table("auth", config.auth)
        if config.auth.senders:
            lines.append("[auth.senders]")
            for user, allowed in sorted(config.auth.senders.items()):
                lines.append(f"{_toml(user)} = {_toml(list(allowed))}")
            lines.append("")
    lines += _table("queue", config.queue)
    lines += _table("outbound", config.outbound)
    if config.dns_servers or config.dnssec_resolver:
        def hp(h: str, p: int) -> str:
            return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"

        lines += ["[dns]"]
        if config.dns_servers:
            lines.append(f"servers = {_toml([hp(h, p) for h, p in config.dns_servers])}")
        if config.dnssec_resolver:
            lines.append(f"dnssec_resolver = {_toml(hp(*config.dnssec_resolver))}")
        lines.append("")
    lines += _table("mta_sts", config.mta_sts)
    for hook in config.webhooks:
        lines += [
            "[[webhook]]", f"name = {_toml(hook.name)}", f"url = {_toml(hook.url)}",
            f"secret_file = {_toml(str(hook.secret_file))}", f"events = {_toml(sorted(hook.events))}",
            f"batch_size = {hook.batch_size}", f"flush_interval = {_toml(hook.flush_interval)}",
            f"timeout = {_toml(hook.timeout)}", "",
        ]
    for pool in config.egress:
        items = ", ".join(f"{{ address = {_toml(a)}, weight = {w} }}" for a, w in pool.addresses)
        lines += [f"[egress.{pool.name}]", f"addresses = [{items}]", ""]
    if config.shaping is not None:
        lines += describe_shaping(config.shaping)
    lines += _table("tls_rpt", config.tls_rpt)
    lines += describe_suppression(config.suppression)
    if config.sink.rules:
        lines.append("[sink]")
        lines.append("rules = [")
        for sr in config.sink.rules:
            reply = "accept" if sr.code is None else f"{sr.code} {sr.enhanced} {sr.text}"
            lines.append(f"  {{ match = {_toml(sr.match)}, reply = {_toml(reply)}, delay = {_toml(sr.delay)},"
                         f" times = {sr.times} }},")
        lines += ["]", ""]
    lines += [
        "[admin]", f"enabled = {_toml(config.admin.enabled)}",
        f"endpoint = {_toml(config.admin_endpoint)}",
    ]
    if config.admin.metrics_endpoint:
        lines.append(f"metrics_endpoint = {_toml(config.admin.metrics_endpoint)}")
    if config.http_api.endpoint:
        lines += [""] + _table("http_api", config.http_api)[:-1]
    lines += [""] + _table("log", config.log)
    if config.dkim.keys:
        lines += ["[dkim]", f"sign = {_toml(config.dkim.sign)}", ""]
        for k in config.dkim.keys:
            lines += [
                "[[dkim.keys]]", f"domain = {_toml(k.domain)}", f"selector = {_toml(k.selector)}",
                f"key_file = {_toml(str(k.key_file))}  # {k.algorithm}", "",
            ]
        if config.dkim.signing_table:
            lines.append("[dkim.signing_table]")
            lines += [f"{_toml(p)} = {_toml(d)}" for p, d in config.dkim.signing_table]
            lines.append("")
    for rule in config.routes:
        lines += ["[[route]]", f"domains = {_toml(list(rule.domains))}", f"action = {_toml(rule.action)}"]
        if rule.next_hops:
            hops = ", ".join(
                f"{{ endpoint = {_toml(h.endpoint)}, priority = {h.priority} }}" for h in rule.next_hops
            )
            lines.append(f"next_hops = [{hops}]")
        if rule.action == "reject":
            lines += [f"code = {rule.code}", f"enhanced = {_toml(rule.enhanced)}", f"text = {_toml(rule.text)}"]
        if rule.action in ("relay", "mx", "lmtp"):
            lines += [f"ack = {_toml(rule.ack)}", f"concurrency = {rule.concurrency}", f"tls = {_toml(rule.tls)}"]
            if rule.source_address:
                lines.append(f"source_address = {_toml(rule.source_address)}")
            if rule.auth_file is not None:
                lines.append(f"auth_file = {_toml(str(rule.auth_file))}")
            if rule.auth_cleartext:
                lines.append("auth_cleartext = true")
            if rule.dkim is not None:
                lines.append(f"dkim = {_toml(rule.dkim)}")
            if rule.source_pool is not None:
                lines.append(f"source_pool = {_toml(rule.source_pool)}")
        if rule.action == "mx":
            lines.append(f"mx_port = {rule.mx_port}")
        lines.append("")
    return "\n".join(lines)
