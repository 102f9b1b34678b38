"""
Administration: the admin API and status page, Prometheus metrics, the queue
command, and the narrow views of a node they read (L{relaynet.admin.views}).
"""
