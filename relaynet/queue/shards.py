# -*- test-case-name: tests.test_workers -*-
"""
The shards of a spool (a node with C{[node] workers}, L{relaynet.supervisor}):
worker K's queue is C{<spool>/queue} (K = 0) or C{<spool>/queue.K}
(L{relaynet.config.shard_queue_dir}). When the number of workers is lowered,
the shards no worker owns any more are merged into the others at start.
"""

from __future__ import annotations

import os
from pathlib import Path

from relaynet.config import shard_queue_dir, shard_queue_dirs
from relaynet.queue.spool import fsync_dir, makedirs_durable


def adopt_orphan_shards(spool: Path, workers: int) -> int:
    """
    Move the mail of every shard C{queue.K} with K >= C{workers} into shard
    K mod C{workers}, and remove the emptied shard. Blocking: run at start,
    before any worker (or the single node) recovers its queue.

    Each message's state file is moved before its queue file: a crash in
    between leaves the queue file behind, and the next start moves it after
    its state (recovery never sees a queue file without the state it had).
    The transfer-window journal of an orphan shard is dropped (a
    retransmission of one of its transfers is then queued again: at least
    once, as with another MTA).

    @return: the number of messages moved.
    """
    moved = 0
    for shard, entry in shard_queue_dirs(spool).items():
        if shard < workers:
            continue
        target = shard_queue_dir(spool, shard % workers)
        for sub in ("state", "new", "corrupt"):
            src = entry / sub
            if not src.is_dir():
                continue
            dst = target / sub
            makedirs_durable(dst)
            names = sorted(os.listdir(src))
            for name in names:
                os.replace(src / name, dst / name)
                if sub == "new":
                    moved += 1
            if names:
                fsync_dir(dst)
                fsync_dir(src)
        _remove_tree(entry)
        fsync_dir(spool)
    return moved


def _remove_tree(path: Path) -> None:
    """Remove what is left of an emptied shard (tmp files, window journal)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(root, name))
        for name in dirs:
            os.rmdir(os.path.join(root, name))
    os.rmdir(path)
