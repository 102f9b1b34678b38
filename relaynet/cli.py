# -*- test-case-name: tests.test_config -*-
"""
The C{relaynet} command.

    relaynet check-config [FILE]         validate a node config, print the effective one
    relaynet route CONFIG ADDRESS...     how each address would be routed, and why
    relaynet gen-cert --dir D NAME...    a lab CA (made once) and a certificate for NAMEs
    relaynet passwd FILE USER            add or change a submission user (scrypt hash)
    relaynet api-token add|list|remove   bearer tokens of the HTTP injection API (docs/http-api.md)
    relaynet dkim keygen DOMAIN SELECTOR a DKIM key (0600) and the DNS TXT record to publish
    relaynet queue COMMAND ...           a running node's queue: list, show, flush, hold, ... (queuecli)
    relaynet suppress COMMAND ...        a running node's suppression list: list, add, remove, import, export
    relaynet version
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, NoReturn

from relaynet import __version__
from relaynet.config import ConfigError, describe, load_config


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(f"relaynet: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(describe(config))
    return 0


def _route(args: argparse.Namespace) -> int:
    import ipaddress

    from relaynet.intake.policy import explain, is_trusted

    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"relaynet: {e}", file=sys.stderr)
        return 1
    try:
        client = ipaddress.ip_address(args.client)
    except ValueError:
        print(f"relaynet: --client {args.client!r} is not an IP address", file=sys.stderr)
        return 2
    if not is_trusted(config, str(client)):
        nets = ", ".join(str(n) for n in config.trusted_networks) or "none"
        print(f"client {args.client} is outside trusted_networks ({nets}): it may send to local "
              "domains and to relay_domains only, or relay after AUTH")
    worst = 0
    explained = [explain(config, address, client_ip=args.client) for address in args.address]
    mx_domains = sorted({
        (ex.address.rpartition("@")[2].lower(), ex.rule.mx_port)
        for ex in explained if ex.rule is not None and ex.rule.action == "mx"
    })
    answers = _mx_answers(config, mx_domains) if mx_domains else {}
    for address, ex in zip(args.address, explained):
        print(f"{address}: {'accepted' if ex.accepted else 'refused'} ({ex.reply})")
        print(f"  why: {ex.why}")
        if ex.rule is not None:
            if ex.rule.action == "relay":
                for hop in ex.hops:
                    print(f"  next hop: {hop.endpoint} (priority {hop.priority})")
                print(f"  ack: {ex.rule.ack}; tls: {ex.rule.tls}; concurrency: {ex.rule.concurrency}"
                      + (f"; source address: {ex.rule.source_address}" if ex.rule.source_address else ""))
            elif ex.rule.action == "mx":
                domain = address.rpartition("@")[2].lower()
                _print_mx(config, answers.get((domain, ex.rule.mx_port)), ex.rule.mx_port)
        if not ex.accepted:
            worst = 1
    return worst


def _mx_answers(config: Any, wanted: list[tuple[str, int]], timeout: float = 20.0) -> dict[tuple[str, int], Any]:
    """
    Look the MX domains up as the node would (its [dns] servers or
    resolv.conf, its address preference, itself as an exchanger); blocking,
    at most C{timeout} seconds in all.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults

    from relaynet.delivery.attempt import system_resolver
    from relaynet.delivery.mx import MXLookup

    lookup = MXLookup.for_config(
        system_resolver(reactor, config.dns_servers), reactor.seconds, lambda: config,
        shuffle=lambda items: None,
    )
    answers: dict[tuple[str, int], Any] = {}

    def one(domain: str, port: int) -> Any:
        return lookup.lookup(domain, port).addCallback(lambda a: answers.__setitem__((domain, port), a))

    def stop(_: object = None) -> None:
        if reactor.running:
            reactor.stop()

    gatherResults([one(d, p) for d, p in wanted], consumeErrors=True).addBoth(stop)
    reactor.callLater(timeout, stop)
    reactor.run()
    return answers


def _print_mx(config: Any, answer: Any, port: int) -> None:
    """What an mx route would try for one domain (see L{_mx_answers})."""
    if answer is None:
        print("  next hops: the MX hosts of the domain (the DNS lookup did not finish)")
        return
    if answer.failure is not None:
        status, dsn, text = answer.failure
        print(f"  DNS: {text}: the recipient would be {status} ({dsn})")
        return
    limit = config.outbound.mx_address_limit
    how = "no MX record: the domain's own address (implicit MX)" if answer.implicit else \
        "MX by preference; equal preferences in random order per attempt"
    print(f"  exchangers ({how}; port {port}, at most {limit or 'all'} addresses,"
          f" address preference {config.outbound.address_preference}):")
    for ex in answer.exchangers:
        print(f"    {ex.preference:>5} {ex.name}: {', '.join(ex.addresses)}")
    for note in answer.notes:
        print(f"    note: {note}")


