"""
L{relaynet.delivery.tlspolicy}: DANE over MTA-STS over the route's policy,
per exchanger (pure decisions, with fake DANE and MTA-STS answers).
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import fail, succeed

from relaynet.delivery import dane
from relaynet.delivery.dane import DaneRequirement, DNSSECLookupError, TLSARecord
from relaynet.delivery.mtasts import PolicyState, parse_policy
from relaynet.delivery.tlspolicy import HopDecision, HopTLS, OutboundSecurity, ReportContext

RECORD = TLSARecord(3, 1, 1, b"\x00" * 32)
ENFORCE = parse_policy("version: STSv1\nmode: enforce\nmx: *.example.test\nmax_age: 86400\n")
TESTING = parse_policy("version: STSv1\nmode: testing\nmx: *.example.test\nmax_age: 86400\n")


class FakeSTS:
    def __init__(self, policy: Any) -> None:
        self.policy = policy

    def policy_for(self, domain: str) -> Any:
        return succeed(PolicyState(domain, self.policy, "cache" if self.policy else "none"))


class FakeDANE:
    def __init__(self, kinds: dict[str, str], mx_secure: Any = True) -> None:
        self.kinds = kinds
        self.secure = mx_secure
        self.asked: list[tuple[str, bool]] = []

    def mx_secure(self, domain: str) -> Any:
        if isinstance(self.secure, Exception):
            return fail(self.secure)
        return succeed(self.secure)

    def requirement_for(self, host: str, port: int = 25, *, mx_secure: bool = True) -> Any:
        self.asked.append((host, mx_secure))
        kind = self.kinds.get(host, dane.NO_DANE)
        records = (RECORD,) if kind == dane.MATCH else ()
        return succeed(DaneRequirement(kind, host, port, records, (host,), f"{kind} for {host}",
                                       "4.7.5" if kind == dane.DEFER else ""))


def decide(sts: Any, dn: Any, hosts: list[str]) -> Any:
    out: list[Any] = []
    OutboundSecurity(sts, dn).decide("example.test", hosts, 25).addBoth(out.append)
    (result,) = out
    return result


def test_nothing_published_leaves_the_routes_policy() -> None:
    """No TLSA, no MTA-STS policy: every host gets the route's own TLS policy."""
    d = decide(FakeSTS(None), FakeDANE({}), ["mx1.example.test"])
    assert d.failure is None and d.hosts == {"mx1.example.test": HopDecision(
        report=ReportContext("example.test", "no-policy-found", mx_host="mx1.example.test"))}


def test_enforce_skips_unmatched_hosts_and_requires_verified_tls() -> None:
    """MTA-STS enforce: a matching host needs TLS verified for its name; one that matches no pattern is skipped."""
    d = decide(FakeSTS(ENFORCE), None, ["mx1.example.test", "mx.elsewhere.test"])
    assert d.hosts["mx1.example.test"].tls == HopTLS("mta-sts", "mx1.example.test")
    report = d.hosts["mx1.example.test"].report
    assert report is not None and (report.policy_type, report.mx_patterns, report.testing) == (
        "sts", ("*.example.test",), False)
    assert report.policy_string == ("version: STSv1", "mode: enforce", "mx: *.example.test", "max_age: 86400")
    skip = d.hosts["mx.elsewhere.test"].skip
    assert skip is not None and "matches no MTA-STS pattern" in skip and d.hosts["mx.elsewhere.test"].tls is None


def test_testing_mode_changes_nothing_but_the_note() -> None:
    """MTA-STS testing: delivery as the route says (noted for reports), even to a host matching no pattern."""
    d = decide(FakeSTS(TESTING), None, ["mx1.example.test", "other.test"])
    for name in ("mx1.example.test", "other.test"):
        h = d.hosts[name]
        assert (h.tls, h.skip, h.note) == (None, None, "MTA-STS testing")
        assert h.report is not None and h.report.testing and h.report.mx_host == name


def test_dane_overrides_mta_sts() -> None:
    """A host with usable TLSA records gets DANE even under an enforce policy it would fail (RFC 8461 2)."""
    dn = FakeDANE({"mx.elsewhere.test": dane.MATCH, "mx1.example.test": dane.TLS_UNAUTHENTICATED})
    d = decide(FakeSTS(ENFORCE), dn, ["mx.elsewhere.test", "mx1.example.test"])
    tls = d.hosts["mx.elsewhere.test"].tls
    assert tls is not None and tls.policy == "dane" and tls.dane is not None and tls.dane.records == (RECORD,)
    other = d.hosts["mx1.example.test"].tls
    assert other is not None and other.policy == "dane-unauthenticated"


