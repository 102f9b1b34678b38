# -*- test-case-name: tests.test_workers -*-
"""
SIGHUP (reload) from a process's first instant: L{hold_sighup} notes one
that comes while the process starts, L{install_sighup} then reloads. For
nodes, supervisors and workers alike; the standard library only, so a
worker holds SIGHUP before it imports anything else.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

_hangup_noted = False


def hold_sighup() -> None:
    """
    From now until this process installs its reload handler
    (L{install_sighup}), a SIGHUP is noted and acted on then, neither lost
    (a worker used to ignore it while starting, and kept its old
    configuration until the next one) nor fatal (its default action).
    Also unblocks SIGHUP: a supervisor blocks it while it forks or spawns a
    worker, so that one sent meanwhile waits for this handler.
    """
    signal.signal(signal.SIGHUP, _note_hangup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})


def _note_hangup(signum: int, frame: Any) -> None:
    global _hangup_noted
    _hangup_noted = True


def install_sighup(reactor: Any, reload: Callable[[], Any]) -> Any:
    """
    Reload on SIGHUP from now on, and at once if one came while starting
    (L{hold_sighup}).

    @return: the handler it replaced (to put back on stop).
    """
    global _hangup_noted
    previous = signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload))
    if _hangup_noted:
        _hangup_noted = False
        reactor.callLater(0, reload)
    return previous
