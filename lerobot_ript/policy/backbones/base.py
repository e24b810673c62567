"""The backbone seam: everything model-specific sits behind this small interface.

The RIPT flow head (label and time conditioning, losses, classifier-free-guided sampling) only talks to a
backbone through these three methods, so the pi0 / pi05 / SmolVLA wrappers plug in without touching it. A fourth,
`prepare_denoise`, is an optional sampling fast path: its default simply calls `denoise`.

Two optional parts let a wrapped model keep its own conventions:
- `owns_condition = True`: the backbone embeds the flow time and the label itself (`time_condition`,
  `label_condition`; the condition is their SUM, so the label part can be computed once per sampling call), e.g.
  pi05's time MLP feeding its adaRMS norms. Otherwise the policy's own time and label embeddings are used.
- `flow_action_dim`: the width of the flow state (pi0 / pi05 / SmolVLA integrate actions padded to
  `max_action_dim`); the policy samples its noise at that width, trains on the first `action_dim` dims and
  returns those.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


class RiptBackbone(nn.Module, abc.ABC):
    """Observation encoder plus a conditioned action denoiser.

    A backbone must apply `cond` (the time + optimality-label embedding) in EVERY denoiser layer (FiLM, adaLN
    or AdaRMSNorm), not only at its input: a label concatenated at the input alone proved too weak.
    """

    # True: `time_condition` and `label_condition` below embed the condition (see the module docstring).
    owns_condition: bool = False

    @property
    def flow_action_dim(self) -> int:
        """Width of the flow state (B, chunk, flow_action_dim); the first `action_dim` dims are the actions."""
        return int(self.config.action_dim)

    def time_condition(self, t: Tensor) -> Tensor:
        """(N,) flow times -> (N, cond) time part of the condition (only when `owns_condition`)."""
        raise NotImplementedError(f"{type(self).__name__} does not embed the flow time itself.")

    def label_condition(self, labels: Tensor) -> Tensor:
        """(N,) labels (good / bad / null) -> (N, cond) label part of the condition (only when `owns_condition`)."""
        raise NotImplementedError(f"{type(self).__name__} does not embed the label itself.")

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

    def prepare_denoise(
        self, context: Any, row_cond: Tensor, step_conds: Tensor
    ) -> Callable[[Tensor, int], Tensor]:
        """A denoiser for one sampling call: `f(noisy_actions, step)` equals
        `self.denoise(context, noisy_actions, row_cond + step_conds[step])`.

        `row_cond` (N, cond_dim) is the part of the condition fixed for the call (the label embedding) and
        `step_conds` (num_steps, cond_dim) the part of each Euler step, shared by every row (the time
        embedding). A backbone may override this to compute everything that depends only on `context`,
        `row_cond` and `step_conds` once, before the Euler loop; this default recomputes it at every step.
        """
        return lambda noisy_actions, step: self.denoise(context, noisy_actions, row_cond + step_conds[step])
