"""Dynamic-sampling signal and the RIPT-VLA skip tracker."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lerobot_ript.rollout.sampling import SkipTracker, group_has_signal


# ------------------------------------------------------------------------------------ group_has_signal
@pytest.mark.parametrize(
    "row,expected",
    [
        ([1, 1, 1, 1], False),
        ([0, 0, 0, 0], False),
        ([1, 0, 1, 1], True),
        ([0.5, 0.5 + 1e-10, 0.5], False),  # within tolerance
        ([0.5, 0.5 + 1e-6, 0.5], True),
        (np.array([2.0, 3.0]), True),
    ],
)
def test_group_has_signal(row, expected: bool) -> None:
    assert group_has_signal(row) is expected


def test_group_has_signal_rejects_non_finite() -> None:
    with pytest.raises(ValueError, match="1 non-finite"):
        group_has_signal([1.0, math.nan, 0.0])


# ----------------------------------------------------------------------------------------- SkipTracker
def test_skips_after_threshold_all_success_groups() -> None:
    t = SkipTracker(threshold=3)
    for _ in range(2):
        t.update(7, all_succeeded=True)
        assert not t.should_skip(7)
    t.update(7, all_succeeded=True)
    assert t.num_skipping == 1
    assert t.should_skip(7)
    assert not t.should_skip(8)  # other states unaffected


def test_mixed_group_resets_streak() -> None:
    t = SkipTracker(threshold=2)
    t.update(1, True)
    t.update(1, False)
    t.update(1, True)
    assert not t.should_skip(1)
    t.update(1, True)
    assert t.should_skip(1)


def test_history_cleared_after_threshold_skips() -> None:
    t = SkipTracker(threshold=2)
    t.update(5, True)
    t.update(5, True)
    assert [t.should_skip(5) for _ in range(3)] == [True, True, False]  # retried after 2 skips
    assert t.num_tracked == 0 and t.num_skipping == 0
    t.update(5, True)
    assert not t.should_skip(5)  # streak starts again from zero


@pytest.mark.parametrize("threshold", [0, -1])
def test_non_positive_threshold_disables(threshold: int) -> None:
    t = SkipTracker(threshold)
    for _ in range(10):
        t.update(3, True)
        assert not t.should_skip(3)
    assert t.num_skipping == 0


def test_state_dict_is_json_and_round_trips() -> None:
    t = SkipTracker(threshold=2)
    big = 2**63 + 5  # init hashes may be unsigned 64-bit
    for h in (1, big, 1):
        t.update(h, True)
    t.update(9, False)
    assert t.should_skip(1)
    state = json.loads(json.dumps(t.state_dict()))
    assert all(isinstance(k, str) for k in state["streaks"])

    t2 = SkipTracker(threshold=2)
    t2.load_state_dict(state)
    assert t2.state_dict() == t.state_dict()
    assert (t2.num_tracked, t2.num_skipping) == (3, 1)
    assert t2.should_skip(1) and not t2.should_skip(1)  # second skip clears, as in the original


events = st.lists(
    st.tuples(st.sampled_from(["update", "skip"]), st.integers(0, 3), st.booleans()), max_size=40
)


@settings(max_examples=60, deadline=None)
@given(threshold=st.integers(-1, 4), first=events, second=events)
def test_resumed_tracker_equals_uninterrupted(threshold: int, first, second) -> None:
    def play(tracker: SkipTracker, evs) -> list[bool]:
        out = []
        for kind, h, ok in evs:
            if kind == "update":
                tracker.update(h, ok)
            else:
                out.append(tracker.should_skip(h))
        return out

    uninterrupted = SkipTracker(threshold)
    play(uninterrupted, first)
    expected = play(uninterrupted, second)

    before = SkipTracker(threshold)
    play(before, first)
    resumed = SkipTracker(threshold)
    resumed.load_state_dict(json.loads(json.dumps(before.state_dict())))
    assert play(resumed, second) == expected
    assert resumed.state_dict() == uninterrupted.state_dict()
