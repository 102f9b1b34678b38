#!/usr/bin/env python3
"""
A counting, timestamping SMTP sink for the benchmarks.

It accepts every message and throws it away, but first appends one line per
message to a log file::

    <CLOCK_MONOTONIC seconds> <message bytes> <Message-ID or ->

The time is taken the moment the final dot has been read, before the C{250}
is written.  C{CLOCK_MONOTONIC} is one clock for every process of the machine,
so the bench compares it with the time its sender wrote the final dot.

Run as its own process (C{python stampsink.py --port P --log FILE}); the
parent controls it with L{StampSink}.  It speaks just enough ESMTP for
relaynet's and Postfix's SMTP clients: EHLO/HELO (PIPELINING, 8BITMIME,
SIZE), MAIL, RCPT, DATA, RSET, NOOP, QUIT.  It listens on loopback only, and
exits on SIGTERM, when its parent goes away, or after C{--max-seconds}.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

_MSGID = re.compile(rb"^message-id:\s*(<[^>\r\n]{1,500}>)", re.I | re.M)
_IDLE_TIMEOUT = 300.0
_MAX_LINE = 4096
_MAX_MESSAGE = 64 * 1024 * 1024
_MAX_COMMANDS = 10_000_000


class _Closed(Exception):
    pass


class _Conn:
    """
    One SMTP session over an asyncio stream, with its own buffer so that
    pipelined commands after the final dot are not lost.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sink: "_Sink"):
        self.reader = reader
        self.writer = writer
        self.sink = sink
        self.buf = bytearray()

    async def _more(self) -> None:
        chunk = await asyncio.wait_for(self.reader.read(262144), _IDLE_TIMEOUT)
        if not chunk:
            raise _Closed()
        self.buf += chunk

    async def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            if len(self.buf) > _MAX_LINE:
                raise _Closed()
            await self._more()

    async def read_data(self) -> bytes:
        """
        Read a message up to and including its final dot line.

        @return: the message (dot-stuffing left in place: it is only counted).
        """
        # Search in CRLF + data, so a dot line right at the start also ends it.
        data = bytearray(b"\r\n")
        data += self.buf
        self.buf.clear()
        start = 0
        while True:
            i = data.find(b"\r\n.\r\n", start)
            if i >= 0:
                self.buf += data[i + 5:]
                return bytes(data[2: i + 2])
            if len(data) > _MAX_MESSAGE:
                raise _Closed()
            start = max(0, len(data) - 4)
            chunk = await asyncio.wait_for(self.reader.read(262144), _IDLE_TIMEOUT)
            if not chunk:
                raise _Closed()
            data += chunk

    def reply(self, text: str) -> None:
        self.writer.write(text.encode("ascii") + b"\r\n")

    async def run(self) -> None:
        host = self.sink.hostname
        self.reply(f"220 {host} ESMTP stampsink")
        await self.writer.drain()
        for _ in range(_MAX_COMMANDS):
            line = await self.readline()
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.reply(f"250-{host}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0")
            elif verb == b"HELO":
                self.reply(f"250 {host}")
            elif verb == b"MAIL":
                self.reply("250 2.1.0 Ok")
            elif verb == b"RCPT":
                self.reply("250 2.1.5 Ok")
            elif verb == b"DATA":
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                await self.writer.drain()
                message = await self.read_data()
                n = self.sink.record(message)
                self.reply(f"250 2.0.0 Ok: queued as S{n}")
            elif verb in (b"RSET", b"NOOP"):
                self.reply("250 2.0.0 Ok")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 Bye")
                await self.writer.drain()
                return
            else:
                self.reply("502 5.5.2 Error: command not recognized")
            # Only flush when the client has nothing more pipelined.
            if b"\n" not in self.buf:
                await self.writer.drain()


class _Sink:
    def __init__(self, log_path: Path, hostname: str):
        self.hostname = hostname
        self.count = 0
        self.fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(self, message: bytes) -> int:
        now = time.monotonic()
        head_end = message.find(b"\r\n\r\n", 0, 65536)
        m = _MSGID.search(message, 0, head_end if head_end >= 0 else min(len(message), 65536))
        msgid = m.group(1).replace(b" ", b"") if m else b"-"
        self.count += 1
        os.write(self.fd, b"%.6f %d %s\n" % (now, len(message), msgid))
        return self.count

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _Conn(reader, writer, self).run()
        except (_Closed, asyncio.TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def _serve(args: argparse.Namespace) -> None:
    sink = _Sink(Path(args.log), args.hostname)
    server = await asyncio.start_server(
        sink.handle, args.host, args.port, backlog=args.backlog, reuse_address=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    deadline = time.monotonic() + args.max_seconds
    async with server:
        # Bounded: stop on a signal, when the parent is gone, or at the deadline.
        while not stop.is_set() and time.monotonic() < deadline and os.getppid() == parent:
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Counting, timestamping SMTP sink (loopback only).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True, help="one line per message is appended here")
    p.add_argument("--hostname", default="stamp.relaynet.test")
    p.add_argument("--backlog", type=int, default=256)
    p.add_argument("--max-seconds", type=float, default=6 * 3600)
    args = p.parse_args(argv)
    if not args.host.startswith("127.") and args.host != "::1":
        p.error("loopback addresses only")
    asyncio.run(_serve(args))
    return 0


# -- the parent's side --------------------------------------------------------


class StampSink:
    """
    Start, read and stop a L{stampsink} process.

    @ivar port: where it listens (127.0.0.1).
    """

    host = "127.0.0.1"

    def __init__(self, base_dir: Path, port: int, start_timeout: float = 15.0):
        self.base_dir = Path(base_dir)
        self.port = port
        self.log_path = self.base_dir / "stamps.log"
        self.err_path = self.base_dir / "stderr.txt"
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self._offset = 0
        self._count = 0
        self._partial = b""

    def start(self) -> None:
        from harness.peers import wait_for_smtp

        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        with open(self.err_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()),
                 "--host", self.host, "--port", str(self.port), "--log", str(self.log_path)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"stampsink exited: {self.err_path.read_text(errors='replace')[-2000:]}")
            try:
                wait_for_smtp(self.host, self.port, timeout=0.5)
                return
            except TimeoutError:
                if time.monotonic() >= deadline:
                    self.stop()
                    raise RuntimeError(f"stampsink did not greet on port {self.port}") from None

    def received(self) -> int:
        """
        @return: messages received so far (lines in the log), read incrementally.
        """
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return 0
        if data:
            self._offset += len(data)
            data = self._partial + data
            self._count += data.count(b"\n")
            self._partial = data[data.rfind(b"\n") + 1:]
        return self._count

    def stamps(self) -> dict[str, float]:
        """
        @return: Message-ID to arrival time (CLOCK_MONOTONIC), for every message so far.
        """
        out: dict[str, float] = {}
        for line in self.log_path.read_bytes().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] != b"-":
                out.setdefault(parts[2].decode("ascii", "replace"), float(parts[0]))
        return out

    def stop(self, timeout: float = 10.0) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
