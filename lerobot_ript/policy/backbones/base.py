"""The backbone seam: everything model-specific sits behind this small interface.

The RIPT flow head (label and time conditioning, losses, classifier-free-guided sampling) only talks to a
backbone through these three methods, so pi0 / pi05 / SmolVLA wrappers plug in without touching it.
"""

from __future__ import annotations

import abc
from typing import Any

from torch import Tensor, nn


class RiptBackbone(nn.Module, abc.ABC):
    """Observation encoder plus a conditioned action denoiser.

    A backbone must apply `cond` (the time + optimality-label embedding) in EVERY denoiser layer (FiLM, adaLN
    or AdaRMSNorm), not only at its input: a label concatenated at the input alone proved too weak.
    """

    @abc.abstractmethod
    def encode_observation(self, batch: dict[str, Tensor]) -> Any:
        """Encode the observation once per sample. Returns a context (a tensor or a tuple of tensors whose
        leading dimension is the batch), reused by every Euler step."""

    @abc.abstractmethod
    def repeat_context(self, context: Any, repeats: int) -> Any:
        """Stack a context `repeats` times along the batch dimension (new storage, never a view), so the
        guided and unguided branches run in one batched pass without sharing mutable tensors."""

    @abc.abstractmethod
    def denoise(self, context: Any, noisy_actions: Tensor, cond: Tensor) -> Tensor:
        """Velocity for `noisy_actions` (B, chunk, action_dim) given the context and `cond` (B, cond_dim)."""
