# -*- test-case-name: tests.test_tap -*-
"""
C{twistd relaynet}: options and service maker.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.python import usage

from relaynet.config import ConfigError, Listener, load_config


class Options(usage.Options):
    """
    Options of C{twistd relaynet}.
    """

    synopsis = "[--config node.toml] [--listen ENDPOINT] [--spool DIR]"
    longdesc = (
        "Run one relaynet SMTP relay node. With no --config, an embedded default "
        "listens on tcp:2525:interface=127.0.0.1, queues under ./var/relaynet, "
        "relays only for loopback clients and delivers every user@localhost into "
        "./var/relaynet/mailboxes/localhost/<user>/Maildir/."
    )
    optParameters = [
        ["config", "c", None, "Node configuration file (TOML); see docs/config.md."],
        ["listen", "l", None,
         "Listen on this endpoint instead of the configured listeners "
         "(e.g. tcp:2525:interface=127.0.0.1). May be given more than once."],
        ["spool", "s", None, "Spool directory, overriding [node].spool."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def postOptions(self) -> None:
        try:
            self.config = self.load()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def load(self) -> Any:
        """
        Load the configuration file and apply the command-line overrides
        (also what SIGHUP re-runs).

        @raise ConfigError: the file is invalid.
        """
        config = load_config(self["config"])
        if self["listen"]:
            config = attrs.evolve(
                config, listeners=tuple(Listener(endpoint=e) for e in self["listen"])
            )
        if self["spool"]:
            from pathlib import Path

            spool = Path(self["spool"]).absolute()
            local = config.local
            if local.mailroot == config.spool / "mailboxes":
                local = attrs.evolve(local, mailroot=spool / "mailboxes")
            config = attrs.evolve(config, spool=spool, local=local)
        return config


def makeService(options: Options) -> Any:
    """Build the node service from parsed options."""
    from twisted.internet import reactor

    from relaynet.node import RelayNode

    parent = getattr(options, "parent", None) or {}
    run_as = (parent.get("uid"), parent.get("gid")) if hasattr(parent, "get") else (None, None)
    return RelayNode(options.config, reactor, run_as=run_as, load_config=options.load)
