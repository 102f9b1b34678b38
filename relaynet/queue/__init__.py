"""
The queue: the durable spool, the pure queue core, the timetable and the retry policy.
"""
