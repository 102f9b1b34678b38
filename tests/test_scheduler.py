"""
Tests for L{relaynet.queue.retry}: the retry policy.
"""

from relaynet.queue.retry import RetryPolicy


def test_postfix_like_schedule() -> None:
    """Without jitter: 300, 600, 1200, 2400, then capped at 4000 seconds."""
    p = RetryPolicy(jitter=0)
    assert [p.delay(n) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]


def test_jitter_bounds() -> None:
    """Jitter stays within its fraction either way."""
    p = RetryPolicy(jitter=0.1)
    assert p.delay(1, rand=lambda: 0.0) == 270
    assert p.delay(1, rand=lambda: 0.999999) < 330


def test_lifetime() -> None:
    """A message expires once it has been queued for its lifetime."""
    p = RetryPolicy(lifetime=100)
    assert not p.expired(1000, 1099)
    assert p.expired(1000, 1100)
