"""LeRobot's pi0 and pi05 as RIPT backbones: the PaliGemma VLM encodes images and language (the prefix) once, the
Gemma action expert denoises the action chunk (the suffix), and the optimality label reaches every expert layer.

- pi05: the flow time enters every expert norm through adaRMS (`time_mlp_in/out` -> `adarms_cond`). The label
  embedding is added to that condition through a zero-initialised linear layer, so it modulates the scale, shift
  and gate of every expert norm (and the final one) and changes nothing at start.
- pi0: the flow time enters through the action-time MLP, and its expert norms are plain RMSNorms. The label is
  added inside the action-time MLP (zero-initialised), and every expert norm (and the final one) becomes a
  `LabelRMSNorm`: the checkpoint's norm (same `.weight`, so checkpoint keys are unchanged) followed by a
  scale and shift from the label; the MLP's label term and all norms' modulations are ONE zero-initialised
  row per label (`StackedLabelFilm`).

Training runs the prefix and suffix in one pass, as LeRobot's `forward` does (gradient checkpointing applies);
sampling encodes the prefix once into a KV cache that every Euler step and both guidance branches reuse. The
expert passes below follow `PI0Pytorch` / `PI05Pytorch` (`forward`, `sample_actions`, `denoise_step`) of
LeRobot 0.6.1 line for line, with the condition passed in instead of computed from the time; the tests
`test_wrapped_pi0_matches_lerobot_at_start` / `..._pi05_...` hold them to LeRobot's sampler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lerobot_ript.policy.backbones.vla import (
    PrefixCache,
    PrefixInputs,
    TimeLabelCondition,
    VLABackbone,
    label_expert_norms,
    label_modulate,
    language_inputs,
    repeat_prefix,
    zero_linear,
)


class PaliGemmaBackbone(VLABackbone):
    """What pi0 and pi05 share; subclasses embed the suffix (`_suffix`) and the condition."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.width = int(self.vla.model.action_in_proj.out_features)  # the expert's width

    def _state(self, batch: dict[str, Tensor]) -> Tensor | None:
        return None

    def encode_observation(self, batch: dict[str, Tensor]) -> PrefixInputs | PrefixCache:
        tokens, masks = language_inputs(batch, self.config.backbone)
        images, img_masks = self.vla._preprocess_images(batch)
        embs, pad_masks, att_masks = self.model.embed_prefix(images, img_masks, tokens, masks)
        state = self._state(batch)
        if torch.is_grad_enabled():
            return PrefixInputs(embs, pad_masks, att_masks, state)
        return PrefixCache(pad_masks, self._prefix_cache(embs, pad_masks, att_masks), state)

    def repeat_context(self, context, repeats: int):
        return repeat_prefix(context, repeats)

    def denoise(self, context, noisy_actions: Tensor, cond: Tensor) -> Tensor:
        suffix_embs, suffix_pad, suffix_att, adarms = self._suffix(context.state, noisy_actions, cond)
        if isinstance(context, PrefixCache):
            out = self._cached_pass(context, suffix_embs, suffix_pad, suffix_att, adarms)
        else:
            out = self._joint_pass(context, suffix_embs, suffix_pad, suffix_att, adarms)
        out = out[:, -self.config.chunk_size :].to(dtype=torch.float32)
        return self.model.action_out_proj(out)  # (B, chunk, max_action_dim)

    def _suffix(self, state, noisy_actions: Tensor, cond: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    # ----- the expert passes of PI0Pytorch / PI05Pytorch -----
    def _prefix_cache(self, embs: Tensor, pad_masks: Tensor, att_masks: Tensor):
        from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d

        pwe = self.model.paligemma_with_expert
        att_4d = prepare_attention_masks_4d(make_att_2d_masks(pad_masks, att_masks))
        position_ids = torch.cumsum(pad_masks, dim=1) - 1
        pwe.paligemma.model.language_model.config._attn_implementation = "eager"  # noqa: SLF001
        _, cache = pwe.forward(
            attention_mask=att_4d,
            position_ids=position_ids,
            past_key_values=None,
            inputs_embeds=[embs, None],
            use_cache=True,
        )
        return cache

    def _cached_pass(self, context: PrefixCache, suffix_embs, suffix_pad, suffix_att, adarms) -> Tensor:
        from lerobot.policies.common.vla_utils import (
            clone_past_key_values,
            make_att_2d_masks,
            prepare_attention_masks_4d,
        )

        pwe = self.model.paligemma_with_expert
        prefix_pad = context.pad_masks
        b, suffix_len, prefix_len = prefix_pad.shape[0], suffix_pad.shape[1], prefix_pad.shape[1]
        prefix_2d = prefix_pad[:, None, :].expand(b, suffix_len, prefix_len)
        full_2d = torch.cat([prefix_2d, make_att_2d_masks(suffix_pad, suffix_att)], dim=2)
        position_ids = torch.sum(prefix_pad, dim=-1)[:, None] + torch.cumsum(suffix_pad, dim=1) - 1
        pwe.gemma_expert.model.config._attn_implementation = "eager"  # noqa: SLF001
        outputs, _ = pwe.forward(
            attention_mask=prepare_attention_masks_4d(full_2d),
            position_ids=position_ids,
            past_key_values=clone_past_key_values(context.cache),
            inputs_embeds=[None, suffix_embs],
            use_cache=False,
            adarms_cond=[None, adarms],
        )
        return outputs[1]

    def _joint_pass(self, context: PrefixInputs, suffix_embs, suffix_pad, suffix_att, adarms) -> Tensor:
        from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d

        pwe = self.model.paligemma_with_expert
        prefix_embs = context.embs
        if pwe.paligemma.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
            suffix_embs = suffix_embs.to(dtype=torch.bfloat16)
            prefix_embs = prefix_embs.to(dtype=torch.bfloat16)
        pad_masks = torch.cat([context.pad_masks, suffix_pad], dim=1)
        att_masks = torch.cat([context.att_masks, suffix_att], dim=1)
        att_4d = prepare_attention_masks_4d(make_att_2d_masks(pad_masks, att_masks))
        position_ids = torch.cumsum(pad_masks, dim=1) - 1

        def expert(prefix_embs, suffix_embs, att_4d, position_ids, adarms):
            (_, suffix_out), _ = pwe.forward(
                attention_mask=att_4d,
                position_ids=position_ids,
                past_key_values=None,
                inputs_embeds=[prefix_embs, suffix_embs],
                use_cache=False,
                adarms_cond=[None, adarms],
            )
            return suffix_out

        return self.model._apply_checkpoint(expert, prefix_embs, suffix_embs, att_4d, position_ids, adarms)

    def _action_att_masks(self, b: int, leading: list[int], dtype, device) -> tuple[Tensor, Tensor]:
        """Pad (B, n) and causal-block (B, n) masks of the suffix: `leading` tokens, then the action chunk."""
        att = leading + [1] + [0] * (self.config.chunk_size - 1)
        pad = torch.ones(b, len(att), dtype=torch.bool, device=device)
        return pad, torch.tensor(att, dtype=dtype, device=device)[None, :].expand(b, len(att))

    def _sincos(self, t: Tensor) -> Tensor:
        from lerobot.policies.common.vla_utils import create_sinusoidal_pos_embedding

        c = self.vla.config
        emb = create_sinusoidal_pos_embedding(
            t, self.width, min_period=c.min_period, max_period=c.max_period, device=t.device
        )
        return emb.type(dtype=t.dtype)


class Pi05Backbone(PaliGemmaBackbone):
    """pi05: condition = time_mlp(sincos(t)) + label_gate(label_embedding(label)), fed to every adaRMS norm."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.label_embedding = nn.Embedding(3, self.width)
        self.label_gate = zero_linear(self.width, self.width)

    def time_condition(self, t: Tensor) -> Tensor:
        m = self.model
        x = F.silu(m.time_mlp_in(self._sincos(t)))
        return F.silu(m.time_mlp_out(x))  # (N, width): PI05Pytorch.embed_suffix's adarms_cond

    def label_condition(self, labels: Tensor) -> Tensor:
        return self.label_gate(self.label_embedding(labels))  # (N, width), zero at start

    def _suffix(self, state, noisy_actions: Tensor, cond: Tensor):
        action_emb = self.model.action_in_proj(noisy_actions)
        pad, att = self._action_att_masks(action_emb.shape[0], [], action_emb.dtype, action_emb.device)
        return action_emb, pad, att, cond


def _label_rms_norm_class():
    from lerobot.policies.pi_gemma import PiGemmaRMSNorm

    class LabelRMSNorm(PiGemmaRMSNorm):
        """A pi0 expert norm (a PiGemmaRMSNorm without adaRMS) followed by the label modulation of its index
        (`label_modulate`). The expert passes the stacked modulations of all its norms as `adarms_cond`, which
        LeRobot hands to every norm. It keeps the wrapped norm's `.weight` under the same name, so the
        checkpoint's keys load unchanged."""

        def __init__(self, norm: PiGemmaRMSNorm, index: int) -> None:
            super().__init__(norm.dim, eps=norm.eps, cond_dim=None)
            self.weight = norm.weight
            self.index = index

        def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, None]:
            out, _ = super().forward(x)
            return (out if cond is None else label_modulate(out, cond, self.index)), None

    return LabelRMSNorm


