"""LeRobot's SmolVLA as a RIPT backbone: the SmolVLM encodes images, language and state (the prefix) once, the
smaller Llama action expert denoises the chunk (the suffix) by self- and cross-attention to the prefix's KV.

The flow time enters through the action-time MLP, as in pi0. SmolVLA's expert norms take no condition (its
`SmolVLMWithExpertModel.forward` calls them with the hidden states only), so every expert norm (both per layer
and the final one) becomes a `LabelNorm`: the checkpoint's RMSNorm (its `.weight` kept under the same name)
followed by a scale and shift from the label (all norms' from one zero-initialised table, `StackedLabelFilm`),
which the backbone places in a `LabelSlot` shared by those norms for the duration of one expert pass. The label is
also added inside the action-time MLP, its term from the same zero-initialised table. Nothing changes at start.

The expert passes follow `VLAFlowMatching.forward` / `sample_actions` / `denoise_step` of LeRobot 0.6.1, with
the condition passed in; `test_wrapped_smolvla_matches_lerobot_at_start` holds them to LeRobot's sampler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lerobot_ript.policy.backbones.vla import (
    LabelMods,
    PrefixCache,
    PrefixInputs,
    TimeLabelCondition,
    VLABackbone,
    label_expert_norms,
    label_modulate,
    language_inputs,
    repeat_prefix,
)


class LabelSlot:
    """The stacked label modulations (`StackedLabelFilm`) of the expert pass in progress, read by every LabelNorm
    (None outside a pass)."""

    def __init__(self) -> None:
        self.mods: Tensor | None = None


class LabelNorm(nn.Module):
    """The wrapped norm followed by the label modulation of its index (`label_modulate`) from the slot; without
    modulations in the slot it is the wrapped norm."""

    def __init__(self, norm: nn.Module, index: int, slot: LabelSlot) -> None:
        super().__init__()
        self.weight = norm.weight  # same key as the wrapped norm: the checkpoint's `...layernorm.weight`
        self.variance_epsilon = norm.variance_epsilon
        self._norm_forward = type(
            norm
        ).forward  # LlamaRMSNorm.forward, reading only weight / variance_epsilon
        self.index = index
        self._slot = slot

    def forward(self, x: Tensor) -> Tensor:
        out = self._norm_forward(self, x)
        mods = self._slot.mods
        return out if mods is None else label_modulate(out, mods, self.index)


class SmolVLABackbone(TimeLabelCondition, VLABackbone):
    """SmolVLA: condition = [sincos(t) | label row]; the label reaches the action-time MLP and every expert
    norm."""

    def __init__(self, config) -> None:
        super().__init__(config)
        if self.vla.config.adapt_to_pi_aloha:
            raise ValueError(
                "this SmolVLA checkpoint uses adapt_to_pi_aloha (Aloha gripper space conversions); the smolvla "
                "backbone does not support it. Use a checkpoint trained without it."
            )
        vwe = self.model.vlm_with_expert
        self.width = w = int(vwe.expert_hidden_size)
        self._slot = LabelSlot()
        self.label_film = label_expert_norms(
            vwe.lm_expert, lambda norm, index: LabelNorm(norm, index, self._slot), extra=w
        )

    def time_condition(self, t: Tensor) -> Tensor:
        from lerobot.policies.common.vla_utils import create_sinusoidal_pos_embedding

        c = self.vla.config
        emb = create_sinusoidal_pos_embedding(t, self.width, c.min_period, c.max_period, device=t.device)
        return self._time_part(emb.type(dtype=self.model.action_in_proj.weight.dtype))

    def encode_observation(self, batch: dict[str, Tensor]) -> PrefixInputs | PrefixCache:
        from lerobot.policies.common.vla_utils import make_att_2d_masks

        tokens, masks = language_inputs(batch, "smolvla")
        images, img_masks = self.vla.prepare_images(batch)
        state = self.vla.prepare_state(batch)
        embs, pad_masks, att_masks = self.model.embed_prefix(images, img_masks, tokens, masks, state=state)
        if torch.is_grad_enabled():
            return PrefixInputs(embs, pad_masks, att_masks)
        _, cache = self.model.vlm_with_expert.forward(
            attention_mask=make_att_2d_masks(pad_masks, att_masks),
            position_ids=torch.cumsum(pad_masks, dim=1) - 1,
            past_key_values=None,
            inputs_embeds=[embs, None],
            use_cache=True,
        )
        return PrefixCache(pad_masks, cache)

    def repeat_context(self, context, repeats: int):
        return repeat_prefix(context, repeats)

    def denoise(self, context, noisy_actions: Tensor, cond: Tensor) -> Tensor:
        from lerobot.policies.common.vla_utils import make_att_2d_masks

        m = self.model
        suffix_embs, mods = self._action_time(m, noisy_actions, cond)
        b, n = suffix_embs.shape[:2]
        suffix_pad = torch.ones(b, n, dtype=torch.bool, device=suffix_embs.device)
        suffix_att = torch.ones(b, n, dtype=suffix_embs.dtype, device=suffix_embs.device)  # [1] * chunk_size
        with self._label(mods):
            if isinstance(context, PrefixCache):
                out = self._cached_pass(context, suffix_embs, suffix_pad, suffix_att)
            else:
                pad_masks = torch.cat([context.pad_masks, suffix_pad], dim=1)
                att_masks = torch.cat([context.att_masks, suffix_att], dim=1)
                (_, out), _ = m.vlm_with_expert.forward(
                    attention_mask=make_att_2d_masks(pad_masks, att_masks),
                    position_ids=torch.cumsum(pad_masks, dim=1) - 1,
                    past_key_values=None,
                    inputs_embeds=[context.embs, suffix_embs],
                    use_cache=False,
                )
        out = out[:, -self.config.chunk_size :].to(dtype=torch.float32)
        return m.action_out_proj(out)  # (B, chunk, max_action_dim)

    def _cached_pass(self, context: PrefixCache, suffix_embs, suffix_pad, suffix_att) -> Tensor:
        from lerobot.policies.common.vla_utils import make_att_2d_masks

        prefix_pad, cache = context.pad_masks, context.cache
        b, suffix_len, prefix_len = prefix_pad.shape[0], suffix_pad.shape[1], prefix_pad.shape[1]
        prefix_2d = prefix_pad[:, None, :].expand(b, suffix_len, prefix_len)
        full_2d = torch.cat([prefix_2d, make_att_2d_masks(suffix_pad, suffix_att)], dim=2)
        position_ids = torch.sum(prefix_pad, dim=-1)[:, None] + torch.cumsum(suffix_pad, dim=1) - 1
        try:
            outputs, _ = self.model.vlm_with_expert.forward(
                attention_mask=full_2d,
                position_ids=position_ids,
                past_key_values=cache,
                inputs_embeds=[None, suffix_embs],
                use_cache=True,
            )
        finally:
            cache.crop(prefix_len)  # self-attention layers appended the suffix K/V: restore the prefix
        return outputs[1]

    @contextlib.contextmanager
    def _label(self, mods: LabelMods) -> Iterator[None]:
        self._slot.mods = mods  # every expert norm's (1 + scale, shift)
        try:
            yield
        finally:
            self._slot.mods = None
