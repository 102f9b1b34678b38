"""
SMTP on the wire: command parsing, DATA scanning, socket helpers, TLS contexts.
"""
