"""
The two systems under test, each as a chain of N hops on loopback:

  - L{PostfixChain}: N private Postfix instances (L{harness.peers.PostfixInstance},
    mode C{relay}, defaults untouched), each one's C{relayhost} the next;
  - L{RelaynetChain}: N relaynet nodes (C{twistd -n --pidfile= relaynet
    --config X}), each with a C{[[route]] domains = ["*"]} relay route to
    the next.

The last hop of each chain relays C{@sink.test} to its own C{smtp-sink} and
C{@stamp.test} to its own timestamping sink (L{stampsink}); every other hop
relays everything to the next hop.  So both systems do the same work: accept
durably, then forward over SMTP, hop after hop, to a sink that discards.

With C{next_hop_down=True} (the C{hopdown} scenario) a one-hop chain's next
hop is a loopback port nobody listens on instead: its mail stays queued.

With C{dkim_keys} (the C{dkim} scenario) a relaynet chain's last hop signs
what it sends (C{[dkim] sign = true}) with keys made by C{relaynet dkim
keygen} in the chain's directory, for L{DKIM_DOMAIN}: the domain of the
From: field C{smtp-source} writes (C{From: <SENDER>}, from its C{-f}) when
the sender is L{DKIM_SENDER}.
"""

from __future__ import annotations

import argparse
import compileall
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.procstat import NodeProbe, process_table, tree_pids, tree_status_kb
from bench.stampsink import StampSink
from harness.nodeproc import relaynet_command
from harness.peers import PostfixInstance, SmtpSink, free_port, relayhost_for, wait_for_smtp
from relaynet.admin.queuecli import AdminClient, AdminError
from relaynet.config import default_admin_endpoint, shard_queue_dirs

