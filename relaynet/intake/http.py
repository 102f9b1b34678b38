# -*- test-case-name: tests.test_http_api -*-
"""
The HTTP injection API: C{POST /api/v1/messages} on its own twisted.web
listener (C{[http_api] endpoint}, which may face the network), described by
C{GET /api/v1/openapi.json}. See C{docs/http-api.md}.

The request, in order of the checks (each failure a JSON object
C{{"error": ..., "field": ...}}, never a traceback):

  1. size: a body above C{[http_api] max_request_size} is read and dropped,
     never kept (C{413}); one that goes on beyond L{DISCARD_FACTOR} times the
     limit is cut off with a bare C{413} and the connection closed;
  2. C{Authorization: Bearer NAME.SECRET}: a token of the tokens file
     (C{401}); the secret is kept as a salted scrypt hash (L{hash_password}),
     checked once in a worker thread, then remembered (by its SHA-256) while
     the file is unchanged;
  3. C{Content-Type: application/json} (C{415}), JSON (C{400}), the fields
     (C{422} naming the field, as C{recipients[2].address}), the envelope
     sender's domain among the token's (C{403}), the routing table's verdict
     per recipient (C{422}, with the SMTP reply it would give);
  4. the message(s) are built (stdlib C{email}: structured parts, or the
     complete message as given) and written to the spool, each committed
     (file and directory fsynced) before C{201} names the queue ids, as the
     SMTP intake sends 250 only then.

JSON parsing, validation and message building run in a worker thread
(L{prepare} is pure: no reactor, no disk); only the spool writer and the
reply run on the reactor.

Bulk sends: when a recipient carries C{substitutions}, each recipient gets a
message of its own, the C{{{name}}} placeholders of the content filled from
its substitutions over the request's C{substitutions}
(C{{{recipient}}} is always its address).
"""

from __future__ import annotations

import base64
import binascii
import email.errors
import email.policy
import hashlib
import io
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from relaynet.config import NodeConfig
from relaynet.delivery.routing import RoutingTable, domain_matches
from relaynet.intake.auth import hash_password, verify_password
from relaynet.intake.policy import check_recipient
from relaynet.queue.spool import Envelope, QueueEntry, Recipient, SpoolFull
from relaynet.queue.suppression import Suppression
from relaynet.smtp.parse import CommandError, parse_mail, parse_rcpt

DISCARD_FACTOR = 4
"""An oversized body is read and dropped up to this many times the limit, then the connection is cut."""

SCRYPT_CHECKS = 2
"""Token secrets checked with scrypt at once (others wait their turn)."""

MAX_SUBSTITUTIONS = 100
"""Keys of one C{substitutions} object."""

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.-]+)\s*\}\}")
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_RESERVED_HEADERS = frozenset({
    "content-type", "content-transfer-encoding", "mime-version", "from", "to", "subject",
})
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

POLICY = email.policy.SMTP.clone(cte_type="7bit")
"""CRLF lines, 7-bit content transfer encodings (quoted-printable or base64 for non-ASCII)."""


class APIError(Exception):
    """
    A request the API refuses: an HTTP status, what is wrong, and the field
    (a JSON path like C{recipients[1].address}) when one is to blame.
    """

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        """The JSON reply."""
        return {"error": self.message, "field": self.field}


# -- tokens -----------------------------------------------------------------


@frozen
class APIToken:
    """
    One line of the tokens file: C{name:$scrypt$...:domain,domain[:pool]}.

    @ivar domains: envelope sender domains the token may use: C{example.org},
        C{*.example.org}, or C{*} for any.
    @ivar pool: the C{[egress]} pool its mail leaves from (over the route's
        C{source_pool}), or C{None}.
    """

    name: str
    hashed: str
    domains: tuple[str, ...]
    pool: str | None = None

    def allows(self, sender: str) -> bool:
        """May this token send with envelope sender C{sender}?"""
        domain = sender.rpartition("@")[2].lower().rstrip(".")
        return bool(domain) and any(domain_matches(p, domain) for p in self.domains)


def read_tokens_file(path: Path) -> dict[str, APIToken]:
    """Token name -> L{APIToken}; lines that are not C{name:hash:domains} are skipped."""
    tokens = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) not in (3, 4) or not _NAME.fullmatch(parts[0]):
            continue
        domains = tuple(d.strip().lower() for d in parts[2].split(",") if d.strip())
        pool = parts[3].strip() if len(parts) == 4 and parts[3].strip() else None
        tokens[parts[0]] = APIToken(parts[0], parts[1], domains, pool)
    return tokens


