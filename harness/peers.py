# -*- test-case-name: tests.test_peers -*-
"""
Private, real SMTP peers for interoperability tests and benchmarks.

This module starts and stops real third-party SMTP software -- a private
Postfix instance, Postfix's C{smtp-sink} test server and its C{smtp-source}
load generator -- on loopback addresses only.  Nothing here touches the
system-wide Postfix configuration or spool: every L{PostfixInstance} lives in
a directory of its own, with its own C{config_directory}, C{queue_directory},
C{data_directory} and log file.

It deliberately does not use the Twisted reactor: it is called from plain
test functions and from benchmark scripts, outside any reactor, and drives
the peers with L{subprocess} and L{socket}.  Every wait is bounded by a
deadline.

Running Postfix needs root (the C{postfix} command refuses otherwise) and the
C{postfix} binaries; when either is missing, L{PeerUnavailable} is raised,
which test runners treat as a skip.

Part of the test and benchmark harness (L{harness}): C{tests/} and C{bench/}
use it; it does not ship in the relaynet wheel.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import subprocess
import time
import unittest
from pathlib import Path
from typing import Iterable, Mapping

__all__ = [
    "PeerUnavailable",
    "SmtpSourceError",
    "PostfixInstance",
    "SmtpSink",
    "free_port",
    "wait_for_smtp",
    "run_smtp_source",
    "missing_binaries",
    "postfix_unavailable_reason",
    "relayhost_for",
    "allow_postfix_search",
    "POSTFIX",
    "SMTP_SINK",
    "SMTP_SOURCE",
]

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"

# The queue sub-directories that hold mail which has not left yet.
_QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred")

_POLL_INTERVAL = 0.05


class PeerUnavailable(unittest.SkipTest):
    """
    A real peer cannot be run on this machine (binaries missing, not root).

    It subclasses L{unittest.SkipTest} (itself an L{Exception}), so pytest,
    trial and unittest all report a test that raises it as skipped, with the
    message as the reason.
    """


class SmtpSourceError(RuntimeError):
    """
    C{smtp-source} failed: it exited non-zero, timed out, or reported an
    SMTP error.

    @ivar returncode: the exit status, or L{None} when it timed out.
    @ivar output: what it printed (stdout and stderr, combined).
    """

    def __init__(self, message: str, returncode: int | None, output: str):
        super().__init__(message)
        self.returncode = returncode
        self.output = output


def missing_binaries(names: Iterable[str] | None = None) -> list[str]:
    """
    List which of the given executables are absent.

    @param names: absolute paths of executables; by default C{postfix},
        C{postconf}, C{smtp-sink} and C{smtp-source}.
    @return: the paths that do not exist or are not executable.
    """
    if names is None:
        names = (POSTFIX, POSTCONF, SMTP_SINK, SMTP_SOURCE)
    return [n for n in names if not os.access(n, os.X_OK)]


def postfix_unavailable_reason() -> str | None:
    """
    Explain why a private Postfix instance cannot run here, if it cannot.

    @return: L{None} when Postfix binaries are installed and we are root;
        otherwise a human-readable reason suitable for a test skip.
    """
    missing = missing_binaries()
    if missing:
        return "Postfix not installed (missing: %s); apt-get install postfix" % (
            ", ".join(missing),
        )
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user: the postfix package is not set up"
    return None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_loopback(host: str) -> None:
    """
    Refuse anything but a literal loopback address.

    @raise ValueError: if C{host} is not in 127.0.0.0/8 or ::1.
    """
    if host == "::1" or re.fullmatch(r"127\.\d{1,3}\.\d{1,3}\.\d{1,3}", host):
        return
    raise ValueError("only literal loopback addresses are allowed, not %r" % (host,))


def free_port(host: str = "127.0.0.1") -> int:
    """
    Find a TCP port that is currently free on a loopback address.

    The port is free when this returns; something else may take it before the
    caller binds it, which is unlikely enough for tests.

    @param host: a literal loopback address.
    @return: the port number.
    """
    _check_loopback(host)
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def relayhost_for(host: str, port: int) -> str:
    """
    Format a Postfix C{relayhost} value that needs no DNS lookup.

    @return: C{"[127.0.0.1]:PORT"} or, for IPv6, C{"[ipv6:::1]:PORT"}.
    """
    _check_loopback(host)
    if ":" in host:
        return "[ipv6:%s]:%d" % (host, port)
    return "[%s]:%d" % (host, port)


def allow_postfix_search(path: Path | str) -> Path:
    """
    Let Postfix daemons (the C{postfix} user) reach C{path}.

    Postfix's master and daemons open some files by absolute path with the
    C{postfix} user's rights (the C{master.lock} in C{data_directory}, the
    log file, the mailbox directory), so every ancestor of an instance's
    directory must be searchable by that user.  pytest's C{tmp_path} lives
    under C{/tmp/pytest-of-USER}, which is mode 0700.

    This adds the search bit for others (C{o+x}: enter, not list) to each
    ancestor of C{path}, and to C{path}, that lacks it and that we own;
    pytest tightens its own directory back to 0700 at its next run.

    @param path: an existing directory.
    @return: C{path}, as an absolute L{Path}.
    """
    path = Path(path).absolute()
    uid = os.geteuid()
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        if not st.st_mode & 0o001 and st.st_uid == uid:
            os.chmod(d, (st.st_mode & 0o7777) | 0o001)
    return path


def wait_for_smtp(host: str, port: int, timeout: float = 15.0) -> str:
    """
    Connect repeatedly until an SMTP server greets with C{220}.

    Each attempt is bounded, and so is the whole wait; after reading the
    greeting the connection is closed politely with C{QUIT}.

    @param host: a literal loopback address.
    @param port: the TCP port.
    @param timeout: seconds to keep trying.
    @return: the greeting line.
    @raise TimeoutError: if no C{220} greeting was read in time.
    """
    _check_loopback(host)
    deadline = time.monotonic() + timeout
    last: object = "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            with socket.create_connection(
                (host, port), timeout=min(remaining, 5.0)
            ) as s:
                f = s.makefile("rb")
                line = f.readline(4096)
                if line.startswith(b"220"):
                    try:
                        # Skip the rest of a multi-line greeting, then quit.
                        while line[3:4] == b"-":
                            line = f.readline(4096)
                        s.sendall(b"QUIT\r\n")
                        f.readline(4096)
                    except OSError:
                        pass
                    return line.decode("ascii", "replace").strip()
                last = line
        except OSError as e:
            last = e
        time.sleep(min(_POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
    raise TimeoutError(
        "no SMTP 220 greeting from %s port %d within %.1fs (last: %r)"
        % (host, port, timeout, last)
    )


def _tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        return "(cannot read %s: %s)" % (path, e)
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; treat it as gone.
    try:
        with open("/proc/%d/stat" % (pid,), "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return True


class PostfixInstance:
    """
    A private Postfix mail system, listening on one loopback address/port.

    Everything lives under C{base_dir}::

        base_dir/etc/main.cf, master.cf     config_directory
        base_dir/spool/                     queue_directory
        base_dir/data/                      data_directory
        base_dir/log/postfix.log            maillog_file (via postlogd)
        base_dir/mail/Maildir/              local deliveries (mode "local")

    Modes:
      - C{"sink"}: queue durably, then discard every message (the C{discard}
        transport).  A durable accepting endpoint that needs no peer.
      - C{"relay"}: forward every message, whatever its domain, to
        C{relayhost} over SMTP.  C{relayhost} is required.
      - C{"local"}: deliver mail for C{local_domains} into one Maildir
        (C{maildir}) with the C{virtual} agent; forward other domains to
        C{relayhost}, or bounce them when there is none.

    Use it as a context manager, or call L{start} and L{stop}.

    @ivar host: the listening address.
    @ivar port: the listening port.
    @ivar base_dir: the instance's directory.
    @ivar config_dir: its C{config_directory}.
    @ivar queue_dir: its C{queue_directory}.
    @ivar data_dir: its C{data_directory}.
    @ivar log_path: its log file.
    @ivar maildir: where mode C{"local"} delivers.
    @ivar name: the unique instance name (C{multi_instance_name}).
    """

    MODES = ("sink", "relay", "local")

    def __init__(
        self,
        base_dir: Path | str,
        *,
        port: int,
        host: str = "127.0.0.1",
        relayhost: str | None = None,
        mode: str = "sink",
        name: str | None = None,
        myhostname: str | None = None,
        local_domains: Iterable[str] = ("localhost",),
        main_cf: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 30.0,
    ):
        """
        @param base_dir: a directory for this instance alone; created if
            missing.  Its ancestors must be searchable by the C{postfix} user
            (checked by L{start}).
        @param port: the TCP port smtpd listens on.
        @param host: a literal loopback address to listen on.
        @param relayhost: a Postfix C{relayhost} value such as
            C{"[127.0.0.1]:2525"} (see L{relayhost_for}).
        @param mode: C{"sink"}, C{"relay"} or C{"local"}.
        @param name: unique instance name; derived from the port by default.
        @param myhostname: defaults to C{NAME.relaynet.test}.
        @param local_domains: domains delivered locally in mode C{"local"}.
        @param main_cf: extra C{main.cf} settings, applied last.
        @param start_timeout: seconds allowed for startup.
        @param stop_timeout: seconds allowed for shutdown.
        """
        if mode not in self.MODES:
            raise ValueError("mode must be one of %r, not %r" % (self.MODES, mode))
        if mode == "relay" and not relayhost:
            raise ValueError('mode "relay" needs a relayhost')
        _check_loopback(host)
        self.base_dir = Path(base_dir).absolute()
        self.host = host
        self.port = int(port)
        self.relayhost = relayhost
        self.mode = mode
        self.name = name or "postfix-relaynet-%d" % (self.port,)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError("bad instance name %r" % (self.name,))
        self.myhostname = myhostname or "%s.relaynet.test" % (self.name,)
        self.local_domains = list(local_domains)
        self.extra_main_cf = dict(main_cf or {})
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout

        self.config_dir = self.base_dir / "etc"
        self.queue_dir = self.base_dir / "spool"
        self.data_dir = self.base_dir / "data"
        self.log_dir = self.base_dir / "log"
        self.log_path = self.log_dir / "postfix.log"
        self.mail_dir = self.base_dir / "mail"
        self.maildir = self.mail_dir / "Maildir"
        self._master_pid: int | None = None
        self._running = False

    def __repr__(self) -> str:
        return "<PostfixInstance %s %s:%d mode=%s>" % (
            self.name,
            self.host,
            self.port,
            self.mode,
        )

    # Configuration

    def main_cf_settings(self) -> dict[str, str]:
        """
        Compute the C{main.cf} parameters of this instance.

        @return: parameter name to value, in file order.
        """
        postfix_user = pwd.getpwnam("postfix")
        ipv6 = ":" in self.host
        s: dict[str, str] = {
            "compatibility_level": "3.6",
            # Private directories; program directories stay the system ones.
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "multi_instance_name": self.name,
            "syslog_name": self.name,
            # No syslog here: log through postlogd into our own file.  The
            # file must start with one of maillog_file_prefixes.
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.log_dir),
            # Loopback only.  smtpd's address comes from master.cf.
            "inet_interfaces": "loopback-only",
            "inet_protocols": "all" if ipv6 else "ipv4",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            "mynetworks_style": "host",
            # Never ask DNS anything: the resolver here may not be on
            # loopback.  Name everything explicitly.
            "myhostname": self.myhostname,
            "mydomain": "relaynet.test",
            "myorigin": "$myhostname",
            "smtp_dns_support_level": "disabled",
            "lmtp_host_lookup": "native",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "append_dot_mydomain": "no",
            "biff": "no",
            "smtputf8_enable": "no",
            "alias_maps": "",
            "alias_database": "",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            # Retry quickly: peers in tests come and go.
            "queue_run_delay": "5s",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "30s",
            "relayhost": self.relayhost or "",
        }
        if self.mode == "sink":
            s["default_transport"] = "discard:private sink"
        elif self.mode == "local":
            s.update(
                {
                    "virtual_mailbox_domains": " ".join(self.local_domains),
                    "virtual_mailbox_base": str(self.mail_dir),
                    # One Maildir (trailing slash) for every local recipient.
                    "virtual_mailbox_maps": "static:Maildir/",
                    "virtual_uid_maps": "static:%d" % (postfix_user.pw_uid,),
                    "virtual_gid_maps": "static:%d" % (postfix_user.pw_gid,),
                    "virtual_minimum_uid": str(min(100, postfix_user.pw_uid)),
                }
            )
            if not self.relayhost:
                s["default_transport"] = "error:no relayhost for this instance"
        s.update(self.extra_main_cf)
        return s

    def master_cf_text(self) -> str:
        """
        Compute C{master.cf}: smtpd on C{host:port} only, and the internal
        services, none of them chrooted (the private queue directory has no
        chroot tree).

        @return: the file's text.
        """
        listen = "[%s]:%d" % (self.host, self.port) if ":" in self.host else (
            "%s:%d" % (self.host, self.port)
        )
        rows = [
            (listen, "inet", "n", "-", "n", "-", "-", "smtpd"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("proxymap", "unix", "-", "-", "n", "-", "-", "proxymap"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("virtual", "unix", "-", "n", "n", "-", "-", "virtual"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        lines = ["# Generated by harness.peers for %s; do not edit." % (self.name,)]
        lines += ["%-22s %-10s %-3s %-3s %-3s %-6s %-3s %s" % r for r in rows]
        return "\n".join(lines) + "\n"

    def _write_config(self) -> None:
        for d in (self.base_dir, self.config_dir, self.queue_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
            # Postfix insists these are root-owned and not group/other
            # writable, and daemons running as "postfix" must search them.
            os.chown(d, 0, 0)
            os.chmod(d, 0o755)
        main = "".join(
            "%s = %s\n" % (k, v) for k, v in self.main_cf_settings().items()
        )
        header = "# Generated by harness.peers for %s; do not edit.\n" % (self.name,)
        (self.config_dir / "main.cf").write_text(header + main)
        (self.config_dir / "master.cf").write_text(self.master_cf_text())
        for f in ("main.cf", "master.cf"):
            os.chmod(self.config_dir / f, 0o644)
        if self.mode == "local":
            pw = pwd.getpwnam("postfix")
            self.mail_dir.mkdir(parents=True, exist_ok=True)
            os.chown(self.mail_dir, pw.pw_uid, pw.pw_gid)
            os.chmod(self.mail_dir, 0o755)

    def _check_search_permission(self) -> None:
        """
        Make sure the C{postfix} user can reach C{base_dir}.

        Postfix daemons drop to the C{postfix} user and open some files by
        absolute path (the log file, the mailbox directory).  A parent such
        as pytest's C{/tmp/pytest-of-root} (mode 0700) blocks them.

        @raise RuntimeError: naming the first directory that blocks.
        """
        pw = pwd.getpwnam("postfix")
        for d in reversed(self.base_dir.parents):
            st = d.stat()
            if st.st_mode & 0o001:
                continue
            if st.st_uid == pw.pw_uid and st.st_mode & 0o100:
                continue
            if st.st_gid == pw.pw_gid and st.st_mode & 0o010:
                continue
            raise RuntimeError(
                "Postfix daemons (user 'postfix') cannot search %s (mode %o) "
                "to reach %s; see harness.peers.allow_postfix_search"
                % (d, st.st_mode & 0o7777, self.base_dir)
            )

    # Control

    def _postfix(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env["MAIL_CONFIG"] = str(self.config_dir)
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=timeout,
            text=True,
        )

    def log_tail(self, lines: int = 40) -> str:
        """
        @return: the last lines of the instance's log.
        """
        return _tail(self.log_path, lines)

    def master_pid(self) -> int | None:
        """
        @return: the pid recorded by the master process, or L{None}.
        """
        try:
            text = (self.queue_dir / "pid" / "master.pid").read_text()
        except OSError:
            return None
        text = text.strip()
        return int(text) if text.isdigit() else None

    def processes(self) -> list[int]:
        """
        List the live processes of this instance: those whose working
        directory is its queue directory (Postfix's master and all its
        daemons C{chdir} there).

        @return: pids.
        """
        want = str(self.queue_dir)
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cwd = os.readlink("/proc/%s/cwd" % (entry,))
            except OSError:
                continue
            if cwd == want and _pid_alive(int(entry)):
                found.append(int(entry))
        return found

    def start(self) -> None:
        """
        Write the configuration and start the instance; return once smtpd
        greets on C{host:port}.

        @raise PeerUnavailable: if Postfix cannot run on this machine.
        @raise RuntimeError: if it does not come up; the message includes
            the tail of its log.
        """
        reason = postfix_unavailable_reason()
        if reason:
            raise PeerUnavailable(reason)
        self._check_search_permission()
        self._write_config()
        # "postfix start" runs "post-install create-missing" (postfix-script
        # check-fatal), which makes the queue sub-directories and the data
        # directory with the right owners and modes.  Do not run "postfix
        # set-permissions": for an instance that is not listed in the
        # system's multi_instance_directories it would also chown/chmod the
        # shared system files (/usr/sbin/postdrop, ...).
        try:
            result = self._postfix("start", timeout=self.start_timeout)
        except subprocess.TimeoutExpired as e:
            log = self.log_tail()
            self._running = True
            self.stop()
            raise RuntimeError(
                "postfix start timed out for %s:\n%s\n--- log:\n%s"
                % (self, e.output, log)
            ) from None
        self._running = True
        self._master_pid = self.master_pid()
        if result.returncode != 0:
            log = self.log_tail()
            self.stop()
            raise RuntimeError(
                "postfix start failed for %s (exit %d):\n%s\n--- log:\n%s"
                % (self, result.returncode, result.stdout, log)
            )
        try:
            wait_for_smtp(self.host, self.port, timeout=self.start_timeout)
        except TimeoutError as e:
            log = self.log_tail()
            self.stop()
            raise RuntimeError(
                "%s started but smtpd is not answering: %s\n--- log:\n%s"
                % (self, e, log)
            ) from None

    def stop(self) -> None:
        """
        Stop the instance and wait, bounded, until all of its processes are
        gone: C{postfix stop}, then C{postfix abort}, then SIGKILL to this
        instance's own pids.  Safe to call more than once.
        """
        if not self._running:
            return
        pids = set(self.processes())
        master = self.master_pid() or self._master_pid
        if master:
            pids.add(master)
        deadline = time.monotonic() + self.stop_timeout
        for command in ("stop", "abort"):
            try:
                self._postfix(command, timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            if self._wait_gone(pids, deadline):
                break
        else:
            for pid in pids | set(self.processes()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._wait_gone(pids, time.monotonic() + 5.0)
        self._running = False

    def _wait_gone(self, pids: set[int], deadline: float) -> bool:
        while True:
            alive = [p for p in pids if _pid_alive(p)] or self.processes()
            if not alive:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)

    def __enter__(self) -> "PostfixInstance":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # Observation

    def queue_count(self) -> int:
        """
        Count messages still queued: files under C{maildrop}, C{incoming},
        C{active} and C{deferred} (which is hashed into sub-directories).

        @return: the number of queue files.
        """
        n = 0
        for sub in _QUEUE_SUBDIRS:
            for _dirpath, _dirs, files in os.walk(self.queue_dir / sub):
                n += len(files)
        return n

    def delivered_count(self) -> int:
        """
        Count messages delivered into L{maildir} (mode C{"local"}).

        @return: files in C{Maildir/new} and C{Maildir/cur}.
        """
        n = 0
        for sub in ("new", "cur"):
            try:
                n += len(os.listdir(self.maildir / sub))
            except FileNotFoundError:
                pass
        return n

    def wait_queue_empty(self, timeout: float = 60.0) -> float:
        """
        Poll until L{queue_count} is zero.

        @return: seconds waited.
        @raise TimeoutError: if the queue is not empty in time.
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            n = self.queue_count()
            if n == 0:
                return time.monotonic() - start
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    "%s still has %d queued messages after %.1fs; log:\n%s"
                    % (self, n, timeout, self.log_tail())
                )
            time.sleep(_POLL_INTERVAL)


