"""Watching a champion after promotion: a sequential test of its flagged rate that stays valid
however often it is looked at.

The model promises that a normal item is flagged with probability at most alpha (the ``fpr``
calibration; with ``calibration.confidence`` that holds for the calibration set drawn, with
that confidence). If the line changes (new lighting, a new supplier), normals start to look
unusual and the flagged rate climbs. Checking "is the rate above alpha?" after every batch with
a fixed-sample test would raise false alarms sooner or later; a test *supermartingale* does
not: under "rate <= alpha",

    W_t = mean over lambda in LAMBDAS of prod_i (1 + lambda (x_i - alpha)),  x_i = 1 if flagged,

never reaches 1 / level with probability more than ``level`` (Ville's inequality), over the
whole unbounded stream. Each factor is >= 0 because lambda <= 1 / alpha, and has mean <= 1
under the null, so the product is a nonnegative supermartingale, and so is an average of them
(a mixture over bets: it adapts to how far the rate moved without choosing in advance).

The state is a few numbers (the log-wealth per bet), so each scoring batch updates it and
writes it back; no item is kept.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

# bets as fractions of the largest one allowed (1 / alpha): small ones catch a small rise slowly,
# large ones a big rise quickly
BET_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5)


@dataclass
class RateMonitor:
    alpha: float                    # the flagged rate normals are promised not to exceed
    level: float = 0.01             # false alarm probability over the whole stream
    items: int = 0
    flagged: int = 0
    log_wealth: list[float] = field(default_factory=lambda: [0.0] * len(BET_FRACTIONS))
    fired_at: int | None = None     # the item count at which it first fired

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.level < 1:
            raise ValueError(f"the monitor's level must be in (0, 1), got {self.level}")
        if len(self.log_wealth) != len(BET_FRACTIONS):
            raise ValueError(f"a monitor state needs {len(BET_FRACTIONS)} log-wealth values, "
                             f"got {len(self.log_wealth)}")

    @property
    def log_evidence(self) -> float:
        """log W_t: W_t is how many times over the null's fair odds the bets have won (1 at the
        start); kept as a log, as a long-fired monitor's W_t overflows a float."""
        top = max(self.log_wealth)
        return top + math.log(float(np.mean(np.exp(np.asarray(self.log_wealth) - top))))

    @property
    def evidence(self) -> float:
        return math.exp(min(self.log_evidence, 700.0))

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def update(self, flags) -> bool:
        """Add a batch's flags (in order); True when the monitor fires on this batch for the
        first time (``fired_at`` is the exact item). Once fired it stays fired: a person looks,
        and a new champion starts a new monitor."""
        flags = np.asarray(flags, dtype=bool)
        was = self.fired
        if len(flags):
            bets = np.asarray(BET_FRACTIONS)[:, None] / self.alpha
            steps = np.log1p(bets * (flags[None, :].astype(np.float64) - self.alpha))  # (bets, items)
            paths = np.asarray(self.log_wealth)[:, None] + np.cumsum(steps, axis=1)
            if self.fired_at is None:  # log of the mean wealth after each item, stably
                top = paths.max(axis=0)
                log_evidence = top + np.log(np.mean(np.exp(paths - top), axis=0))
                crossed = np.nonzero(log_evidence >= math.log(1 / self.level))[0]
                if len(crossed):
                    self.fired_at = self.items + int(crossed[0]) + 1
            self.log_wealth = [float(v) for v in paths[:, -1]]
        self.items += len(flags)
        self.flagged += int(flags.sum())
        return self.fired and not was

    def as_dict(self) -> dict:
        return {**asdict(self), "log10_evidence": self.log_evidence / math.log(10)}

    @classmethod
    def from_dict(cls, data: dict) -> "RateMonitor":
        known = {k: data[k] for k in ("alpha", "level", "items", "flagged", "log_wealth", "fired_at") if k in data}
        return cls(**known)
