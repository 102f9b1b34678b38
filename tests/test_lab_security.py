"""
Outbound security in labs: C{topologies/outbound-security.toml} run as real
processes. C{lab up} makes the egress node's DKIM keys and publishes them in
the lab's DNS server, with the domains' MTA-STS records, and serves their
policies over HTTPS; the node signs what it sends by MX and applies the
policies; C{lab check} verifies every delivered copy's signatures against
the keys it looks up in that DNS server (and fails when one does not
verify) and reports the TLS each delivery used. Independent checks: C{drill}
reads the published records, OpenDKIM verifies a delivered copy with them,
Python's C{ssl} and C{urllib} fetch a policy with the lab CA.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from harness.nodeproc import wait_for
from harness.opendkim import OpenDKIMVerifier, opendkim_unavailable_reason
from relaynet.config import ConfigError
from relaynet.delivery.dkim import load_key, zone_record
from relaynet.lab.dnssec import missing_tools
from relaynet.lab.topology import parse_topology, zone_spec
from relaynet.zones import parse_record

from test_lab import TOPOLOGIES, lab_dirs, relaynet  # noqa: F401 - lab_dirs is a fixture


def test_zone_lines_as_keygen_prints_them() -> None:
    """A TXT line of several quoted strings, with the IN class, is one record: their concatenation."""
    name, rr = parse_record('s1._domainkey.x.test. IN TXT "v=DKIM1; k=rsa; p=AB" "CD"', "x.test")
    assert name == "s1._domainkey.x.test" and b"".join(rr.data) == b"v=DKIM1; k=rsa; p=ABCD"
    name, rr = parse_record("@ 60 IN MX 10 mx", "x.test")
    assert rr.preference == 10 and rr.ttl == 60


def test_dkim_node_needs_zones_and_records_go_to_the_enclosing_zone() -> None:
    """C{dkim = [...]} without [dns] zones is an error; extra records join the closest zone."""
    text = ('[node.a]\ndkim = ["x.test"]\n[[node.a.route]]\ndomains = ["*"]\naction = "mx"\n'
            '[node.b]\ndomains = ["b.test"]\nusers = ["u"]\n')
    with pytest.raises(ConfigError) as e:
        parse_topology(tomllib.loads(text), source="t.toml")
    assert e.value.key == "node.a.dkim" and "[dns] zones" in e.value.problem
    topo = parse_topology(tomllib.loads(text + '[dns.zones]\n"x.test" = ["@ A 127.0.0.9"]\n'), source="t.toml")
    spec = zone_spec(topo, {"a": "127.0.0.2", "b": "127.0.0.3"}, {"x.test": ["s._domainkey.x.test. IN TXT \"v=DKIM1\""],
                                                 "other.test": ["s._domainkey.other.test. IN TXT \"v=DKIM1\""]})
    assert spec == {"x.test": ["@ A 127.0.0.9", 's._domainkey.x.test. IN TXT "v=DKIM1"'],
                    "other.test": ['s._domainkey.other.test. IN TXT "v=DKIM1"']}


def _need_tools() -> None:
    missing = [t for t in ["drill", *missing_tools()] if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: make peers")


def _drill_txt(server: dict[str, Any], name: str) -> str:
    """The TXT record of C{name} as drill (ldnsutils) reads it from the lab's DNS server, joined."""
    out = subprocess.run(
        ["drill", "-p", str(server["port"]), "TXT", name, f"@{server['address']}"],
        capture_output=True, text=True, timeout=30,
    ).stdout
    answer = out.split(";; ANSWER SECTION:")[1].split(";;")[0]
    (line,) = [x for x in answer.splitlines() if "\tTXT\t" in x or " TXT " in x]
    return "".join(part for part in line.split('"')[1::2])


