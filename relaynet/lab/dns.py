# -*- test-case-name: tests.test_lab_dns -*-
"""
The lab's DNS server: the zones of a topology's C{[dns]} table, served by
L{twisted.names} (authoritative, UDP and TCP) on a loopback port, so that
C{mx} routes of the lab's nodes resolve as they would on the Internet.

    python -m relaynet.lab.dns --zones ZONES.json --listen 127.0.0.1:PORT

C{ZONES.json} maps each origin to its record lines (L{relaynet.zones}), with
node names already replaced by addresses. C{relaynet lab up} writes it,
starts this server before the nodes (each node's C{[dns] servers} names it),
restarts it when it finds it stopped, and C{lab down} stops it.

With C{--policies FILE --https HOST:PORT --cert C --key K} the same process
serves the topology's MTA-STS policies (C{[mta_sts."DOMAIN"]}) over HTTPS,
with a certificate from the lab CA for every C{mta-sts.DOMAIN}; the nodes'
C{[mta_sts] policy_port} names that port (a lab cannot take 443).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from relaynet.lab.state import pid_state
from relaynet.zones import ZoneError, zones

POLL = 0.05
START_TIMEOUT = 15.0


def serve(spec: Mapping[str, Sequence[str]], host: str, port: int, reactor: Any) -> list[Any]:
    """
    Answer for the zones of C{spec} on C{host:port}, UDP and TCP.

    @return: the listening ports.
    """
    from twisted.names import dns, server

    factory = server.DNSServerFactory(authorities=zones(spec))
    return [
        reactor.listenUDP(port, dns.DNSDatagramProtocol(factory), interface=host),
        reactor.listenTCP(port, factory, interface=host),
    ]


def ask(host: str, port: int, name: str, qtype: int, timeout: float = 1.0, ad: bool = False) -> Any:
    """
    One UDP query (blocking): the answer (a C{twisted.names.dns.Message}),
    or None when nothing answered within C{timeout}.

    @param ad: ask for the AD bit (RFC 6840 5.7): a validating resolver says
        whether the answer was validated.
    """
    from twisted.names import dns

    # Recursion desired: with [dns] dnssec the server is a validating
    # resolver in front of NSD (an authoritative server ignores the bit).
    message = dns.Message(id=os.getpid() & 0xFFFF, recDes=1, authenticData=int(ad))
    message.queries = [dns.Query(name.encode(), qtype, dns.IN)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(message.toStr(), (host, port))
            data, _ = s.recvfrom(65535)
        except OSError:
            return None
    answer = dns.Message()
    answer.fromStr(data)
    return answer


def query(host: str, port: int, name: str, qtype: int, timeout: float = 1.0) -> int | None:
    """
    One UDP query (blocking, for readiness checks): the response code, or
    None when nothing answered within C{timeout}.
    """
    answer = ask(host, port, name, qtype, timeout)
    return None if answer is None else int(answer.rCode)


def txt(host: str, port: int, name: str, timeout: float = 1.0) -> list[bytes] | None:
    """
    The TXT records of C{name} (each its strings joined), blocking; None
    when the server did not answer.
    """
    from twisted.names import dns

    answer = ask(host, port, name, dns.TXT, timeout)
    if answer is None:
        return None
    return [b"".join(rr.payload.data) for rr in answer.answers if rr.type == dns.TXT]


def free_port(host: str = "127.0.0.1", tries: int = 50) -> int:
    """A port free for both UDP and TCP on C{host}."""
    for _ in range(tries):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
            return int(port)
    raise OSError(f"no port free for UDP and TCP on {host} after {tries} tries")


def alive(rec: Mapping[str, Any]) -> bool:
    """The server of C{rec} (C{lab.data["dns"]}) is running."""
    pid = rec.get("pid")
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"relaynet.lab.dns" in argv and rec["zones"].encode() in argv


def start(rec: dict[str, Any], timeout: float = START_TIMEOUT) -> int:
    """
    Start the server of C{rec} detached (unless it runs) and wait until it
    answers for its first zone; record its pid.

    @raise OSError: it did not come up (the message names its log).
    """
    if alive(rec):
        return int(rec["pid"])
    log = open(rec["log"], "ab")
    with log:
        policies = [
            "--policies", rec["policies"], "--https", f"{rec['address']}:{rec['https_port']}",
            "--cert", rec["cert"], "--key", rec["key"],
        ] if rec.get("policies") else []
        if rec.get("dnssec"):
            policies += ["--dnssec", rec["dnssec"], "--nsd-port", str(rec["nsd_port"])]
        proc = subprocess.Popen(
            [sys.executable, "-m", "relaynet.lab.dns", "--zones", rec["zones"],
             "--listen", f"{rec['address']}:{rec['port']}", *policies],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    rec["pid"] = proc.pid
    first = next(iter(json.loads(Path(rec["zones"]).read_text("utf-8"))), "lab.test")
    from twisted.names import dns

    deadline = time.monotonic() + timeout

    def answers() -> bool:
        if rec.get("dnssec"):
            from relaynet.lab.dnssec import validated

            return validated(rec["address"], rec["port"], first)
        return query(rec["address"], rec["port"], first, dns.SOA, timeout=POLL * 4) is not None

    while not answers():
        if proc.poll() is not None or time.monotonic() >= deadline:
            stop(rec)
            tail = Path(rec["log"]).read_text("utf-8", "replace").strip().splitlines()[-3:]
            raise OSError(f"the lab DNS server did not answer on {rec['address']}:{rec['port']}"
                          f" (log {rec['log']}: {' | '.join(tail) or 'empty'})")
    return proc.pid


def stop(rec: dict[str, Any], timeout: float = 10.0) -> str:
    """Stop the server (SIGTERM, then SIGKILL after C{timeout}); @return: what happened."""
    pid = rec.get("pid")
    if not pid or not alive(rec):
        rec["pid"] = None
        return "not running"
    os.kill(pid, signal.SIGTERM)
    how = "stopped"
    for sig in (signal.SIGKILL, None):
        deadline = time.monotonic() + timeout
        while pid_state(pid) not in (None, "Z", "X") and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(POLL)  # polling for the process to be gone, bounded by the deadline
        if pid_state(pid) in (None, "Z", "X") or sig is None:
            break
        os.kill(pid, sig)
        how = "killed"
    _reap(pid)
    rec["pid"] = None
    return how


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def serve_policies(policies: Mapping[str, str], host: str, port: int, cert: Path, key: Path,
                   reactor: Any) -> Any:
    """
    Serve MTA-STS policy files over HTTPS on C{host:port}: C{GET
    /.well-known/mta-sts.txt} with C{Host: mta-sts.DOMAIN} answers that
    host's policy (C{text/plain}, RFC 8461 3.3); anything else is 404.

    @param policies: policy host name -> policy text.
    @return: the listening port.
    """
    from twisted.web import resource, server

    from relaynet.smtp.tls import server_options

    class Policy(resource.Resource):
        isLeaf = True

        def __init__(self) -> None:
            resource.Resource.__init__(self)

        def render_GET(self, request: Any) -> bytes:  # noqa: N802 - Twisted's name
            name = (request.getRequestHostname() or b"").decode("ascii", "replace").lower()
            text = policies.get(name)
            if request.path != b"/.well-known/mta-sts.txt" or text is None:
                request.setResponseCode(404)
                request.setHeader(b"content-type", b"text/plain")
                return b"no such policy\n"
            request.setHeader(b"content-type", b"text/plain")
            return text.encode("utf-8")

    return reactor.listenSSL(port, server.Site(Policy()), server_options(cert, key), interface=host)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relaynet.lab.dns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--zones", required=True, help="JSON: origin -> record lines")
    parser.add_argument("--listen", required=True, help="HOST:PORT (loopback)")
    parser.add_argument("--policies", help="JSON: mta-sts.DOMAIN -> MTA-STS policy text (served over HTTPS)")
    parser.add_argument("--https", help="HOST:PORT for the policies (loopback)")
    parser.add_argument("--cert", help="the policy server's certificate (PEM)")
    parser.add_argument("--key", help="its key (PEM)")
    parser.add_argument("--dnssec", metavar="DIR",
                        help="sign the zones (work files in DIR), serve them with NSD on --nsd-port and"
                             " validate them with Unbound on --listen (relaynet.lab.dnssec)")
    parser.add_argument("--nsd-port", type=int, help="NSD's port, with --dnssec")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        spec = json.loads(Path(args.zones).read_text("utf-8"))
        from twisted.internet import reactor

        if args.dnssec:
            from relaynet.lab.dnssec import DNSSECError, DNSSECServers

            servers = DNSSECServers(Path(args.dnssec), spec, host, int(port), args.nsd_port)
            try:
                servers.start()
            except DNSSECError as e:
                raise ValueError(str(e)) from None
            reactor.addSystemEventTrigger("before", "shutdown", servers.stop)
            print(f"relaynet lab dns: zones signed, NSD on {host}:{args.nsd_port}, validating Unbound"
                  f" on {host}:{port}", flush=True)
        else:
            serve(spec, host, int(port), reactor)
        if args.policies:
            policies = json.loads(Path(args.policies).read_text("utf-8"))
            https_host, _, https_port = args.https.rpartition(":")
            serve_policies(policies, https_host, int(https_port), Path(args.cert), Path(args.key), reactor)
            print(f"relaynet lab dns: MTA-STS policies of {', '.join(policies)} on https://{args.https}",
                  flush=True)
    except (OSError, ValueError, ZoneError) as e:
        print(f"relaynet lab dns: {e}", file=sys.stderr)
        return 1
    print(f"relaynet lab dns: serving {', '.join(spec)} on {host}:{port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