def _write_tokens(path: Path, lines: list[str]) -> None:
    """Write the tokens file atomically (tmp, fsync, rename), mode 0600."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _other_lines(path: Path, name: str) -> tuple[list[str], bool]:
    """The tokens file's lines but C{name}'s, and whether C{name} had one."""
    lines, found = [], False
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.partition(":")[0].strip() == name:
                found = True
            else:
                lines.append(line)
    return lines, found


def add_token(path: Path, name: str, domains: Sequence[str], pool: str | None = None) -> str:
    """
    Make a new token C{name} (replacing one of that name) for C{domains};
    its mail leaves from the C{[egress]} pool C{pool}, if given.

    @return: the token to give the client, C{NAME.SECRET}; only its hash is stored.
    @raise ValueError: a bad name or domain.
    """
    if not _NAME.fullmatch(name):
        raise ValueError("a token name is 1 to 64 letters, digits, '-' or '_'")
    clean = []
    for d in domains:
        d = d.strip().lower().rstrip(".")
        body = d.removeprefix("*.")
        if d != "*" and (not body or any(c in body for c in "*:, \t@")):
            raise ValueError(f"{d!r} is not a domain, '*.domain' or '*'")
        clean.append(d)
    if not clean:
        raise ValueError("give at least one sender domain (or '*' for any)")
    if pool is not None and not _NAME.fullmatch(pool):
        raise ValueError(f"{pool!r} is not a pool name (letters, digits, '-', '_')")
    secret = secrets.token_urlsafe(32)
    lines, _ = _other_lines(path, name)
    lines.append(f"{name}:{hash_password(secret)}:{','.join(clean)}" + (f":{pool}" if pool else ""))
    _write_tokens(path, lines)
    return f"{name}.{secret}"


def remove_token(path: Path, name: str) -> bool:
    """Remove token C{name}; @return: whether there was one."""
    lines, found = _other_lines(path, name)
    if found:
        _write_tokens(path, lines)
    return found


class TokenStore:
    """
    The tokens of a tokens file, re-read when its modification time changes
    (an unreadable file keeps the copy read before). A presented token is
    checked with scrypt in a worker thread once (at most L{SCRYPT_CHECKS}
    at a time); then its SHA-256 is remembered until the file changes, so a
    client's requests after the first cost no scrypt.
    """

    def __init__(self, path: Path, run_in_thread: Callable[..., Deferred[Any]]) -> None:
        self.path = Path(path)
        self._run = run_in_thread
        self._tokens: dict[str, APIToken] = {}
        self._mtime: float | None = None
        self._verified: dict[bytes, APIToken] = {}
        # Wrong secrets each cost a scrypt: at most this many at once, so a
        # flood of them cannot take every thread of the node's pool.
        self._checks = DeferredSemaphore(SCRYPT_CHECKS)

    def tokens(self) -> dict[str, APIToken]:
        """The current tokens."""
        try:
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                self._tokens = read_tokens_file(self.path)
                self._mtime = mtime
                self._verified = {}
        except OSError:
            pass
        return self._tokens

    def check(self, presented: str) -> Deferred[APIToken | None]:
        """The token C{presented} (C{NAME.SECRET}) stands for, or C{None}."""
        tokens = self.tokens()
        key = hashlib.sha256(presented.encode("utf-8", "replace")).digest()
        known = self._verified.get(key)
        if known is not None:
            return succeed(known)
        name, _, secret = presented.partition(".")
        token = tokens.get(name)
        if token is None:
            # A token's name is not a secret (its 256-bit secret is): an
            # unknown name is refused without the cost of scrypt.
            return succeed(None)
        stored = token.hashed

        def verify() -> bool:
            return verify_password(secret, stored)

        def checked(ok: bool) -> APIToken | None:
            if not ok or token is None or self.tokens().get(name) != token:
                return None
            self._verified[key] = token
            return token

        return self._checks.run(self._run, verify).addCallback(checked)


# -- validation and building (pure) -------------------------------------------


@frozen
class Prepared:
    """One message to queue: its recipients, bytes (CRLF lines), and facts for the envelope."""

    recipients: tuple[Recipient, ...]
    data: bytes
    message_id: str | None
    hops: int
    smtputf8: bool
    eight_bit: bool


@frozen
class Refused:
    """A recipient left out of a request because it is on the suppression list."""

    field: str
    address: str
    error: str
    entry: Suppression


@frozen
class Injection:
    """
    A validated request: the envelope sender, the messages to queue, and
    the recipients left out because they are suppressed.
    """

    sender: str
    messages: tuple[Prepared, ...]
    suppressed: tuple[Refused, ...] = ()


def _expect(value: Any, kind: type | tuple[type, ...], field: str, what: str) -> Any:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise APIError(422, f"must be {what}", field)
    if not isinstance(value, kind):
        raise APIError(422, f"must be {what}", field)
    return value


def _substitutions(value: Any, field: str) -> dict[str, str]:
    _expect(value, dict, field, "an object of strings")
    if len(value) > MAX_SUBSTITUTIONS:
        raise APIError(422, f"at most {MAX_SUBSTITUTIONS} keys", field)
    out = {}
    for k, v in value.items():
        if not _PLACEHOLDER.fullmatch("{{" + k + "}}"):
            raise APIError(422, "keys are letters, digits, '_', '-' or '.'", f"{field}.{k}")
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise APIError(422, "must be a string or a number", f"{field}.{k}")
        out[k] = str(v)
    return out


def _fill(template: str, values: Mapping[str, str], field: str, vars_field: str) -> str:
    def one(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise APIError(422, f"no substitution for {{{{{key}}}}} (used in {field})", vars_field)
        return values[key]

    return _PLACEHOLDER.sub(one, template)


def _address(raw: Any, field: str, sender: bool = False) -> tuple[str, str, str, bool]:
    """C{(address, localpart, domain, non-ASCII)} of an envelope address, or 422."""
    _expect(raw, str, field, "an address (local@domain)")
    text = raw.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if any(c in text for c in "<>\r\n\0") or not text or "@" not in text:
        raise APIError(422, "must be an address (local@domain)", field)
    try:
        if sender:
            box = parse_mail(b"FROM:<" + text.encode("utf-8") + b"> SMTPUTF8", size_limit=None).sender
        else:
            box = parse_rcpt(b"TO:<" + text.encode("utf-8") + b">", smtputf8=True).recipient
    except CommandError as e:
        raise APIError(422, f"must be an address (local@domain): {e.text}", field) from None
    if not box.domain:
        raise APIError(422, "must be an address (local@domain)", field)
    return str(box), box.local, box.domain, not text.isascii()


def _header_section(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end + 2]


def _raw_message(text: str, field: str, max_line: int) -> bytes:
    data = text.encode("utf-8")
    if b"\0" in data:
        raise APIError(422, "must not contain NUL", field)
    data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if not re.match(rb"[!-9;-~]+:", data):
        raise APIError(422, "must be a complete RFC 5322 message, starting with a header field", field)
    for n, line in enumerate(data.split(b"\r\n"), 1):
        if len(line) + 2 > max_line:
            raise APIError(422, f"line {n} is longer than {max_line - 2} octets (RFC 5322 2.1.1)", field)
    head = _header_section(data)
    extra = b""
    if not re.search(rb"(?im)^date:", head):
        extra += f"Date: {formatdate(localtime=True)}\r\n".encode()
    return extra + data


def _ensure_message_id(data: bytes, hostname: str) -> tuple[bytes, str]:
    m = re.search(rb"(?im)^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)", _header_section(data))
    if m is not None:
        return data, m.group(1).replace(b"\r\n", b"").strip().decode("utf-8", "replace")
    mid = make_msgid(domain=hostname)
    return f"Message-ID: {mid}\r\n".encode() + data, mid


def _build(
    content: Mapping[str, Any], values: Mapping[str, str] | None, vars_field: str,
    default_to: Sequence[str], hostname: str,
) -> bytes:
    """A message from structured parts (L{EmailMessage}, CRLF, 7-bit)."""

    def text(name: str, required: bool = False) -> str | None:
        value = content.get(name)
        if value is None:
            if required:
                raise APIError(422, "is required", f"content.{name}")
            return None
        _expect(value, str, f"content.{name}", "a string")
        return _fill(value, values, f"content.{name}", vars_field) if values is not None else value

    msg = EmailMessage(policy=POLICY)
    field = "content"
    try:
        field = "content.from"
        msg["From"] = text("from", True)
        field = "content.to"
        to = content.get("to")
        if to is None:
            msg["To"] = ", ".join(default_to)
        elif isinstance(to, list) and to and all(isinstance(t, str) for t in to):
            msg["To"] = ", ".join(_fill(t, values, field, vars_field) if values is not None else t for t in to)
        else:
            msg["To"] = text("to")
        field = "content.subject"
        msg["Subject"] = text("subject") or ""
        msg["Date"] = formatdate(localtime=True)
        msg["Message-ID"] = make_msgid(domain=hostname)
        headers = content.get("headers", {})
        _expect(headers, dict, "content.headers", "an object of header fields")
        for name, value in headers.items():
            field = f"content.headers.{name}"
            if not _HEADER_NAME.fullmatch(name):
                raise APIError(422, "is not a header field name", field)
            if name.lower() in _RESERVED_HEADERS:
                raise APIError(422, "is set from content.from/to/subject/text/html", field)
            _expect(value, str, field, "a string")
            value = _fill(value, values, field, vars_field) if values is not None else value
            if name.lower() in ("message-id", "date"):
                del msg[name]
            msg[name] = value
        field = "content.text"
        plain, html = text("text"), text("html")
        if plain is None and html is None:
            raise APIError(422, "give content.text, content.html or both", "content.text")
        if plain is not None:
            msg.set_content(plain)
            if html is not None:
                field = "content.html"
                msg.add_alternative(html, subtype="html")
        else:
            field = "content.html"
            msg.set_content(html or "", subtype="html")
        attachments = content.get("attachments", [])
        _expect(attachments, list, "content.attachments", "an array")
        for i, att in enumerate(attachments):
            field = f"content.attachments[{i}]"
            _expect(att, dict, field, "an object: filename, content_type, data (base64)")
            filename = _expect(att.get("filename"), str, f"{field}.filename", "a string")
            ctype = att.get("content_type", "application/octet-stream")
            _expect(ctype, str, f"{field}.content_type", "a type/subtype")
            maintype, slash, subtype = ctype.partition("/")
            if not slash or not _HEADER_NAME.fullmatch(maintype) or not _HEADER_NAME.fullmatch(subtype):
                raise APIError(422, "must be a type/subtype", f"{field}.content_type")
            raw = _expect(att.get("data"), str, f"{field}.data", "base64 text")
            try:
                payload = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise APIError(422, "is not base64", f"{field}.data") from None
            if maintype == "text":
                try:
                    msg.add_attachment(payload.decode("utf-8"), subtype=subtype, filename=filename)
                except UnicodeDecodeError:
                    raise APIError(422, "text attachments must be UTF-8", f"{field}.data") from None
            else:
                msg.add_attachment(payload, maintype=maintype, subtype=subtype, filename=filename)
        field = "content"
        return msg.as_bytes(policy=POLICY)
    except APIError:
        raise
    except (ValueError, TypeError, LookupError, email.errors.MessageError) as e:
        raise APIError(422, f"cannot build the message: {e}", field) from None


def prepare(
    body: bytes, token: APIToken, config: NodeConfig, table: RoutingTable, max_recipients: int,
    suppressed: Callable[[str], Suppression | None] | None = None,
) -> Injection:
    """
    Validate a request body and build its message(s). Pure (no reactor, no
    disk): run in a worker thread.

    @param suppressed: the suppression list's in-memory lookup (an entry or
        C{None}); a suppressed recipient is left out, and listed in
        L{Injection.suppressed}.
    @raise APIError: what to answer instead of queueing.
    """
    try:
        req = json.loads(body)
    except RecursionError:
        raise APIError(400, "the body is not JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not JSON: {e}") from None
    if not isinstance(req, dict):
        raise APIError(400, "the body must be a JSON object")
    known = {"sender", "recipients", "message", "content", "substitutions"}
    for key in req:
        if key not in known:
            raise APIError(422, "unknown field", key)
    if "sender" not in req:
        raise APIError(422, "is required", "sender")
    sender, _, sender_domain, sender_utf8 = _address(req["sender"], "sender", sender=True)
    if not token.allows(sender):
        raise APIError(403, f"token {token.name!r} may not send as {sender_domain}", "sender")
    if "recipients" not in req:
        raise APIError(422, "is required", "recipients")
    rcpts = _expect(req["recipients"], list, "recipients", "an array of addresses")
    if not rcpts:
        raise APIError(422, "must not be empty", "recipients")
    if len(rcpts) > max_recipients:
        raise APIError(422, f"at most {max_recipients} recipients per request", "recipients")
    has_message, has_content = "message" in req, "content" in req
    if has_message == has_content:
        raise APIError(422, "give either message (RFC 5322 text) or content (structured parts)",
                       "message" if has_message else "content")
    shared = _substitutions(req["substitutions"], "substitutions") if "substitutions" in req else {}
    parsed: list[tuple[Recipient, dict[str, str] | None, str, bool]] = []
    refused: list[Refused] = []
    for i, item in enumerate(rcpts):
        field = f"recipients[{i}]"
        subs = None
        if isinstance(item, dict):
            for key in item:
                if key not in ("address", "substitutions"):
                    raise APIError(422, "unknown field", f"{field}.{key}")
            if "address" not in item:
                raise APIError(422, "is required", f"{field}.address")
            if "substitutions" in item:
                subs = _substitutions(item["substitutions"], f"{field}.substitutions")
            afield, raw = f"{field}.address", item["address"]
        else:
            afield, raw = field, item
        address, local, domain, utf8 = _address(raw, afield)
        verdict = check_recipient(config, local, domain, "", authenticated=True, table=table)
        if not verdict.accepted:
            raise APIError(422, f"refused: {verdict.code} {verdict.enhanced} {verdict.text}", afield)
        entry = suppressed(address) if suppressed is not None else None
        if entry is not None:
            refused.append(Refused(afield, address, f"550 5.1.1 {entry.refusal(address)}", entry))
            continue
        route = verdict.route.name if verdict.route is not None else "local"
        parsed.append((Recipient(address=address, route=route), subs, afield, utf8))
    if not parsed:
        return Injection(sender=sender, messages=(), suppressed=tuple(refused))
    personal = any(subs is not None for _, subs, _, _ in parsed)
    groups: list[tuple[list[Recipient], dict[str, str] | None, str, bool]]
    if personal:
        groups = [
            ([r], {**shared, **(subs or {}), "recipient": r.address}, f"{f.rsplit('.', 1)[0]}.substitutions", u)
            for r, subs, f, u in parsed
        ]
    else:
        seen: dict[str, Recipient] = {}
        for r, _, _, _ in parsed:
            seen.setdefault(r.address, r)
        groups = [(list(seen.values()), shared if "substitutions" in req else None, "substitutions",
                   any(u for *_, u in parsed))]
    max_line = max(config.limits.max_line_length, 1000)
    limit = config.limits.max_message_size
    messages = []
    for recipients, values, vars_field, utf8 in groups:
        if has_message:
            raw_text = _expect(req["message"], str, "message", "a string (the whole RFC 5322 message)")
            if values is not None:
                raw_text = _fill(raw_text, values, "message", vars_field)
            data = _raw_message(raw_text, "message", max_line)
        else:
            content = _expect(req["content"], dict, "content", "an object")
            for key in content:
                if key not in ("from", "to", "subject", "text", "html", "attachments", "headers"):
                    raise APIError(422, "unknown field", f"content.{key}")
            data = _build(content, values, vars_field, [r.address for r in recipients], config.hostname)
        data, message_id = _ensure_message_id(data, config.hostname)
        if len(data) > limit:
            raise APIError(413, f"the message is {len(data)} octets, above the limit of {limit}",
                           "message" if has_message else "content")
        head = _header_section(data)
        hops = len(re.findall(rb"(?im)^received:", head)) + 1
        if hops > config.limits.max_hops:
            raise APIError(422, f"too many Received: fields ({hops - 1}): a mail loop?", "message")
        messages.append(Prepared(
            recipients=tuple(recipients), data=data, message_id=message_id, hops=hops,
            smtputf8=sender_utf8 or utf8 or not head.isascii(), eight_bit=not data.isascii(),
        ))
    return Injection(sender=sender, messages=tuple(messages), suppressed=tuple(refused))


# -- the web side -----------------------------------------------------------


def _json(request: Request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, indent=None, separators=(",", ":")).encode() + b"\n"


def _header(request: Request, name: bytes) -> str:
    value = request.getHeader(name)
    return value.decode("latin-1").strip() if value is not None else ""


class APIRequest(Request):
    """
    A request whose body is kept only up to the site's C{max_request_size}
    (in memory: the limit bounds it).

    A C{Content-Length} above the limit is answered at once with 413 (no
    C{100 Continue}), the body that follows read and dropped up to
    L{DISCARD_FACTOR} times the limit, then the connection closed (closing
    with unread data would reset it and could lose the answer). A chunked
    body that grows past the limit is read and dropped, answered 413 by the
    resource when complete, or cut off with a 413 past L{DISCARD_FACTOR}
    times the limit.
    """

    too_large = False
    _received = 0
    _limit = 0
    _answered = False

    def gotLength(self, length: int | None) -> None:
        channel: Any = self.channel
        limit: int = channel.site.max_request_size()
        self._limit = limit
        self.content = io.BytesIO()
        if length is not None and length > limit:
            self.too_large = True
            self.requestHeaders.removeHeader(b"expect")
            self._answer_413(close=length > DISCARD_FACTOR * limit)

    def _answer_413(self, close: bool) -> None:
        """Write a 413 on the connection now; close it now, or once the body is read (L{process})."""
        channel: Any = self.channel
        if self._answered or channel is None or channel.transport is None:
            return
        self._answered = True
        body = json.dumps({"error": f"the request body is larger than {self._limit} octets",
                           "field": None}).encode()
        channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        if close:
            channel.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self._limit:
            self.too_large = True
        if self.too_large:
            if self._received > DISCARD_FACTOR * self._limit:
                self._answer_413(close=True)
            return
        if self.content is not None:
            self.content.write(data)

    def process(self) -> None:
        if self._answered:
            channel: Any = self.channel
            if channel is not None:
                channel.loseConnection()
            return
        Request.process(self)


class APISite(Site):
    """The API's site: L{APIRequest}s, no tracebacks, no access log (the events say what came in)."""

    noisy = False
    requestFactory = APIRequest
    displayTracebacks = False

    def __init__(self, resource: Resource, max_request_size: Callable[[], int], reactor: Any = None) -> None:
        Site.__init__(self, resource, reactor=reactor, timeout=60)
        self.max_request_size = max_request_size

    def log(self, request: http.Request) -> None:
        pass