def test_failed_dnssec_lookup_skips_the_host_never_falls_back() -> None:
    """A TLSA lookup that failed (bogus: SERVFAIL) skips the host; no MTA-STS or clear text instead."""
    d = decide(FakeSTS(None), FakeDANE({"mx1.example.test": dane.DEFER}), ["mx1.example.test"])
    assert d.hosts["mx1.example.test"].skip == "defer for mx1.example.test"


def test_mx_lookup_failing_validation_defers_the_domain() -> None:
    """The MX RRset failing validation at the validating resolver: the whole domain defers."""
    d = decide(None, FakeDANE({}, mx_secure=DNSSECLookupError("SERVFAIL")), ["mx1.example.test"])
    assert d.failure is not None and "DNSSEC-validated" in d.failure and not d.hosts


@pytest.mark.parametrize("secure", [True, False])
def test_mx_security_is_passed_on(secure: bool) -> None:
    """Whether the MX RRset was secure goes to every TLSA decision (RFC 7672 2.2.1)."""
    dn = FakeDANE({}, mx_secure=secure)
    decide(None, dn, ["a.example.test", "b.example.test", "a.example.test"])
    assert dn.asked == [("a.example.test", secure), ("b.example.test", secure)]


def test_hop_tls_labels_and_context() -> None:
    """Events name the policy; MTA-STS verifies the MX name, DANE uses its own TLS options."""
    assert HopTLS("mta-sts", "mx1.example.test").label == "MTA-STS"
    req = DaneRequirement(dane.MATCH, "mx1.example.test", 25, (RECORD,), ("mx1.example.test",))
    assert isinstance(HopTLS("dane", "mx1.example.test", req).context(), dane.DaneClientTLS)
    assert HopTLS("mta-sts", "mx1.example.test").context() is not None


# -- in the delivery of mx routes (relaynet.delivery.attempt) ------------------


class TLSHops:
    """An outbound agent recording the hop_tls of each try; every hop answers 421 but C{ok}."""

    def __init__(self, ok: str = "") -> None:
        self.ok = ok
        self.tried: list[tuple[str, Any]] = []

    def deliver(self, endpoint: str, entry: Any, recipients: list[Any], concurrency: int = 20,
                source_address: str | None = None, tls_policy: str = "none", hop_tls: Any = None) -> Any:
        from relaynet.delivery.client import DeliveryResult

        self.tried.append((endpoint, hop_tls))
        code, enhanced = (250, "2.0.0") if endpoint == self.ok else (421, "4.4.2")
        return succeed([DeliveryResult(r.address, code, enhanced, "said so", endpoint) for r in recipients])


def mx_attempt(hops: TLSHops, security: OutboundSecurity) -> Any:
    from relaynet import zones
    from relaynet.delivery.attempt import Delivery
    from relaynet.delivery.routing import RoutingTable
    from relaynet.queue.spool import Recipient
    from tests.test_delivery import Boxes, config, entry

    resolver = zones.resolver({"mx.test": [
        "@ MX 10 a.example.test.", "@ MX 20 b.elsewhere.test.",
    ], "example.test": ["a A 192.0.2.10"], "elsewhere.test": ["b A 192.0.2.20"]})
    table = RoutingTable(config())
    d = Delivery(lambda: table, hops, Boxes(), lambda: resolver, shuffle=lambda h: None,  # type: ignore[arg-type]
                 security=lambda: security)
    out: list[Any] = []
    d.attempt(entry("u@mx.test"), [Recipient("u@mx.test")]).addBoth(out.append)
    [[outcome]] = out
    return outcome


def test_enforce_in_delivery_uses_matching_hosts_only() -> None:
    """
    The enforce policy matches a.example.test only: b.elsewhere.test is never
    connected to; a is tried with MTA-STS TLS; when a defers, the recipient
    is deferred naming a, with b in tried as ruled out (4.7.5).
    """
    hops = TLSHops()
    o = mx_attempt(hops, OutboundSecurity(FakeSTS(ENFORCE), None))  # type: ignore[arg-type]
    assert hops.tried == [("tcp:192.0.2.10:2525", HopTLS("mta-sts", "a.example.test"))]
    assert o.dsn == "4.4.2" and o.remote == "a.example.test[192.0.2.10]:2525"
    assert [(t[0], t[1]) for t in o.tried] == [("b.elsewhere.test[192.0.2.20]:2525", "4.7.5")]


