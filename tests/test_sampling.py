"""Dynamic-sampling signal, the RIPT-VLA skip tracker and the state curriculum."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lerobot_ript.rollout.collector import SeedSampler
from lerobot_ript.rollout.sampling import SkipTracker, StateCurriculum, group_has_signal, signal_probability


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


# ------------------------------------------------------------------------------------------ state curriculum
@pytest.mark.parametrize(("successes", "failures"), [(0, 0), (0, 8), (8, 0), (4, 4), (1, 7), (2.5, 0.75)])
def test_signal_probability_matches_monte_carlo(successes: float, failures: float) -> None:
    """P(K rollouts mixed) with p ~ Beta(0.5 + s, 0.5 + f), against sampling p and then the K outcomes."""
    rng = np.random.default_rng(0)
    p = rng.beta(0.5 + successes, 0.5 + failures, size=200_000)
    wins = rng.random((p.size, 8)) < p[:, None]
    mixed = float((wins.any(1) & ~wins.all(1)).mean())
    assert signal_probability(successes, failures, 8) == pytest.approx(mixed, abs=0.005)


def test_signal_probability_orders_states_by_what_they_teach() -> None:
    half, unseen, failed, solved = (signal_probability(s, f, 8) for s, f in [(4, 4), (0, 0), (0, 8), (8, 0)])
    assert half > unseen > failed and failed == pytest.approx(solved)  # symmetric in success and failure
    assert signal_probability(0, 16, 8) < failed  # more evidence of "always fails" weighs it down further
    assert 0.0 <= signal_probability(0, 1e6, 8) < 1e-3


def test_curriculum_discounts_old_groups() -> None:
    cur = StateCurriculum(group_size=8, discount=0.5)
    cur.record(7, 0, 8)
    cur.record(7, 8, 8)  # the policy now solves it: (0 * 0.5 + 8, 8 * 0.5 + 0)
    assert cur.state_dict() == {"counts": {"7": [8.0, 4.0]}}
    assert cur.weight(7) == pytest.approx(signal_probability(8, 4, 8))
    last_only = StateCurriculum(group_size=8, discount=0.0)
    last_only.record(7, 0, 8)
    last_only.record(7, 8, 8)
    assert last_only.weight(7) == pytest.approx(signal_probability(8, 0, 8))
    assert cur.weight(123) == pytest.approx(signal_probability(0, 0, 8))  # never tried: the prior


def test_curriculum_state_dict_is_json_and_round_trips() -> None:
    cur = StateCurriculum(group_size=4)
    for seed, wins in [(1, 0), (2, 4), (3, 2), (1, 1)]:
        cur.record(seed, wins, 4)
    restored = StateCurriculum(group_size=4)
    restored.load_state_dict(json.loads(json.dumps(cur.state_dict())))
    seeds = list(range(6))
    np.testing.assert_array_equal(restored.weights(seeds), cur.weights(seeds))


def test_curriculum_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="group_size >= 2"):
        StateCurriculum(group_size=1)
    with pytest.raises(ValueError, match=r"discount=1.5 must be in \[0, 1\]"):
        StateCurriculum(group_size=8, discount=1.5)
    with pytest.raises(ValueError, match="successes=9 must be in"):
        StateCurriculum(group_size=8).record(0, 9, 8)


def test_seed_sampler_with_a_curriculum_draws_teaching_states_more_often() -> None:
    """Pool of 4: seed 0 failed all 8 twice, seed 1 solved all 8 twice, seed 2 is half-solved, seed 3 untried.
    Draw frequencies follow the weights; uniform sampling (no curriculum) would give 25% each."""
    cur = StateCurriculum(group_size=8, discount=1.0)
    for _ in range(2):
        cur.record(0, 0, 8)
        cur.record(1, 8, 8)
        cur.record(2, 4, 8)
    sampler = SeedSampler(4, start=0, seed=0, curriculum=cur)
    counts = np.bincount([sampler() for _ in range(20_000)], minlength=4) / 20_000
    expected = cur.weights([0, 1, 2, 3])
    np.testing.assert_allclose(counts, expected, atol=0.015)
    assert counts[2] > counts[3] > counts[0] and counts[2] > 3 * counts[0]
    sampler.record(0, 4, 8)  # the sampler forwards a group's outcome to its curriculum
    assert cur.state_dict()["counts"]["0"] == [4.0, 20.0]
    uniform = SeedSampler(4, start=10, seed=0)
    uniform.record(10, 4, 8)  # no curriculum: nothing to update, draws stay uniform over [10, 14)
    draws = np.bincount([uniform() - 10 for _ in range(20_000)], minlength=4) / 20_000
    np.testing.assert_allclose(draws, 0.25, atol=0.015)
