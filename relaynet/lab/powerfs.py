# -*- test-case-name: tests.test_powerloss -*-
"""
powerfs: a FUSE file system that can lose power.

A passthrough over a backing directory (written with C{mfusepy}, a ctypes
binding to libfuse 3) that remembers what is not yet durable and, on
C{cut}, throws it away, as a power loss would. The model (the strict POSIX
one; ext4 is often kinder) is in C{docs/power-loss.md}:

  - file data written since the file's last C{fsync}/C{fdatasync} is lost:
    the file goes back to its last synced content (a file never synced goes
    back to empty);
  - a directory operation (create, mkdir, mknod, symlink, rename, link,
    unlink, rmdir) not followed by an C{fsync} of that directory is undone,
    each directory on its own (a rename from C{tmp/} to C{new/} made durable
    by an fsync of C{new/} alone leaves the name in C{tmp/} too).

Operations go straight to the backing directory; an undo journal keeps
what a cut needs:

  - per directory, for each name changed since the directory's last fsync,
    what the name held then: nothing, a directory, or a file (any
    non-directory) kept alive by a hard link in the hidden stash
    C{<backing>/.powerfs/};
  - per file (by inode) written since its last fsync, its durable length
    (while only appended to) or a copy of its durable bytes in the stash,
    and a hard link to the inode so that its content can be put back
    whatever its names are by then.

C{cut} restores every journaled name (shallow directories first), then every
file's content, and forgets the journal. Renaming a directory is refused
with C{EXDEV} (not modelled; relaynet never does it). Metadata (modes,
times) is passed through and not journaled.

Run as C{python -m relaynet.lab.powerfs BACKING MOUNTPOINT --control SOCKET}
(a foreground process; C{fusermount3 -u MOUNTPOINT} or SIGTERM ends it). The
control socket takes one command per line and answers one line:

    cut                 drop everything not durable         -> ok <records undone>
    enospc on|off       writes and creates fail with ENOSPC -> ok
    eio-fsync on|off    fsync and fsyncdir fail with EIO    -> ok
    stats               counters                            -> ok <JSON>

The power-cut protocol for a process using the mount: SIGKILL it (and wait
until it is gone), C{cut}, start it again. L{PowerFS} drives all of this
from Python.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from attrs import define, field

STASH = ".powerfs"
POLL = 0.02
START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0

#: What a journaled name held when its directory was last synced.
DIR = "dir"


@define
class Original:
    """
    The durable content of one name: nothing (C{kind=None}), a directory
    (C{kind="dir"}, C{mode}) or a file (C{kind="file"}, stash inode C{ino}).
    """

    kind: str | None
    ino: int = 0
    mode: int = 0o700


@define
class FileRecord:
    """
    A file written since its last fsync.

    @ivar durable_len: its durable bytes are its first C{durable_len} bytes
        (only appends and writes past it since), unless C{copied}.
    @ivar copied: its durable bytes are in the stash (C{c<ino>}).
    """

    durable_len: int
    copied: bool = False


@define
class Counters:
    """What powerfs has seen and done."""

    cuts: int = 0
    undone: int = 0
    fsyncs: int = 0
    fsyncdirs: int = 0
    enospc_errors: int = 0
    eio_errors: int = 0


class Journal:
    """
    The undo journal over a backing directory: every mutating operation of
    the file system goes through it, under one lock. Pure file operations on
    the backing directory, no FUSE: tests can drive it directly.

    @ivar root: the backing directory (absolute, no trailing slash).
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.stash = os.path.join(self.root, STASH)
        if os.path.lexists(self.stash):
            shutil.rmtree(self.stash)
        os.mkdir(self.stash, 0o700)
        self.lock = threading.RLock()
        self.dirs: dict[str, dict[str, Original]] = {}
        self.files: dict[int, FileRecord] = {}
        self._refs: dict[int, int] = {}
        self.enospc = False
        self.eio_fsync = False
        self.counters = Counters()

    # -- paths ----------------------------------------------------------

    def real(self, path: str) -> str:
        """The backing path of a path in the mount (C{/a/b})."""
        return self.root + path if path != "/" else self.root

    @staticmethod
    def split(path: str) -> tuple[str, str]:
        parent, _, name = path.rpartition("/")
        return parent or "/", name

    def hidden(self, path: str) -> bool:
        """Whether C{path} is the stash (not part of the mount's view)."""
        return path == "/" + STASH or path.startswith("/" + STASH + "/")

    # -- stash ----------------------------------------------------------

    def _link(self, ino: int) -> str:
        return os.path.join(self.stash, f"i{ino}")

    def _copy(self, ino: int) -> str:
        return os.path.join(self.stash, f"c{ino}")

    def _hold(self, ino: int, source: str) -> bool:
        """Keep inode C{ino} (reachable at C{source}) alive in the stash."""
        n = self._refs.get(ino, 0)
        if n == 0:
            try:
                os.link(source, self._link(ino), follow_symlinks=False)
            except FileExistsError:
                pass
            except OSError:
                return False
        self._refs[ino] = n + 1
        return True

    def _release(self, ino: int) -> None:
        n = self._refs.get(ino, 0) - 1
        if n > 0:
            self._refs[ino] = n
            return
        self._refs.pop(ino, None)
        try:
            os.unlink(self._link(ino))
        except FileNotFoundError:
            pass

    # -- names ------------------------------------------------------------

    def _current(self, real: str) -> os.stat_result | None:
        try:
            return os.lstat(real)
        except FileNotFoundError:
            return None

    def note_name(self, path: str) -> None:
        """Journal name C{path} before it changes (first change since its directory's sync)."""
        parent, name = self.split(path)
        names = self.dirs.setdefault(parent, {})
        if name in names:
            return
        real = self.real(path)
        st = self._current(real)
        if st is None:
            names[name] = Original(None)
        elif stat.S_ISDIR(st.st_mode):
            names[name] = Original(DIR, mode=stat.S_IMODE(st.st_mode))
        else:
            self._hold(st.st_ino, real)
            names[name] = Original("file", ino=st.st_ino)

    def settle(self, path: str) -> None:
        """Forget the journal entry of C{path} if the name holds its durable content again."""
        parent, name = self.split(path)
        names = self.dirs.get(parent)
        if names is None or name not in names:
            return
        orig = names[name]
        st = self._current(self.real(path))
        same = (
            (orig.kind is None and st is None)
            or (orig.kind == "file" and st is not None and not stat.S_ISDIR(st.st_mode)
                and st.st_ino == orig.ino)
        )
        if same:
            del names[name]
            if orig.kind == "file":
                self._release(orig.ino)
            if not names:
                del self.dirs[parent]

    def synced_dir(self, path: str) -> None:
        """C{path} was fsynced: its names are durable as they are."""
        self.counters.fsyncdirs += 1
        names = self.dirs.pop(path, {})
        for orig in names.values():
            if orig.kind == "file":
                self._release(orig.ino)

    # -- file content -------------------------------------------------------

    def new_file(self, real: str, fd: int) -> None:
        """A file was just created: its durable content is empty."""
        st = os.fstat(fd)
        if st.st_ino not in self.files and self._hold(st.st_ino, real):
            self.files[st.st_ino] = FileRecord(durable_len=0)

    def will_write(self, fd: int, offset: int, real: str | None) -> None:
        """
        The file open as C{fd} (named C{real} in the backing directory, if
        it still has that name) is about to change from C{offset} on (a
        write there, or a truncation to C{offset}).
        """
        st = os.fstat(fd)
        rec = self.files.get(st.st_ino)
        if rec is None:
            if st.st_ino in self._refs:
                real = self._link(st.st_ino)
            if real is None or st.st_nlink == 0 or not self._hold(st.st_ino, real):
                return  # no name now, none durable: nothing of it can come back
            rec = self.files[st.st_ino] = FileRecord(durable_len=st.st_size)
        if not rec.copied and offset < rec.durable_len:
            # An overwrite (or a truncation) of durable bytes: keep them first
            # (read through the stash link: C{fd} may be write-only).
            with open(self._link(st.st_ino), "rb") as src, open(self._copy(st.st_ino), "wb") as out:
                left = rec.durable_len
                while left > 0:
                    chunk = src.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    out.write(chunk)
                    left -= len(chunk)
            rec.copied = True

    def forget_orphan(self, ino: int) -> None:
        """
        Drop the record of file C{ino} if nothing can bring it back: no name
        in the tree, no journaled name that held it (an aborted temporary
        file, unlinked before any fsync, costs nothing more).
        """
        rec = self.files.get(ino)
        if rec is None or self._refs.get(ino) != 1:
            return
        try:
            if os.lstat(self._link(ino)).st_nlink != 1:
                return
        except FileNotFoundError:
            pass
        del self.files[ino]
        if rec.copied:
            os.unlink(self._copy(ino))
        self._release(ino)

    def synced_file(self, fd: int) -> None:
        """The file open as C{fd} was fsynced: its content is durable."""
        self.counters.fsyncs += 1
        ino = os.fstat(fd).st_ino
        rec = self.files.pop(ino, None)
        if rec is None:
            return
        if rec.copied:
            os.unlink(self._copy(ino))
        self._release(ino)

    # -- cut ----------------------------------------------------------------

    def cut(self) -> int:
        """
        Drop everything not durable: restore journaled names, shallow
        directories first, then file contents.

        @return: journal records undone.
        """
        undone = 0
        for parent in sorted(self.dirs, key=lambda p: (p.count("/") if p != "/" else 0, p)):
            names = self.dirs[parent]
            rparent = self.real(parent)
            if not os.path.isdir(rparent) or os.path.islink(rparent):
                continue  # its own parent's restore removed it: nothing here is durable
            for name, orig in sorted(names.items()):
                undone += 1
                real = os.path.join(rparent, name)
                st = self._current(real)
                if st is not None:
                    if orig.kind == DIR and stat.S_ISDIR(st.st_mode):
                        continue  # its entries are journaled under its own path
                    if orig.kind == "file" and not stat.S_ISDIR(st.st_mode) and st.st_ino == orig.ino:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        shutil.rmtree(real)
                    else:
                        os.unlink(real)
                if orig.kind == DIR:
                    os.mkdir(real, orig.mode)
                elif orig.kind == "file":
                    os.link(self._link(orig.ino), real, follow_symlinks=False)
        for ino, rec in self.files.items():
            undone += 1
            link = self._link(ino)
            if rec.copied:
                shutil.copyfile(self._copy(ino), link)
            else:
                os.truncate(link, rec.durable_len)
        self.dirs.clear()
        self.files.clear()
        self._refs.clear()
        shutil.rmtree(self.stash)
        os.mkdir(self.stash, 0o700)
        self.counters.cuts += 1
        self.counters.undone += undone
        return undone

    def stats(self) -> dict[str, Any]:
        """Counters and the journal's size now."""
        c = self.counters
        return {
            "cuts": c.cuts, "undone": c.undone, "fsyncs": c.fsyncs, "fsyncdirs": c.fsyncdirs,
            "enospc_errors": c.enospc_errors, "eio_errors": c.eio_errors,
            "dirty_dirs": len(self.dirs), "dirty_names": sum(len(n) for n in self.dirs.values()),
            "dirty_files": len(self.files), "stash_links": len(self._refs),
            "enospc": self.enospc, "eio_fsync": self.eio_fsync,
        }


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class PowerOperations:
    """
    The FUSE operations (C{mfusepy}'s high-level API, file handles are
    backing descriptors). Not a subclass of C{mfusepy.Operations}: C{FUSE}
    only looks the methods up by name, and only those defined are set up.
    """

    use_ns = True

    def __init__(self, journal: Journal) -> None:
        self.j = journal

    # -- helpers ------------------------------------------------------------

    def _path(self, path: str) -> str:
        if self.j.hidden(path):
            raise _oserror(errno.ENOENT)
        return self.j.real(path)

    def _full(self) -> None:
        if self.j.enospc:
            self.j.counters.enospc_errors += 1
            raise _oserror(errno.ENOSPC)

    def _namespace(self, paths: list[str], op: Callable[[], Any]) -> Any:
        with self.j.lock:
            before = []
            for p in paths:
                self._path(p)
                self.j.note_name(p)
                try:
                    before.append(os.lstat(self._path(p)).st_ino)
                except FileNotFoundError:
                    pass
            try:
                return op()
            finally:
                for p in paths:
                    self.j.settle(p)
                for ino in before:
                    self.j.forget_orphan(ino)

    # -- attributes and reading ---------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.fstat(fh) if fh is not None and path is None else os.lstat(self._path(path))
        out = {k: getattr(st, k) for k in (
            "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_ino", "st_blocks", "st_blksize",
        )}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return out

    def readdir(self, path: str, fh: int) -> list[str]:
        names = os.listdir(self._path(path))
        if path == "/":
            names = [n for n in names if n != STASH]
        return [".", "..", *names]

    def readlink(self, path: str) -> str:
        return os.readlink(self._path(path))

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._path(path), amode):
            raise _oserror(errno.EACCES)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        sv = os.statvfs(self._path(path))
        return {k: getattr(sv, k) for k in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files", "f_flag",
            "f_frsize", "f_namemax",
        )}

    def open(self, path: str, flags: int) -> int:
        real = self._path(path)
        flags &= ~(os.O_CREAT | os.O_EXCL)
        if flags & os.O_TRUNC:
            with self.j.lock:
                fd = os.open(real, flags & ~os.O_TRUNC)
                try:
                    self.j.will_write(fd, 0, real)
                    os.ftruncate(fd, 0)
                except BaseException:
                    os.close(fd)
                    raise
                return fd
        return os.open(real, flags)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    # -- writing -------------------------------------------------------------

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        self._full()
        with self.j.lock:
            self.j.will_write(fh, offset, None if path is None else self._path(path))
            return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self.j.lock:
            real = None if path is None else self._path(path)
            if fh is None:
                assert real is not None
                fd = os.open(real, os.O_WRONLY)
                try:
                    self.j.will_write(fd, length, real)
                    os.ftruncate(fd, length)
                finally:
                    os.close(fd)
            else:
                self.j.will_write(fh, length, real)
                os.ftruncate(fh, length)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self.j.lock:
            if self.j.eio_fsync:
                self.j.counters.eio_errors += 1
                raise _oserror(errno.EIO)
            self.j.synced_file(fh)
        return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self.j.lock:
            self._path(path)
            if self.j.eio_fsync:
                self.j.counters.eio_errors += 1
                raise _oserror(errno.EIO)
            self.j.synced_dir(path)
        return 0

    def chmod(self, path: str, mode: int) -> int:
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        os.chown(self._path(path), uid, gid, follow_symlinks=False)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        real = self._path(path)
        if times is None:
            os.utime(real, follow_symlinks=False)
        else:
            os.utime(real, ns=times, follow_symlinks=False)
        return 0

    # -- namespace -------------------------------------------------------------

    def create(self, path: str, mode: int, flags: int) -> int:
        self._full()
        real = self._path(path)

        def op() -> int:
            existed = os.path.lexists(real)
            fd = os.open(real, (flags | os.O_CREAT) & ~os.O_TRUNC, mode)
            try:
                if not existed:
                    self.j.new_file(real, fd)
                elif flags & os.O_TRUNC:
                    self.j.will_write(fd, 0, real)
                    os.ftruncate(fd, 0)
            except BaseException:
                os.close(fd)
                raise
            return fd

        return int(self._namespace([path], op))

    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._full()
        self._namespace([path], lambda: os.mknod(self._path(path), mode, dev))
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        self._full()
        self._namespace([path], lambda: os.mkdir(self._path(path), mode))
        return 0

    def symlink(self, target: str, source: str) -> int:
        # mfusepy: symlink(name, what it points to)
        self._full()
        self._namespace([target], lambda: os.symlink(source, self._path(target)))
        return 0

    def link(self, target: str, source: str) -> int:
        # mfusepy: link(new name, existing file)
        self._full()
        self._namespace([target], lambda: os.link(self._path(source), self._path(target)))
        return 0

    def unlink(self, path: str) -> int:
        self._namespace([path], lambda: os.unlink(self._path(path)))
        return 0

    def rmdir(self, path: str) -> int:
        self._namespace([path], lambda: os.rmdir(self._path(path)))
        return 0

    def rename(self, old: str, new: str) -> int:
        if os.path.isdir(self._path(old)) and not os.path.islink(self._path(old)):
            raise _oserror(errno.EXDEV)  # directory renames are not modelled
        self._namespace([old, new], lambda: os.rename(self._path(old), self._path(new)))
        return 0


