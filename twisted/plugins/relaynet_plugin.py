"""
twistd plugin for relaynet: C{twistd -n relaynet --config node.toml}.

Kept import-light on purpose: importing C{twisted.mail.smtp} here would install
the global reactor and resolve the host name whenever any twistd command scans
its plugins.
"""

from twisted.application.service import ServiceMaker

relaynet = ServiceMaker(
    "relaynet",
    "relaynet.tap",
    "A store-and-forward SMTP relay node (durable spool, local delivery).",
    "relaynet",
)
