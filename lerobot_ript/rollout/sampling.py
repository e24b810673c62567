"""Which groups teach and which initial states to skip (pure Python / numpy, no env).

- ``group_has_signal``: a group whose K rewards are all equal has zero RLOO advantage everywhere;
  dynamic sampling (in the collector) drops it and samples more.
- ``SkipTracker``: the RIPT-VLA rule. An initial state whose K rollouts all succeeded ``threshold``
  groups in a row is skipped; after ``threshold`` skips its history is cleared so it is retried.
- ``StateCurriculum``: draw weights over initial states, the probability that a group from the state has signal.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Two rewards closer than this count as equal (0/1 successes and float returns alike).
REWARD_EQUAL_ATOL = 1e-8


def group_has_signal(rewards_row: Sequence[float] | np.ndarray, atol: float = REWARD_EQUAL_ATOL) -> bool:
    """True when the K rewards of one group are not all equal (within ``atol``), i.e. RLOO is non-zero."""
    r = np.asarray(rewards_row, dtype=np.float64).reshape(-1)  # (K,)
    if r.size == 0:
        raise ValueError(
            "group_has_signal got an empty reward group; a group holds rloo_batch_size >= 2 rewards."
        )
    num_nonfinite = int((~np.isfinite(r)).sum())
    if num_nonfinite:
        raise ValueError(
            f"group_has_signal got {num_nonfinite} non-finite reward(s) in a group of {r.size}; "
            "rewards must be finite: check the reward function or the env's info dict."
        )
    return bool(r.max() - r.min() > atol)


class SkipTracker:
    """RIPT-VLA skip rule over initial states identified by ``init_hash``.

    ``update`` counts consecutive all-success groups per state (any other group resets the count to 0). The
    same rule over all-FAILURE groups (``update(h, not any_success)``) is the collector's ``fail_tracker``.
    Once a state reached ``threshold`` of them, ``should_skip`` answers True and counts a skip; after
    ``threshold`` skips the state's history is cleared. ``threshold <= 0`` disables skipping.
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = int(threshold)
        self._streaks: dict[int, int] = {}  # init_hash -> consecutive all-success groups
        self._skips: dict[int, int] = {}  # init_hash -> skips counted since the streak reached threshold

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    @property
    def num_tracked(self) -> int:
        """States with a recorded history."""
        return len(self._streaks)

    @property
    def num_skipping(self) -> int:
        """States that ``should_skip`` would currently skip."""
        if not self.enabled:
            return 0
        return sum(1 for n in self._streaks.values() if n >= self.threshold)

    def update(self, init_hash: int, all_succeeded: bool) -> None:
        """Record one group's result for an initial state."""
        if not self.enabled:
            return
        h = int(init_hash)
        if all_succeeded:
            self._streaks[h] = self._streaks.get(h, 0) + 1
        else:
            self._streaks[h] = 0
            self._skips.pop(h, None)

    def should_skip(self, init_hash: int) -> bool:
        """True when the state is skipped now; counts the skip and clears the history after ``threshold``."""
        if not self.enabled:
            return False
        h = int(init_hash)
        if self._streaks.get(h, 0) < self.threshold:
            return False
        self._skips[h] = self._skips.get(h, 0) + 1
        if self._skips[h] >= self.threshold:  # skipped long enough: retry it from a clean slate
            del self._streaks[h]
            del self._skips[h]
        return True

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (int keys as str) for exact resume."""
        return {
            "threshold": self.threshold,
            "streaks": {str(h): n for h, n in self._streaks.items()},
            "skips": {str(h): n for h, n in self._skips.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; the tracker keeps its own threshold (the config wins) and warns if it differs."""
        saved = int(state.get("threshold", self.threshold))
        if saved != self.threshold:
            logger.warning(
                "SkipTracker: checkpoint threshold %d differs from the configured %d; keeping %d.",
                saved,
                self.threshold,
                self.threshold,
            )
        self._streaks = {int(h): int(n) for h, n in state["streaks"].items()}
        self._skips = {int(h): int(n) for h, n in state["skips"].items()}

    def __repr__(self) -> str:
        return f"SkipTracker(threshold={self.threshold}, tracked={self.num_tracked}, skipping={self.num_skipping})"


def signal_probability(successes: float, failures: float, group_size: int, prior: float = 0.5) -> float:
    """Probability that a group of ``group_size`` rollouts from one initial state has mixed outcomes (RLOO signal),
    under a Beta(prior + successes, prior + failures) posterior of the state's success rate (Jeffreys prior 0.5).

    1 - E[p^K] - E[(1-p)^K], with E[p^K] = prod_{i<K} (a + i) / (a + b + i) for p ~ Beta(a, b).
    """
    a, b = prior + float(successes), prior + float(failures)
    i = np.arange(group_size, dtype=np.float64)
    all_success = float(np.prod((a + i) / (a + b + i)))
    all_failure = float(np.prod((b + i) / (a + b + i)))
    return max(0.0, 1.0 - all_success - all_failure)


class StateCurriculum:
    """Weights over initial-state seeds that move rollouts to the states whose groups teach.

    Each seed keeps discounted counts of its rollouts' successes and failures (``discount`` per new group, so
    the estimate follows the improving policy); its weight is ``signal_probability`` of those counts. A seed
    never tried has the prior's weight (0.61 for K = 8), one whose 8 rollouts all failed (or all succeeded) once
    0.29, a half-solved one 0.95. Dynamic sampling drops groups without signal after paying for them; this
    spends fewer of the episodes on them in the first place.
    """

    def __init__(self, group_size: int, discount: float = 0.5, prior: float = 0.5) -> None:
        if group_size < 2:
            raise ValueError(f"StateCurriculum needs group_size >= 2 (got {group_size}).")
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"StateCurriculum discount={discount} must be in [0, 1].")
        if prior <= 0:
            raise ValueError(f"StateCurriculum prior={prior} must be > 0.")
        self.group_size, self.discount, self.prior = int(group_size), float(discount), float(prior)
        # seed -> (discounted successes, discounted failures)
        self._counts: dict[int, tuple[float, float]] = {}

    def record(self, seed: int, successes: int, trials: int) -> None:
        """One finished group of ``trials`` rollouts from ``seed``, ``successes`` of them successful."""
        if not 0 <= successes <= trials:
            raise ValueError(
                f"StateCurriculum.record: successes={successes} must be in [0, trials={trials}]."
            )
        s, f = self._counts.get(int(seed), (0.0, 0.0))
        self._counts[int(seed)] = (self.discount * s + successes, self.discount * f + trials - successes)

    def weight(self, seed: int) -> float:
        s, f = self._counts.get(int(seed), (0.0, 0.0))
        return signal_probability(s, f, self.group_size, self.prior)

    def weights(self, seeds: Sequence[int]) -> np.ndarray:
        """Draw probabilities over ``seeds`` (sum 1)."""
        w = np.array([self.weight(s) for s in seeds], dtype=np.float64)
        total = w.sum()
        if not total > 0:  # an empty pool, or every weight underflowed to 0 (discount=1 and huge counts)
            raise ValueError(
                f"StateCurriculum.weights: no seed has a positive weight among {len(w)} seeds; pass a non-empty "
                "pool, or use a discount < 1 so that old groups fade."
            )
        return w / total

    def state_dict(self) -> dict[str, Any]:
        return {"counts": {str(k): list(v) for k, v in self._counts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._counts = {int(k): (float(v[0]), float(v[1])) for k, v in state["counts"].items()}

    def __repr__(self) -> str:
        return f"StateCurriculum(K={self.group_size}, discount={self.discount}, seeds={len(self._counts)})"
