"""
Memory (PSS) and CPU time of the processes of a node, from C{/proc}.

A I{node} is one relaynet process tree (the C{twistd relaynet} process and,
with C{[node] workers} above 1, the worker processes it supervises), or one
Postfix instance: its C{master} and every process C{master} started (smtpd,
cleanup, qmgr, smtp, postlogd, anvil, trivial-rewrite, ...).

CPU: for a relaynet node, C{utime + stime + cutime + cstime} from
C{/proc/PID/stat} of the root and of every live descendant (all their
threads, and any reaped children: a worker that exits moves its time into
the supervisor's C{cutime/cstime}).  For a Postfix
instance, summed over the master and its live children: each process's own
run time (exactly, from C{/proc/PID/schedstat}: Postfix daemons are
single-threaded and short-lived, and C{stat} would lose up to a 10 ms tick
for each) plus its C{cutime + cstime}, the CPU of its children that have
exited and been reaped.  So a daemon that exits during a run is still
counted: the master reaps it and its time moves into the master's
C{cutime/cstime}.  Only the difference between two readings is meaningful.

Memory: C{Pss} from C{/proc/PID/smaps_rollup} (proportional set size: each
shared page divided among the processes mapping it), summed over the node's
live processes; L{PeakSampler} samples it in a thread and keeps the peak.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Mapping

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat(pid: int) -> tuple[int, str, int, int] | None:
    """
    @return: C{(ppid, state, own ticks, reaped children's ticks)} or L{None}
        when the process is gone.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    fields = data[data.rfind(b")") + 2:].split()
    try:
        state = fields[0].decode()
        ppid = int(fields[1])
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    except (IndexError, ValueError):
        return None
    return ppid, state, utime + stime, cutime + cstime


def runtime_ns(pid: int) -> int | None:
    """
    @return: nanoseconds C{pid}'s main thread has run (C{/proc/PID/schedstat},
        first field), or L{None}.  Exact, where C{/proc/PID/stat} counts
        whole clock ticks (10 ms), which loses up to a tick per process.
    """
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def process_table() -> dict[int, tuple[int, str, int, int]]:
    """
    @return: pid to L{read_stat} for every process now.
    """
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                table[int(entry)] = st
    return table


def descendants(root: int, table: Mapping[int, tuple]) -> list[int]:
    """
    @param table: a L{process_table}.
    @return: the pids of every live descendant of C{root} (children,
        grandchildren, ...), found by their parent pids, parents first.
    """
    children: dict[int, list[int]] = {}
    for pid, st in table.items():
        children.setdefault(st[0], []).append(pid)
    out: list[int] = []
    todo = [root]
    while todo:
        kids = sorted(children.get(todo.pop(0), ()))
        out.extend(kids)
        todo.extend(kids)
    return out


def tree_pids(root: int) -> list[int]:
    """@return: C{root} and its live descendants (see L{descendants})."""
    return [root] + descendants(root, process_table())


def tree_status_kb(root: int | None, field: str) -> int | None:
    """
    @return: a kB field of C{/proc/PID/status} summed over C{root} and its
        live descendants (a relaynet supervisor and its workers), or L{None}
        when C{root} is gone.  For C{VmHWM} the sum of the processes' peaks
        is an upper bound of the peak of their sum.
    """
    if root is None:
        return None
    values = [status_kb(pid, field) for pid in tree_pids(root)]
    if values[0] is None:
        return None
    return sum(v for v in values if v is not None)


def _kb_field(path: str, name: str) -> int | None:
    """The kB figure of the line C{name:} of a C{/proc} file, or L{None}."""
    prefix = name.encode() + b":"
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(prefix):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pss_kb(pid: int) -> int | None:
    """
    @return: the C{Pss} of C{pid} in kB, or L{None} (gone, or a zombie).
    """
    return _kb_field(f"/proc/{pid}/smaps_rollup", "Pss")


def status_kb(pid: int, field: str) -> int | None:
    """@return: a kB field of C{/proc/PID/status} (C{VmRSS}, C{VmHWM}), or L{None}."""
    return _kb_field(f"/proc/{pid}/status", field)


def vm_hwm_kb(pid: int) -> int | None:
    """
    @return: C{VmHWM} (peak RSS since start) of C{pid} in kB.
    """
    return status_kb(pid, "VmHWM")


class NodeProbe:
    """
    The processes of one node: a root pid (the relaynet process or the
    Postfix master) and, with C{children=True}, the processes it started;
    with C{tree=True}, every descendant (a relaynet supervisor's workers).
    """

    def __init__(self, root: Callable[[], int | None], children: bool, tree: bool = False):
        """
        @param root: returns the root pid now (or L{None}).
        @param children: also count the root's child processes; then every
            process is taken to be single-threaded (Postfix's are), and its
            own time is read exactly from C{schedstat}.
        @param tree: instead, count the root and all its descendants, each
            possibly multi-threaded (relaynet's supervisor and workers): CPU
            from C{/proc/PID/stat}, which covers every thread.
        """
        self._root = root
        self.children = children or tree
        self.tree = tree

    def pids(self, table: Mapping[int, tuple] | None = None) -> list[int]:
        root = self._root()
        if root is None:
            return []
        if not self.children:
            return [root]
        table = table if table is not None else process_table()
        if self.tree:
            return [root] + descendants(root, table)
        return [root] + [p for p, st in table.items() if st[0] == root]

    def cpu_seconds(self, table: Mapping[int, tuple] | None = None) -> float | None:
        """
        @return: CPU seconds used so far by the node (see the module docstring).
        """
        root = self._root()
        if root is None:
            return None
        table = table if table is not None else (process_table() if self.children else {})
        st = table.get(root) or read_stat(root)
        if st is None:
            return None
        if not self.children:
            # One (multi-threaded) process: stat's utime+stime cover all threads.
            return (st[2] + st[3]) / CLK_TCK
        if self.tree:
            # Multi-threaded processes: stat's ticks, own and reaped children's.
            return sum(
                (s[2] + s[3]) / CLK_TCK
                for s in [st] + [table[p] for p in descendants(root, table) if p in table]
            )
        return sum(
            _own_seconds(pid, s) + s[3] / CLK_TCK
            for pid, s in [(root, st)] + [(p, s) for p, s in table.items() if s[0] == root]
        )

    def pss_kb(self, table: Mapping[int, tuple] | None = None) -> int:
        return sum(v for v in (pss_kb(p) for p in self.pids(table)) if v is not None)


def _own_seconds(pid: int, st: tuple) -> float:
    ns = runtime_ns(pid)
    return ns / 1e9 if ns is not None else st[2] / CLK_TCK


def cpu_of(probes: Mapping[str, NodeProbe]) -> dict[str, float | None]:
    """
    @return: node name to CPU seconds so far, from one scan of C{/proc}.
    """
    table = process_table() if any(p.children for p in probes.values()) else {}
    return {name: probe.cpu_seconds(table) for name, probe in probes.items()}


class PeakSampler:
    """
    Sample the PSS of some nodes every C{interval} seconds in a thread, and
    keep the peaks: per node, and of their sum. With C{interval=None}, only
    at the start and at the end: a sample reads C{smaps_rollup} of every
    process (the kernel walks its page tables) and the process table, a
    burst of CPU on the machine under test that runs that often.
    """

    def __init__(self, probes: Mapping[str, NodeProbe], interval: float | None = 0.5, max_seconds: float = 7200):
        self.probes = dict(probes)
        self.interval = interval
        self.max_seconds = max_seconds
        self.peak_total_kb = 0
        self.peak_kb: dict[str, int] = {name: 0 for name in probes}
        self.peak_processes: dict[str, int] = {name: 0 for name in probes}
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        need_table = any(p.children for p in self.probes.values())
        table = process_table() if need_table else None
        total = 0
        for name, probe in self.probes.items():
            pids = probe.pids(table)
            kb = sum(v for v in (pss_kb(p) for p in pids) if v is not None)
            total += kb
            self.peak_kb[name] = max(self.peak_kb[name], kb)
            self.peak_processes[name] = max(self.peak_processes[name], len(pids))
        self.peak_total_kb = max(self.peak_total_kb, total)
        self.samples += 1

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.sample()
            except Exception:  # a sampling hiccup must not kill the bench
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        if self.interval is None:
            self.sample()
            return self
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.sample()  # one last sample at the end of the run
        except Exception:
            pass

    def result(self) -> dict:
        return {
            "peak_total_kb": self.peak_total_kb,
            "peak_kb": dict(self.peak_kb),
            "peak_processes": dict(self.peak_processes),
            "samples": self.samples,
        }
