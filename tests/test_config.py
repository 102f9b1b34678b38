"""
Tests for L{relaynet.config}: parsing, defaults and error messages.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relaynet.cli import main
from relaynet.config import ConfigError, load_config, parse_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_embedded_default() -> None:
    """
    With no file: loopback listener on 2525, spool ./var/relaynet, catch-all
    delivery for localhost, loopback-only relay.
    """
    c = load_config(None)
    assert [l.endpoint for l in c.listeners] == ["tcp:2525:interface=127.0.0.1"]
    assert c.spool == Path("var/relaynet")
    assert c.local.mailroot == Path("var/relaynet/mailboxes")
    assert c.local.domains == ("localhost",) and c.local.catch_all
    assert [str(n) for n in c.trusted_networks] == ["127.0.0.0/8", "::1/128"]
    assert c.routes == ()


def test_full_file(tmp_path: Path) -> None:
    """Every section parses; relative paths are relative to the file."""
    p = write(tmp_path, """
[node]
name = "hop1"
hostname = "hop1.lab.test"
spool = "spool"

[[listener]]
endpoint = "tcp:0:interface=127.0.0.1"

[limits]
max_message_size = 1000000
idle_timeout = 30

[local]
mailroot = "/srv/mail"
domains = ["Example.ORG"]
users = ["alice", "bob@example.org"]
[local.aliases]
postmaster = "alice"
team = ["alice", "bob"]

[relay]
trusted_networks = ["10.0.0.0/8", "2001:db8::/32"]

[[route]]
domains = ["*.example.com", "example.com"]
action = "relay"
next_hops = ["tcp:127.0.0.2:2525", { endpoint = "tcp:127.0.0.3:2525", priority = 20 }]

[[route]]
domains = ["*"]
action = "reject"
code = 554
text = "no"
""")
    c = load_config(p)
    assert c.name == "hop1" and c.hostname == "hop1.lab.test"
    assert c.spool == tmp_path / "spool"
    assert c.local.mailroot == Path("/srv/mail")
    assert c.local.domains == ("example.org",)
    assert c.local.aliases["team"] == ("alice", "bob")
    assert c.limits.max_message_size == 1000000 and c.limits.idle_timeout == 30.0
    assert c.routes[0].next_hops[1].priority == 20
    assert c.routes[1].enhanced == "5.7.1"


@pytest.mark.parametrize(
    "text, key",
    [
        ("[node]\nnmae = 'x'\n", "node.nmae"),
        ("[limits]\nmax_message_size = 'big'\n", "limits.max_message_size"),
        ("[limits]\nmax_message_size = -1\n", "limits.max_message_size"),
        ("[limits]\nmax_recipients = 10\n", "limits.max_recipients"),
        ("[[listener]]\nmode = 'relay'\n", "listener[0].endpoint"),
        ("[[listener]]\nendpoint = 'tcp:1'\nmode = 'x'\n", "listener[0].mode"),
        ("[[listener]]\nendpoint = 'unix:/tmp/s'\nreuse_port = true\n", "listener[0].reuse_port"),
        ("[[listener]]\nendpoint = 'tcp:1'\nreuse_port = 'yes'\n", "listener[0].reuse_port"),
        ("[relay]\ntrusted_networks = ['not-a-net']\n", "relay.trusted_networks[0]"),
        ("[[route]]\ndomains = ['*']\naction = 'relay'\n", "route[0].next_hops"),
        ("[[route]]\ndomains = ['a..b']\naction = 'local'\n", "route[0].domains[0]"),
        ("[[route]]\ndomains = ['*']\naction = 'reject'\ncode = 250\n", "route[0].code"),
        ("bogus = 1\n", "bogus"),
        ("[local]\ndomains = ['*.x']\n", "local.domains[0]"),
        ("[local.aliases]\na = 3\n", "local.aliases.a"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    """Each invalid setting is an error naming the file and the key."""
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.key == key
    assert str(p) in str(e.value)


def test_not_toml(tmp_path: Path) -> None:
    """A file that is not TOML is an error naming the file."""
    p = write(tmp_path, "[node\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(p)


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is an error, not the default."""
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{relaynet check-config} prints the effective configuration and exits 0;
    on a bad file it prints the file and key and exits 1.
    """
    good = write(tmp_path, "[node]\nname = 'n1'\n")
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert 'name = "n1"' in out and "[limits]" in out
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nnmae = 'x'\n")
    assert main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "node.nmae" in err


def test_parse_config_is_frozen() -> None:
    """Config objects are immutable."""
    c = parse_config({})
    with pytest.raises(Exception):
        c.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[[listener]]\nendpoint = 'tpc:2601'\n", "listener[0].endpoint"),
        ("[[listener]]\nendpoint = 'tcp:port=abc'\n", "listener[0].endpoint"),
        ("[[listener]]\nendpoint = 'tcp:70000:interface=127.0.0.1'\n", "listener[0].endpoint"),
        ("[[route]]\ndomains = ['*']\naction = 'relay'\nnext_hops = ['tcp:127.0.0.1:99999']\n",
         "route[0].next_hops[0]"),
        ("[[route]]\ndomains = ['*']\naction = 'relay'\nnext_hops = ['tcp:127.0.0.1:0']\n",
         "route[0].next_hops[0]"),
        ("[[route]]\ndomains = ['*']\naction = 'relay'\n"
         "next_hops = [{ endpoint = 'tcp:127.0.0.1', priority = 1 }]\n",
         "route[0].next_hops[0].endpoint"),
        ("[admin]\nendpoint = 'tcp:port=x:interface=127.0.0.1'\n", "admin.endpoint"),
        ("[admin]\nmetrics_endpoint = 'tcp:99999:interface=127.0.0.1'\n", "admin.metrics_endpoint"),
    ],
)
def test_endpoints_parsed_by_twisted_at_check_time(tmp_path: Path, text: str, key: str) -> None:
    """
    Every endpoint string (listeners, next hops, admin endpoints) is parsed by
    Twisted's own parser and its port range checked when the file is loaded,
    so C{check-config} refuses what the node would die on (or defer mail
    forever for), naming the file and the key.
    """
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.key == key
    assert str(p) in str(e.value)


def test_listen_option_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{twistd relaynet --listen} with an endpoint Twisted cannot parse ends
    option parsing with one line naming the option (no usage dump, no
    traceback), exit status 1.
    """
    from relaynet.tap import Options

    with pytest.raises(SystemExit) as e:
        Options().parseOptions(["--listen", "bogus:1"])
    assert isinstance(e.value.code, str)
    assert "--listen" in e.value.code and "bogus:1" in e.value.code
    assert "\n" not in e.value.code