REPO = Path(__file__).resolve().parent.parent
SINK_DOMAIN = "sink.test"
STAMP_DOMAIN = "stamp.test"
HOST = "127.0.0.1"
SENDER = "bench@localhost"
"""The envelope sender (and, through C{smtp-source}, the From:) of every scenario but C{dkim}."""
DKIM_DOMAIN = "bench.relaynet.test"
DKIM_SENDER = f"bench@{DKIM_DOMAIN}"
"""The C{dkim} scenario's sender: C{smtp-source -f} also writes it as C{From: <...>}."""
DKIM_SELECTORS = {"rsa": "rsa1", "ed25519": "ed1"}
DKIM_KEY_SETS = {"rsa": ("rsa",), "ed25519": ("ed25519",), "both": ("rsa", "ed25519")}
"""C{--dkim-keys}: the algorithms of the keys of the signing node (C{both}: dual signing)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e})"


def _wait(predicate, timeout: float, what: str, interval: float = 0.05) -> float:
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


@functools.cache
def compile_relaynet() -> None:
    """
    Compile the bytecode of the code the nodes run (relaynet/ and the twistd
    plugin) once per bench, as an installed package has it (pip compiles on
    install). Otherwise, where C{PYTHONDONTWRITEBYTECODE} is set (some CI
    images and sandboxes), every node start compiled every module from source
    again: 0.3 s more CPU per start, and about 4 MiB more PSS per node (the
    compiler's freed memory stays in the heap), which the memory row counted.
    """
    for sub in ("relaynet", "twisted"):
        compileall.compile_dir(str(REPO / sub), quiet=2, workers=0)


class Chain:
    """
    A system under test: C{hops} nodes in a row, then two sinks.

    @ivar name: C{"postfix"} or C{"relaynet"}.
    @ivar entry_port: where the first hop listens (on 127.0.0.1).
    @ivar sink: the C{smtp-sink} for C{user@sink.test}.
    @ivar stamp: the timestamping sink for C{user@stamp.test}.
    """

    name = "?"

    def __init__(self, workdir: Path, hops: int, next_hop_down: bool = False, tag: str = "",
                 sender: str = SENDER):
        """
        @param next_hop_down: the last hop's next hop is a loopback port
            nobody listens on (one free now), not the sinks: every message
            stays queued, deferred.
        @param tag: appended to the chain's directory (and Postfix instance
            names), to run two chains of one system side by side.
        @param sender: the envelope sender the load generators use with this
            chain (C{smtp-source} also writes it as the From: field).
        """
        self.sender = sender
        self.hops = hops
        self.next_hop_down = next_hop_down
        self.tag = tag
        self.workdir = workdir / f"{self.name}-{hops}hop{tag}"
        self.sink = SmtpSink(self.workdir / "smtp-sink")
        self.stamp = StampSink(self.workdir / "stampsink", free_port(HOST))
        self.entry_port = 0

    def start_sinks(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sink.start()
        self.stamp.start()

    def stop_sinks(self) -> None:
        try:
            self.sink.stop()
        finally:
            self.stamp.stop()

    def probes(self) -> dict[str, NodeProbe]:
        raise NotImplementedError

    def queued(self) -> int:
        """Messages still queued on any hop."""
        raise NotImplementedError

    def wait_idle(self, timeout: float) -> float:
        """
        Wait until no hop holds mail; @return: seconds waited.  With the next
        hop down the mail stays: nothing to wait for.
        """
        if self.next_hop_down:
            return 0.0
        return _wait(lambda: self.queued() == 0, timeout, f"{self.name} queues empty")

    def last_relay_port(self) -> tuple[int, int]:
        """
        @return: where the last hop sends C{@sink.test} mail and C{@stamp.test}
            mail: the sinks' ports, or with the next hop down one port nobody
            listens on for both.
        """
        if self.next_hop_down:
            dead = free_port(HOST)
            return dead, dead
        return self.sink.port, self.stamp.port

    def check_alive(self) -> None:
        pass

    def restart_dead(self) -> list[str]:
        """
        Start again the nodes that are not running; @return: their names
        (none: this chain cannot, the caller gives up).
        """
        return []

    def hwm_kb(self) -> dict[str, int | None]:
        return {}

    def event_counts(self, names: tuple[str, ...]) -> dict[str, int]:
        """How many events of each of C{names} the hops have logged so far (none here)."""
        return {name: 0 for name in names}


class PostfixChain(Chain):
    name = "postfix"

    def __init__(self, workdir: Path, hops: int, next_hop_down: bool = False, tag: str = "",
                 main_cf: dict[str, str] | None = None, sender: str = SENDER):
        """
        @param main_cf: more C{main.cf} settings for every instance.
        """
        super().__init__(workdir, hops, next_hop_down, tag, sender)
        self.instances: list[PostfixInstance] = []
        self.main_cf = dict(main_cf or {})

    def start(self) -> None:
        self.start_sinks()
        try:
            ports = [free_port(HOST) for _ in range(self.hops)]
            sink_port, stamp_port = self.last_relay_port()
            # Start from the last hop, so each next hop is up first.
            for i in reversed(range(self.hops)):
                extra = dict(self.main_cf)
                if i == self.hops - 1:
                    relayhost = relayhost_for(HOST, sink_port)
                    # The same routing as relaynet's last hop: stamp.test to
                    # the timestamping sink, everything else to smtp-sink.
                    extra["transport_maps"] = (
                        "inline:{ %s=smtp:%s }" % (STAMP_DOMAIN, relayhost_for(HOST, stamp_port))
                    )
                else:
                    relayhost = relayhost_for(HOST, ports[i + 1])
                inst = PostfixInstance(
                    self.workdir / f"pf{i + 1}",
                    port=ports[i],
                    mode="relay",
                    relayhost=relayhost,
                    name=f"rnbench{os.getpid()}-{self.hops}h{i + 1}{self.tag}",
                    main_cf=extra,
                )
                inst.start()
                self.instances.insert(0, inst)
            self.entry_port = ports[0]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            for inst in self.instances:
                try:
                    inst.stop()
                except Exception as e:  # keep stopping the others
                    log(f"postfix: stopping {inst}: {e}")
        finally:
            self.stop_sinks()

    def probes(self) -> dict[str, NodeProbe]:
        return {
            f"pf{i + 1}": NodeProbe(inst.master_pid, children=True)
            for i, inst in enumerate(self.instances)
        }

    def queued(self) -> int:
        return sum(inst.queue_count() for inst in self.instances)

    def check_alive(self) -> None:
        for inst in self.instances:
            if inst.master_pid() is None:
                raise RuntimeError(f"{inst} has no master:\n{inst.log_tail()}")

    def describe(self) -> dict:
        version = subprocess.run(
            ["/usr/sbin/postconf", "-d", "-h", "mail_version"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()
        return {
            "postfix_version": version,
            "hops": self.hops,
            "next_hop_down": self.next_hop_down,
            "main_cf_last_hop": self.instances[-1].main_cf_settings() if self.instances else None,
            "master_cf": self.instances[0].master_cf_text() if self.instances else None,
        }


NODE_CONFIG = """\
# relaynet bench node {name}: written by bench/systems.py
[node]
name = "{name}"
hostname = "{name}.bench.relaynet.test"
spool = "{spool}"
{workers_line}
[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1{listen_options}"
mode = "relay"
reuse_port = {reuse_port}

{routes}
[queue]
{queue_settings}
{dkim}
[outbound]
connect_timeout = 5
helo_timeout = 30
mail_timeout = 30
rcpt_timeout = 30
data_timeout = 30
data_block_timeout = 60
data_done_timeout = 60
"""

QUEUE_SETTINGS = """\
delay_warning = 0
minimal_backoff = 5
maximal_backoff = 30"""

# The hopdown scenario's nodes, next hop up or down alike: retries far apart
# (relaynet's and Postfix's default backoffs), so that what a run measures is
# the cost of taking mail for a hop that is down, not the retrying of the
# mail earlier runs left queued.
HOPDOWN_QUEUE_SETTINGS = """\
delay_warning = 0
minimal_backoff = 300
maximal_backoff = 4000"""
HOPDOWN_POSTFIX = {"queue_run_delay": "300s", "minimal_backoff_time": "300s",
                   "maximal_backoff_time": "4000s"}

ROUTE = """\
[[route]]
domains = [{domains}]
action = "relay"
next_hops = ["tcp:127.0.0.1:{port}"]
"""


def make_dkim_keys(directory: Path, algorithms: tuple[str, ...], domain: str = DKIM_DOMAIN,
                   timeout: float = 120.0) -> list[tuple[str, str, Path]]:
    """
    Make a key for C{domain} per algorithm in C{algorithms} (C{"rsa"}:
    RSA-2048, C{"ed25519"}), with the real C{relaynet dkim keygen DOMAIN
    SELECTOR --out PATH [--algorithm ed25519]}, in C{directory}; a key
    already there (a chain started again) is kept.

    @return: C{(domain, selector, absolute key path)} per key.
    @raise RuntimeError: the command failed (its output is in the message).
    """
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for algorithm in algorithms:
        selector = DKIM_SELECTORS[algorithm]
        path = directory / f"{domain}.{selector}.key"
        if not path.exists():
            cmd = [*relaynet_command(), "dkim", "keygen", domain, selector, "--out", str(path)]
            if algorithm != "rsa":
                cmd += ["--algorithm", algorithm]
            proc = subprocess.run(cmd, cwd=directory, capture_output=True, text=True, timeout=timeout, check=False)
            if proc.returncode != 0 or not path.exists():
                raise RuntimeError(f"{shlex.join(cmd)}: exit {proc.returncode}: {proc.stdout}{proc.stderr}")
        keys.append((domain, selector, path))
    return keys


def dkim_config(keys: list[tuple[str, str, Path]]) -> str:
    """The C{[dkim]} table of a signing node: C{sign = true} and one C{[[dkim.keys]]} per key."""
    if not keys:
        return ""
    lines = ["[dkim]", "sign = true"]
    for domain, selector, path in keys:
        lines += ["", "[[dkim.keys]]", f"domain = {json.dumps(domain)}", f"selector = {json.dumps(selector)}",
                  f"key_file = {json.dumps(str(path))}"]
    return "\n" + "\n".join(lines) + "\n"


class EventTally:
    """
    Counts events by name in a node's C{<spool>/events.jsonl}, reading only
    what was appended since the last call (whole lines; the workers of a
    node append to the same file).
    """

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.counts: dict[str, int] = {}

    def update(self) -> dict[str, int]:
        """Read the new lines; @return: the counts so far, by event name."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.counts
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            try:
                event = json.loads(line).get("event")
            except (ValueError, AttributeError):
                continue
            if isinstance(event, str):
                self.counts[event] = self.counts.get(event, 0) + 1
        self.offset += end
        return self.counts


def workers_setting(value: int | str | None) -> str:
    """
    The C{[node] workers} line of a node config for C{value}: C{N},
    C{"auto"}, or nothing (L{None}: the node's default).
    """
    if value is None:
        return ""
    if value == "auto":
        return 'workers = "auto"\n'
    if isinstance(value, int) and value >= 1:
        return f"workers = {value}\n"
    raise ValueError(f"workers: a positive integer or 'auto', not {value!r}")


def parse_workers(text: str, p: "argparse.ArgumentParser | None" = None) -> int | str:
    """
    C{--workers}: C{"auto"} or a positive count.

    @raise SystemExit: through C{p.error} (or L{ValueError} without C{p}) otherwise.
    """
    value: int | str = text.strip().lower()
    if value != "auto":
        try:
            value = int(value)
        except ValueError:
            value = 0
    try:
        workers_setting(value)
    except ValueError:
        if p is None:
            raise
        p.error(f"--workers: a positive integer or 'auto', not {text!r}")
    return value


def usable_cpus() -> int:
    """The CPUs this process may run on: what C{workers = "auto"} means."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def queue_dirs(spool: Path) -> list[Path]:
    """
    The C{new} directories of a node's queues: C{SPOOL/queue/new} (a node
    without workers, or worker 0's shard) and C{SPOOL/queue.K/new} (worker
    K's shard; C{relaynet.config.shard_queue_dir}).  Lists the spool only,
    never a C{new} directory itself (it may hold 1,000,000 files).
    """
    return [q / "new" for q in shard_queue_dirs(spool).values() if (q / "new").is_dir()]


class RelaynetNode:
    """One C{twistd -n relaynet} node: one process, or a supervisor and its workers."""

    def __init__(
        self, base: Path, name: str, port: int, routes: str, backlog: int | None = None,
        queue_settings: str = QUEUE_SETTINGS, reuse_port: bool = False,
        workers: int | str | None = None, dkim: str = "",
    ):
        """
        @param workers: C{[node] workers}: a count, C{"auto"}, or L{None}
            for the node's default (no line written).
        @param dkim: the node's C{[dkim]} table (L{dkim_config}), or nothing.
        """
        self.dkim = dkim
        workers_setting(workers)  # refuse a bad value before anything starts
        self.workers = workers
        self.queue_settings = queue_settings
        self.reuse_port = reuse_port
        self.base = base
        self.backlog = backlog
        self.name = name
        self.port = port
        self.spool = base / "spool"
        self.config = base / "node.toml"
        self.log_path = base / "node.log"
        self.routes = routes
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.events = EventTally(self.spool / "events.jsonl")

    def config_text(self) -> str:
        """The node's config file, as L{start} writes it."""
        return NODE_CONFIG.format(
            name=self.name, spool=self.spool, port=self.port, routes=self.routes,
            listen_options=f":backlog={self.backlog}" if self.backlog else "",
            queue_settings=self.queue_settings, reuse_port="true" if self.reuse_port else "false",
            workers_line=workers_setting(self.workers), dkim=self.dkim,
        )

    def admin(self, timeout: float = 10.0) -> AdminClient:
        """A client of the node's admin API (the default socket in the spool)."""
        return AdminClient(default_admin_endpoint(self.spool), timeout=timeout)

    def workers_status(self) -> list[dict] | None:
        """
        C{GET /api/status}'s C{workers} (one entry per worker: C{shard},
        C{pid}, C{up}, C{restarts}), or L{None}: a node without workers, or
        no answer.
        """
        try:
            workers = self.admin().request("GET", "/api/status").get("workers")
        except (AdminError, AttributeError):
            return None
        return workers if isinstance(workers, list) else None

    def wait_workers_up(self, timeout: float) -> float:
        """
        Wait until every worker is up (a node without workers: at once).

        @return: seconds waited.
        @raise RuntimeError: if they are not all up within C{timeout}.
        """
        if self.workers == 1:
            return 0.0

        def up() -> bool:
            status = self.workers_status()
            if status is None:
                return self.admin_answers()
            return all(w.get("up") for w in status)

        try:
            return _wait(up, timeout, f"relaynet node {self.name}: every worker up")
        except TimeoutError as e:
            raise RuntimeError(f"{e}: {self.workers_status()}\n{_tail(self.log_path)}") from None

    def admin_answers(self) -> bool:
        try:
            self.admin().request("GET", "/api/status")
            return True
        except AdminError:
            return False

    def start(self, timeout: float = 60.0, wait_workers: bool = True) -> None:
        """
        Start the node and wait until it greets on its port and, with
        C{wait_workers}, until its admin API says every worker is up.
        """
        self.base.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text())
        t0 = time.monotonic()
        self._start(timeout)
        if wait_workers:
            try:
                self.wait_workers_up(max(1.0, timeout - (time.monotonic() - t0)))
            except BaseException:
                self.stop()
                raise

    def _start(self, timeout: float) -> None:
        compile_relaynet()
        twistd = Path(sys.executable).parent / "twistd"
        self.command = [str(twistd), "-n", "--pidfile=", "relaynet", "--config", str(self.config)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                self.command, cwd=self.base, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"relaynet node {self.name} exited with {self.process.returncode}:\n{_tail(self.log_path)}"
                )
            try:
                wait_for_smtp(HOST, self.port, timeout=0.5)
                # A shared port greets as soon as one node listens: wait for this one's own word.
                if not self.reuse_port or b"Listening on" in self.log_path.read_bytes():
                    return
                time.sleep(0.05)
            except TimeoutError:
                pass
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    f"relaynet node {self.name} did not listen within {timeout}s:\n{_tail(self.log_path)}"
                )

    def pid(self) -> int | None:
        p = self.process
        return p.pid if p is not None and p.poll() is None else None

    def pids(self) -> list[int]:
        """The node's live processes: the root, and its workers if any."""
        pid = self.pid()
        return tree_pids(pid) if pid is not None else []

    def probe(self) -> NodeProbe:
        """CPU and PSS of the whole node: the root and every descendant (workers)."""
        return NodeProbe(self.pid, children=True, tree=True)

    def queued(self) -> int:
        """Messages in the spool's C{queue/new} directories (every shard's)."""
        n = 0
        for d in queue_dirs(self.spool):
            try:
                n += len(os.listdir(d))
            except FileNotFoundError:
                pass
        return n

    def stop(self) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            # A supervisor gives its workers 60 s (relaynet.supervisor.STOP_GRACE).
            p.wait(timeout=90)
        except subprocess.TimeoutExpired:
            log(f"relaynet {self.name}: no exit 90s after SIGTERM; killing it and its workers")
            doomed = [pid for pid in tree_pids(p.pid)[1:]]
            p.kill()
            p.wait(timeout=30)
            for pid in doomed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


