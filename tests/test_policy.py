"""
Tests for L{relaynet.intake.policy}: relay permission, local users and routing rules,
without any I/O.
"""

from __future__ import annotations

from relaynet.config import parse_config
from relaynet.delivery.routing import RouteKind, domain_matches, resolve_local
from relaynet.intake.policy import check_recipient

CONFIG = parse_config(
    {
        "local": {
            "mailroot": "/m",
            "domains": ["example.org", "localhost"],
            "users": ["alice", "bob@example.org"],
            "aliases": {"postmaster": "alice", "team@example.org": ["alice", "bob"], "loop": "loop"},
        },
        "route": [
            {"domains": ["partner.test", "*.partner.test"], "action": "relay",
             "next_hops": ["tcp:127.0.0.2:25"]},
            {"domains": ["blocked.test"], "action": "reject", "code": 550, "text": "go away"},
        ],
    }
)


def test_domain_patterns() -> None:
    """Exact, wildcard (strict subdomains only) and default patterns."""
    assert domain_matches("*", "x.y")
    assert domain_matches("*.a.test", "b.a.test")
    assert not domain_matches("*.a.test", "a.test")
    assert not domain_matches("*.a.test", "xa.test")
    assert domain_matches("a.test", "a.test")


def test_local_users() -> None:
    """Known users are accepted, unknown ones get 550 5.1.1."""
    assert check_recipient(CONFIG, "alice", "localhost", "10.9.9.9").accepted
    assert check_recipient(CONFIG, "bob", "example.org", "10.9.9.9").accepted
    v = check_recipient(CONFIG, "bob", "localhost", "10.9.9.9")
    assert (v.accepted, v.code, v.enhanced) == (False, 550, "5.1.1")


def test_aliases() -> None:
    """Aliases expand to local users; loops end without mailboxes."""
    assert resolve_local(CONFIG.local, "postmaster", "example.org") == [("example.org", "alice")]
    assert resolve_local(CONFIG.local, "Team", "example.org") == [
        ("example.org", "alice"), ("example.org", "bob")
    ]
    assert resolve_local(CONFIG.local, "loop", "localhost") == []


def test_unsafe_local_part() -> None:
    """A local part that is unsafe as a directory name is never a mailbox."""
    catch = parse_config({})
    assert resolve_local(catch.local, "../etc", "localhost") == []
    assert resolve_local(catch.local, ".hidden", "localhost") == []
    assert resolve_local(catch.local, "ok.user+tag", "localhost") == [("localhost", "ok.user+tag")]


def test_relay_only_for_trusted() -> None:
    """Relay routes serve trusted networks and authenticated clients only."""
    route = check_recipient(CONFIG, "x", "sub.partner.test", "127.0.0.1").route
    assert route is not None and route.kind is RouteKind.RELAY
    assert route.rule is CONFIG.routes[0] and route.name == "relay:partner.test,*.partner.test"
    v = check_recipient(CONFIG, "x", "partner.test", "192.0.2.1")
    assert (v.code, v.enhanced) == (554, "5.7.1")
    assert check_recipient(CONFIG, "x", "partner.test", "192.0.2.1", authenticated=True).accepted
    assert check_recipient(CONFIG, "x", "partner.test", "::ffff:127.0.0.1").accepted


def test_no_route() -> None:
    """
    No matching rule: 554 5.7.1 for strangers (not an open relay), 550 5.1.2
    for trusted clients (never accepted and then lost).
    """
    v = check_recipient(CONFIG, "x", "elsewhere.test", "192.0.2.1")
    assert (v.code, v.enhanced) == (554, "5.7.1")
    v = check_recipient(CONFIG, "x", "elsewhere.test", "127.0.0.1")
    assert (v.code, v.enhanced) == (550, "5.1.2")


def test_reject_route() -> None:
    """A reject rule answers with its code and text."""
    v = check_recipient(CONFIG, "x", "blocked.test", "127.0.0.1")
    assert (v.code, v.enhanced) == (550, "5.7.1") and "go away" in v.text


def test_postmaster_without_domain() -> None:
    """C{RCPT TO:<postmaster>} is accepted (RFC 5321 4.5.1)."""
    assert check_recipient(CONFIG, "postmaster", "", "192.0.2.1").accepted