class Pi0Backbone(TimeLabelCondition, PaliGemmaBackbone):
    """pi0: condition = [sincos(t) | label row]; the label enters the action-time MLP and every expert norm
    (LabelRMSNorm), all from one zero-initialised table."""

    def __init__(self, config) -> None:
        super().__init__(config)
        expert = self.model.paligemma_with_expert.gemma_expert.model
        self.label_film = label_expert_norms(expert, _label_rms_norm_class(), extra=self.width)

    def time_condition(self, t: Tensor) -> Tensor:
        return self._time_part(self._sincos(t))

    def _state(self, batch: dict[str, Tensor]) -> Tensor:
        return self.vla.prepare_state(batch)  # (B, max_state_dim)

    def _suffix(self, state, noisy_actions: Tensor, cond: Tensor):
        m = self.model
        if m.state_proj.weight.dtype == torch.float32:
            state = state.to(torch.float32)
        state_emb = m.state_proj(state)[:, None, :]  # (B, 1, width)
        action_time_emb, mods = self._action_time(m, noisy_actions, cond)
        embs = torch.cat([state_emb, action_time_emb], dim=1)
        pad, att = self._action_att_masks(embs.shape[0], [1], embs.dtype, embs.device)
        return embs, pad, att, mods  # every expert norm's (1 + scale, shift)
