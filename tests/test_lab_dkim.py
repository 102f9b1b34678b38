"""
DKIM in labs: C{topologies/outbound-security.toml} run as real processes.
C{lab up} makes the egress node's keys and publishes them in the lab's DNS
server; the node signs what it sends by MX; C{lab check} verifies every
delivered copy against the keys it looks up in that DNS server, and fails
when one does not verify. Independent checks: C{drill} reads the published
records, OpenDKIM verifies a delivered copy with them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from harness.opendkim import OpenDKIMVerifier, opendkim_unavailable_reason
from relaynet.config import ConfigError
from relaynet.delivery.dkim import load_key, zone_record
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
    if shutil.which("drill") is None:
        pytest.skip("drill (ldnsutils) is not installed: make peers")
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
