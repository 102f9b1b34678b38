"""
DKIM signing (L{relaynet.delivery.dkim}), its configuration and the
C{relaynet dkim keygen} command, and the signing in the SMTP client (after
the 7-bit conversion, in the worker thread).

Signatures are checked here with dkimpy's verifier, given the public key
records that C{keygen} printed; tests/test_dkim_interop.py checks them with
OpenDKIM, which shares no code with the signer.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import dkim as dkimpy
import pytest

from relaynet.config import ConfigError, describe, load_config, parse_config
from relaynet.delivery import dkim
from relaynet.delivery.client import HopPool
from harness.nodeproc import TWISTD
from tests.test_outbound import EIGHT_BIT_MESSAGE, NO_8BIT, ChunkingServer, Hop, results_of

MESSAGE = (
    b"Received: from client.test by relay.test; Sun, 6 Dec 2026 10:00:00 +0000\r\n"
    b"From: Alice <alice@Example.ORG>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
    b"Date: Sun, 6 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n\r\n"
    b"Hello Bob,  \r\nthe body.\r\n\r\n\r\n"
)


def keygen(tmp_path: Path, domain: str, selector: str, *extra: str) -> tuple[Path, str]:
    """Run C{relaynet dkim keygen}; @return: the key file and the TXT record value it printed."""
    out = tmp_path / f"{domain}.{selector}.key"
    proc = subprocess.run(
        [sys.executable, "-m", "relaynet.cli", "dkim", "keygen", domain, selector, "--out", str(out), *extra],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    name, _, rest = line.partition(" IN TXT ")
    assert name == f"{selector}._domainkey.{domain}."
    value = "".join(part.strip('"') for part in rest.split('" "'))
    return out, value


def verify_all(message: bytes, records: dict[str, str]) -> list[bool]:
    """dkimpy's verdict on each DKIM-Signature of C{message}, keys from C{records}."""

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return records.get(name.decode().rstrip(".") + ".", "").encode()

    def one(i: int) -> bool:
        try:
            return bool(dkimpy.DKIM(message).verify(idx=i, dnsfunc=dnsfunc))
        except dkimpy.DKIMException:
            return False

    n = sum(1 for line in message.split(b"\r\n\r\n")[0].split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
    return [one(i) for i in range(n)]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An RSA-2048 and an Ed25519 key for example.org, made by the command."""
    tmp = tmp_path_factory.mktemp("keys")
    rsa_file, rsa_record = keygen(tmp, "example.org", "rsa1")
    ed_file, ed_record = keygen(tmp, "example.org", "ed1", "--algorithm", "ed25519")
    return {
        "rsa": dkim.load_key(rsa_file, "example.org", "rsa1"),
        "ed": dkim.load_key(ed_file, "example.org", "ed1"),
        "records": {"rsa1._domainkey.example.org.": rsa_record, "ed1._domainkey.example.org.": ed_record},
        "dir": tmp,
    }


# -- the signer -------------------------------------------------------------


def test_keygen_writes_a_private_key_0600_and_prints_its_record(keys: dict[str, Any], tmp_path: Path) -> None:
    """The key file is mode 0600; the printed record is the key's public half."""
    for k in (keys["rsa"], keys["ed"]):
        assert stat.S_IMODE(os.stat(k.key_file).st_mode) == 0o600
        assert keys["records"][k.record_name] == k.record
    assert keys["rsa"].algorithm == dkim.RSA and "k=rsa;" in keys["rsa"].record
    assert keys["ed"].algorithm == dkim.ED25519 and "k=ed25519;" in keys["ed"].record


def test_keygen_never_overwrites_and_refuses_bad_names(tmp_path: Path) -> None:
    """An existing key file is kept (exit 1, one line); a bad domain is a usage error (exit 2)."""
    existing = tmp_path / "k.key"
    existing.write_bytes(b"keep me")
    run = [sys.executable, "-m", "relaynet.cli", "dkim", "keygen"]
    proc = subprocess.run([*run, "example.org", "s1", "--out", str(existing)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and existing.read_bytes() == b"keep me"
    assert proc.stderr.count("\n") == 1 and "exists" in proc.stderr and not proc.stdout
    proc = subprocess.run([*run, "bad_domain", "s1", "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("which", ["rsa", "ed", "both"])
def test_signature_verifies(keys: dict[str, Any], which: str) -> None:
    """RSA, Ed25519, and both at once (dual signing): every signature verifies."""
    chosen = [keys["rsa"], keys["ed"]] if which == "both" else [keys[which]]
    signed = dkim.Signer(chosen).sign(MESSAGE)
    assert signed.unsigned is None and signed.domain == "example.org"
    assert signed.selectors == tuple(k.selector for k in chosen)
    out = signed.fields + MESSAGE
    assert verify_all(out, keys["records"]) == [True] * len(chosen)
    # A changed body breaks every one of them (the test can fail).
    assert verify_all(out.replace(b"the body", b"the bodY"), keys["records"]) == [False] * len(chosen)


def test_rsa_step_by_openssl_gives_dkimpys_signature(keys: dict[str, Any]) -> None:
    """
    The RSA step done by OpenSSL (for speed) gives exactly the bytes
    dkimpy's own Python arithmetic gives (PKCS#1 v1.5 is deterministic); a
    key that is not ours still goes to dkimpy's code.
    """
    import hashlib

    from dkim import HashThrough
    from dkim.crypto import parse_pem_private_key

    dkim.Signer([keys["rsa"]])  # registers the key
    pk = parse_pem_private_key(keys["rsa"].private)
    ours = dkim._rsa_sign(HashThrough(hashlib.sha256(b"headers")), pk)
    assert ours == dkim._PURE_RSA_SIGN(HashThrough(hashlib.sha256(b"headers")), pk)
    from cryptography.hazmat.primitives import serialization

    stranger = serialization.load_pem_private_key(dkim.generate_key("rsa", 1024), None)
    other = parse_pem_private_key(dkim.signing_key(stranger, "x.test", "s", Path("k")).private)
    assert dkim._rsa_sign(HashThrough(hashlib.sha256(b"h")), other) == dkim._PURE_RSA_SIGN(
        HashThrough(hashlib.sha256(b"h")), other)


def test_signature_is_relaxed_and_oversigns_from_subject_to(keys: dict[str, Any]) -> None:
    """
    c=relaxed/relaxed; h= has From, Subject and To once more than they
    occur, and no trace field; adding a second Subject breaks it, refolding
    a header does not.
    """
    fields = dkim.Signer([keys["rsa"]]).sign(MESSAGE).fields
    tags = dict(
        t.strip().split("=", 1) for t in fields.decode().split(":", 1)[1].replace("\r\n", "").split(";") if "=" in t
    )
    assert tags["c"] == "relaxed/relaxed" and "l" not in tags
    h = [x.strip() for x in tags["h"].replace(" ", "").split(":")]
    for name in ("from", "subject", "to"):
        assert h.count(name) == 2, h
    assert "received" not in h and "date" in h and "message-id" in h
    out = fields + MESSAGE
    added = out.replace(b"\r\n\r\n", b"\r\nSubject: something else\r\n\r\n", 1)
    assert verify_all(added, keys["records"]) == [False]
    refolded = out.replace(b"Subject: hello", b"Subject:   hello\r\n ")
    assert verify_all(refolded, keys["records"]) == [True]


@pytest.mark.parametrize(("message", "why"), [
    (b"From: a@other.test\r\n\r\nbody\r\n", "no DKIM key for other.test"),
    (b"To: b@x.test\r\n\r\nbody\r\n", "no From: header field"),
    (b"From: a@example.org\r\nFrom: b@example.org\r\n\r\nbody\r\n", "more than one From: header field"),
    (b"From: a@example.org, b@example.org\r\n\r\nbody\r\n", "From: holds 2 addresses, not one"),
])
def test_unsigned_and_why(keys: dict[str, Any], message: bytes, why: str) -> None:
    """A From: domain without a key, or no single From: address: unsigned, with the reason."""
    signed = dkim.Signer([keys["rsa"]]).sign(message)
    assert signed.fields == b"" and signed.unsigned == why


def test_signing_table_maps_subdomains(keys: dict[str, Any]) -> None:
    """C{*.example.org = example.org}: mail from a subdomain gets example.org's signature."""
    signer = dkim.Signer([keys["ed"]], [("*.example.org", "example.org")])
    message = MESSAGE.replace(b"alice@Example.ORG", b"alice@mail.example.org")
    signed = signer.sign(message)
    assert signed.domain == "example.org" and signed.from_domain == "mail.example.org"
    assert verify_all(signed.fields + message, keys["records"]) == [True]
    assert dkim.Signer([keys["ed"]]).sign(message).unsigned == "no DKIM key for mail.example.org"


def test_load_key_errors_are_one_line(tmp_path: Path) -> None:
    """Missing, not a key, too short an RSA key, another kind of key: one clear reason each."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    with pytest.raises(dkim.KeyFileError, match="cannot read"):
        dkim.load_key(tmp_path / "missing.key", "example.org", "s")
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    with pytest.raises(dkim.KeyFileError, match="not an unencrypted PEM private key"):
        dkim.load_key(junk, "example.org", "s")
    short = tmp_path / "short.key"
    # cryptography makes no RSA key below 1024 bits; OpenSSL still does.
    subprocess.run(["openssl", "genrsa", "-out", str(short), "768"], check=True, capture_output=True, timeout=60)
    with pytest.raises(dkim.KeyFileError, match="at least 1024"):
        dkim.load_key(short, "example.org", "s")
    ecfile = tmp_path / "ec.key"
    ecfile.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(dkim.KeyFileError, match="RSA or Ed25519"):
        dkim.load_key(ecfile, "example.org", "s")


# -- configuration ------------------------------------------------------------


def node_toml(keys: dict[str, Any], extra: str = "", route: str = "") -> str:
    return f"""
[node]
spool = "spool"
[[route]]
domains = ["*"]
action = "relay"
next_hops = ["tcp:127.0.0.1:2600"]
{route}
[dkim]
sign = true
{extra}
[[dkim.keys]]
domain = "example.org"
selector = "rsa1"
key_file = "{keys['rsa'].key_file}"
[[dkim.keys]]
domain = "Example.ORG."
selector = "ed1"
key_file = "{keys['ed'].key_file}"
"""


def test_config_reads_the_keys_and_check_config_round_trips(keys: dict[str, Any], tmp_path: Path) -> None:
    """[dkim] loads both keys (normalised domain); check-config's output loads to the same."""
    path = tmp_path / "node.toml"
    path.write_text(node_toml(keys, route="dkim = false"))
    config = load_config(path)
    assert config.dkim.sign and [(k.domain, k.selector, k.algorithm) for k in config.dkim.keys] == [
        ("example.org", "rsa1", dkim.RSA), ("example.org", "ed1", dkim.ED25519)]
    assert config.routes[0].dkim is False
    again = tmp_path / "again.toml"
    again.write_text(describe(config))
    assert load_config(again).dkim == config.dkim


@pytest.mark.parametrize(("mutate", "key", "words"), [
    (lambda t, k: t.replace(str(k["rsa"].key_file), "/nonexistent/x.key"), "dkim.keys[0].key_file", "cannot read"),
    (lambda t, k: t.replace('selector = "rsa1"', 'selector = "bad selector"'), "dkim.keys[0].selector", "DNS labels"),
    (lambda t, k: t.replace('selector = "ed1"', 'selector = "rsa1"'), "dkim.keys[1].selector", "already configured"),
    (lambda t, k: t.replace("[dkim]\nsign = true", "[dkim]\nsign = true\nextra = 1"), "dkim.extra", "unknown key"),
    (lambda t, k: t.replace('action = "relay"', 'action = "local"').replace('next_hops = ["tcp:127.0.0.1:2600"]', "dkim = true"),
     "route[0].dkim", "only relay and mx routes sign"),
])
def test_config_errors_name_the_key(keys: dict[str, Any], tmp_path: Path, mutate: Any, key: str, words: str) -> None:
    """An unreadable key, a bad or repeated selector, an unknown key, dkim on a local route."""
    path = tmp_path / "node.toml"
    path.write_text(mutate(node_toml(keys), keys))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == key and words in str(e.value)


FORK_IMPORTS = """
import sys
import relaynet.node, relaynet.runner, relaynet.tap, relaynet.worker
from relaynet.config import load_config
from relaynet.supervisor import prepare_to_fork
prepare_to_fork(load_config(sys.argv[1]))
print(" ".join(sorted(m for m in ("dkim", "dns", "nacl") if m in sys.modules)))
"""


def test_dkimpy_is_loaded_only_by_a_node_with_keys(keys: dict[str, Any], tmp_path: Path) -> None:
    """
    A node without [[dkim.keys]] never imports dkimpy (nor its dnspython and
    PyNaCl: about 4 MiB per process); a supervisor with keys imports it
    before it forks, so its workers share it.
    """
    with_keys = tmp_path / "keys.toml"
    with_keys.write_text(node_toml(keys))
    without = tmp_path / "plain.toml"
    without.write_text('[node]\nspool = "spool"\n')
    seen = {}
    for name, path in (("with", with_keys), ("without", without)):
        proc = subprocess.run([sys.executable, "-c", FORK_IMPORTS, str(path)], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        seen[name] = proc.stdout.split()
    assert seen == {"with": ["dkim", "dns", "nacl"], "without": []}


def test_signing_without_keys_is_an_error() -> None:
    """[dkim] sign = true with no key, or a route with dkim = true and no key: refused."""
    with pytest.raises(ConfigError, match="no \\[\\[dkim.keys\\]\\]"):
        parse_config({"dkim": {"sign": True}})
    with pytest.raises(ConfigError, match="no keys"):
        parse_config({"route": [{"domains": ["*"], "action": "mx", "dkim": True}]})


def test_node_with_an_unreadable_key_does_not_start(keys: dict[str, Any], tmp_path: Path) -> None:
    """C{twistd relaynet} with a key it cannot read: one line naming file and key, non-zero exit."""
    path = tmp_path / "node.toml"
    path.write_text(node_toml(keys).replace(str(keys["rsa"].key_file), str(tmp_path / "gone.key")))
    proc = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "relaynet", "--config", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if "dkim.keys[0].key_file" in line]
    assert len(lines) == 1 and "cannot read" in lines[0], proc.stderr + proc.stdout


# -- in the SMTP client ----------------------------------------------------


def signing_hop(tmp_path: Path, keys: dict[str, Any], **kw: Any) -> Hop:
    hop = Hop(tmp_path, **kw)
    hop.pool.signer = dkim.Signer([keys["rsa"], keys["ed"]])
    return hop


def test_client_sends_the_message_signed(keys: dict[str, Any], tmp_path: Path) -> None:
    """Through a signing pool the peer receives the message with both signatures, which verify."""
    hop = signing_hop(tmp_path, keys)
    out = hop.submit(message=MESSAGE)
    hop.serve()
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}
    (msg,) = hop.servers[0].messages
    assert msg.data.endswith(MESSAGE) and msg.data.startswith(b"DKIM-Signature: ")
    assert verify_all(msg.data, keys["records"]) == [True, True]
    assert b"SIZE=%d" % len(msg.data) in msg.mail


@pytest.mark.parametrize("chunking", [False, True], ids=["DATA", "BDAT"])
def test_client_signs_after_the_seven_bit_conversion(keys: dict[str, Any], tmp_path: Path, chunking: bool) -> None:
    """
    An 8-bit message to a peer without 8BITMIME is converted, then signed:
    what arrives is 7-bit and its signatures verify (signing before the
    conversion would break the body hash).
    """
    hop = signing_hop(tmp_path, keys)
    message = EIGHT_BIT_MESSAGE.replace(b"From: sender@example.org", b"From: sender@example.org")
    assert b"example.org" in message.split(b"\r\n\r\n")[0]
    out = hop.submit(message=message, params={"body": "8BITMIME", "content": "78"})
    hop.serve(lambda: ChunkingServer(NO_8BIT + ((b"CHUNKING",) if chunking else ())))
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}
    (msg,) = hop.servers[0].messages
    assert msg.data.isascii()
    assert verify_all(msg.data, keys["records"]) == [True, True]


def test_client_signing_runs_in_the_worker_thread(keys: dict[str, Any], tmp_path: Path) -> None:
    """Nothing is sent for a signed message until the worker-thread work has run."""
    hop = signing_hop(tmp_path, keys)
    hop.threads_immediate = False
    out = hop.submit(message=MESSAGE)
    wire = hop.wire()
    assert wire.greet((b"PIPELINING", b"8BITMIME")) == b""
    assert len(hop.thread_work) == 1 and not out.fired
    hop.run_threads()
    assert wire.take().startswith(b"MAIL FROM:")


def test_unsigned_mail_goes_with_an_event(keys: dict[str, Any], tmp_path: Path) -> None:
    """A From: domain without a key: delivered unsigned, and a C{dkim_unsigned} event says why."""
    events: list[tuple[str, dict[str, Any]]] = []

    class Events:
        def emit(self, name: str, **fields: Any) -> None:
            events.append((name, fields))

    hop = signing_hop(tmp_path, keys)
    hop.pool.events = Events()
    message = MESSAGE.replace(b"alice@Example.ORG", b"alice@elsewhere.test")
    out = hop.submit(message=message)
    hop.serve()
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}
    (msg,) = hop.servers[0].messages
    assert msg.data == message
    assert [(n, f["from_domain"], f["reason"]) for n, f in events if n.startswith("dkim")] == [
        ("dkim_unsigned", "elsewhere.test", "no DKIM key for elsewhere.test")]


def test_pool_without_a_signer_sends_the_file_unchanged(tmp_path: Path) -> None:
    """No signer: no worker-thread work, the queue file goes as it is (the common path stays cheap)."""
    hop = Hop(tmp_path)
    assert isinstance(hop.pool, HopPool) and hop.pool.signer is None
    out = hop.submit(message=MESSAGE)
    hop.serve()
    assert results_of(out) == {"rcpt@example.net": (250, "2.0.0")}
    assert hop.servers[0].messages[0].data == MESSAGE and not hop.thread_work


# -- which routes sign (the in-memory network of relaynet.testing) ------------


def test_only_the_egress_routes_sign(keys: dict[str, Any]) -> None:
    """
    An egress node with C{[dkim] sign = true}: mail relayed out is signed
    once (the next node, without [dkim], adds none), mail its local route
    delivers and mail of a route with C{dkim = false} is not; the signature
    still verifies at the last hop, below that node's Received field.
    """
    from relaynet.testing.network import Network

    net = Network()
    dkim_table = {"sign": True, "keys": [
        {"domain": "example.org", "selector": "rsa1", "key_file": str(keys["rsa"].key_file)},
        {"domain": "example.org", "selector": "ed1", "key_file": str(keys["ed"].key_file)},
    ]}
    net.add_node("inside", local_domains=["dest.test"])
    net.add_node("outside", local_domains=["world.test"])
    egress = net.add_node("egress", local_domains=["egress.test"], routes=[
        {"domains": ["world.test"], "action": "relay", "next_hops": [net.endpoint("outside")]},
        {"domains": ["dest.test"], "action": "relay", "next_hops": [net.endpoint("inside")], "dkim": False},
    ], dkim=dkim_table)
    for rcpt in ("far@world.test", "near@dest.test", "me@egress.test"):
        egress.submit("alice@example.org", [rcpt], MESSAGE)
    net.run()
    (far,) = net.nodes["outside"].mailboxes.delivered("far@world.test")
    assert far.data.count(b"DKIM-Signature:") == 2
    assert verify_all(far.data, keys["records"]) == [True, True]
    (near,) = net.nodes["inside"].mailboxes.delivered("near@dest.test")
    (me,) = egress.mailboxes.delivered("me@egress.test")
    assert b"DKIM-Signature" not in near.data and b"DKIM-Signature" not in me.data
    (signed,) = egress.events_named("dkim_signed")
    assert signed["domain"] == "example.org" and signed["selectors"] == ["rsa1", "ed1"]