# -- the control socket -----------------------------------------------------------


def _serve_control(journal: Journal, sock: socket.socket) -> None:
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        threading.Thread(target=_control_session, args=(journal, conn), daemon=True).start()


def _control_session(journal: Journal, conn: socket.socket) -> None:
    with conn, conn.makefile("rwb") as f:
        for _ in range(10000):
            line = f.readline(1024)
            if not line:
                return
            f.write((control_reply(journal, line.decode("ascii", "replace").strip()) + "\n").encode())
            f.flush()


def control_reply(journal: Journal, command: str) -> str:
    """The answer of the control socket to one command line."""
    words = command.split()
    switch = {"on": True, "off": False}
    try:
        with journal.lock:
            if words == ["cut"]:
                return f"ok {journal.cut()}"
            if words == ["stats"]:
                return "ok " + json.dumps(journal.stats(), sort_keys=True)
            if len(words) == 2 and words[0] == "enospc" and words[1] in switch:
                journal.enospc = switch[words[1]]
                return "ok"
            if len(words) == 2 and words[0] == "eio-fsync" and words[1] in switch:
                journal.eio_fsync = switch[words[1]]
                return "ok"
    except OSError as e:
        return f"error {e}"
    return f"error unknown command {command!r} (cut, stats, enospc on|off, eio-fsync on|off)"


