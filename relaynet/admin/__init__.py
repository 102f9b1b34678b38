"""
Administration: the admin API and status page, Prometheus metrics, the queue command.
"""
