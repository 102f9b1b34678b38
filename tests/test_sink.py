"""
The test sink (C{[sink]}, L{relaynet.intake.sink}): a node answering each
recipient as its rules say, used to show retries, bounce classes and
suppression working (issue 14 item 6).
"""

from __future__ import annotations

from typing import Any

import pytest

from relaynet.config import ConfigError, SinkRule, describe, parse_config
from relaynet.intake.sink import SinkRules
from relaynet.testing.network import Network

RULES = [
    {"match": "gone*@*", "reply": "550 5.1.1 No such user"},
    {"match": "full*@*", "reply": "452 4.2.2 Mailbox full", "times": 2},
    {"match": "busy*@*", "reply": "421 4.7.0 Too many connections, slow down", "times": 1},
    {"match": "slow*@*", "delay": 2.5},
]


def test_rules_decide_first_match_times_then_accept() -> None:
    """The first matching rule answers; times = N: that answer N times, then accepted; no rule: accepted."""
    rules = SinkRules(parse_config({"sink": {"rules": RULES}}).sink.rules)
    assert rules.decide("Gone@x.test").code == 550
    assert [rules.decide("full@x.test").code for _ in range(3)] == [452, 452, None]
    busy = rules.decide("busy@x.test")
    assert busy.code == 421 and busy.closes and rules.decide("busy@x.test").code is None
    assert rules.decide("slow@x.test").delay == 2.5 and rules.decide("slow@x.test").code is None
    assert rules.decide("anyone@x.test").code is None


def test_configuration_errors_and_round_trip() -> None:
    """reply must be accept or CODE X.Y.Z text of a 4xx/5xx class; check-config prints rules that load the same."""
    import tomllib

    config = parse_config({"sink": {"rules": RULES}})
    assert config.sink.rules[0] == SinkRule("gone*@*", 550, "5.1.1", "No such user")
    assert parse_config(tomllib.loads(describe(config))).sink == config.sink
    for bad, key in [
        ({"rules": [{"reply": "accept"}]}, "sink.rules[0].match"),
        ({"rules": [{"match": "*", "reply": "250 2.0.0 fine"}]}, "sink.rules[0].reply"),
        ({"rules": [{"match": "*", "reply": "550 4.1.1 mixed"}]}, "sink.rules[0].reply"),
        ({"rules": [{"match": "*", "delay": -1}]}, "sink.rules[0].delay"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_config({"sink": bad})
        assert e.value.key == key


def test_a_sink_provider_shows_retries_bounce_classes_and_suppression() -> None:
    """
    A sender relays to a sink provider: gone@ bounces at once (class
    invalid-recipient, then suppressed at the sender: a second message to it
    is refused at RCPT); full@ is deferred twice (class mailbox-full) then
    delivered; busy@ gets a 421 that ends the session (class rate-limit),
    then is delivered; ok@ is delivered at the first attempt.
    """
    net = Network()
    net.add_node("provider", local_domains=["prov.test"], sink={"rules": RULES})
    sender = net.add_node("sender", routes=[
        {"domains": ["prov.test"], "action": "relay", "next_hops": [net.endpoint("provider")]},
    ], queue={"minimal_backoff": 60, "maximal_backoff": 120, "lifetime": 86400}, suppression={"enabled": True})
    sender.intake.suppression = sender.runner.suppression
    for rcpt in ("gone@prov.test", "full@prov.test", "busy@prov.test", "ok@prov.test"):
        sender.submit("app@send.test", [rcpt], f"Subject: to {rcpt}\r\n\r\nhello\r\n".encode())
    net.run()
    net.advance(600)
    provider = net.nodes["provider"]
    delivered = {box for box in ("full@prov.test", "busy@prov.test", "ok@prov.test")
                 if provider.mailboxes.delivered(box)}
    assert delivered == {"full@prov.test", "busy@prov.test", "ok@prov.test"}
    assert not provider.mailboxes.delivered("gone@prov.test")

    def classes(name: str, rcpt: str) -> list[Any]:
        return [e.get("class") for e in sender.events_named(name, recipient=rcpt)]

    assert classes("bounced", "gone@prov.test") == ["invalid-recipient"]
    assert classes("deferred", "full@prov.test") == ["mailbox-full", "mailbox-full"]
    assert classes("deferred", "busy@prov.test") == ["rate-limit"]
    assert classes("deferred", "ok@prov.test") == []
    replies = sender.submit("app@send.test", ["gone@prov.test"], b"Subject: again\r\n\r\nhello\r\n")
    assert (550, "5.1.1") in [(code, text.split()[0]) for code, text in replies], replies
