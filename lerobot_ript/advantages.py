"""RLOO advantages and the advantage processor (pure tensor code, no model, no env).

Two consumers read what this module returns:
- the CFG objective reads only ``labels`` (the SIGN of the raw RLOO advantage: good / bad / null);
- the weighted objective reads ``values`` (normalised, clipped, negatives handled).

The labels are taken from the raw advantages before any processing: softplus or abs would otherwise
turn every failure into "good".
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Optimality labels fed to the policy's label embedding.
LABEL_NULL = 0  # unconditioned: zero advantage, non-finite advantage, or dropped label
LABEL_GOOD = 1  # advantage > 0
LABEL_BAD = 2  # advantage < 0

NORMALIZATIONS = ("standard", "robust", "none")
CLIPPINGS = ("symmetric", "asymmetric", "none")
NEGATIVE_HANDLINGS = ("softplus", "abs", "clamp", "none")

# Raw advantages are clamped to +-MAX_ABS_ADVANTAGE (in float64) before any statistic, so squares and
# sums cannot overflow. RLOO advantages of 0/1 rewards lie in [-1, 1]; 1e6 leaves room for returns.
MAX_ABS_ADVANTAGE = 1e6
# Consistency constant turning a median absolute deviation into a standard deviation (normal data).
MAD_TO_STD = 1.4826
# Interquartile range of a standard normal distribution: IQR / 1.349 estimates the standard deviation.
IQR_TO_STD = 1.349


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages: A_i = R_i - mean of the other K-1 rewards of its group.

    rewards: (num_groups, K). Returns (num_groups, K), float (the input's float dtype, else float32).
    A group whose rewards are all equal gets exact zeros.
    """
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 2:
        raise ValueError(
            f"rloo_advantages expects rewards of shape (num_groups, K), got shape {tuple(rewards.shape)}; "
            "reshape the flat rewards with rewards.view(num_groups, rloo_batch_size)."
        )
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(
            f"RLOO needs at least 2 rollouts per group, got K={k}: the leave-one-out baseline is undefined "
            "with a single rollout. Raise rloo_batch_size to 2 or more."
        )
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    r = rewards.to(torch.float64)  # (num_groups, K)
    num_nonfinite = int((~torch.isfinite(r)).sum())
    if num_nonfinite:
        raise ValueError(
            f"rloo_advantages got {num_nonfinite} non-finite reward(s) out of {r.numel()}; "
            "rewards must be finite numbers: check the reward function or the env's info dict."
        )
    # Shift by each group's first reward so that an all-equal group gives exact zeros.
    d = r - r[:, :1]  # (num_groups, K)
    # R_i - (S - R_i) / (K - 1) = K / (K - 1) * (R_i - mean)
    adv = (d - d.mean(dim=1, keepdim=True)) * (k / (k - 1))  # (num_groups, K)
    return adv.to(out_dtype)


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value in valid:
        return
    hint = difflib.get_close_matches(str(value), valid, n=1)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(
        f"AdvantageProcessor.{name}={value!r} is not a valid choice; valid choices: "
        f"{', '.join(repr(v) for v in valid)}.{did_you_mean}"
    )


def _sanitize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copy with non-finite entries set to 0 and magnitudes clamped, plus the finite mask."""
    x = torch.as_tensor(x).to(torch.float64)
    finite = torch.isfinite(x)
    clean = torch.where(finite, x, torch.zeros_like(x)).clamp(-MAX_ABS_ADVANTAGE, MAX_ABS_ADVANTAGE)
    return clean, finite


def _quantiles(sorted_x: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Linear-interpolation quantiles of a sorted 1-D tensor (no size limit, unlike torch.quantile)."""
    n = sorted_x.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo, hi = int(pos), min(int(pos) + 1, n - 1)
        frac = pos - lo
        out.append(float(sorted_x[lo]) * (1.0 - frac) + float(sorted_x[hi]) * frac)
    return out


@dataclass
class AdvantageOutput:
    """What the processor returns; every tensor has the input's shape."""

    values: torch.Tensor  # processed advantages, finite float32: weights of the weighted objective
    labels: torch.Tensor  # int64 in {LABEL_NULL, LABEL_GOOD, LABEL_BAD}, from the raw sign
    stats: dict[str, float] = field(default_factory=dict)  # scalars for logging (advantage/*)


