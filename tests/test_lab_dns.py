"""
Labs that route by MX: a topology's C{[dns.zones]} served by the lab's own
DNS server (C{relaynet.lab.dns}, twisted.names) and C{topologies/internet.toml}
run as real processes: delivered by MX, the null-MX domain bounced, the
backup exchanger holding mail while the primary is down, C{lab trace}
naming the exchanger.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from twisted.names import dns

from relaynet.config import ConfigError
from relaynet.lab import dns as labdns
from relaynet.lab.topology import allocate, node_config, parse_topology, zone_spec

from test_lab import TOPOLOGIES, lab_dirs, relaynet  # noqa: F401 - lab_dirs is a fixture

ZONED = """
[node.a]
[[node.a.route]]
domains = ["*"]
action = "mx"
[node.b]
domains = ["b.test"]
users = ["u"]
[dns.zones]
"b.test" = ["@ MX 10 mx", "mx A {b}"]
"""


def _topo(text: str) -> Any:
    return parse_topology(tomllib.loads(text), source="t.toml")


@pytest.mark.parametrize(("extra", "key", "problem"), [
    ('"c.test" = ["@ MX 10 {nobody}"]', "dns.zones.c.test[0]", "no node named 'nobody'"),
    ('"c.test" = ["@ A 300.0.0.1"]', "dns.zones.c.test[0]", "bad A data"),
    ('"c.test" = ["@ SRV 1 1 1 x"]', "dns.zones.c.test[0]", "SRV is not supported"),
    ('"c.test" = "@ MX 10 x"', "dns.zones.c.test", "array of record lines"),
])
def test_zone_errors_name_the_key(extra: str, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        _topo(ZONED + extra + "\n")
    assert (e.value.key, e.value.source) == (key, "t.toml") and problem in e.value.problem


def test_zones_get_node_addresses_and_nodes_one_port_and_the_server() -> None:
    """{NODE} becomes its address; every node gets the same relay port; mx routes use it; [dns] names the server."""
    topo = _topo(ZONED)
    busy = {("127.0.0.3", 2525)}
    plans = allocate(topo, lambda host, port: (host, port) not in busy, lambda host: 40000)
    assert {p.port for p in plans.values()} == {2526}
    spec = zone_spec(topo, {name: plan.address for name, plan in plans.items()})
    assert spec == {"b.test": ["@ MX 10 mx", "mx A 127.0.0.3"]}
    config = node_config(topo, plans, "a", Path("/nonexistent/a"), dns="127.0.0.1:5300")
    assert config["dns"] == {"servers": ["127.0.0.1:5300"]}
    assert config["route"][0]["mx_port"] == 2526


@pytest.mark.slow
def test_internet_lab_delivers_by_mx(lab_dirs: Any) -> None:
    """
    topologies/internet.toml: its DNS server answers (MX, NXDOMAIN); 40
    messages, a quarter to a null-MX domain, are delivered by MX or bounced
    with a DSN, none lost; lab trace names the exchanger. With the primary
    exchanger of alpha.test down, the backup (preference 20) takes its mail
    and holds it (it is a backup: it relays only to the primary) until the
    primary is back; lab down stops the DNS server.
    """
    labdir = lab_dirs("internet")
    relaynet("lab", "up", str(TOPOLOGIES / "internet.toml"), "--dir", str(labdir))
    state = json.loads((labdir / "lab.json").read_text())
    server = state["dns"]
    assert labdns.alive(server)
    assert labdns.query(server["address"], server["port"], "alpha.test", dns.MX) == dns.OK
    assert labdns.query(server["address"], server["port"], "nobody.alpha.test", dns.MX) == dns.ENAME

    sent = json.loads(relaynet("lab", "send", "--dir", str(labdir), "-n", "40", "--json").stdout)
    assert sent["accepted"] == 40, sent
    report = json.loads(relaynet("lab", "check", "--dir", str(labdir), "--wait", "60", "--json").stdout)
    assert (report["messages"], report["delivered_once"], report["bounced"], report["lost"],
            report["duplicated"]) == (40, 30, 10, 0, 0), report

    events = [json.loads(line) for line in
              (labdir / "outbound" / "spool" / "events.jsonl").read_text().splitlines()]
    bounced = [e for e in events if e["event"] == "bounced"]
    assert len(bounced) == 10 and {e["dsn"] for e in bounced} == {"5.1.10"}
    relays = {e["relay"].split("[")[0] for e in events if e["event"] == "sent"}
    assert relays == {"mx1.alpha.test", "mail.beta.test", "gamma.test", "mx.client.test"}, relays

    # The backup exchanger: mx-a1 down, alpha.test mail goes to mx-a2, which holds it.
    relaynet("lab", "chaos", "--dir", str(labdir), "--target", "mx-a1", "--max-actions", "1",
             "--no-restart", "--duration", "1")
    relaynet("lab", "send", "--dir", str(labdir), "-n", "5", "--to", "bob@alpha.test", "--json")
    held = relaynet("lab", "check", "--dir", str(labdir), "--wait", "5", "--json", check_rc=False)
    assert held.returncode == 1 and json.loads(held.stdout)["in_flight"] == 5, held.stdout
    events = [json.loads(line) for line in
              (labdir / "outbound" / "spool" / "events.jsonl").read_text().splitlines()]
    assert sum(1 for e in events if e["event"] == "sent" and e["relay"].startswith("mx2.alpha.test[")) == 5
    relaynet("lab", "up", str(TOPOLOGIES / "internet.toml"), "--dir", str(labdir))
    report = json.loads(relaynet("lab", "check", "--dir", str(labdir), "--wait", "60", "--json").stdout)
    assert (report["delivered_once"], report["lost"], report["duplicated"]) == (35, 0, 0), report

    trace = json.loads(relaynet("lab", "trace", "--dir", str(labdir), "--json").stdout)
    assert any("= MX mx1.alpha.test" in h["next_hop"] for h in trace["hops"]), trace

    down = relaynet("lab", "down", "--dir", str(labdir))
    assert "dns: stopped" in down.stdout
    assert not labdns.alive(server)


def test_route_command_shows_the_exchangers(tmp_path: Path) -> None:
    """
    C{relaynet route} on an mx route looks the domain up as the node would
    (here through the lab's DNS server, as a process) and prints the
    exchangers and addresses in the order it would try them, or the DSN a
    null MX or NXDOMAIN would give; it marks itself as a backup exchanger.
    """
    zones_file = tmp_path / "zones.json"
    zones_file.write_text(json.dumps({
        "alpha.test": ["@ MX 20 mx2", "@ MX 10 mx1", "mx1 A 127.0.0.44", "mx1 AAAA ::1", "mx2 A 127.0.0.45"],
        "null.test": ["@ MX 0 ."],
    }))
    server = {"address": "127.0.0.1", "port": labdns.free_port(), "zones": str(zones_file),
              "log": str(tmp_path / "dns.log"), "pid": None}
    labdns.start(server)
    try:
        cfg = tmp_path / "node.toml"
        cfg.write_text(
            '[node]\nname = "m"\nhostname = "m.test"\nspool = "spool"\n'
            '[[listener]]\nendpoint = "tcp:2525:interface=127.0.0.45"\n'
            '[relay]\ntrusted_networks = ["127.0.0.0/8"]\n'
            f'[dns]\nservers = ["127.0.0.1:{server["port"]}"]\n'
            '[outbound]\naddress_preference = "ipv6"\n'
            '[[route]]\ndomains = ["*"]\naction = "mx"\nmx_port = 25\n'
        )
        out = relaynet("route", str(cfg), "bob@alpha.test", "x@null.test", "y@nx.alpha.test").stdout
        assert "       10 mx1.alpha.test: ::1, 127.0.0.44\n       20 mx2.alpha.test: 127.0.0.45" in out, out
        assert "bounced (5.1.10)" in out and "bounced (5.1.2)" in out, out
        # Listening on mx2's address at the MX port: this node is the backup exchanger.
        cfg.write_text(cfg.read_text().replace("mx_port = 25", "mx_port = 2525"))
        out = relaynet("route", str(cfg), "bob@alpha.test").stdout
        assert "mx2.alpha.test" not in out.split("note:")[0] and "at preference 20" in out, out
    finally:
        labdns.stop(server)
