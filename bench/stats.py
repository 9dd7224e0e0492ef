"""Statistics the benchmarks share: ratios paired by round, with a bootstrap interval.

On a shared machine the speed drifts from one moment to the next; a row's time divided by
the reference's time in the same round takes the drift out, and the interval of the median
of those ratios says whether a difference stands out of what is left of the noise.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

MIN_ROUNDS = 5  # fewer paired rounds give no interval


def median_interval(ratios: Sequence[float], resamples: int = 2000) -> tuple[float, float, float] | None:
    """The median of ``ratios`` and a 95% bootstrap interval of it (a fixed seed: the same
    figures give the same interval), or None with fewer than ``MIN_ROUNDS`` ratios."""
    if len(ratios) < MIN_ROUNDS:
        return None
    draw = random.Random(1234)
    medians = sorted(statistics.median(draw.choices(list(ratios), k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def interval_text(paired: tuple[float, float, float] | None) -> str:
    if paired is None:
        return "n/a"
    median, low, high = paired
    return f"{median:.2f}x [{low:.2f}-{high:.2f}]"


def noise_words(paired: tuple[float, float, float], *, higher_is_better: bool) -> str:
    """Whether the interval leaves 1.0x out, and on which side: for times lower is better,
    for rates higher."""
    _, low, high = paired
    if low > 1.0:
        return "faster beyond the noise" if higher_is_better else "slower beyond the noise"
    if high < 1.0:
        return "slower beyond the noise" if higher_is_better else "faster beyond the noise"
    return "level within the noise"
