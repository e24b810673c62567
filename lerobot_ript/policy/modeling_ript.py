"""The `ript` policy: advantage-conditioned flow matching with classifier-free guidance.

Training (objective "cfg"): every frame carries an optimality label from the sign of its `advantages`
(good / bad / null; no key: good), dropped to null with `cfg_dropout_prob`; the denoiser is conditioned on
label and flow time in every layer. Sampling: v = v_null + w (v_good - v_null), both branches in one batched
pass of 2B rows with the observation encoded once, and what is constant within the call (label, context, the
Euler grid's time conditioning) computed once before the Euler loop (`RiptBackbone.prepare_denoise`).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from lerobot.policies.common.flow_matching import euler_integrate, sample_noise, sample_time_beta
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.utils.constants import ACTION, OBS_IMAGES
from torch import Tensor, nn

from lerobot_ript.advantages import LABEL_BAD, LABEL_GOOD, LABEL_NULL
from lerobot_ript.policy.backbones import make_backbone
from lerobot_ript.policy.configuration_ript import RiptConfig
from lerobot_ript.shapes import pad_or_truncate

ADVANTAGES_KEY = "advantages"
ADVANTAGE_WEIGHTS_KEY = "advantage_weights"
INIT_HASH_KEY = "init_hash"


def labels_from_advantages(batch: dict[str, Tensor], batch_size: int, device: torch.device) -> Tensor:
    """Optimality labels (B,) from the SIGN of `batch["advantages"]`; every frame is good without the key."""
    if ADVANTAGES_KEY not in batch:
        return torch.full((batch_size,), LABEL_GOOD, dtype=torch.long, device=device)
    adv = torch.as_tensor(batch[ADVANTAGES_KEY], device=device).reshape(batch_size, -1)[:, 0]  # (B,)
    bad = ~torch.isfinite(adv)
    if bad.any():
        raise ValueError(
            f"batch key '{ADVANTAGES_KEY}' has {int(bad.sum())} non-finite values (NaN/inf) out of {batch_size}. "
            "Run the advantages through lerobot_ript.advantages.AdvantageProcessor or fix the dataset column."
        )
    labels = torch.full((batch_size,), LABEL_NULL, dtype=torch.long, device=device)
    labels[adv > 0] = LABEL_GOOD
    labels[adv < 0] = LABEL_BAD
    return labels


def sample_weights(batch: dict[str, Tensor], batch_size: int, device: torch.device) -> Tensor:
    """Non-negative per-sample weights (B,) for the "weighted" objective."""
    key = ADVANTAGE_WEIGHTS_KEY if ADVANTAGE_WEIGHTS_KEY in batch else ADVANTAGES_KEY
    if key not in batch:
        return torch.ones(batch_size, device=device)
    w = torch.as_tensor(batch[key], device=device, dtype=torch.float32).reshape(batch_size, -1)[:, 0]
    if not torch.isfinite(w).all():
        raise ValueError(f"batch key '{key}' has non-finite values; process advantages before training.")
    if (w < 0).any():
        raise ValueError(
            f"The 'weighted' objective needs non-negative weights but '{key}' has {int((w < 0).sum())} negative "
            "values. Pass them through AdvantageProcessor with negative_handling=softplus|abs|clamp."
        )
    return w


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of the flow time t in [0, 1] followed by an MLP: (B,) -> (B, dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(
            -math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        angles = t.float()[:, None] * 1000.0 * freqs[None]
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
        if emb.shape[-1] < self.dim:
            emb = F.pad(emb, (0, self.dim - emb.shape[-1]))
        return self.mlp(emb)


class RiptPolicy(PreTrainedPolicy):
    """Flow-matching policy conditioned on an optimality label, sampled with classifier-free guidance."""

    config_class = RiptConfig
    name = "ript"

    def __init__(self, config: RiptConfig, **kwargs) -> None:
        super().__init__(config)
        config.validate_features()
        config.validate_hyperparameters()
        self.config = config
        self.backbone = make_backbone(config)
        if not self.backbone.owns_condition:
            self.time_embedding = TimeEmbedding(config.cond_dim)
            self.label_embedding = nn.Embedding(3, config.cond_dim)
        self.reset()

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path, *, config: RiptConfig | None = None, **kwargs):
        """LeRobot's loader, strict by default (a missing or unexpected key fails instead of leaving a layer at its
        initial value), with a VLA backbone rebuilt from the saved `backbone_config` rather than reloaded from
        its original checkpoint: the ript checkpoint's weights fill it."""
        from lerobot_ript.policy.backbones.vla import architecture_only

        kwargs.setdefault("strict", True)
        with architecture_only():
            return super().from_pretrained(pretrained_name_or_path, config=config, **kwargs)

    # ----- LeRobot policy API -----
    def get_optim_params(self) -> list[nn.Parameter]:
        """The trainable parameters (a VLA's frozen vision encoder or VLM is left out)."""
        return [p for p in self.parameters() if p.requires_grad]

    def reset(self) -> None:
        self._action_queue: deque[Tensor] = deque(maxlen=self.config.n_action_steps)

    def forward(self, batch: dict[str, Tensor], reduction: str = "mean") -> tuple[Tensor, dict]:
        """Flow-matching loss of the configured objective. reduction="none" gives the per-sample loss (B,)."""
        actions = batch[ACTION]
        if actions.dim() == 2:
            actions = actions.unsqueeze(1)  # (B, 1, A)
        b, device = actions.shape[0], actions.device
        if actions.shape[1] != self.config.chunk_size:
            raise ValueError(
                f"'{ACTION}' has a chunk of {actions.shape[1]} steps, the policy expects chunk_size="
                f"{self.config.chunk_size}. Load the dataset with the policy's action_delta_indices."
            )
        pad = batch.get(f"{ACTION}_is_pad")
        valid = torch.ones(actions.shape[:2], device=device) if pad is None else (~pad.bool()).float()
        if (
            ADVANTAGES_KEY in getattr(self.config, "_dataset_feature_keys", ())
            and ADVANTAGES_KEY not in batch
        ):
            raise ValueError(
                f"The training dataset labels its frames with '{ADVANTAGES_KEY}', but the batch reaching "
                "RiptPolicy.forward has none, so every frame would train as good. A preprocessor reloaded by "
                "LeRobot (`lerobot-train --policy.path=...` or `--resume=true`) uses LeRobot's own batch "
                "converter, which drops the key. Train from a checkpoint with `python -m lerobot_ript.train "
                "--checkpoint_path=...`, or call `lerobot_ript.policy.processor_ript.attach_ript_converter"
                "(preprocessor)` on the reloaded preprocessor in a script of your own."
            )
        labels = labels_from_advantages(batch, b, device)
        context = self.backbone.encode_observation(self._images_to_float(batch))
        actions = pad_or_truncate(
            actions, self.backbone.flow_action_dim
        )  # (B, T, flow_action_dim), zeros past A
        noise = sample_noise(actions.shape, device)
        t = self._sample_time(b, device)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
        target = noise - actions  # (B, T, A)

        objective = self.config.objective
        counts = torch.bincount(labels, minlength=3).tolist()  # per label, one host read
        metrics: dict[str, float] = {"share_good": counts[LABEL_GOOD] / b, "share_bad": counts[LABEL_BAD] / b}
        if objective == "cfgrl":
            ctx2 = self.backbone.repeat_context(context, 2)
            labels2 = torch.cat([torch.full_like(labels, LABEL_GOOD), torch.full_like(labels, LABEL_NULL)])
            v2 = self._velocity(ctx2, torch.cat([x_t, x_t]), torch.cat([t, t]), labels2)
            loss_good, loss_null = self._masked_mse(
                v2, torch.cat([target, target]), valid.repeat(2, 1)
            ).chunk(2)
            per_sample = (labels == LABEL_GOOD).float() * loss_good + self.config.cfg_alpha * loss_null
            metrics["loss_null"] = float(loss_null.detach().mean())
        elif objective == "repel":
            neg = labels == LABEL_BAD
            labels = self._drop_labels(
                torch.where(neg, torch.full_like(labels, LABEL_GOOD), labels), keep=neg
            )
            flow = self._masked_mse(self._velocity(context, x_t, t, labels), target, valid)
            per_sample = self._repel(batch, flow, neg, (x_t, t, labels, target, valid), metrics)
        else:
            if objective == "weighted":
                weights = sample_weights(batch, b, device)
                labels = torch.full_like(labels, LABEL_GOOD)
            else:
                labels = self._drop_labels(labels)
            per_sample = self._masked_mse(self._velocity(context, x_t, t, labels), target, valid)
            if objective == "weighted":
                per_sample = per_sample * weights
                metrics["mean_weight"] = float(weights.mean())
        if reduction == "none":
            return per_sample, metrics
        loss = per_sample.mean()
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def _drop_labels(self, labels: Tensor, keep: Tensor | None = None) -> Tensor:
        """Condition dropout: in training, each label becomes null with probability `cfg_dropout_prob`,
        except where `keep` is True (the repel objective's failure rows, whose label is the push target)."""
        if not self.training or self.config.cfg_dropout_prob <= 0:
            return labels
        drop = torch.rand(labels.shape[0], device=labels.device) < self.config.cfg_dropout_prob
        if keep is not None:
            drop &= ~keep
        return torch.where(drop, torch.full_like(labels, LABEL_NULL), labels)

    def set_reference(self) -> None:
        """Freeze a copy of the current weights as the "repel" objective's trust-region reference.

        The training loop calls it before each iteration's updates. The copy is not a submodule: it is
        neither saved, nor trained, nor seen by DDP / FSDP wrappers."""
        ref = self.__dict__.get("_reference")
        device = next(self.parameters()).device
        if ref is None or next(ref.parameters()).device != device:
            self.__dict__["_reference"] = None
            ref = copy.deepcopy(self)
            ref.requires_grad_(False)
            ref.eval()
            self.__dict__["_reference"] = ref
        else:
            ref.load_state_dict(self.state_dict())

    def _repel(self, batch: dict, flow: Tensor, neg: Tensor, draw: tuple, metrics: dict) -> Tensor:
        """Per-sample loss (B,) of the "repel" objective from the flow losses (B,) of this draw; its mean is the
        successes' mean flow loss plus repel_weight times the failures' mean clipped-ratio term."""
        b = flow.shape[0]
        pos, n_neg = ~neg, int(neg.sum())
        n_pos = b - n_neg
        out = torch.where(pos, flow * (b / max(n_pos, 1)), torch.zeros_like(flow))
        metrics["loss_pos"] = float(flow[pos].detach().mean()) if n_pos else float("nan")
        for key in ("repel_ratio", "repel_clipped", "repel_capped"):  # the same keys with or without failures
            metrics[key] = float("nan")
        if n_neg == 0 or self.config.repel_weight == 0:
            return out
        ref = self.__dict__.get("_reference")
        if ref is None:
            raise RuntimeError(
                "objective='repel' got failure frames (negative advantages) but has no reference policy: call "
                "policy.set_reference() before each round of updates (lerobot_ript.train does)."
            )
        x_t, t, labels, target, valid = draw
        idx = neg.nonzero(as_tuple=True)[0]
        with torch.no_grad():
            ref_ctx = ref.backbone.encode_observation(ref._images_to_float(_select_rows(batch, idx, b)))
            ref_flow = ref._masked_mse(
                ref._velocity(ref_ctx, x_t[idx], t[idx], labels[idx]), target[idx], valid[idx]
            )
        adv = torch.as_tensor(batch[ADVANTAGES_KEY], device=flow.device).reshape(b, -1)[idx, 0].float().abs()
        # r = exp(L_ref - L): the flow loss stands in for -log pi. PPO's clipped term for A < 0 is |A| max(r, 1 - clip)
        # (no gradient once r < 1 - clip), capped at |A| repel_ratio_cap as in dual-clip PPO (no gradient once
        # r > cap either: one noise draw's flow loss can sit far below the reference's, and exp of that
        # difference is unbounded). The cap on log r only guards exp against overflow.
        ratio = torch.exp((ref_flow.float() - flow[idx].float()).clamp(max=20.0))
        c = self.config
        term = c.repel_weight * adv * ratio.clamp(min=1 - c.repel_clip, max=c.repel_ratio_cap)
        r = ratio.detach()
        metrics["repel_ratio"] = float(r.median())
        metrics["repel_clipped"] = float((r < 1 - c.repel_clip).float().mean())
        metrics["repel_capped"] = float((r > c.repel_ratio_cap).float().mean())
        return out.index_put((idx,), term.to(out.dtype) * (b / n_neg))

    @torch.no_grad()
    def predict_action_chunk(
        self,
        batch: dict[str, Tensor],
        noise: Tensor | None = None,
        guidance_scale: float | None = None,
        batched_guidance: bool = True,
        precompute: bool = True,
        noise_scale: float = 1.0,
    ) -> Tensor:
        """Sample a normalised action chunk (B, chunk_size, action_dim) with guidance scale w.

        Without `noise`, the initial flow noise is a standard normal draw times `noise_scale` (1 = the policy as
        trained, 0 = its deterministic mean path, in between = sharper sampling).

        w = 1 runs one conditional pass per Euler step. w != 1 runs the good and null branches in ONE
        batched pass of 2B rows sharing the observation encoding (or two passes if batched_guidance=False,
        kept for tests and benchmarks). precompute=True computes what is constant within the call (label and
        context conditioning, see `RiptBackbone.prepare_denoise`) once before the Euler loop; False recomputes
        it every step (the plain reference, same result up to float rounding). The batch is never mutated.
        """
        w = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        if w < 0:
            raise ValueError(f"guidance_scale={w} must be >= 0.")
        context = self.backbone.encode_observation(self._images_to_float(batch))
        b = _batch_size(context)
        device = next(self.parameters()).device
        shape = (b, self.config.chunk_size, self.backbone.flow_action_dim)
        if noise is not None and tuple(noise.shape) != shape:
            raise ValueError(
                f"noise has shape {tuple(noise.shape)}; this policy integrates a flow state of shape {shape} "
                "(batch, chunk_size, the backbone's flow_action_dim)."
            )
        x1 = noise_scale * sample_noise(shape, device) if noise is None else noise.to(device)
        good = torch.full((b,), LABEL_GOOD, dtype=torch.long, device=device)
        # the branch guidance moves away from: null (classifier-free guidance) or bad (policy.guidance_negative)
        neg = torch.full_like(good, LABEL_BAD if self.config.guidance_negative == "bad" else LABEL_NULL)
        if w == 1.0:
            fn = self._velocity_fn(context, good, precompute)
        elif batched_guidance:
            ctx2 = self.backbone.repeat_context(context, 2)
            if self.config.enable_cfg_safe_copy:
                _check_context_not_shared(context, ctx2)
            v2 = self._velocity_fn(ctx2, torch.cat([good, neg]), precompute)
            fn = lambda x, t: _guide(*v2(torch.cat([x, x]), torch.cat([t, t])).chunk(2), w)  # noqa: E731
        else:
            v_good = self._velocity_fn(context, good, precompute)
            v_neg = self._velocity_fn(context, neg, precompute)
            fn = lambda x, t: _guide(v_good(x, t), v_neg(x, t), w)  # noqa: E731
        return euler_integrate(fn, x1, self.config.num_inference_steps)[..., : self.config.action_dim]

    @torch.no_grad()
    def select_action(self, batch: dict[str, Tensor], noise: Tensor | None = None) -> Tensor:
        """One action (B, action_dim) from a queue refilled with `n_action_steps` of a fresh chunk."""
        self.eval()
        if len(self._action_queue) == 0:
            chunk = self.predict_action_chunk(batch, noise=noise)[:, : self.config.n_action_steps]
            self._action_queue.extend(chunk.transpose(0, 1))
        return self._action_queue.popleft()

    # ----- conditioning and guidance -----
    def velocity_field(
        self, batch: dict[str, Tensor], label: int = LABEL_GOOD, precompute: bool = True
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """The label-conditioned velocity field at a preprocessed observation batch: fn(x, t) -> v, x the
        (B, chunk_size, action_dim) flow state and t (B,) its flow time on `euler_integrate`'s grid (any time
        with precompute=False). For custom samplers, e.g. guidance away from another checkpoint's policy; call it
        and the field under torch.no_grad() or torch.inference_mode() to sample."""
        context = self.backbone.encode_observation(self._images_to_float(batch))
        device = next(self.parameters()).device
        labels = torch.full((_batch_size(context),), label, dtype=torch.long, device=device)
        return self._velocity_fn(context, labels, precompute)

    def condition(self, t: Tensor, labels: Tensor) -> Tensor:
        """Time + label conditioning (B, cond_dim) fed to every denoiser layer."""
        return self.time_condition(t) + self.label_condition(labels)

    def time_condition(self, t: Tensor) -> Tensor:
        """The time part (N, cond) of the condition: the backbone's own (pi0 / pi05 / SmolVLA) or the policy's."""
        return self.backbone.time_condition(t) if self.backbone.owns_condition else self.time_embedding(t)

    def label_condition(self, labels: Tensor) -> Tensor:
        """The label part (N, cond) of the condition (zero at start for a wrapped VLA: see its backbone)."""
        if self.backbone.owns_condition:
            return self.backbone.label_condition(labels)
        return self.label_embedding(labels)

    def _velocity(self, context, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        return self.backbone.denoise(context, x, self.condition(t, labels))

    def _velocity_fn(self, context, labels: Tensor, precompute: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """fn(x, t) = _velocity(context, x, t, labels) at the flow times of `euler_integrate`, t (N,) holding
        one time for every row. With `precompute` the label and time embeddings (one row per Euler step) and
        what the backbone derives from them and from the context are computed once, here."""
        if not precompute:
            return lambda x, t: self._velocity(context, x, t, labels)
        times = euler_times(self.config.num_inference_steps)  # (num_steps,)
        step_of = {time: step for step, time in enumerate(times.tolist())}
        step_conds = self.time_condition(times.to(labels.device))  # (num_steps, cond_dim)
        denoise = self.backbone.prepare_denoise(context, self.label_condition(labels), step_conds)
        return lambda x, t: denoise(x, _grid_step(step_of, t))

    def branch_velocities(self, ctx2, x_good: Tensor, x_null: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(v_good, v_null) from one batched pass of 2B rows; ctx2 = repeat_context(context, 2)."""
        b = x_good.shape[0]
        x2 = torch.cat([x_good, x_null])  # (2B, T, A), new storage
        labels2 = torch.cat(
            [torch.full((b,), LABEL_GOOD, device=x2.device), torch.full((b,), LABEL_NULL, device=x2.device)]
        ).long()
        v2 = self._velocity(ctx2, x2, torch.cat([t, t]), labels2)
        return v2[:b], v2[b:]

    # ----- helpers -----
    def _sample_time(self, b: int, device: torch.device) -> Tensor:
        c = self.config
        return sample_time_beta(
            b,
            device,
            alpha=c.time_sampling_beta_alpha,
            beta=c.time_sampling_beta_beta,
            scale=c.time_sampling_scale,
            offset=c.time_sampling_offset,
        )

    def _masked_mse(self, v: Tensor, target: Tensor, valid: Tensor) -> Tensor:
        """Per-sample MSE (B,) over valid (non-padded) chunk steps and the real action dims (a backbone's
        padded flow dims, as in LeRobot's pi0 / pi05 / SmolVLA losses, are not trained)."""
        a = self.config.action_dim
        err = F.mse_loss(v[..., :a].float(), target[..., :a].float(), reduction="none").mean(dim=-1)  # (B, T)
        return (err * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)

    def _images_to_float(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A shallow view of the batch where uint8 camera images become float in [0, 1] (no copy otherwise)."""
        if not any(k.startswith(OBS_IMAGES) and v.dtype == torch.uint8 for k, v in _tensors(batch)):
            return batch
        out = dict(batch)
        for k, v in _tensors(batch):
            if k.startswith(OBS_IMAGES) and v.dtype == torch.uint8:
                out[k] = v.float() / 255.0
        return out


def euler_times(num_steps: int) -> Tensor:
    """The flow times (num_steps,) float32 at which lerobot's `euler_integrate` evaluates the velocity."""
    dt = -1.0 / num_steps
    return torch.tensor([1.0 + step * dt for step in range(num_steps)], dtype=torch.float32)


def _grid_step(step_of: dict[float, int], t: Tensor) -> int:
    """The Euler step whose flow time is t[0] (a host read: one sync per step on an accelerator)."""
    time = float(t[0])
    if time not in step_of:
        raise ValueError(
            f"Flow time {time} is not one of the Euler grid's {sorted(step_of, reverse=True)}: the "
            "precomputed time conditioning only covers lerobot's euler_integrate grid. Sample with "
            "precompute=False."
        )
    return step_of[time]


def _guide(v_good: Tensor, v_neg: Tensor, w: float) -> Tensor:
    """Guidance: v_neg + w (v_good - v_neg), v_neg the null (classifier-free guidance) or the bad branch."""
    return v_neg + w * (v_good - v_neg)


def _select_rows(batch: dict, idx: Tensor, b: int) -> dict:
    """The rows `idx` of every per-sample entry of the batch (tensors and lists of length b); others as they are."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b:
            out[k] = v[idx]
        elif isinstance(v, list) and len(v) == b:
            out[k] = [v[i] for i in idx.tolist()]
        else:
            out[k] = v
    return out


def _tensors(batch: dict) -> list[tuple[str, Tensor]]:
    return [(k, v) for k, v in batch.items() if isinstance(v, Tensor)]


def _batch_size(context) -> int:
    first = context[0] if isinstance(context, tuple | list) else context
    return int(first.shape[0])


def _check_context_not_shared(context, ctx2) -> None:
    """The run-time check behind `enable_cfg_safe_copy`: a backbone's `repeat_context` must return new
    storage (e.g. `repeat`), never a view of the context (e.g. `expand`), so that the guided and unguided
    rows of the batched pass cannot alias each other or the cached observation encoding."""
    pairs = zip(context, ctx2, strict=True) if isinstance(context, tuple | list) else [(context, ctx2)]
    for a, b in pairs:
        if isinstance(a, Tensor):
            _check_no_shared_storage(a, b)


def _check_no_shared_storage(a: Tensor, b: Tensor) -> None:
    if a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
        raise RuntimeError(
            "enable_cfg_safe_copy: the guided and unguided branches share storage (a backbone's repeat_context "
            "returned a view such as .expand()); refusing to sample. Return new storage (.repeat)."
        )
