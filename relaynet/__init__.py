"""
relaynet: a store-and-forward SMTP relay network built on Twisted.
"""

__version__ = "0.1.0"