def serve(backing: str, mount: str, control: str, debug: bool = False) -> int:
    """Mount powerfs over C{backing} at C{mount} and serve until unmounted."""
    import logging

    import mfusepy

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr)
    journal = Journal(backing)
    try:
        os.unlink(control)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(control)
    os.chmod(control, 0o600)
    sock.listen(16)
    threading.Thread(target=_serve_control, args=(journal, sock), daemon=True).start()
    try:
        mfusepy.FUSE(
            PowerOperations(journal), mount, foreground=True, debug=debug,
            fsname=f"powerfs:{journal.root}", subtype="powerfs",
            entry_timeout=0, attr_timeout=0, negative_timeout=0,
            direct_io=True, hard_remove=True, auto_unmount=True,
        )
    finally:
        sock.close()
        try:
            os.unlink(control)
        except FileNotFoundError:
            pass
    return 0


# -- the Python API -------------------------------------------------------------


class PowerFSError(Exception):
    """powerfs could not be started, reached or stopped; the message says why."""


def unavailable_reason() -> str | None:
    """Why powerfs cannot run here (no /dev/fuse, no fusermount3, no mfusepy), or C{None}."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is missing (Debian package fuse3)"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError, EnvironmentError) as e:
        return f"mfusepy cannot load libfuse: {e}"
    return None


def send(control: str | Path, command: str, timeout: float = 30.0) -> str:
    """
    Send one command to a powerfs control socket.

    @return: the text after C{ok}.
    @raise PowerFSError: no answer, or an C{error} answer.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(control))
            s.sendall(command.encode("ascii") + b"\n")
            with s.makefile("rb") as f:
                line = f.readline(1 << 16).decode("ascii", "replace").strip()
    except OSError as e:
        raise PowerFSError(f"powerfs control socket {control}: {e}") from None
    if line == "ok" or line.startswith("ok "):
        return line[3:]
    raise PowerFSError(f"powerfs {command!r}: {line or 'no answer'}")