class SmtpSink:
    """
    Postfix's C{smtp-sink}: an SMTP server that accepts and throws away
    every message, on a loopback port.

    It runs with C{-c}, which prints running counters (C{sess=N quit=N
    mesg=N}, one update per line ending in CR) to stdout; stdout goes to a
    file and L{received} parses the last C{mesg=} value.  Optionally (C{dump=
    True}) it also writes every message to its own file in L{dump_dir}
    (C{-d}), which costs disk time.

    @ivar host: the listening address.
    @ivar port: the listening port.
    @ivar dump_dir: where C{dump=True} writes messages.
    """

    def __init__(
        self,
        base_dir: Path | str,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        dump: bool = False,
        hostname: str = "sink.relaynet.test",
        backlog: int = 256,
        max_concurrency: int = 256,
        user: str | None = None,
        extra_args: Iterable[str] = (),
        start_timeout: float = 15.0,
    ):
        """
        @param base_dir: directory for its counter output and dumps.
        @param port: listening port; a free one by default.
        @param host: a literal loopback address.
        @param dump: also write each message to a file (C{-d}).
        @param hostname: the greeting name (C{-h}).
        @param backlog: listen(2) backlog.
        @param max_concurrency: C{-m}, simultaneous connections.
        @param user: C{-u}, required when running as root: it switches to
            that user after binding.  Defaults to C{root} when we are root
            (so dumps may be written under a directory only root can
            reach), and is omitted otherwise.
        @param extra_args: more smtp-sink options, e.g. C{["-w", "1"]}.
        @param start_timeout: seconds allowed until it greets.
        """
        _check_loopback(host)
        self.base_dir = Path(base_dir).absolute()
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.dump = dump
        self.hostname = hostname
        self.backlog = backlog
        self.max_concurrency = max_concurrency
        self.user = user if user is not None else ("root" if os.geteuid() == 0 else None)
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.dump_dir = self.base_dir / "dump"
        self.counter_path = self.base_dir / "counters.txt"
        self.stderr_path = self.base_dir / "stderr.txt"
        self.process: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return "<SmtpSink %s:%d>" % (self.host, self.port)

    def command(self) -> list[str]:
        """
        @return: the C{smtp-sink} command line.
        """
        cmd = [SMTP_SINK, "-c", "-h", self.hostname, "-m", str(self.max_concurrency)]
        if self.user:
            cmd += ["-u", self.user]
        if self.dump:
            # Template: DIR/msg. + pseudo-random hex suffix per message.
            cmd += ["-d", str(self.dump_dir) + "/msg."]
        cmd += self.extra_args
        addr = "[%s]" % (self.host,) if ":" in self.host else self.host
        cmd += ["inet:%s:%d" % (addr, self.port), str(self.backlog)]
        return cmd

    def start(self) -> None:
        """
        Start C{smtp-sink} and return once it greets.

        @raise PeerUnavailable: if C{smtp-sink} is not installed.
        @raise RuntimeError: if it does not come up.
        """
        missing = missing_binaries([SMTP_SINK])
        if missing:
            raise PeerUnavailable("smtp-sink not installed (%s); apt-get install postfix" % missing[0])
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.dump:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
        with open(self.counter_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    "smtp-sink exited with %s: %s"
                    % (self.process.returncode, _tail(self.stderr_path))
                )
            try:
                wait_for_smtp(self.host, self.port, timeout=0.5)
                break
            except TimeoutError:
                if time.monotonic() >= deadline:
                    self.stop()
                    raise RuntimeError(
                        "smtp-sink did not greet on %s:%d: %s"
                        % (self.host, self.port, _tail(self.stderr_path))
                    ) from None
        # wait_for_smtp's own probe counts as a session, never a message.

    def stop(self, timeout: float = 10.0) -> None:
        """
        Terminate C{smtp-sink} (SIGTERM, then SIGKILL), bounded.
        """
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)

    def __enter__(self) -> "SmtpSink":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def received(self) -> int:
        """
        @return: how many messages (end of DATA) the sink has received.
        """
        try:
            with open(self.counter_path, "rb") as f:
                # Only the last update matters; the file grows by one line
                # (CR-terminated) per event.
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 256))
                data = f.read()
        except FileNotFoundError:
            return 0
        counts = re.findall(rb"mesg=(\d+)", data)
        return int(counts[-1]) if counts else 0

    def dumped(self) -> list[Path]:
        """
        @return: the per-message dump files (with C{dump=True}).
        """
        try:
            return sorted(self.dump_dir.iterdir())
        except FileNotFoundError:
            return []

    def wait_received(self, count: int, timeout: float = 60.0) -> float:
        """
        Poll until at least C{count} messages were received.

        @return: seconds waited.
        @raise TimeoutError: if fewer arrived in time.
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            n = self.received()
            if n >= count:
                return time.monotonic() - start
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    "%r received %d of %d messages in %.1fs" % (self, n, count, timeout)
                )
            time.sleep(_POLL_INTERVAL)


def run_smtp_source(
    host: str,
    port: int,
    *,
    messages: int,
    sessions: int,
    size: int,
    recipients: int = 1,
    sender: str = "bench@localhost",
    recipient: str = "user@localhost",
    helo: str = "source.relaynet.test",
    reuse_connection: bool = False,
    unique_recipients: bool = False,
    timeout: float = 600,
) -> dict:
    """
    Send mail with Postfix's C{smtp-source} and time it by wall clock.

    The command is C{smtp-source -s SESSIONS -m MESSAGES -l SIZE -r
    RECIPIENTS -f SENDER -t RECIPIENT -M HELO [-d] [-N] HOST:PORT}.
    C{-m} is the total over all sessions.  Without C{-d} every message gets
    its own connection.  C{smtp-source} stops at the first unexpected reply
    and exits non-zero.

    @param host: a literal loopback address.
    @param port: the server's port.
    @param messages: total messages (C{-m}).
    @param sessions: parallel sessions (C{-s}).
    @param size: payload bytes per message, headers excluded (C{-l}).
    @param recipients: recipients per transaction (C{-r}).
    @param sender: envelope sender (C{-f}).
    @param recipient: envelope recipient (C{-t}).
    @param helo: HELO name (C{-M}); given so nothing resolves our hostname.
    @param reuse_connection: send all of a session's messages over one
        connection (C{-d}).
    @param unique_recipients: prefix a sequence number to each recipient
        (C{-N}).
    @param timeout: seconds before it is killed.
    @return: C{{"messages", "seconds", "rate", "sessions", "size",
        "command"}}; C{rate} is messages per second.
    @raise SmtpSourceError: on a non-zero exit, a timeout, or an error
        printed by smtp-source.
    @raise PeerUnavailable: if C{smtp-source} is not installed.
    """
    _check_loopback(host)
    missing = missing_binaries([SMTP_SOURCE])
    if missing:
        raise PeerUnavailable("smtp-source not installed (%s); apt-get install postfix" % missing[0])
    addr = "[%s]" % (host,) if ":" in host else host
    cmd = [
        SMTP_SOURCE,
        "-s", str(sessions),
        "-m", str(messages),
        "-l", str(size),
        "-r", str(recipients),
        "-f", sender,
        "-t", recipient,
        "-M", helo,
    ]
    if reuse_connection:
        cmd.append("-d")
    if unique_recipients:
        cmd.append("-N")
    cmd.append("inet:%s:%d" % (addr, port))
    start = time.perf_counter()
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        output = (e.output or b"").decode("utf-8", "replace")
        raise SmtpSourceError(
            "smtp-source timed out after %ss: %s\n%s" % (timeout, " ".join(cmd), output[-2000:]),
            None,
            output,
        ) from None
    seconds = time.perf_counter() - start
    output = result.stdout.decode("utf-8", "replace")
    problems = [
        line for line in output.splitlines() if re.search(r"\b(fatal|error|warning):", line)
    ]
    if result.returncode != 0 or problems:
        raise SmtpSourceError(
            "smtp-source failed (exit %d): %s\n%s"
            % (result.returncode, " ".join(cmd), output[-2000:]),
            result.returncode,
            output,
        )
    return {
        "messages": messages,
        "seconds": seconds,
        "rate": messages / seconds if seconds > 0 else float("inf"),
        "sessions": sessions,
        "size": size,
        "command": cmd,
    }
