"""
The intake stage: the ESMTP server, relay permission (policy) and SMTP AUTH.
"""
