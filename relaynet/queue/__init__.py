"""
The queue: the durable spool, the pure queue core, its states, the timetable, the retry policy and the delivery status notifications (DSNs) the core decides to send.
"""