@dataclass(frozen=True)
class AdvantageProcessor:
    """Sanitize -> normalize -> clip -> negative handling, on a whole batch of advantages.

    Non-finite inputs are left out of every statistic, get label null and value 0 (no weight).
    """

    # Normalisation over the batch: "standard" (x - mean) / (std + eps); "robust"
    # (x - median) / (1.4826 * MAD + eps), falling back to IQR / 1.349, then std, when MAD is 0; "none".
    normalization: str = "standard"
    # "symmetric": clamp to [-clip_value, clip_value]; "asymmetric": clamp to
    # [-negative_clip_value, clip_value]; "none": no clipping.
    clipping: str = "symmetric"
    # Upper clipping bound (in normalised units when normalising), > 0.
    clip_value: float = 3.0
    # Bound for negative values with asymmetric clipping, > 0; None means clip_value / 2 (failures
    # pushed away from less hard than successes are pulled towards).
    negative_clip_value: float | None = None
    # Weighted objective only: "softplus", "abs", "clamp" (max(x, 0)), or "none" (negative weights kept).
    negative_handling: str = "clamp"
    # Added to the scale in normalisation, > 0.
    eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("clipping", self.clipping, CLIPPINGS)
        _check_choice("negative_handling", self.negative_handling, NEGATIVE_HANDLINGS)
        if not (self.clip_value > 0 and self.clip_value < float("inf")):
            raise ValueError(
                f"AdvantageProcessor.clip_value={self.clip_value!r} must be a finite number > 0; "
                "use clipping='none' to turn clipping off."
            )
        ncv = self.negative_clip_value
        if ncv is not None and not (ncv > 0 and ncv < float("inf")):
            raise ValueError(
                f"AdvantageProcessor.negative_clip_value={ncv!r} must be a finite number > 0, "
                "or None for clip_value / 2."
            )
        if not (self.eps > 0 and self.eps < float("inf")):
            raise ValueError(f"AdvantageProcessor.eps={self.eps!r} must be a finite number > 0, e.g. 1e-6.")

    @property
    def negative_bound(self) -> float:
        """Magnitude bound of negative values under asymmetric clipping."""
        return self.negative_clip_value if self.negative_clip_value is not None else self.clip_value / 2

    def labels(self, advantages: torch.Tensor) -> torch.Tensor:
        """Optimality labels from the sign of the RAW advantages: >0 good, <0 bad, 0 or non-finite null."""
        x = torch.as_tensor(advantages)
        finite = torch.isfinite(x)
        labels = torch.full(x.shape, LABEL_NULL, dtype=torch.long, device=x.device)
        labels[finite & (x > 0)] = LABEL_GOOD
        labels[finite & (x < 0)] = LABEL_BAD
        return labels

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over all entries (non-finite ones are sanitized first). Returns float64, same shape."""
        x, _ = _sanitize(x)
        flat = x.reshape(-1)
        if flat.numel() == 0 or self.normalization == "none":
            return x
        if bool((flat == flat[0]).all()):  # zero variance (or a single value): nothing to tell apart
            return torch.zeros_like(x)
        if self.normalization == "standard":
            mean = flat.mean()
            return (x - mean) / (flat.std(correction=0) + self.eps)
        # robust
        s = flat.sort().values
        (median,) = _quantiles(s, (0.5,))
        scale = MAD_TO_STD * float((flat - median).abs().median())
        if scale == 0.0:
            q1, q3 = _quantiles(s, (0.25, 0.75))
            scale = (q3 - q1) / IQR_TO_STD
        if scale == 0.0:
            scale = float(flat.std(correction=0))
        return (x - median) / (scale + self.eps)

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp to the configured bounds; same shape and dtype."""
        if self.clipping == "symmetric":
            return x.clamp(-self.clip_value, self.clip_value)
        if self.clipping == "asymmetric":
            return x.clamp(-self.negative_bound, self.clip_value)
        return x

    def handle_negatives(self, x: torch.Tensor) -> torch.Tensor:
        """Map values to non-negative weights (softplus / abs / clamp) or leave them ("none")."""
        if self.negative_handling == "softplus":
            return F.softplus(x)
        if self.negative_handling == "abs":
            return x.abs()
        if self.negative_handling == "clamp":
            return x.clamp(min=0)
        return x

    def __call__(self, advantages: torch.Tensor) -> AdvantageOutput:
        """Run the whole pipeline on a batch of raw advantages of any shape."""
        raw = torch.as_tensor(advantages)
        labels = self.labels(raw)  # from the sign, before any processing
        x, finite = _sanitize(raw)  # float64, same shape
        valid = x[finite]  # (num_finite,)

        normalized = torch.zeros_like(x)
        normalized[finite] = self.normalize(valid)
        clipped = self.clip(normalized)
        values = self.handle_negatives(clipped)
        values = torch.where(finite, values, torch.zeros_like(values))  # non-finite inputs: no weight
        values = torch.nan_to_num(values.to(torch.float32), nan=0.0)  # last guard: inf -> float32 max

        n = max(raw.numel(), 1)
        num_valid = valid.numel()
        stats = {
            "mean": float(valid.mean()) if num_valid else 0.0,
            "std": float(valid.std(correction=0)) if num_valid else 0.0,
            "min": float(valid.min()) if num_valid else 0.0,
            "max": float(valid.max()) if num_valid else 0.0,
            "share_clipped": float((clipped != normalized)[finite].sum()) / n,
            "share_nonfinite": float((~finite).sum()) / n,
            "share_positive": float((labels == LABEL_GOOD).sum()) / n,
            "share_negative": float((labels == LABEL_BAD).sum()) / n,
        }
        return AdvantageOutput(values=values, labels=labels, stats=stats)
