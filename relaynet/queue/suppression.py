# -*- test-case-name: tests.test_suppression -*-
"""
The suppression list: recipients that mail is no longer sent to.

A recipient whose delivery failed permanently as an invalid recipient
(L{relaynet.queue.classify}) is added by the runner; an administrator adds,
removes, imports and exports entries (C{relaynet suppress}, the admin API).
The intake refuses a suppressed recipient at C{RCPT} with C{550 5.1.1} and
a C{suppressed} event. Each entry has an address (lower-cased), a reason,
a class, the time it was added, when it expires (C{None}: never) and its
source (C{bounce}, C{admin}, C{import}). An expired entry no longer
suppresses and is dropped at the next compaction.

Lookups are in memory (a dict). The list is kept in
C{<spool>/suppression.jsonl}, one JSON object per line, appended to (and
fsynced) in a worker thread, never on the reactor::

    {"v":1,"op":"add","address":"a@b.example","reason":"...","class":"invalid-recipient",
     "time":1764000000.0,"expires":1795536000.0,"source":"bounce"}
    {"v":1,"op":"remove","address":"a@b.example","time":1764000100.0}

Reading the file replays it in order; a line that cannot be read is skipped
(a torn last line after a crash). When the file holds many more lines than
live entries, it is rewritten with only the live ones
(L{relaynet.queue.spool.write_file_durably}: temporary file, fsync, rename).
Writes run one at a time, in the order they were asked for, under an
exclusive C{flock} of C{suppression.jsonl.lock}: the workers of a node share
the file, and each takes what the others appended with
L{SuppressionList.refresh} (the runner of a worker calls it every few
seconds).

L{SuppressionSettings} is the C{[suppression]} table of the node
configuration (L{parse_suppression}).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaynet.config import (  # noqa: F401 - the settings' names, re-exported
    BOUNCE_CLASSES, SuppressionSettings, describe_suppression, parse_suppression,
)
from relaynet.queue.classify import CLASSES, BounceClass, Classifier
from relaynet.queue.spool import append_durably as append_and_sync, write_file_durably

T = TypeVar("T")
RunInThread = Callable[[Callable[[], Any]], "Deferred[Any]"]

#: Sources of an entry.
SOURCES = ("bounce", "admin", "import")
#: Days an entry lasts by default.
DEFAULT_EXPIRY_DAYS = 365.0
#: The file rewritten once it has this many lines more than live entries.
COMPACT_SLACK = 1000
_DAY = 86400.0




def classifier_for(settings: SuppressionSettings) -> Classifier:
    """The L{Classifier} with the configured patterns of C{settings}."""
    grouped: dict[str, list[str]] = {}
    for name, expr in settings.patterns:
        grouped.setdefault(name, []).append(expr)
    return Classifier.from_patterns(grouped)


# -- entries ---------------------------------------------------------------


def normalise(address: str) -> str:
    """The key of an address: without angle brackets and surrounding space, lower-cased."""
    return address.strip().strip("<>").strip().lower()


@frozen
class Suppression:
    """
    One suppressed recipient.

    @ivar address: lower-cased.
    @ivar reason: why (the bounce's diagnostic, or the administrator's words).
    @ivar kind: the bounce class (C{class} in JSON).
    @ivar time: when it was added (Unix seconds).
    @ivar expires: when it stops suppressing (C{None}: never).
    @ivar source: C{bounce}, C{admin} or C{import}.
    """

    address: str
    reason: str = ""
    kind: str = BounceClass.INVALID_RECIPIENT.value
    time: float = 0.0
    expires: float | None = None
    source: str = "admin"

    def live(self, now: float) -> bool:
        """Whether it still suppresses at C{now}."""
        return self.expires is None or self.expires > now

    def refusal(self, address: str) -> str:
        """
        The text of the C{550 5.1.1} refusing C{address} (after the codes):
        the class, the source and the day, not the reason (a remote
        server's words stay in the log).
        """
        day = time.strftime("%Y-%m-%d", time.gmtime(self.time))
        return f"<{address}>: recipient suppressed ({self.kind}, {self.source} {day})"

    def event_fields(self) -> dict[str, Any]:
        """What a C{suppressed} event says of the entry (the intakes add the stage and the session)."""
        return {"reason": self.reason, "source": self.source, "since": self.time, "expires": self.expires,
                "class": self.kind}

    def to_json(self) -> dict[str, Any]:
        """The entry as the admin API and the file show it."""
        return {"address": self.address, "reason": self.reason, "class": self.kind,
                "time": self.time, "expires": self.expires, "source": self.source}

    @classmethod
    def from_json(cls, data: Any, now: float, default_source: str = "import",
                  default_expiry: float | None = None) -> "Suppression":
        """
        An entry from a JSON object (an import line, a file line, an API
        body): C{address} is required; C{time} defaults to C{now},
        C{expires} to C{default_expiry} (a time).

        @raise ValueError: not an object, no address, a field of the wrong type.
        """
        if not isinstance(data, dict):
            raise ValueError("an entry must be a JSON object")
        address = data.get("address")
        if not isinstance(address, str) or "@" not in address or any(c.isspace() for c in address.strip()):
            raise ValueError(f"not an address: {address!r}")
        reason = data.get("reason") or ""
        kind = data.get("class") or BounceClass.INVALID_RECIPIENT.value
        source = data.get("source") or default_source
        when = data.get("time", now)
        expires = data.get("expires", default_expiry)
        if not isinstance(reason, str):
            raise ValueError("reason must be a string")
        if kind not in CLASSES:
            raise ValueError(f"{kind!r} is not a bounce class")
        if source not in SOURCES:
            raise ValueError(f"{source!r} is not a source ({', '.join(SOURCES)})")
        for name, value in (("time", when), ("expires", expires)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number (Unix seconds)")
        if when is None:
            raise ValueError("time must be a number (Unix seconds)")
        return cls(normalise(address), reason, kind, float(when),
                   None if expires is None else float(expires), source)


# -- the list --------------------------------------------------------------


def _immediately(work: Callable[[], T]) -> "Deferred[T]":
    from twisted.internet.defer import maybeDeferred
    return maybeDeferred(work)


class SuppressionList:
    """
    The suppression list of a node: lookups in memory, the file written in
    a worker thread (module docstring).

    File work runs one job at a time, in order: appending the changes
    asked for, rewriting the file (compaction), or reading what other
    processes (the workers of a node, which share the file) appended since
    the last read (L{refresh}). Appends and rewrites hold an exclusive
    C{flock} on C{<file>.lock}, so a rewrite replays every process's lines
    and none is appended to a file being replaced. While a read or a
    rewrite runs, the addresses changed meanwhile are remembered, and the
    memory's word on them wins over the file's.

    @ivar path: the file (C{None}: in memory only, for tests and fakes).
    @ivar expiry_days: the default lifetime of a new entry (0: for ever).
    """

    log = Logger()

    def __init__(
        self, path: Path | None, now: Callable[[], float] = time.time,
        run_in_thread: RunInThread = _immediately, expiry_days: float = DEFAULT_EXPIRY_DAYS,
        compact_slack: int = COMPACT_SLACK,
    ) -> None:
        """
        @param run_in_thread: runs blocking file work, e.g.
            C{lambda f: deferToThreadPool(reactor, pool, f)}.
        @param compact_slack: lines beyond the live entries that trigger a rewrite.
        """
        self.path = path
        self.now = now
        self.run_in_thread = run_in_thread
        self.expiry_days = expiry_days
        self.compact_slack = compact_slack
        self._entries: dict[str, Suppression] = {}
        self._touched: dict[str, Suppression | None] = {}
        self._reading = False
        self._lines = 0
        self._position = FilePosition()
        self._pending: list[dict[str, Any]] = []
        self._rewrite = False
        self._sync = False
        self._busy = False
        self._waiters: list[Deferred[None]] = []
        self._read_waiters: list[Deferred[int]] = []

    # -- reading --------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, address: str) -> Suppression | None:
        """The live entry of C{address}, or C{None}."""
        entry = self._entries.get(normalise(address))
        if entry is None or not entry.live(self.now()):
            return None
        return entry

    def is_suppressed(self, address: str) -> bool:
        """Whether mail to C{address} is refused (in memory: call it anywhere)."""
        return self.get(address) is not None

    def entries(self) -> list[Suppression]:
        """The live entries, by address."""
        now = self.now()
        return sorted((e for e in self._entries.values() if e.live(now)), key=lambda e: e.address)

    def counts(self) -> dict[str, int]:
        """Live entries by source."""
        out = {s: 0 for s in SOURCES}
        now = self.now()
        for e in self._entries.values():
            if e.live(now):
                out[e.source] = out.get(e.source, 0) + 1
        return out

    # -- changing -------------------------------------------------------

    def default_expiry(self, now: float, days: float | None = None) -> float | None:
        """When an entry added at C{now} expires: after C{days} (default L{expiry_days}); 0: never."""
        days = self.expiry_days if days is None else days
        return None if days <= 0 else now + days * _DAY

    def add(
        self, address: str, reason: str = "", kind: str = BounceClass.INVALID_RECIPIENT.value,
        source: str = "admin", expires_days: float | None = None,
    ) -> Suppression:
        """
        Suppress C{address} (replacing any entry of it) from now on; the
        file is written in the background (L{flushed}).
        """
        now = self.now()
        entry = Suppression(normalise(address), reason, kind, now, self.default_expiry(now, expires_days), source)
        self.put(entry)
        return entry

    def put(self, entry: Suppression) -> None:
        """Keep C{entry} (replacing any of its address) and write it."""
        self._entries[entry.address] = entry
        if self._reading:
            self._touched[entry.address] = entry
        self._append({"v": 1, "op": "add", **entry.to_json()})

    def put_many(self, entries: Iterable[Suppression]) -> int:
        """Keep each of C{entries} (an import); written together. @return: how many."""
        n = 0
        for entry in entries:
            self.put(entry)
            n += 1
        return n

    def remove(self, address: str) -> bool:
        """Stop suppressing C{address}. @return: whether it was on the list (live)."""
        key = normalise(address)
        was = self.get(key) is not None
        entry = self._entries.pop(key, None)
        if self._reading:
            self._touched[key] = None
        if entry is not None or self._reading:
            self._append({"v": 1, "op": "remove", "address": key, "time": self.now()})
        return was

    def flushed(self) -> Deferred[None]:
        """Fires once every change made so far is in the file (at once without a file)."""
        if self.path is None or (not self._pending and not self._busy and not self._rewrite):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    # -- the file -------------------------------------------------------

    def load(self) -> Deferred[int]:
        """
        Read the whole file in a worker thread and take its entries; changes
        made meanwhile win over the file's. @return: fires with the entries.
        """
        self._position = FilePosition()
        return self.refresh()

    def refresh(self) -> Deferred[int]:
        """
        Take what other processes wrote since the last read (all of the file
        if it was replaced, or at the first read), in a worker thread after
        the writes asked for so far. @return: fires with the entries then.
        """
        if self.path is None:
            return succeed(len(self))
        d: Deferred[int] = Deferred()
        self._read_waiters.append(d)
        self._sync = True
        self._next()
        return d

    def load_now(self) -> int:
        """L{load}, blocking (before the reactor runs, or in a command)."""
        if self.path is not None:
            self._entries, self._lines, self._position = read_file_at(self.path)
        return len(self)

    def compact(self) -> Deferred[None]:
        """Rewrite the file with only the live entries (now, in a worker thread)."""
        if self.path is None:
            return succeed(None)
        self._rewrite = True
        self._next()
        return self.flushed()

    def _append(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self._pending.append(record)
        self._lines += 1
        if self._lines > len(self._entries) + self.compact_slack:
            self._rewrite = True
        self._next()

    def _next(self) -> None:
        """Start the next file job unless one runs: a rewrite, else an append, else a read."""
        if self._busy or self.path is None:
            return
        path = self.path
        records, self._pending = self._pending, []
        data = "".join(_line(r) for r in records).encode("utf-8")
        job: Callable[[], Any]
        if self._rewrite:
            self._rewrite = self._sync = False
            now = self.now()
            job, reads = (lambda: rewrite_file(path, data, now)), True
        elif records:
            job, reads = (lambda: append_durably(path, data)), False
        elif self._sync:
            self._sync = False
            position = self._position
            job, reads = (lambda: read_changes(path, position)), True
        else:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)
            return
        self._busy = True
        self._reading = reads
        self._touched.clear()

        def done(result: object) -> None:
            self._busy = False
            self._reading = False
            touched, self._touched = self._touched, {}
            if isinstance(result, Failure):
                self.log.failure("Could not write or read the suppression list {path}", result, path=str(path))
                # Written again with the next change (not in a loop while the disk fails).
                self._pending[:0] = records
                waiters, self._waiters = self._waiters, []
                for d in waiters:
                    d.errback(result)
                readers, self._read_waiters = self._read_waiters, []
                for r in readers:
                    r.errback(result)
                return
            if isinstance(result, FileState):
                self._take(result, touched)
            self._next()

        self.run_in_thread(job).addBoth(done)

    def _take(self, state: "FileState", touched: dict[str, Suppression | None]) -> None:
        """Apply what a read or a rewrite found; the addresses changed meanwhile keep their memory."""
        if state.whole:
            self._entries = {k: v for k, v in state.changes.items() if v is not None}
            self._lines = state.lines
        entries = self._entries
        changes = () if state.whole else state.changes.items()
        for key, change in changes:
            if key in touched:
                continue
            if change is None:
                entries.pop(key, None)
            else:
                entries[key] = change
        for key, entry in touched.items():
            if entry is None:
                entries.pop(key, None)
            else:
                entries[key] = entry
        self._position = state.position
        if self._lines > len(entries) + self.compact_slack:
            self._rewrite = True
        readers, self._read_waiters = self._read_waiters, []
        for r in readers:
            r.callback(len(self))


@frozen
class FilePosition:
    """How far a process has read the file: its inode and the offset after the last whole line."""

    inode: int = -1
    offset: int = 0


@frozen
class FileState:
    """
    What a read found: all of the file (C{whole}: C{changes} is every entry)
    or the lines after the last read (C{changes}: the last word on each
    address they name, C{None} for a removal).
    """

    whole: bool
    changes: dict[str, Any]
    lines: int
    position: FilePosition


def _lock(path: Path) -> int:
    """An exclusive C{flock} on C{<path>.lock} (the file of the list is replaced by rewrites; its lock is not)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def append_durably(path: Path, data: bytes) -> None:
    """Append C{data} to C{path} under the lock and fsync it (and its directory when the file is new). Blocking."""
    lock = _lock(path)
    try:
        append_and_sync(path, data)
    finally:
        os.close(lock)


def rewrite_file(path: Path, data: bytes, now: float) -> FileState:
    """
    Under the lock: append C{data}, replay the whole file (every process's
    lines), and replace it with one line per live entry
    (L{write_file_durably}). Blocking.
    """
    lock = _lock(path)
    try:
        if data:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        entries, _, _ = read_file_at(path)
        live = [e for e in entries.values() if e.live(now)]
        body = "".join(_line({"v": 1, "op": "add", **e.to_json()}) for e in live).encode("utf-8")
        write_file_durably(path, body)
        st = os.stat(path)
        return FileState(True, {e.address: e for e in live}, len(live), FilePosition(st.st_ino, st.st_size))
    finally:
        os.close(lock)


def read_changes(path: Path, since: FilePosition) -> FileState:
    """
    The lines after C{since} (blocking), or the whole file when it is not
    the file read then (replaced by a rewrite, or never read).
    """
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return FileState(True, {}, 0, FilePosition())
    with f:
        st = os.fstat(f.fileno())
        if st.st_ino != since.inode or st.st_size < since.offset:
            entries, lines, offset = _replay(f)
            return FileState(True, dict(entries), lines, FilePosition(st.st_ino, offset))
        f.seek(since.offset)
        changes: dict[str, Suppression | None] = {}
        lines, offset = 0, since.offset
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # being written: read it next time
            lines += 1
            offset += len(raw)
            _apply(raw, changes)
        return FileState(False, changes, lines, FilePosition(st.st_ino, offset))


def _apply(raw: bytes, into: dict[str, Any]) -> None:
    try:
        record = json.loads(raw)
        op = record.get("op")
        if op == "add":
            entry = Suppression.from_json(record, 0.0, default_source="admin")
            into[entry.address] = entry
        elif op == "remove":
            into[normalise(str(record["address"]))] = None
    except (ValueError, KeyError, TypeError, AttributeError):
        pass


def _replay(f: Any) -> tuple[dict[str, Suppression], int, int]:
    changes: dict[str, Suppression | None] = {}
    lines = offset = 0
    for raw in f:
        lines += 1
        offset += len(raw)
        _apply(raw, changes)
    return {k: v for k, v in changes.items() if v is not None}, lines, offset


def read_file_at(path: Path) -> tuple[dict[str, Suppression], int, FilePosition]:
    """L{read_file} and the position after its last line."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return {}, 0, FilePosition()
    with f:
        st = os.fstat(f.fileno())
        entries, lines, offset = _replay(f)
        return entries, lines, FilePosition(st.st_ino, offset)


def read_file(path: Path) -> tuple[dict[str, Suppression], int]:
    """
    Replay the file (blocking): the entries it leaves (expired ones too) and
    its number of lines. A missing file is an empty list; unreadable lines
    are skipped.
    """
    entries, lines, _ = read_file_at(path)
    return entries, lines


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


# -- import and export ------------------------------------------------------

CSV_FIELDS = ("address", "reason", "class", "time", "expires", "source")


def parse_import(text: str, now: float, default_expiry: float | None) -> Iterator[Suppression]:
    """
    The entries of an import file (L{parse_import_records}), with C{time}
    C{now} and C{expires} C{default_expiry} unless a record gives them, and
    source C{import} unless it names one.

    @raise ValueError: a line that cannot be read, naming its number.
    """
    for n, record in parse_import_records(text):
        try:
            yield Suppression.from_json(record, now, "import", default_expiry)
        except ValueError as e:
            raise ValueError(f"line {n}: {e}") from None


def parse_import_records(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """
    The records of an import file, each with its line number, checked: JSON
    lines (each an object with at least C{address}), or CSV with a header
    line naming some of L{CSV_FIELDS} (C{address} required), or plain lines
    of one address each. Blank lines and lines starting with C{#} are
    skipped. A record has only the fields the file gives.

    @raise ValueError: a line that cannot be read, naming its number.
    """
    import csv

    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return
    first = lines[0][1].strip()
    rows: list[tuple[int, Any]] = []
    if first.startswith("{"):
        for n, line in lines:
            try:
                rows.append((n, json.loads(line)))
            except ValueError as e:
                raise ValueError(f"line {n}: not JSON: {e}") from None
    else:
        header = [h.strip().lower() for h in next(csv.reader([first]))]
        if "address" in header:
            unknown = [h for h in header if h not in CSV_FIELDS]
            if unknown:
                raise ValueError(f"line {lines[0][0]}: unknown column {unknown[0]!r} ({', '.join(CSV_FIELDS)})")
            for n, line in lines[1:]:
                record: dict[str, Any] = {}
                for name, value in zip(header, next(csv.reader([line]))):
                    value = value.strip()
                    if not value:
                        continue
                    if name in ("time", "expires"):
                        try:
                            record[name] = float(value)
                        except ValueError:
                            raise ValueError(f"line {n}: {name} must be a number (Unix seconds)") from None
                    else:
                        record[name] = value
                rows.append((n, record))
        else:
            rows = [(n, {"address": line.strip()}) for n, line in lines]
    for n, row in rows:
        try:
            Suppression.from_json(row, 0.0, "import")
        except ValueError as e:
            raise ValueError(f"line {n}: {e}") from None
        yield n, row


def export_csv(entries: Iterable[dict[str, Any]]) -> str:
    """Entries (as L{Suppression.to_json}) as CSV with a header line of L{CSV_FIELDS}."""
    import csv
    import io

    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for e in entries:
        w.writerow(["" if e.get(k) is None else e.get(k) for k in CSV_FIELDS])
    return out.getvalue()


def export_jsonl(entries: Iterable[dict[str, Any]]) -> str:
    """Entries (as L{Suppression.to_json}) as JSON lines."""
    return "".join(_line(e) for e in entries)


def suppression_settings(config: Any) -> SuppressionSettings:
    """
    C{config.suppression} (a L{relaynet.config.NodeConfig}), or the
    defaults while the configuration has no such field.
    """
    settings = getattr(config, "suppression", None)
    return settings if isinstance(settings, SuppressionSettings) else SuppressionSettings()