def test_no_usable_host_defers_with_4_7_5() -> None:
    """Every exchanger ruled out (DANE lookups failed): deferred 4.7.5, no connection at all."""
    hops = TLSHops(ok="tcp:192.0.2.10:2525")
    dn = FakeDANE({"a.example.test": dane.DEFER, "b.elsewhere.test": dane.DEFER})
    o = mx_attempt(hops, OutboundSecurity(None, dn))  # type: ignore[arg-type]
    assert hops.tried == [] and o.dsn == "4.7.5" and "defer for b.elsewhere.test" in o.diagnostic


def test_hosts_without_dane_or_sts_go_as_the_route_says() -> None:
    """Nothing published: hop_tls is not passed at all (the route's tls applies), and delivery succeeds."""
    hops = TLSHops(ok="tcp:192.0.2.10:2525")
    o = mx_attempt(hops, OutboundSecurity(FakeSTS(None), FakeDANE({})))  # type: ignore[arg-type]
    assert hops.tried == [("tcp:192.0.2.10:2525", None)] and o.dsn == "2.0.0"


class Reports:
    def __init__(self) -> None:
        self.results: list[Any] = []

    def record(self, result: Any) -> None:
        self.results.append(result)


def test_ruled_out_hosts_and_failed_fetches_are_reported() -> None:
    """
    With TLS reporting: a host matching no enforce pattern counts as a
    validation-failure under the sts policy, a failed DANE lookup as
    dnssec-invalid under tlsa, a failed policy fetch under the cached policy.
    """
    from relaynet.delivery.mtasts import Failed

    class FailingSTS(FakeSTS):
        def policy_for(self, domain: str) -> Any:
            failed = Failed("sts-policy-fetch-error", "HTTP 404", "2", 0.0)
            return succeed(PolicyState(domain, ENFORCE, "cache", failure=failed))

    reports = Reports()
    dn = FakeDANE({"mx.dane.test": dane.DEFER})
    out: list[Any] = []
    OutboundSecurity(FailingSTS(ENFORCE), dn, reports).decide(  # type: ignore[arg-type]
        "example.test", ["mx.dane.test", "mx.elsewhere.test", "mx1.example.test"], 25).addBoth(out.append)
    got = [(r.policy_type, r.receiving_mx_hostname, r.result_type) for r in reports.results]
    assert got == [
        ("sts", None, "sts-policy-fetch-error"),
        ("tlsa", "mx.dane.test", "dnssec-invalid"),
        ("sts", "mx.elsewhere.test", "validation-failure"),
    ]


def test_mta_sts_and_dane_settings() -> None:
    """[mta_sts] refresh is wait or background; [dns] dnssec_resolver must be loopback (its AD bit is trusted)."""
    from relaynet.config import ConfigError, parse_config

    config = parse_config({"mta_sts": {"refresh": "background", "policy_port": 8443},
                           "dns": {"dnssec_resolver": "127.0.0.1:5353"}})
    assert (config.mta_sts.refresh, config.mta_sts.policy_port, config.dnssec_resolver) == (
        "background", 8443, ("127.0.0.1", 5353))
    assert parse_config({}).mta_sts.refresh == "wait" and parse_config({}).dnssec_resolver is None
    with pytest.raises(ConfigError) as e:
        parse_config({"mta_sts": {"refresh": "later"}})
    assert e.value.key == "mta_sts.refresh"
    with pytest.raises(ConfigError) as e:
        parse_config({"dns": {"dnssec_resolver": "192.0.2.1"}})
    assert e.value.key == "dns.dnssec_resolver" and "loopback" in e.value.problem


def test_tls_rpt_settings_leave_the_node_name_alone() -> None:
    """[tls_rpt] enabled: its required fields are checked, and the node keeps its own name (a loop variable once took it)."""
    from relaynet.config import ConfigError, parse_config

    config = parse_config({"node": {"name": "edge"}, "tls_rpt": {
        "enabled": True, "organization_name": "Org", "contact_info": "tlsrpt@example.org"}})
    assert config.name == "edge" and config.tls_rpt.enabled
    with pytest.raises(ConfigError) as e:
        parse_config({"tls_rpt": {"enabled": True, "organization_name": "Org"}})
    assert e.value.key == "tls_rpt.contact_info"
