"""RLOO advantages and the advantage processor: hand-computed cases and properties over every option."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lerobot_ript.advantages import (
    CLIPPINGS,
    LABEL_BAD,
    LABEL_GOOD,
    LABEL_NULL,
    NEGATIVE_HANDLINGS,
    NORMALIZATIONS,
    AdvantageProcessor,
    rloo_advantages,
)

ALL_COMBOS = list(itertools.product(NORMALIZATIONS, CLIPPINGS, NEGATIVE_HANDLINGS))
EXTREMES = [0.0, -0.0, 1.0, -1.0, 1e30, -1e30, 1e-300, -1e-300, math.nan, math.inf, -math.inf]

# Raw advantages as they may arrive: ordinary, extreme, tiny, and non-finite values.
nasty_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-5.0, max_value=5.0),
    st.sampled_from(EXTREMES),
)
nasty_tensors = st.builds(
    lambda vals, dtype: torch.tensor(vals, dtype=dtype),
    st.lists(nasty_floats, min_size=1, max_size=24),
    st.sampled_from([torch.float64, torch.float32]),
)


# ----------------------------------------------------------------------------------------------- RLOO
def test_rloo_hand_computed() -> None:
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1.0, -1 / 3, -1 / 3, -1 / 3]])
    torch.testing.assert_close(adv, expected)


def test_rloo_two_rollouts_is_difference() -> None:
    adv = rloo_advantages(torch.tensor([[3.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2.0, -2.0]]))


def test_rloo_all_equal_group_is_exactly_zero() -> None:
    adv = rloo_advantages(torch.tensor([[1.0] * 5, [0.1] * 5, [0.3] * 5]))
    assert torch.equal(adv, torch.zeros(3, 5))


def test_rloo_int_rewards_give_float() -> None:
    adv = rloo_advantages(torch.tensor([[1, 0]]))
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0]]))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda g: st.integers(2, 8).flatmap(
            lambda k: st.lists(st.lists(st.floats(-1e6, 1e6), min_size=k, max_size=k), min_size=g, max_size=g)
        )
    )
)
def test_rloo_matches_definition_and_has_zero_group_mean(rows: list[list[float]]) -> None:
    rewards = torch.tensor(rows, dtype=torch.float64)  # (num_groups, K)
    adv = rloo_advantages(rewards)
    k = rewards.shape[1]
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    torch.testing.assert_close(adv, rewards - others_mean, rtol=1e-9, atol=1e-6)
    assert adv.mean(dim=1).abs().max() <= 1e-6


def test_rloo_k_below_two_explains_fix() -> None:
    with pytest.raises(ValueError, match=r"at least 2 rollouts per group.*undefined.*rloo_batch_size"):
        rloo_advantages(torch.ones(3, 1))


@pytest.mark.parametrize("shape", [(4,), (2, 2, 2), ()])
def test_rloo_wrong_rank_names_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(num_groups, K\)"):
        rloo_advantages(torch.zeros(shape))


def test_rloo_non_finite_counted() -> None:
    with pytest.raises(ValueError, match="2 non-finite"):
        rloo_advantages(torch.tensor([[1.0, math.nan], [math.inf, 0.0], [1.0, 1.0]]))


# ------------------------------------------------------------------------------ processor: properties
def _bounds(p: AdvantageProcessor) -> tuple[float, float]:
    """Bounds of the processed values implied by the clipping and negative handling."""
    lo, hi = {
        "symmetric": (-p.clip_value, p.clip_value),
        "asymmetric": (-p.negative_bound, p.clip_value),
        "none": (-math.inf, math.inf),
    }[p.clipping]
    if p.negative_handling == "clamp":
        return 0.0, hi
    if p.negative_handling == "abs":
        return 0.0, max(hi, -lo)
    if p.negative_handling == "softplus":
        return 0.0, float(F.softplus(torch.tensor(hi, dtype=torch.float64)))
    return lo, hi


@pytest.mark.parametrize("normalization,clipping,negative_handling", ALL_COMBOS)
@settings(max_examples=60, deadline=None)
@given(x=nasty_tensors, clip_value=st.sampled_from([0.5, 1.0, 3.0]))
def test_processor_properties_over_all_combos(
    normalization: str, clipping: str, negative_handling: str, x: torch.Tensor, clip_value: float
) -> None:
    p = AdvantageProcessor(normalization, clipping, clip_value, None, negative_handling)
    out = p(x)
    finite = torch.isfinite(x)

    assert out.values.shape == x.shape and out.labels.shape == x.shape
    assert out.values.dtype == torch.float32 and out.labels.dtype == torch.long
    assert torch.isfinite(out.values).all()
    assert all(math.isfinite(v) for v in out.stats.values())

    # Labels come from the raw sign, whatever happens to the values afterwards.
    assert torch.equal(
        out.labels[finite & (x > 0)], torch.full_like(out.labels[finite & (x > 0)], LABEL_GOOD)
    )
    assert torch.equal(out.labels[finite & (x < 0)], torch.full_like(out.labels[finite & (x < 0)], LABEL_BAD))
    assert (out.labels[~finite | (x == 0)] == LABEL_NULL).all()
    # Non-finite inputs carry no weight.
    assert (out.values[~finite] == 0).all()

    lo, hi = _bounds(p)
    tol = 1e-5 * max(1.0, abs(hi))
    assert out.values.min() >= lo - tol and out.values.max() <= hi + tol
    if negative_handling in ("clamp", "abs", "softplus"):
        assert (out.values >= 0).all()


@pytest.mark.parametrize("normalization,clipping,negative_handling", ALL_COMBOS)
@pytest.mark.parametrize("value", [0.0, 1.0, -2.5, 1e30, -1e-300])
def test_zero_variance_batch_is_finite(
    normalization: str, clipping: str, negative_handling: str, value: float
) -> None:
    p = AdvantageProcessor(normalization, clipping, negative_handling=negative_handling)
    out = p(torch.full((7,), value))
    assert torch.isfinite(out.values).all()
    if normalization != "none":  # nothing to tell apart: every value is the normalised zero
        expected = p.handle_negatives(torch.zeros(7, dtype=torch.float64)).float()
        torch.testing.assert_close(out.values, expected)


def test_softplus_keeps_bad_labels() -> None:
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    out = AdvantageProcessor(negative_handling="softplus")(x)
    assert (out.values > 0).all()  # every weight is positive ...
    assert out.labels.tolist() == [
        LABEL_BAD,
        LABEL_BAD,
        LABEL_NULL,
        LABEL_GOOD,
        LABEL_GOOD,
    ]  # ... labels are not


def test_abs_keeps_bad_labels() -> None:
    out = AdvantageProcessor(normalization="none", clipping="none", negative_handling="abs")(
        torch.tensor([-1.0, 1.0])
    )
    assert out.values.tolist() == [1.0, 1.0]
    assert out.labels.tolist() == [LABEL_BAD, LABEL_GOOD]


def test_none_none_none_is_sanitized_identity() -> None:
    p = AdvantageProcessor(normalization="none", clipping="none", negative_handling="none")
    x = torch.tensor([-1.5, 0.25, math.nan, math.inf, -math.inf, 1e30])
    out = p(x)
    torch.testing.assert_close(out.values, torch.tensor([-1.5, 0.25, 0.0, 0.0, 0.0, 1e6]))
    assert out.stats["share_nonfinite"] == pytest.approx(0.5)


def test_standard_normalization_gives_zero_mean_unit_std() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5 + 3
    y = AdvantageProcessor("standard", "none", negative_handling="none").normalize(x)
    assert abs(float(y.mean())) < 1e-9
    assert float(y.std(correction=0)) == pytest.approx(1.0, abs=1e-5)


def test_robust_normalization_resists_outlier() -> None:
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1e6], dtype=torch.float64)
    y_robust = AdvantageProcessor("robust").normalize(x)
    y_standard = AdvantageProcessor("standard").normalize(x)
    # The outlier dominates the standard deviation, not the median absolute deviation: standard
    # normalisation squashes the inliers together, robust keeps them apart.
    spread_robust = float(y_robust[:5].max() - y_robust[:5].min())
    spread_standard = float(y_standard[:5].max() - y_standard[:5].min())
    assert spread_robust > 1.0 and spread_robust > 1000 * spread_standard


def test_robust_mad_zero_falls_back_and_stays_finite() -> None:
    x = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])  # MAD = 0 and IQR = 0: std fallback
    y = AdvantageProcessor("robust").normalize(x)
    assert torch.isfinite(y).all()
    assert (y[:6] == 0).all() and float(y[6]) > 0


def test_asymmetric_default_negative_bound_is_half() -> None:
    p = AdvantageProcessor(
        normalization="none", clipping="asymmetric", clip_value=2.0, negative_handling="none"
    )
    assert p.negative_bound == 1.0
    out = p(torch.tensor([-5.0, -0.5, 0.5, 5.0]))
    assert out.values.tolist() == [-1.0, -0.5, 0.5, 2.0]
    assert out.stats["share_clipped"] == pytest.approx(0.5)
    p2 = AdvantageProcessor(
        normalization="none",
        clipping="asymmetric",
        clip_value=2.0,
        negative_clip_value=0.25,
        negative_handling="none",
    )
    assert p2(torch.tensor([-5.0, 5.0])).values.tolist() == [-0.25, 2.0]


def test_stats_describe_raw_finite_inputs() -> None:
    out = AdvantageProcessor()(torch.tensor([-1.0, 0.0, 3.0, math.nan]))
    assert out.stats["mean"] == pytest.approx(2 / 3)
    assert out.stats["min"] == -1.0 and out.stats["max"] == 3.0
    assert out.stats["share_positive"] == 0.25 and out.stats["share_negative"] == 0.25
    assert out.stats["share_nonfinite"] == 0.25


def test_keeps_2d_shape() -> None:
    x = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))  # (num_groups, K)
    out = AdvantageProcessor()(x)
    assert out.values.shape == (2, 3)
    assert out.labels.tolist() == [[LABEL_GOOD, LABEL_BAD, LABEL_BAD], [LABEL_BAD, LABEL_BAD, LABEL_GOOD]]


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs,valid,suggestion",
    [
        ({"normalization": "standrad"}, NORMALIZATIONS, "standard"),
        ({"clipping": "symetric"}, CLIPPINGS, "symmetric"),
        ({"negative_handling": "softpuls"}, NEGATIVE_HANDLINGS, "softplus"),
    ],
)
def test_unknown_choice_lists_valid_and_suggests(
    kwargs: dict, valid: tuple[str, ...], suggestion: str
) -> None:
    with pytest.raises(ValueError) as err:
        AdvantageProcessor(**kwargs)
    msg = str(err.value)
    assert all(repr(v) in msg for v in valid)
    assert f"Did you mean {suggestion!r}?" in msg


def test_unknown_choice_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ValueError, match="valid choices") as err:
        AdvantageProcessor(normalization="zzzzzz")
    assert "Did you mean" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs", [{"clip_value": 0.0}, {"clip_value": -1.0}, {"negative_clip_value": 0.0}, {"eps": 0.0}]
)
def test_invalid_numbers_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="> 0"):
        AdvantageProcessor(**kwargs)