def _auth_route(tmp_path: Path, mode: int, text: str = "relay-user:s3cret:with:colons\n") -> Path:
    cred = tmp_path / "smarthost.auth"
    cred.write_text(text)
    cred.chmod(mode)
    p = tmp_path / "node.toml"
    p.write_text(
        '[[route]]\ndomains = ["*"]\naction = "relay"\nnext_hops = ["tcp:127.0.0.1:587"]\n'
        'tls = "verify"\nauth_file = "smarthost.auth"\n'
    )
    return p


def test_route_auth_file_is_read_relative_to_the_config_and_kept_out_of_repr(tmp_path: Path) -> None:
    (rule,) = load_config(_auth_route(tmp_path, 0o600)).routes
    assert rule.auth_file == tmp_path / "smarthost.auth"
    assert rule.auth == ("relay-user", "s3cret:with:colons") and not rule.auth_cleartext
    assert "s3cret" not in repr(rule)


@pytest.mark.parametrize(("mode", "text", "problem"), [
    (0o644, "u:p\n", "readable by group or others (mode 0644): it holds a password; chmod 600"),
    (0o600, "no-colon\n", "the first line must be username:password"),
    (0o600, "", "the first line must be username:password"),
])
def test_route_auth_file_problems_are_one_line(tmp_path: Path, mode: int, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_auth_route(tmp_path, mode, text))
    assert e.value.key == "route[0].auth_file" and problem in e.value.problem, e.value


def test_lmtp_route_needs_a_next_hop() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config({"route": [{"domains": ["mail.test"], "action": "lmtp"}]})
    assert e.value.key == "route[0].next_hops" and "an lmtp route needs" in e.value.problem
    config = parse_config({"route": [{"domains": ["mail.test"], "action": "lmtp",
                                      "next_hops": ["unix:/run/dovecot/lmtp"]}]})
    assert config.routes[0].next_hops[0].endpoint == "unix:/run/dovecot/lmtp"
