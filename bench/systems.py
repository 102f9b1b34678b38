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
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.procstat import NodeProbe, vm_hwm_kb
from bench.stampsink import StampSink
from harness.peers import PostfixInstance, SmtpSink, free_port, relayhost_for, wait_for_smtp

REPO = Path(__file__).resolve().parent.parent
SINK_DOMAIN = "sink.test"
STAMP_DOMAIN = "stamp.test"
HOST = "127.0.0.1"


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


class Chain:
    """
    A system under test: C{hops} nodes in a row, then two sinks.

    @ivar name: C{"postfix"} or C{"relaynet"}.
    @ivar entry_port: where the first hop listens (on 127.0.0.1).
    @ivar sink: the C{smtp-sink} for C{user@sink.test}.
    @ivar stamp: the timestamping sink for C{user@stamp.test}.
    """

    name = "?"

    def __init__(self, workdir: Path, hops: int):
        self.hops = hops
        self.workdir = workdir / f"{self.name}-{hops}hop"
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
        """Wait until no hop holds mail; @return: seconds waited."""
        return _wait(lambda: self.queued() == 0, timeout, f"{self.name} queues empty")

    def check_alive(self) -> None:
        pass

    def hwm_kb(self) -> dict[str, int | None]:
        return {}


class PostfixChain(Chain):
    name = "postfix"

    def __init__(self, workdir: Path, hops: int):
        super().__init__(workdir, hops)
        self.instances: list[PostfixInstance] = []

    def start(self) -> None:
        self.start_sinks()
        try:
            ports = [free_port(HOST) for _ in range(self.hops)]
            # Start from the last hop, so each next hop is up first.
            for i in reversed(range(self.hops)):
                extra = {}
                if i == self.hops - 1:
                    relayhost = relayhost_for(self.sink.host, self.sink.port)
                    # The same routing as relaynet's last hop: stamp.test to
                    # the timestamping sink, everything else to smtp-sink.
                    extra["transport_maps"] = (
                        "inline:{ %s=smtp:%s }"
                        % (STAMP_DOMAIN, relayhost_for(self.stamp.host, self.stamp.port))
                    )
                else:
                    relayhost = relayhost_for(HOST, ports[i + 1])
                inst = PostfixInstance(
                    self.workdir / f"pf{i + 1}",
                    port=ports[i],
                    mode="relay",
                    relayhost=relayhost,
                    name=f"rnbench{os.getpid()}-{self.hops}h{i + 1}",
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
            "main_cf_last_hop": self.instances[-1].main_cf_settings() if self.instances else None,
            "master_cf": self.instances[0].master_cf_text() if self.instances else None,
        }


NODE_CONFIG = """\
# relaynet bench node {name}: written by bench/systems.py
[node]
name = "{name}"
hostname = "{name}.bench.relaynet.test"
spool = "{spool}"

[[listener]]
endpoint = "tcp:{port}:interface=127.0.0.1{listen_options}"
mode = "relay"
reuse_port = {reuse_port}

{routes}
[queue]
{queue_settings}

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

ROUTE = """\
[[route]]
domains = [{domains}]
action = "relay"
next_hops = ["tcp:127.0.0.1:{port}"]
"""


class RelaynetNode:
    """One C{twistd -n relaynet} process."""

    def __init__(
        self, base: Path, name: str, port: int, routes: str, backlog: int | None = None,
        queue_settings: str = QUEUE_SETTINGS, reuse_port: bool = False,
    ):
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

    def start(self, timeout: float = 60.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            NODE_CONFIG.format(
                name=self.name, spool=self.spool, port=self.port, routes=self.routes,
                listen_options=f":backlog={self.backlog}" if self.backlog else "",
                queue_settings=self.queue_settings, reuse_port="true" if self.reuse_port else "false",
            )
        )
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

    def queued(self) -> int:
        try:
            return len(os.listdir(self.spool / "queue" / "new"))
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log(f"relaynet {self.name}: no exit 30s after SIGTERM; killing it")
            p.kill()
            p.wait(timeout=30)


class RelaynetChain(Chain):
    name = "relaynet"

    def __init__(self, workdir: Path, hops: int, backlog: int | None = None, processes: int = 1):
        super().__init__(workdir, hops)
        self.backlog = backlog
        self.processes = processes
        self.nodes: list[RelaynetNode] = []

    def start(self) -> None:
        self.start_sinks()
        try:
            ports = [free_port(HOST) for _ in range(self.hops)]
            for i in reversed(range(self.hops)):
                if i == self.hops - 1:
                    routes = (
                        ROUTE.format(domains=f'"{STAMP_DOMAIN}"', port=self.stamp.port)
                        + "\n"
                        + ROUTE.format(domains='"*"', port=self.sink.port)
                    )
                else:
                    routes = ROUTE.format(domains='"*"', port=ports[i + 1])
                # Each hop: one node, or several sharing its port (SO_REUSEPORT),
                # each with its own spool: a node per core, as bench/README.md sizes it.
                for k in reversed(range(self.processes)):
                    name = f"rn{i + 1}" + (f"-{k + 1}" if self.processes > 1 else "")
                    node = RelaynetNode(self.workdir / name, name, ports[i], routes, self.backlog,
                                        reuse_port=self.processes > 1)
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
        return {node.name: NodeProbe(node.pid, children=False) for node in self.nodes}

    def queued(self) -> int:
        return sum(node.queued() for node in self.nodes)

    def check_alive(self) -> None:
        for node in self.nodes:
            if node.pid() is None:
                raise RuntimeError(f"relaynet node {node.name} died:\n{_tail(node.log_path)}")

    def hwm_kb(self) -> dict[str, int | None]:
        return {node.name: (vm_hwm_kb(node.pid()) if node.pid() else None) for node in self.nodes}

    def describe(self) -> dict:
        return {
            "hops": self.hops,
            "processes_per_hop": self.processes,
            "command": shlex.join(self.nodes[0].command) if self.nodes else None,
            "configs": {node.name: node.config.read_text() for node in self.nodes},
        }


SYSTEMS = {"postfix": PostfixChain, "relaynet": RelaynetChain}