def is_mounted(mount: str | Path) -> bool:
    """Whether a powerfs is mounted at C{mount} (from C{/proc/self/mountinfo})."""
    target = os.path.abspath(mount)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                mp = parts[4].replace("\\040", " ")
                if mp == target and "powerfs" in line:
                    return True
    except OSError:
        pass
    return False


def unmount(mount: str | Path, timeout: float = STOP_TIMEOUT) -> str:
    """
    C{fusermount3 -u}, again while the mount is busy (a process using it may
    still be exiting) for up to a third of C{timeout}, then lazily (C{-z});
    nothing if nothing is mounted there.

    @return: C{""}, or what C{fusermount3} said when it had to go lazy.
    """
    deadline = time.monotonic() + timeout / 3
    said = ""
    while is_mounted(mount):
        r = subprocess.run(["fusermount3", "-u", str(mount)], capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0 or not is_mounted(mount):
            return ""
        said = r.stderr.strip()
        if time.monotonic() >= deadline:
            subprocess.run(["fusermount3", "-u", "-z", str(mount)], capture_output=True, timeout=timeout)
            return said
        time.sleep(POLL * 5)
    return said


def command(backing: str | Path, mount: str | Path, control: str | Path) -> list[str]:
    """The command line that runs powerfs."""
    return [sys.executable, "-m", "relaynet.lab.powerfs", str(backing), str(mount), "--control", str(control)]


class PowerFS:
    """
    A powerfs process from Python: L{start} it over a backing directory,
    L{cut} power, switch faults on and off, L{stop} it.

    @ivar proc: the powerfs process (L{None} when attached by L{attach}).
    """

    def __init__(self, backing: str | Path, mount: str | Path, control: str | Path | None = None) -> None:
        self.backing = Path(backing).absolute()
        self.mount = Path(mount).absolute()
        self.control = Path(control).absolute() if control else self.backing.with_name(
            self.backing.name + ".powerfs.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, backing: str | Path, mount: str | Path, control: str | Path | None = None,
              log: str | Path | None = None, detach: bool = False,
              timeout: float = START_TIMEOUT) -> "PowerFS":
        """
        Start powerfs (creating both directories) and wait (bounded) until it
        is mounted and answers on its control socket.

        @param log: its stdout and stderr go here (default: discarded).
        @param detach: a session of its own (outlives the caller).
        @raise PowerFSError: it did not come up (it is stopped again).
        """
        fs = cls(backing, mount, control)
        fs.backing.mkdir(parents=True, exist_ok=True)
        fs.mount.mkdir(parents=True, exist_ok=True)
        unmount(fs.mount)
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            fs.proc = subprocess.Popen(
                command(fs.backing, fs.mount, fs.control), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=detach,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        deadline = time.monotonic() + timeout
        while True:
            if fs.proc.poll() is not None:
                raise PowerFSError(f"powerfs exited with status {fs.proc.returncode} before mounting"
                                   f" {fs.mount}" + (f" (see {log})" if log else ""))
            if is_mounted(fs.mount):
                try:
                    fs.stats()
                    return fs
                except PowerFSError:
                    pass
            if time.monotonic() >= deadline:
                fs.stop()
                raise PowerFSError(f"powerfs did not mount {fs.mount} within {timeout:.0f}s")
            time.sleep(POLL)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cut(self) -> int:
        """Drop everything not durable; @return: journal records undone."""
        return int(send(self.control, "cut"))

    def enospc(self, on: bool) -> None:
        """Make writes and creates fail with ENOSPC (a full disk), or stop."""
        send(self.control, f"enospc {'on' if on else 'off'}")

    def eio_fsync(self, on: bool) -> None:
        """Make fsync and fsyncdir fail with EIO, or stop."""
        send(self.control, f"eio-fsync {'on' if on else 'off'}")

    def stats(self) -> dict[str, Any]:
        """The counters (cuts, undone, fsyncs, ...) and the journal's size."""
        data: dict[str, Any] = json.loads(send(self.control, "stats", timeout=5.0))
        return data

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """
        Unmount and wait (bounded) for the process to end: SIGTERM if it
        still serves a second later (the file system is still mounted in
        another mount namespace), SIGKILL after C{timeout}.
        """
        unmount(self.mount, timeout)
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 1.0), (signal.SIGKILL, timeout)):
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m relaynet.lab.powerfs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backing", help="the backing directory (holds the files)")
    p.add_argument("mountpoint", help="where to mount the power-loss view of it")
    p.add_argument("--control", required=True, help="UNIX socket for cut, enospc, eio-fsync, stats")
    p.add_argument("--debug", action="store_true", help="libfuse debug output")
    args = p.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"powerfs: {reason}", file=sys.stderr)
        return 1
    return serve(args.backing, args.mountpoint, args.control, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