@pytest.mark.slow
def test_lab_signs_publishes_and_checks_dkim(lab_dirs: Any) -> None:
    """
    The egress node signs with an RSA and an Ed25519 key; drill finds both
    records in the lab's DNS, equal to the keys' public halves; lab check
    reports every delivered copy verified (both selectors); OpenDKIM
    verifies a delivered copy with the records drill read; a copy changed
    after delivery fails lab check (exit 1).
    """
    _need_tools()
    labdir = lab_dirs("security")
    relaynet("lab", "up", str(TOPOLOGIES / "outbound-security.toml"), "--dir", str(labdir))
    server = json.loads((labdir / "lab.json").read_text())["dns"]
    records = []
    for selector in ("lab-rsa", "lab-ed"):
        key = load_key(labdir / "outbound" / "dkim" / f"client.test.{selector}.key", "client.test", selector)
        assert _drill_txt(server, f"{selector}._domainkey.client.test") == key.record
        records.append(zone_record(key))

    sent = json.loads(relaynet("lab", "send", "--dir", str(labdir), "-n", "10", "--json").stdout)
    assert sent["accepted"] == 10, sent
    report = json.loads(relaynet("lab", "check", "--dir", str(labdir), "--wait", "60", "--json").stdout)
    assert report["ok"] and report["delivered_once"] == 10, report
    dkim = report["dkim"]
    assert dkim["verified"] == 10 and not dkim["failed"] and not dkim["unsigned"], dkim
    assert {(s["s"], s["a"], s["verified"]) for s in dkim["signatures"]} == {
        ("lab-rsa", "rsa-sha256", 10), ("lab-ed", "ed25519-sha256", 10)}

    copies = sorted((labdir / "mx-a" / "mailboxes").glob("*/*/Maildir/new/*"))
    assert copies, list(labdir.glob("mx-a/**"))
    if opendkim_unavailable_reason() is None:
        with OpenDKIMVerifier(labdir / "opendkim", records) as verifier:
            result = verifier.verify(copies[0].read_bytes())  # its -t takes a comma-separated list: not a Maildir name
        assert result.all_pass and len(result.signatures) == 2, result

    data = copies[0].read_bytes()
    copies[0].write_bytes(data.replace(b"Subject:", b"Subject: changed", 1))
    bad = relaynet("lab", "check", "--dir", str(labdir), "--json", check_rc=False)
    assert bad.returncode == 1, bad.stdout
    failed = json.loads(bad.stdout)["dkim"]["failed"]
    assert [f["file"] for f in failed] == [str(copies[0])], failed
    copies[0].write_bytes(data)


@pytest.mark.slow
def test_lab_applies_mta_sts_policies_and_dane(lab_dirs: Any) -> None:
    """
    The lab publishes each domain's _mta-sts TXT (drill reads it) and serves
    its policy over HTTPS with a lab-CA certificate for mta-sts.DOMAIN
    (Python's ssl and urllib fetch it, checking the certificate); mail to
    alpha.test (enforce) goes with TLS checked for mx.alpha.test, and lab
    check reports it as MTA-STS; mail to gamma.test (enforce, no pattern
    matches its MX) is deferred 4.7.5 and mx-c never gets it; delta.test
    goes by DANE (a TLSA record of mx-d's key in the signed zone, validated
    by the lab's Unbound); eps.test's TLSA record does not match: deferred
    4.7.5, mx-e never gets it.
    """
    _need_tools()
    labdir = lab_dirs("sts")
    relaynet("lab", "up", str(TOPOLOGIES / "outbound-security.toml"), "--dir", str(labdir))
    server = json.loads((labdir / "lab.json").read_text())["dns"]
    txt = _drill_txt(server, "_mta-sts.alpha.test")
    assert txt.startswith("v=STSv1; id="), txt

    context = ssl.create_default_context(cafile=str(labdir / "ca" / "ca.pem"))
    with socket.create_connection(("127.0.0.1", server["https_port"]), timeout=30) as raw:
        # SNI and the certificate check are for the policy host, as a sender's.
        with context.wrap_socket(raw, server_hostname="mta-sts.alpha.test") as tls:
            tls.sendall(b"GET /.well-known/mta-sts.txt HTTP/1.0\r\nHost: mta-sts.alpha.test\r\n\r\n")
            response = http.client.HTTPResponse(tls)  # type: ignore[arg-type]
            response.begin()
            assert response.status == 200 and response.headers.get_content_type() == "text/plain"
            policy = response.read().decode()
    assert "mode: enforce" in policy and "mx: mx.alpha.test" in policy

    relaynet("lab", "send", "--dir", str(labdir), "-n", "6", "--json")
    report = json.loads(relaynet("lab", "check", "--dir", str(labdir), "--wait", "60", "--json").stdout)
    # alpha.test by MTA-STS, delta.test by DANE (its signed TLSA record; its
    # MTA-STS policy, which matches no MX, does not apply: RFC 8461 2),
    # beta.test as the route says.
    assert report["ok"] and report["tls_used"]["outbound"] == {"MTA-STS": 2, "DANE": 2, "no TLS": 2}, report

    relaynet("lab", "send", "--dir", str(labdir), "-n", "1", "--to", "erin@gamma.test", "--json")
    events = labdir / "outbound" / "spool" / "events.jsonl"
    deferred = wait_for(lambda: [
        e for e in map(json.loads, events.read_text().splitlines())
        if e["event"] == "deferred" and e["recipient"] == "erin@gamma.test"
    ], 30, "the deferral of the message to gamma.test")
    assert deferred[0]["dsn"] == "4.7.5", deferred
    assert "matches no MTA-STS pattern" in deferred[0]["diagnostic"]
    assert not list((labdir / "mx-c" / "mailboxes").glob("*/*/Maildir/new/*"))
    held = json.loads(relaynet("lab", "check", "--dir", str(labdir), "--json", check_rc=False).stdout)
    assert held["in_flight"] == 1 and held["tls_used"]["outbound"]["MTA-STS"] == 2

    # DANE: eps.test's signed TLSA record does not match mx-e's key: the
    # handshake is aborted, deferred 4.7.5, never delivered.
    relaynet("lab", "send", "--dir", str(labdir), "-n", "1", "--to", "finn@eps.test", "--json")
    dane = wait_for(lambda: [
        e for e in map(json.loads, events.read_text().splitlines())
        if e["event"] == "deferred" and e["recipient"] == "finn@eps.test"
    ], 30, "the deferral of the message to eps.test")
    assert dane[0]["dsn"] == "4.7.5" and "(DANE)" in dane[0]["diagnostic"], dane
    assert "TLSA 3 1 1 did not match" in dane[0]["diagnostic"]
    assert not list((labdir / "mx-e" / "mailboxes").glob("*/*/Maildir/new/*"))


