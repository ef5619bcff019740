"""How the community's votes rank images: one function for the gallery, Discord and the dataset export.

"Best" is the Wilson score lower bound of the up-vote share (95%), so 3 up / 0 down ranks
above 30 up / 28 down: volume alone is not rewarded. "Today" and "this week" decay the score
with the image's age (half-lives of 6 hours and 2 days). Ties go to the newer image.
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta

Z_95 = 1.959964
HALF_LIVES = {"day": timedelta(hours=6), "week": timedelta(days=2)}


def wilson_lower_bound(up: int, down: int, z: float = Z_95) -> float:
    """Lower bound of the Wilson score interval of up / (up + down); 0 without votes."""
    n = up + down
    if n <= 0 or up <= 0:
        return 0.0  # exactly: the formula leaves rounding dust (1e-18) when there are no up-votes
    share = up / n
    centre = share + z * z / (2 * n)
    margin = z * math.sqrt((share * (1 - share) + z * z / (4 * n)) / n)
    return (centre - margin) / (1 + z * z / n)


def rank_score(up: int, down: int, created_at: datetime, now: datetime, period: str = "all") -> float:
    """The ranking score of an image for `period` (all, week, day)."""
    score = wilson_lower_bound(up, down)
    half_life = HALF_LIVES.get(period)
    if half_life is None:
        return score
    age = max(timedelta(0), now - created_at)
    return score * 0.5 ** (age / half_life)


def rank_key(up: int, down: int, created_at: datetime, now: datetime, period: str = "all") -> tuple[float, float]:
    """Sort key, best first: the score, then recency."""
    return (-rank_score(up, down, created_at, now, period), -created_at.timestamp())