class InjectionAPI(Resource):
    """
    C{/api/v1/messages} and C{/api/v1/openapi.json}; everything else is a
    JSON 404 (or 405).

    @param commit: commits a validated L{Injection}: a callable taking it,
        the token and the request, returning a Deferred list of
        L{QueueEntry}s (an L{Injector}).
    @param suppressed: the suppression list's lookup (L{relaynet.intake.server.Intake.suppressed}).
    @param events: the node's event log, for C{suppressed} events.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self, config: Callable[[], NodeConfig], tokens: Callable[[], TokenStore | None],
        routing: Callable[[], RoutingTable], run_in_thread: Callable[..., Deferred[Any]],
        commit: Callable[[Injection, APIToken, Request], Deferred[list[QueueEntry]]],
        suppressed: Callable[[str], Suppression | None] | None = None, events: Any = None,
    ) -> None:
        Resource.__init__(self)
        self.suppressed = suppressed
        self.events = events
        self.config = config
        self.tokens = tokens
        self.routing = routing
        self.run = run_in_thread
        self.commit = commit

    def render(self, request: Request) -> Any:
        try:
            return self._render(request)
        except APIError as e:
            return _json(request, e.status, e.body())
        except Exception:  # noqa: BLE001 -- never a traceback: whatever fails is a JSON 500, logged
            self.log.failure("HTTP API request failed")
            return _json(request, 500, {"error": "internal error", "field": None})

    def _render(self, request: Request) -> Any:
        path = b"/".join((request.prepath or []) + (request.postpath or [])).rstrip(b"/")
        method = request.method
        if path == b"api/v1/openapi.json":
            if method not in (b"GET", b"HEAD"):
                request.setHeader(b"allow", b"GET, HEAD")
                raise APIError(405, "use GET")
            return _json(request, 200, openapi())
        if path != b"api/v1/messages":
            raise APIError(404, "no such resource (POST /api/v1/messages, GET /api/v1/openapi.json)")
        if method != b"POST":
            request.setHeader(b"allow", b"POST")
            raise APIError(405, "use POST")
        if getattr(request, "too_large", False):
            limit = self.config().http_api.max_request_size
            request.setHeader(b"connection", b"close")
            raise APIError(413, f"the request body is larger than {limit} octets")
        auth = _header(request, b"authorization")
        scheme, _, presented = auth.partition(" ")
        store = self.tokens()
        if scheme.lower() != "bearer" or not presented.strip() or store is None:
            request.setHeader(b"www-authenticate", b'Bearer realm="relaynet"')
            raise APIError(401, "give Authorization: Bearer <token>", "Authorization")
        ctype = _header(request, b"content-type").split(";")[0].strip().lower()
        body = request.content.read() if request.content is not None else b""
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))

        def authorised(token: APIToken | None) -> Any:
            if token is None:
                request.setHeader(b"www-authenticate", b'Bearer realm="relaynet", error="invalid_token"')
                raise APIError(401, "unknown or wrong token", "Authorization")
            if ctype != "application/json":
                raise APIError(415, "send Content-Type: application/json", "Content-Type")
            config = self.config()
            settings = config.http_api
            table = self.routing()
            return self.run(
                prepare, body, token, config, table, settings.max_recipients, self.suppressed,
            ).addCallback(prepared, token)

        def prepared(injection: Injection, token: APIToken) -> Any:
            for r in injection.suppressed:
                self._suppressed_event(r, injection.sender, request, token)
            if not injection.messages:
                first = injection.suppressed[0]
                raise APIError(422, f"every recipient is suppressed; first: {first.error}", first.field)
            left_out = [{"field": r.field, "address": r.address, "error": r.error} for r in injection.suppressed]
            return self.commit(injection, token, request).addCallback(lambda entries: (entries, left_out))

        def done(result: tuple[list[QueueEntry], list[dict[str, str]]]) -> None:
            entries, left_out = result
            reply: dict[str, Any] = {"messages": [
                {"queue_id": e.queue_id, "recipients": [r.address for r in e.envelope.recipients]}
                for e in entries
            ], "queue_ids": [e.queue_id for e in entries]}
            if left_out:
                reply["suppressed"] = left_out
            self._write(request, finished, 201, reply)

        def refused(failure: Failure) -> None:
            e = failure.value
            if isinstance(e, APIError):
                self._write(request, finished, e.status, e.body())
                return
            if failure.check(SpoolFull):
                self._write(request, finished, 507, {"error": "insufficient storage, try later", "field": None})
                return
            if isinstance(e, CommitFailed):
                self._write(request, finished, 503, e.body())
                return
            self.log.failure("HTTP API request failed", failure)
            self._write(request, finished, 500, {"error": "internal error", "field": None})

        store.check(presented.strip()).addCallback(authorised).addCallbacks(done, refused).addErrback(
            lambda f: self.log.failure("HTTP API reply failed", f))
        return NOT_DONE_YET

    def _suppressed_event(self, r: Refused, sender: str, request: Request, token: APIToken) -> None:
        """A C{suppressed} event, as the SMTP intake logs one at RCPT (stage C{http})."""
        if self.events is None:
            return
        try:
            self.events.emit(
                "suppressed", stage="http", code=550, dsn="5.1.1", sender=sender, recipient=r.address,
                client=str(getattr(request.getClientAddress(), "host", "")), token=token.name,
                status="suppressed", **r.entry.event_fields(),
            )
        except Exception:  # noqa: BLE001 -- an event is diagnostics: its failure must not fail the request
            self.log.failure("Could not log a suppressed event")

    def _write(self, request: Request, finished: list[bool], status: int, body: Any) -> None:
        if finished[0]:
            return  # the client went away; what was committed stays queued
        data = _json(request, status, body)
        request.setHeader(b"content-length", str(len(data)).encode())
        request.write(data)
        request.finish()


class CommitFailed(Exception):
    """Some or all messages of a request could not be committed; C{queued} were."""

    def __init__(self, queued: list[QueueEntry]) -> None:
        super().__init__("queue file write error")
        self.queued = queued

    def body(self) -> dict[str, Any]:
        return {
            "error": "queue file write error: try again later"
            + (" (the messages listed in queued were accepted)" if self.queued else ""),
            "field": None,
            "queued": [{"queue_id": e.queue_id, "recipients": [r.address for r in e.envelope.recipients]}
                       for e in self.queued],
        }


class Injector:
    """
    Writes validated injections into the spool, as the SMTP intake does:
    our C{Received:} field first, the envelope (client C{protocol} HTTP or
    HTTPS, the token's name, never its secret), then the commit; each
    committed message gets a C{received} event and is handed to C{queued}.
    """

    log = Logger()

    def __init__(
        self, spool: Any, events: Any, queued: Callable[[QueueEntry], None],
        config: Callable[[], NodeConfig], reactor: Any, listener: str,
    ) -> None:
        self.spool = spool
        self.events = events
        self.queued = queued
        self.config = config
        self.reactor = reactor
        self.listener = listener

    def __call__(self, injection: Injection, token: APIToken, request: Request) -> Deferred[list[QueueEntry]]:
        config = self.config()
        peer = request.getClientAddress()
        ip = str(getattr(peer, "host", "")) or "unix"
        port = getattr(peer, "port", None)
        protocol = "HTTPS" if request.isSecure() else "HTTP"
        started = self.reactor.seconds()
        pending = []
        for msg in injection.messages:
            env = Envelope(
                queue_id=self.spool.new_id(), sender=injection.sender, recipients=msg.recipients,
                arrival=self.reactor.seconds(),
                params={"body": "8BITMIME" if msg.eight_bit else None, "smtputf8": msg.smtputf8,
                        **({"source_pool": token.pool} if token.pool else {})},
                client={"ip": ip, "port": port, "protocol": protocol, "listener": self.listener,
                        "token": token.name},
                node=config.name,
            )
            rcpt = f"\r\n\tfor <{msg.recipients[0].address}>" if len(msg.recipients) == 1 else ""
            literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
            received = (
                f"Received: from {literal} (token {token.name})\r\n"
                f"\tby {config.hostname} (relaynet) with {protocol} id {env.queue_id}{rcpt};"
                f" {formatdate(env.arrival, localtime=True)}\r\n"
            ).encode()
            try:
                writer = self.spool.begin(env)
                writer.write(received)
                writer.write(msg.data)
                d = writer.commit(msg.hops)
            except Exception:  # noqa: BLE001 -- any error of the spool writer becomes that message's failed commit
                d = Deferred()
                d.errback(Failure())
            pending.append(d.addCallback(self._committed, msg, token, ip, port, started))

        def gathered(results: list[tuple[bool, Any]]) -> list[QueueEntry]:
            entries = [r for ok, r in results if ok]
            failures = [r for ok, r in results if not ok]
            for f in failures:
                self.log.failure("HTTP API: queue commit failed", f)
            if failures:
                if not entries and any(f.check(SpoolFull) for f in failures):
                    raise SpoolFull("spool full")
                raise CommitFailed(entries)
            return entries

        return DeferredList(pending, consumeErrors=True).addCallback(gathered)

    def _committed(
        self, entry: QueueEntry, msg: Prepared, token: APIToken, ip: str, port: Any, started: float,
    ) -> QueueEntry:
        env = entry.envelope
        try:
            self.events.emit(
                "received", queue_id=entry.queue_id, message_id=msg.message_id, sender=env.sender,
                recipients=[r.address for r in env.recipients], size=env.size, client=ip,
                client_port=port, protocol="http", token=token.name, hops=msg.hops,
                ack_delay=round(self.reactor.seconds() - started, 6),
            )
        except Exception:  # noqa: BLE001 -- an event is diagnostics: the message is committed whatever happens
            self.log.failure("Could not log the received event of {queue_id}", queue_id=entry.queue_id)
        try:
            self.queued(entry)
        except Exception:  # noqa: BLE001 -- committed is committed: the recovery schedules it at the next start
            self.log.failure("Could not schedule {queue_id}", queue_id=entry.queue_id)
        return entry


def api_site(
    config: Callable[[], NodeConfig], spool: Any, events: Any, queued: Callable[[QueueEntry], None],
    routing: Callable[[], RoutingTable], reactor: Any, run_in_thread: Callable[..., Deferred[Any]],
    suppressed: Callable[[str], Suppression | None] | None = None,
) -> APISite:
    """
    The API's site for a node: its tokens file (C{[http_api] tokens_file}),
    limits read from C{config()} at each request (a reload applies them).
    """
    settings = config().http_api
    store = TokenStore(settings.tokens_file, run_in_thread) if settings.tokens_file is not None else None
    if store is not None:
        store.tokens()  # read now: before twistd drops privileges it may be root's only
    injector = Injector(spool, events, queued, config, reactor, settings.endpoint or "")
    resource = InjectionAPI(config, lambda: store, routing, run_in_thread, injector, suppressed, events)
    return APISite(resource, lambda: config().http_api.max_request_size, reactor)


# -- OpenAPI ------------------------------------------------------------------


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the API (served at C{/api/v1/openapi.json})."""
    subs = {"type": "object", "additionalProperties": {"type": ["string", "number"]},
            "description": "Values for {{name}} placeholders in message or content."}
    return {
        "openapi": "3.1.0",
        "info": {"title": "relaynet HTTP injection API", "version": "1",
                 "description": "Queue mail on a relaynet node over HTTP. A 201 is sent only once every "
                                "message is committed to the spool (fsynced), as SMTP's 250."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "NAME.SECRET from `relaynet api-token add`"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error", "field"], "properties": {
                    "error": {"type": "string"},
                    "field": {"type": ["string", "null"],
                              "description": "the field to blame, as a JSON path: recipients[2].address"},
                    "queued": {"type": "array", "items": {"$ref": "#/components/schemas/Queued"}},
                }},
                "Queued": {"type": "object", "properties": {
                    "queue_id": {"type": "string"},
                    "recipients": {"type": "array", "items": {"type": "string"}},
                }},
                "Recipient": {"oneOf": [
                    {"type": "string", "format": "email"},
                    {"type": "object", "required": ["address"], "additionalProperties": False, "properties": {
                        "address": {"type": "string", "format": "email"}, "substitutions": subs,
                    }},
                ]},
                "Content": {"type": "object", "required": ["from"], "additionalProperties": False, "properties": {
                    "from": {"type": "string", "description": "the From: field, e.g. 'Shop <shop@example.org>'"},
                    "to": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                           "description": "the To: field; default: the recipient(s)"},
                    "subject": {"type": "string"},
                    "text": {"type": "string"},
                    "html": {"type": "string"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "attachments": {"type": "array", "items": {
                        "type": "object", "required": ["filename", "data"], "properties": {
                            "filename": {"type": "string"},
                            "content_type": {"type": "string", "default": "application/octet-stream"},
                            "data": {"type": "string", "contentEncoding": "base64"},
                        }}},
                }},
                "Injection": {
                    "type": "object", "required": ["sender", "recipients"], "additionalProperties": False,
                    "properties": {
                        "sender": {"type": "string", "description": "the envelope sender (MAIL FROM)"},
                        "recipients": {"type": "array", "minItems": 1,
                                       "items": {"$ref": "#/components/schemas/Recipient"}},
                        "message": {"type": "string", "description": "a complete RFC 5322 message"},
                        "content": {"$ref": "#/components/schemas/Content"},
                        "substitutions": subs,
                    },
                    "oneOf": [{"required": ["message"]}, {"required": ["content"]}],
                },
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/messages": {"post": {
                "summary": "Queue one message, or one per recipient when recipients carry substitutions",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Injection"}}}},
                "responses": {
                    "201": {"description": "committed to the spool", "content": {"application/json": {
                        "schema": {"type": "object", "properties": {
                            "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Queued"}},
                            "queue_ids": {"type": "array", "items": {"type": "string"}},
                            "suppressed": {"type": "array", "description": "recipients left out: suppressed",
                                           "items": {"type": "object", "properties": {
                                               "field": {"type": "string"}, "address": {"type": "string"},
                                               "error": {"type": "string"}}}},
                        }}}}},
                    "400": _error_response("the body is not a JSON object"),
                    "401": _error_response("no, unknown or wrong bearer token"),
                    "403": _error_response("the token may not use the sender's domain"),
                    "413": _error_response("the request or the message is too large"),
                    "415": _error_response("not application/json"),
                    "422": _error_response("a field is missing or invalid (field names it)"),
                    "503": _error_response("the spool could not commit (queued lists what was)"),
                    "507": _error_response("the spool's disk is full"),
                },
            }},
            "/api/v1/openapi.json": {"get": {"summary": "this description", "security": [],
                                             "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
    }


__all__ = [
    "APIError",
    "APISite",
    "APIToken",
    "Injection",
    "InjectionAPI",
    "Injector",
    "Prepared",
    "TokenStore",
    "add_token",
    "api_site",
    "openapi",
    "prepare",
    "read_tokens_file",
    "remove_token",
]
