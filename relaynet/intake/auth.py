# -*- test-case-name: tests.test_auth -*-
"""
SMTP AUTH for submission: a C{twisted.cred} checker over a password file of
salted scrypt hashes (C{hashlib.scrypt}), the realm, and sender ownership.

Password file format, one user per line (comments with C{#}):

    alice:$scrypt$ln=14,r=8,p=1$<salt, base64>$<hash, base64>

C{relaynet passwd FILE USER} adds or changes a user. The file is re-read when
its modification time changes, so edits (and SIGHUP reloads) take effect
without a restart. Hashing runs in a worker thread: scrypt is deliberately slow.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any, Callable, Mapping

from twisted.cred import credentials, error, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred, fail
from zope.interface import Interface, implementer

SCRYPT_LN = 14
SCRYPT_R = 8
SCRYPT_P = 1


class IRelayUser(Interface):
    """The avatar of an authenticated submission client (its user name)."""


def hash_password(password: str, ln: int = SCRYPT_LN) -> str:
    """
    Hash a password with a fresh salt.

    @return: C{$scrypt$ln=..,r=..,p=..$salt$hash} (base64 without padding).
    """
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=1 << ln, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode().rstrip("=")

    return f"$scrypt$ln={ln},r={SCRYPT_R},p={SCRYPT_P}${b64(salt)}${b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    """Check C{password} against a stored C{$scrypt$...} hash (constant time)."""
    try:
        _, scheme, params, salt_b64, hash_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        p = dict(kv.split("=", 1) for kv in params.split(","))
        ln, r, par = int(p["ln"]), int(p["r"]), int(p["p"])
        if not (1 <= ln <= 20 and 1 <= r <= 32 and 1 <= par <= 16):
            return False
        salt = base64.b64decode(_pad(salt_b64))
        expected = base64.b64decode(_pad(hash_b64))
    except (ValueError, KeyError):
        return False
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=1 << ln, r=r, p=par, dklen=len(expected),
        maxmem=256 * 1024 * 1024,
    )
    return hmac.compare_digest(digest, expected)


def _pad(b64: str) -> str:
    """Restore the C{=} padding that L{hash_password} strips."""
    return b64 + "=" * (-len(b64) % 4)


def read_password_file(path: Path) -> dict[str, str]:
    """User name -> stored hash."""
    users = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, stored = line.partition(":")
        if sep and user:
            users[user] = stored
    return users


def set_password(path: Path, user: str, password: str) -> None:
    """Add or replace C{user} in the password file (written atomically, 0600)."""
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError("a user name has no colon or white space")
    lines = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.partition(":")[0].strip() != user:
                lines.append(line)
    lines.append(f"{user}:{hash_password(password)}")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@implementer(ICredentialsChecker)
class ScryptChecker:
    """
    Checks user names and passwords against a password file; the scrypt work
    runs through C{run_in_thread}.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, path: Path, run_in_thread: Callable[..., Deferred[Any]]) -> None:
        self.path = Path(path)
        self._run = run_in_thread
        self._users: dict[str, str] = {}
        self._mtime: float | None = None

    def users(self) -> dict[str, str]:
        """The current users, re-read when the file changed."""
        try:
            mtime = self.path.stat().st_mtime
            if mtime != self._mtime:
                self._users = read_password_file(self.path)
                self._mtime = mtime
        except OSError:
            # Unreadable now (e.g. after twistd dropped privileges): keep the
            # copy loaded before, as Postfix keeps its tables.
            pass
        return self._users

    def requestAvatarId(self, creds: Any) -> Deferred[bytes | tuple[()]]:
        try:
            user: str = creds.username.decode("utf-8")
            password: str = creds.password.decode("utf-8")
        except (UnicodeDecodeError, AttributeError):
            return fail(error.UnauthorizedLogin())
        stored = self.users().get(user)
        if stored is None:
            # Spend the same effort for unknown users: no user enumeration by timing.
            stored = _DUMMY_HASH

        def check() -> bytes:
            if verify_password(password, stored) and user in self.users():
                return user.encode("utf-8")
            raise error.UnauthorizedLogin()

        return self._run(check)


_DUMMY_HASH = "$scrypt$ln=14,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"


@implementer(portal.IRealm)
class RelayRealm:
    """Avatars are user names; nothing to log out."""

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, str, Callable[[], None]]:
        if IRelayUser not in interfaces:
            raise NotImplementedError("relaynet only provides IRelayUser")
        if not isinstance(avatarId, bytes):
            # ANONYMOUS: L{ScryptChecker}, our only checker, never returns it.
            raise NotImplementedError("relaynet has no anonymous users")
        return IRelayUser, avatarId.decode("utf-8"), lambda: None


def may_send_as(user: str, sender: str, allowed: Mapping[str, tuple[str, ...]]) -> bool:
    """
    May authenticated C{user} use C{sender} as the envelope sender?

    C{allowed} maps users to addresses and C{@domain} patterns; a user with no
    entry may send only as the user name itself when that is an address. The
    null sender is not allowed (submission clients do not send bounces).
    """
    if not sender:
        return False
    sender_l = sender.lower()
    patterns = allowed.get(user)
    if patterns is None:
        return "@" in user and sender_l == user.lower()
    domain = "@" + sender_l.rpartition("@")[2]
    return any(p == sender_l or p == domain or p == "*" for p in patterns)
