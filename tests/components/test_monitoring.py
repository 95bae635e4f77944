"""The champion's rate monitor: its false alarm rate on a stream that keeps the promise, and how
fast it fires on one that breaks it (seeded simulations; the Monte Carlo error is stated)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from components.monitoring import RateMonitor


def test_a_stream_at_the_promised_rate_rarely_fires():
    """2,000 streams of 5,000 items flagged at exactly alpha (the worst case the promise allows):
    the share that ever fires must stay under the level (Ville), less 3 standard errors."""
    rng = np.random.default_rng(0)
    alpha, level, streams = 0.05, 0.05, 2000
    fired = 0
    for _ in range(streams):
        monitor = RateMonitor(alpha=alpha, level=level)
        for batch in np.array_split(rng.random(5000) < alpha, 10):  # ten nightly batches
            monitor.update(batch)
        fired += monitor.fired
    rate = fired / streams
    assert rate <= level + 3 * math.sqrt(level * (1 - level) / streams), rate


def test_a_shifted_stream_fires_within_a_few_hundred_items():
    """Normals now flagged at 3 alpha (the line changed): it fires, in every one of 200 streams,
    within 500 items (median about 75), and a rate below the promise never fires."""
    rng = np.random.default_rng(1)
    alpha, delays = 0.05, []
    for _ in range(200):
        monitor = RateMonitor(alpha=alpha, level=0.01)
        monitor.update(rng.random(5000) < 3 * alpha)
        assert monitor.fired
        delays.append(monitor.fired_at)
    assert max(delays) <= 500, max(delays)
    assert np.median(delays) <= 120, np.median(delays)
    quiet = RateMonitor(alpha=alpha, level=0.01)
    quiet.update(rng.random(20000) < alpha / 2)
    assert not quiet.fired


def test_batches_add_up_and_the_state_round_trips():
    rng = np.random.default_rng(2)
    flags = rng.random(3000) < 0.2
    whole, parts = RateMonitor(alpha=0.05), RateMonitor(alpha=0.05)
    assert whole.update(flags)
    newly = []
    for batch in np.array_split(flags, 7):
        parts = RateMonitor.from_dict(parts.as_dict())  # written and read back between batches
        newly.append(parts.update(batch))
    assert sum(newly) == 1  # fires once, on the batch that crossed
    assert parts.fired_at == whole.fired_at and parts.items == 3000 and parts.flagged == int(flags.sum())
    assert parts.log_wealth == pytest.approx(whole.log_wealth)


def test_a_monitor_refuses_nonsense_settings():
    with pytest.raises(ValueError, match="alpha"):
        RateMonitor(alpha=0.0)
    with pytest.raises(ValueError, match="level"):
        RateMonitor(alpha=0.05, level=1.5)
    with pytest.raises(ValueError, match="log-wealth"):
        RateMonitor.from_dict({"alpha": 0.05, "log_wealth": [0.0]})