def _gen_cert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from relaynet.smtp.tls import generate_ca, generate_cert

    directory = Path(args.dir)
    if args.days <= 0:
        print(f"relaynet: --days must be positive, not {args.days}", file=sys.stderr)
        return 2
    try:
        ca_cert, ca_key = generate_ca(directory)
        print(f"CA: {ca_cert} (key {ca_key})")
        if args.names:
            cert, key = generate_cert(directory, ca_cert, ca_key, args.names, days=args.days)
            print(f"certificate for {', '.join(args.names)}: {cert} (key {key})")
    except OSError as e:
        print(f"relaynet: {directory}: {e.strerror or e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"relaynet: {e}", file=sys.stderr)
        return 1
    return 0


def _dkim_keygen(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization

    from relaynet.delivery.dkim import KeyFileError, generate_key, signing_key, zone_record

    domain = args.domain.strip().rstrip(".").lower()
    selector = args.selector
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        print(f"relaynet: {args.domain!r} is not a domain name", file=sys.stderr)
        return 2
    labels = selector.split(".") + domain.split(".")
    if not all(part and all(c.isalnum() or c == "-" for c in part) for part in labels) or "." not in domain:
        print(f"relaynet: {selector!r} / {args.domain!r}: selector and domain must be DNS names "
              "(letters, digits, '-', dots between labels)", file=sys.stderr)
        return 2
    if args.algorithm == "rsa" and not 1024 <= args.bits <= 8192:
        print(f"relaynet: --bits must be 1024 to 8192 (2048 advised), not {args.bits}", file=sys.stderr)
        return 2
    path = Path(args.out or f"{domain}.{selector}.key")
    pem = generate_key(args.algorithm, args.bits)
    try:
        key = signing_key(serialization.load_pem_private_key(pem, None), domain, selector, path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"relaynet: {path} exists; not overwriting a key (give another --out)", file=sys.stderr)
        return 1
    except (OSError, KeyFileError) as e:
        print(f"relaynet: {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    print(zone_record(key))
    kind = f"RSA {args.bits} bits" if args.algorithm == "rsa" else "Ed25519"
    print(
        f"relaynet: {kind} key written to {path} (mode 0600); publish the TXT record above, then add"
        f' to the node config: [[dkim.keys]] domain = "{domain}", selector = "{selector}",'
        f' key_file = "{path}"', file=sys.stderr,
    )
    return 0


def _passwd(args: argparse.Namespace) -> int:
    import getpass
    import warnings
    from pathlib import Path

    from relaynet.intake.auth import set_password

    if args.password_stdin:
        if sys.stdin is None:
            print("relaynet: --password-stdin, but stdin is closed", file=sys.stderr)
            return 1
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        # getpass reads the terminal; with none it would fall back to stdin
        # with a warning (GetPassWarning), then end in EOFError on an empty
        # one: either way, say what to do in one line.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", getpass.GetPassWarning)
                password = getpass.getpass(f"password for {args.user}: ")
                again = getpass.getpass("again: ")
        except (getpass.GetPassWarning, EOFError, OSError):
            print(
                "relaynet: no terminal to read the password from: "
                "give it on stdin with --password-stdin",
                file=sys.stderr,
            )
            return 1
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        if password != again:
            print("relaynet: passwords differ", file=sys.stderr)
            return 1
    if not password:
        print("relaynet: empty password", file=sys.stderr)
        return 1
    try:
        set_password(Path(args.file), args.user, password)
    except (ValueError, OSError) as e:
        print(f"relaynet: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: password set for {args.user}")
    return 0


def _api_token(args: argparse.Namespace) -> int:
    from pathlib import Path

    from relaynet.intake.http import add_token, read_tokens_file, remove_token

    path = Path(args.file)
    try:
        if args.token_command == "add":
            token = add_token(path, args.name, args.domain, args.pool)
            print(token)
            print(f"relaynet: token {args.name} written to {path} (hashed; the token above is shown only now)",
                  file=sys.stderr)
        elif args.token_command == "list":
            tokens = read_tokens_file(path) if path.exists() else {}
            for entry in tokens.values():
                print(f"{entry.name}\t{','.join(entry.domains)}" + (f"\tpool={entry.pool}" if entry.pool else ""))
        else:
            if not remove_token(path, args.name):
                print(f"relaynet: {path}: no token {args.name}", file=sys.stderr)
                return 1
            print(f"{path}: token {args.name} removed")
    except (ValueError, OSError) as e:
        print(f"relaynet: {e}", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    """
    Run the benchmarks, C{python -m bench.run ARGS}, from the source checkout
    this package lives in.

    The bench (C{bench/}) and the harness it uses (C{harness/}) are not in the
    wheel: when this package was installed from one, with no checkout around
    it, say so in one line.

    @return: the bench's exit status; 2 when there is no checkout.
    """
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not ((root / "bench" / "run.py").is_file() and (root / "harness" / "peers.py").is_file()):
        print(
            "relaynet bench runs from a source checkout (bench/ and harness/ are not installed): "
            "git clone the relaynet repository, then `make bench` in it",
            file=sys.stderr,
        )
        return 2
    if not any(Path(p or ".").resolve() == root for p in sys.path):
        # An editable install in strict mode maps the package alone: let the
        # checkout's bench and harness packages be found, as `python -m` from
        # the root would.
        sys.path.insert(0, str(root))
    sys.argv = [str(root / "bench" / "run.py"), *args.args]
    try:
        runpy.run_module("bench.run", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0


def _version(args: argparse.Namespace) -> int:
    print(f"relaynet {__version__}")
    return 0


class Parser(argparse.ArgumentParser):
    """
    An argument parser whose errors are one line on stderr (what is wrong,
    and where the help is), status 2; argparse's own prints the usage first.
    Subcommand parsers are of the same class.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the C{relaynet} command."""
    parser = Parser(
        prog="relaynet", description="relaynet: a store-and-forward SMTP relay network."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser(
        "check-config", help="validate a node config and print the effective configuration"
    )
    p.add_argument("file", nargs="?", help="node config (TOML); omitted: the embedded default")
    p.set_defaults(func=_check_config)
    p = sub.add_parser("route", help="show how addresses would be routed, and why")
    p.add_argument("config", help="node config (TOML)")
    p.add_argument("address", nargs="+", help="recipient address(es)")
    p.add_argument("--client", default="127.0.0.1",
                   help="client IP to decide relay permission for (default 127.0.0.1)")
    p.set_defaults(func=_route)
    p = sub.add_parser("gen-cert", help="make a lab CA and node certificates")
    p.add_argument("--dir", default="certs", help="where the CA and certificates go (default ./certs)")
    p.add_argument("--days", type=int, default=825, help="certificate validity in days")
    p.add_argument("names", nargs="*", help="host names or IP addresses the certificate is for")
    p.set_defaults(func=_gen_cert)
    p = sub.add_parser("passwd", help="add or change a user of a submission password file")
    p.add_argument("file", help="password file (created if missing, mode 0600)")
    p.add_argument("user", help="user name")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=_passwd)
    p = sub.add_parser("api-token", help="bearer tokens of the HTTP injection API (docs/http-api.md)")
    tsub = p.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    t = tsub.add_parser("add", help="make a token (printed once; the file keeps its scrypt hash)")
    t.add_argument("file", help="tokens file ([http_api] tokens_file; created if missing, mode 0600)")
    t.add_argument("name", help="token name (letters, digits, '-', '_'); an existing one is replaced")
    t.add_argument("--domain", action="append", required=True,
                   help="an envelope sender domain the token may use (example.org, *.example.org, *); repeatable")
    t.add_argument("--pool", help="the [egress] pool its mail leaves from (instead of the route's source_pool)")
    t.set_defaults(func=_api_token)
    t = tsub.add_parser("list", help="token names and their sender domains")
    t.add_argument("file", help="tokens file")
    t.set_defaults(func=_api_token)
    t = tsub.add_parser("remove", help="remove a token")
    t.add_argument("file", help="tokens file")
    t.add_argument("name", help="token name")
    t.set_defaults(func=_api_token)
    p = sub.add_parser("dkim", help="DKIM signing keys (docs/outbound-security.md)")
    dsub = p.add_subparsers(dest="dkim_command", metavar="COMMAND", required=True)
    k = dsub.add_parser(
        "keygen", help="make a signing key (mode 0600) and print the DNS TXT record to publish"
    )
    k.add_argument("domain", help="the signing domain (d=), e.g. example.org")
    k.add_argument("selector", help="the selector (s=), e.g. 2026a")
    k.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa",
                   help="rsa (rsa-sha256, default) or ed25519 (ed25519-sha256, RFC 8463)")
    k.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    k.add_argument("--out", help="where the key goes (default ./DOMAIN.SELECTOR.key; never overwritten)")
    k.set_defaults(func=_dkim_keygen)
    p = sub.add_parser("bench", help="benchmark relaynet against Postfix (see bench/README.md)",
                       add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    from relaynet.lab.cli import add_lab_parser

    add_lab_parser(sub)
    from relaynet.admin.queuecli import add_queue_parser

    add_queue_parser(sub)
    from relaynet.admin.suppresscli import add_suppress_parser

    add_suppress_parser(sub)
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=_version)
    return parser


SIGPIPE_STATUS = 128 + 13
"""The exit status of a command whose reader went away (as a shell reports C{cat} killed by SIGPIPE)."""


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of the C{relaynet} console script.

    Whatever the command, a closed stdout (C{relaynet queue list --ids |
    head -1}) ends it quietly, as it does C{cat}: no traceback, status
    L{SIGPIPE_STATUS}.
    """
    try:
        try:
            status = _run(list(sys.argv[1:] if argv is None else argv))
        finally:
            # Also when argparse ends with SystemExit (--help).
            if sys.stdout is not None:
                sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return SIGPIPE_STATUS
    return status


def _quiet_stdout() -> None:
    """
    Point stdout at C{/dev/null}: the interpreter flushes it once more at exit,
    which would report the broken pipe again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _run(argv: list[str]) -> int:
    if argv[:1] == ["bench"]:
        # Everything after "bench" belongs to bench/run.py (argparse would
        # reject its options here).
        return _bench(argparse.Namespace(args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