@pytest.mark.slow
def test_lab_counts_and_mails_tls_reports(lab_dirs: Any) -> None:
    """
    TLS reporting (RFC 8460) at the egress: today's counts per recipient
    domain are written as the RFC's JSON (alpha.test: sts, successes;
    beta.test: its testing policy, starttls-not-supported failures;
    delta.test: tlsa, successes); a finished day's report (here: today's
    file put under yesterday's date) is mailed to the rua the domain
    publishes, and arrives at mx-a as multipart/report; report-type=tlsrpt
    with the gzipped JSON, read back with Python's email, gzip and json.
    """
    import datetime
    import email
    import email.policy
    import gzip

    _need_tools()
    labdir = lab_dirs("rpt")
    relaynet("lab", "up", str(TOPOLOGIES / "outbound-security.toml"), "--dir", str(labdir))
    relaynet("lab", "send", "--dir", str(labdir), "-n", "6", "--json")
    assert json.loads(relaynet("lab", "check", "--dir", str(labdir), "--wait", "60", "--json").stdout)["ok"]
    today = datetime.datetime.now(datetime.timezone.utc).date()
    reports = labdir / "outbound" / "spool" / "tls-rpt"

    def counts(domain: str) -> Any:
        path = reports / today.isoformat() / f"{domain}.json"
        if not path.exists():
            return None
        policy = json.loads(path.read_text())["policies"][0]
        s = policy["summary"]
        total = s["total-successful-session-count"] + s["total-failure-session-count"]
        return (policy, s) if total >= 2 else None

    alpha, s = wait_for(lambda: counts("alpha.test"), 30, "alpha.test's TLS report counts")
    assert alpha["policy"]["policy-type"] == "sts" and alpha["policy"]["mx-host"] == ["mx.alpha.test"]
    assert s == {"total-successful-session-count": 2, "total-failure-session-count": 0}
    beta, s = wait_for(lambda: counts("beta.test"), 30, "beta.test's TLS report counts")
    assert beta["policy"]["policy-type"] == "sts" and s["total-failure-session-count"] == 2
    assert [d["result-type"] for d in beta["failure-details"]] == ["starttls-not-supported"]
    delta, s = wait_for(lambda: counts("delta.test"), 30, "delta.test's TLS report counts")
    assert delta["policy"]["policy-type"] == "tlsa" and s["total-successful-session-count"] == 2
    assert delta["policy"]["policy-string"][0].startswith("3 1 1 ")

    yesterday = reports / (today - datetime.timedelta(days=1)).isoformat()
    yesterday.mkdir(parents=True, exist_ok=True)
    (yesterday / "alpha.test.json").write_bytes((reports / today.isoformat() / "alpha.test.json").read_bytes())
    box = labdir / "mx-a" / "mailboxes" / "alpha.test" / "tlsrpt" / "Maildir" / "new"
    (mail,) = wait_for(lambda: list(box.glob("*")) if box.exists() else [], 60, "the TLS report mail")
    msg = email.message_from_bytes(mail.read_bytes(), policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    assert msg["TLS-Report-Domain"] == "alpha.test" and msg["Subject"].startswith("Report Domain: alpha.test")
    (part,) = [p for p in msg.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert part.get_filename().endswith(".json.gz") and "!alpha.test!" in part.get_filename()
    report = json.loads(gzip.decompress(part.get_content()))
    assert report["policies"][0]["summary"]["total-successful-session-count"] == 2
    assert (yesterday / "alpha.test.sent").exists()