class RelaynetChain(Chain):
    name = "relaynet"

    def __init__(self, workdir: Path, hops: int, backlog: int | None = None, processes: int = 1,
                 workers: int | str | None = None, next_hop_down: bool = False, tag: str = "",
                 queue_settings: str = QUEUE_SETTINGS, sender: str = SENDER,
                 dkim_keys: tuple[str, ...] = ()):
        """
        @param processes: nodes per hop, sharing its port.
        @param workers: each node's C{[node] workers} (L{None}: not written).
        @param queue_settings: the C{[queue]} table of every node.
        @param dkim_keys: the algorithms of the keys the last hop signs with
            (L{make_dkim_keys}, in the chain's C{dkim/} directory, for
            L{DKIM_DOMAIN}); none: no node signs.
        """
        super().__init__(workdir, hops, next_hop_down, tag, sender)
        self.dkim_keys = tuple(dkim_keys)
        self.dkim_key_files: list[tuple[str, str, Path]] = []
        self.backlog = backlog
        self.processes = processes
        self.workers = workers
        self.queue_settings = queue_settings
        self.nodes: list[RelaynetNode] = []

    def start(self) -> None:
        self.start_sinks()
        try:
            if self.dkim_keys:
                self.dkim_key_files = make_dkim_keys(self.workdir / "dkim", self.dkim_keys)
            ports = [free_port(HOST) for _ in range(self.hops)]
            sink_port, stamp_port = self.last_relay_port()
            for i in reversed(range(self.hops)):
                # Only the last hop signs: where mail leaves (docs/outbound-security.md).
                dkim = dkim_config(self.dkim_key_files) if i == self.hops - 1 else ""
                if i == self.hops - 1:
                    routes = (
                        ROUTE.format(domains=f'"{STAMP_DOMAIN}"', port=stamp_port)
                        + "\n"
                        + ROUTE.format(domains='"*"', port=sink_port)
                    )
                else:
                    routes = ROUTE.format(domains='"*"', port=ports[i + 1])
                # Each hop: one node, or several sharing its port (SO_REUSEPORT),
                # each with its own spool: a node per core, as bench/README.md sizes it.
                for k in reversed(range(self.processes)):
                    name = f"rn{i + 1}" + (f"-{k + 1}" if self.processes > 1 else "")
                    node = RelaynetNode(self.workdir / name, name, ports[i], routes, self.backlog,
                                        reuse_port=self.processes > 1, workers=self.workers,
                                        queue_settings=self.queue_settings, dkim=dkim)
                    node.start()
                    self.nodes.insert(0, node)
            self.entry_port = ports[0]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        try:
            for node in self.nodes:
                try:
                    node.stop()
                except Exception as e:
                    log(f"relaynet: stopping {node.name}: {e}")
        finally:
            self.stop_sinks()

    def probes(self) -> dict[str, NodeProbe]:
        return {node.name: node.probe() for node in self.nodes}

    def queued(self) -> int:
        return sum(node.queued() for node in self.nodes)

    def check_alive(self) -> None:
        for node in self.nodes:
            if node.pid() is None:
                raise RuntimeError(f"relaynet node {node.name} died:\n{_tail(node.log_path)}")

    def restart_dead(self) -> list[str]:
        """
        Start again every node that is not running, on its port, config and
        spool; its log so far is kept as C{node.log.1} (C{.2}, ...).
        """
        names = []
        for node in self.nodes:
            if node.pid() is None:
                k = 1
                while node.log_path.with_name(f"{node.log_path.name}.{k}").exists():
                    k += 1
                if node.log_path.exists():
                    node.log_path.rename(node.log_path.with_name(f"{node.log_path.name}.{k}"))
                node.start()
                names.append(node.name)
        return names

    def event_counts(self, names: tuple[str, ...]) -> dict[str, int]:
        """
        How many events of each of C{names} (e.g. C{dkim_signed}) the nodes
        have written to their C{events.jsonl} so far, summed over the nodes.
        """
        totals = {name: 0 for name in names}
        for node in self.nodes:
            counts = node.events.update()
            for name in names:
                totals[name] += counts.get(name, 0)
        return totals

    def hwm_kb(self) -> dict[str, int | None]:
        """Per node, the sum of its processes' C{VmHWM} (root and workers)."""
        return {node.name: tree_status_kb(node.pid(), "VmHWM") for node in self.nodes}

    def describe(self) -> dict:
        table = process_table()
        return {
            "hops": self.hops,
            "next_hop_down": self.next_hop_down,
            "processes_per_hop": self.processes,
            "workers": self.workers,
            "sender": self.sender,
            "dkim_keys": [{"domain": d, "selector": s, "key_file": str(p)} for d, s, p in self.dkim_key_files],
            "processes_per_node": {node.name: len(node.probe().pids(table)) for node in self.nodes},
            "command": shlex.join(self.nodes[0].command) if self.nodes else None,
            "configs": {node.name: node.config.read_text() for node in self.nodes},
        }


SYSTEMS = {"postfix": PostfixChain, "relaynet": RelaynetChain}
