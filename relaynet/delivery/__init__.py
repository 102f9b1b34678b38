"""
The delivery stage: routing table, one delivery attempt, the ESMTP client, MX lookup, local Maildir delivery.
"""
