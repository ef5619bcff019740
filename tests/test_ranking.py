"""Ranking properties: votes, not volume; decay for recent periods; ties by recency."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st

from storage.ranking import rank_key, rank_score, wilson_lower_bound

NOW = datetime(2026, 11, 22, 12, tzinfo=timezone.utc)


def test_three_up_beats_thirty_up_twenty_eight_down():
    assert wilson_lower_bound(3, 0) > wilson_lower_bound(30, 28)


def test_no_votes_scores_zero_and_one_up_scores_above_one_down():
    assert wilson_lower_bound(0, 0) == 0.0
    assert wilson_lower_bound(1, 0) > wilson_lower_bound(0, 1) == 0.0


@given(st.integers(0, 500), st.integers(0, 500))
def test_score_is_a_probability_and_more_up_votes_never_hurt(up, down):
    score = wilson_lower_bound(up, down)
    assert 0.0 <= score <= 1.0
    assert wilson_lower_bound(up + 1, down) >= score
    assert wilson_lower_bound(up, down + 1) <= score


def test_recent_periods_decay_with_age_and_all_time_does_not():
    fresh, old = NOW - timedelta(hours=1), NOW - timedelta(days=3)
    assert rank_score(5, 0, fresh, NOW, "day") > rank_score(5, 0, old, NOW, "day")
    assert rank_score(5, 0, fresh, NOW, "week") > rank_score(5, 0, old, NOW, "week")
    assert rank_score(5, 0, fresh, NOW, "all") == rank_score(5, 0, old, NOW, "all")


def test_ties_go_to_the_newer_image():
    newer, older = NOW - timedelta(minutes=5), NOW - timedelta(minutes=50)
    ranked = sorted([("older", older), ("newer", newer)], key=lambda item: rank_key(2, 0, item[1], NOW, "all"))
    assert [name for name, _ in ranked] == ["newer", "older"]
