# -*- test-case-name: tests.test_lab -*-
"""
Network namespaces for C{relaynet lab up --netns}: each node gets a namespace
of its own, and every pair of nodes that route to each other is joined by a
veth link, so that C{lab chaos --links} can cut a link for real.

Addresses: each node listens on 127.0.0.1 inside its namespace (reached by
the lab's own commands, which enter the namespace) and on its end of each of
its links: one /30 of 198.18.0.0/15 (the RFC 2544 benchmarking range) per
link. These addresses exist only inside namespaces the lab creates; nothing
is added to the host's own network namespace.

Needs Linux, root and iproute2's C{ip}. Every command is bounded by a
timeout; L{teardown} deletes the namespaces (and with them the veths).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from typing import Any, Callable, Mapping, Sequence, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT = 10.0


class NetnsError(Exception):
    """A namespace operation failed or is not possible here."""


def unavailable_reason() -> str | None:
    """
    Why namespaces cannot be used here, or L{None} when they can.
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or use the loopback mode without --netns)"
    if shutil.which("ip") is None:
        return "iproute2's 'ip' command is not installed (apt-get install iproute2)"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces (/proc/self/ns/net is missing)"
    return None


def ns_name(lab_dir: str, node: str) -> str:
    """The namespace of C{node} in the lab at C{lab_dir}: C{rn-<hash>-<node>}."""
    digest = hashlib.sha1(lab_dir.encode()).hexdigest()[:6]
    return f"rn-{digest}-{node}"


def link_ifname(index: int, peer: str) -> str:
    """The name of a link's veth end, inside the namespace of the node at that end."""
    return f"v{index}-{peer}"[:15]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """
    Run C{ip ARGS} with a timeout.

    @raise NetnsError: it failed (with C{check}) or timed out.
    """
    cmd = ["ip", *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(cmd)}: timed out after {COMMAND_TIMEOUT:.0f}s") from None
    except OSError as e:
        raise NetnsError(f"{' '.join(cmd)}: {e}") from None
    if check and res.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {res.stderr.strip() or 'exit status %d' % res.returncode}")
    return res


def existing() -> set[str]:
    """Names of the namespaces that exist now."""
    res = ip("netns", "list", check=False)
    return {line.split()[0] for line in res.stdout.splitlines() if line.strip()}


def setup(namespaces: Mapping[str, str], links: Sequence[Mapping[str, Any]]) -> None:
    """
    Create one namespace per node and the veth links between them.

    @param namespaces: node -> namespace name.
    @param links: C{{"a", "b", "if_a", "if_b", "addr_a", "addr_b"}} per link.
    @raise NetnsError: on any failure (what was created is removed again).
    """
    have = existing()
    clash = sorted(set(namespaces.values()) & have)
    if clash:
        raise NetnsError(f"namespace(s) already exist: {', '.join(clash)} (is the lab up? try 'lab down')")
    try:
        for ns in namespaces.values():
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        for link in links:
            ns_a, ns_b = namespaces[link["a"]], namespaces[link["b"]]
            ip("link", "add", link["if_a"], "netns", ns_a, "type", "veth",
               "peer", "name", link["if_b"], "netns", ns_b)
            ip("-n", ns_a, "addr", "add", f"{link['addr_a']}/30", "dev", link["if_a"])
            ip("-n", ns_b, "addr", "add", f"{link['addr_b']}/30", "dev", link["if_b"])
            ip("-n", ns_a, "link", "set", link["if_a"], "up")
            ip("-n", ns_b, "link", "set", link["if_b"], "up")
    except NetnsError:
        teardown(namespaces.values())
        raise


def teardown(namespaces: Any) -> list[str]:
    """
    Delete the namespaces (their veths go with them).

    @return: problems met (empty when all went).
    """
    problems = []
    have = existing()
    for ns in namespaces:
        if ns in have:
            res = ip("netns", "del", ns, check=False)
            if res.returncode != 0:
                problems.append(f"ip netns del {ns}: {res.stderr.strip()}")
    return problems


def set_link(namespaces: Mapping[str, str], link: Mapping[str, Any], up: bool) -> None:
    """Bring both ends of a link up or down."""
    state = "up" if up else "down"
    ip("-n", namespaces[link["a"]], "link", "set", link["if_a"], state)
    ip("-n", namespaces[link["b"]], "link", "set", link["if_b"], state)


def command_prefix(ns: str) -> list[str]:
    """Prefix a command with this to run it inside namespace C{ns}."""
    return ["ip", "netns", "exec", ns]


def _setns(ns: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def enter(ns: str | None) -> None:
    """
    Move the calling thread into network namespace C{ns} (no-op for L{None}).

    Only the calling thread moves; call it first thing in a thread of its own.
    """
    if ns:
        _setns(ns)


def run_in(ns: str | None, fn: Callable[[], T], timeout: float = 60.0) -> T:
    """
    Call C{fn} in a new thread that entered namespace C{ns}, and return its
    result (re-raising its exception). With C{ns} L{None}, call it here.
    """
    if not ns:
        return fn()
    values: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            enter(ns)
            values.append(fn())
        except BaseException as e:  # handed to the caller
            errors.append(e)

    t = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise NetnsError(f"operation inside {ns} did not finish within {timeout:.0f}s")
    if errors:
        raise errors[0]
    return values[0]
