"""Configuration of the `ript` policy: advantage-conditioned flow matching with classifier-free guidance."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from lerobot.configs import NormalizationMode, PreTrainedConfig
from lerobot.optim import AdamWConfig
from lerobot.optim.schedulers import CosineDecayWithWarmupSchedulerConfig
from lerobot.utils.constants import ACTION

OBJECTIVES = ("cfg", "cfgrl", "weighted", "repel")
GUIDANCE_NEGATIVES = ("null", "bad")
# "small": built in, runs on a CPU. The others wrap a LeRobot checkpoint of that policy type (backbone_path).
BACKBONES = ("small", "pi0", "pi05", "smolvla")
VLA_BACKBONES = ("pi0", "pi05", "smolvla")


def _choice_error(field_name: str, value: str, valid: tuple[str, ...]) -> ValueError:
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(f"{field_name}={value!r} is not one of {list(valid)}.{hint}")


def task_vocabulary(task_names: list[str]) -> dict[str, int]:
    """The `task` strings a task-conditioned policy accepts -> the index of their task in `task_names`: each name,
    and for a MetaWorld task also its instruction (`lerobot_ript.envs.metaworld.TASK_INSTRUCTIONS`, what the env,
    the collector and the recorded datasets put in the batch's `task`). Fails on an empty list, a task named
    twice, or two tasks that one string would name (e.g. push-v3 and push-back-v3 share their instruction)."""
    from lerobot_ript.envs.metaworld import TASK_INSTRUCTIONS

    names = [str(name) for name in task_names]
    if not names:
        raise ValueError(
            "task_names=[] names no task; give the policy's tasks, or None for a single-task policy."
        )
    vocabulary: dict[str, int] = {}
    for i, name in enumerate(names):
        for key in dict.fromkeys([name, TASK_INSTRUCTIONS.get(name, name)]):
            if key in vocabulary:
                raise ValueError(
                    f"task_names={names}: {names[vocabulary[key]]!r} and {name!r} are both named by {key!r}, so the "
                    "batch's `task` could not tell them apart. Name each task once, and never two tasks that "
                    "share an instruction."
                )
            vocabulary[key] = i
    return vocabulary


@PreTrainedConfig.register_subclass("ript")
@dataclass
class RiptConfig(PreTrainedConfig):
    """A flow-matching policy whose action denoiser is conditioned on an optimality label.

    The label (good / bad / null) comes from the sign of a per-frame `advantages` batch key; with no such key
    every frame is good, so a plain demonstration dataset trains plain flow matching. The label and the flow
    time condition every denoiser layer (adaLN-style scale, shift and gate). Sampling uses classifier-free
    guidance: v = v_null + guidance_scale * (v_good - v_null).
    """

    # Number of observation frames fed to the policy (only 1 is supported).
    n_obs_steps: int = 1
    # Length of the predicted action chunk, in env steps (>= 1). openpi uses 50.
    chunk_size: int = 50
    # Number of actions of a chunk executed before the policy is queried again (1..chunk_size).
    n_action_steps: int = 50
    # Euler steps used to integrate the flow from noise (t=1) to actions (t=0) (>= 1).
    num_inference_steps: int = 10

    # How each feature type is normalised by the processors. Never QUANTILES for advantages.
    normalization_mapping: dict[str, NormalizationMode] = field(
        default_factory=lambda: {
            "VISUAL": NormalizationMode.IDENTITY,
            "STATE": NormalizationMode.MEAN_STD,
            "ACTION": NormalizationMode.MEAN_STD,
        }
    )

    # Backbone behind the backbone seam: "small" (built in, runs on a CPU, downloads nothing), or "pi0" /
    # "pi05" / "smolvla": a LeRobot checkpoint of that policy type (backbone_path), its weights, normalisation
    # stats and tokenizer reused, the optimality label added to every layer of its action expert.
    backbone: str = "small"
    # VLA backbones: the LeRobot checkpoint to wrap, a local directory or a Hub id (e.g. lerobot/pi05_base). Read
    # once, when the ript policy is first built; a saved ript checkpoint holds the weights itself.
    backbone_path: str | None = None
    # VLA backbones: the wrapped policy's own LeRobot config (as in its config.json), filled in when it is first
    # wrapped and saved with the ript checkpoint, so that reloading rebuilds the architecture without the
    # original checkpoint. Not set by hand.
    backbone_config: dict[str, Any] | None = None
    # VLA backbones: LeRobot's own training switches of the wrapped policy; None keeps the checkpoint's value.
    # Freeze the vision encoder (SigLIP) weights.
    freeze_vision_encoder: bool | None = None
    # See freeze_vision_encoder: train the action expert (and the label path) only; the VLM is frozen.
    train_expert_only: bool | None = None
    # See freeze_vision_encoder: activation (gradient) checkpointing in the VLM and the expert.
    gradient_checkpointing: bool | None = None
    # See freeze_vision_encoder: the precision the wrapped model keeps its weights in ("bfloat16" | "float32").
    vla_dtype: str | None = None
    # VLA backbones: the tokenizer (local directory or Hub id) the processors load instead of the one named by
    # the checkpoint's processor config (e.g. a local copy of google/paligemma-3b-pt-224 on a machine without
    # Hub access). None keeps the checkpoint's.
    tokenizer_path: str | None = None
    # Width of the small backbone's observation encoder and denoiser (>= 8).
    hidden_dim: int = 256
    # Number of adaLN-conditioned residual blocks in the small denoiser (>= 1).
    num_denoiser_layers: int = 3
    # Width of the (time + label) conditioning vector fed to every denoiser layer (>= 8).
    cond_dim: int = 128
    # Camera images are resized to (height, width) pixels before the small CNN encoder.
    image_size: tuple[int, int] = (224, 224)
    # Channels of the small CNN image encoder's last layer (>= 8).
    image_channels: int = 32
    # Normalised state values are clamped to +-this bound (guards against near-zero std dims).
    state_clip: float = 10.0
    # Floor on the std that normalises state features (MEAN_STD), applied to the dataset stats when the
    # processors are built (0 = LeRobot's stats as they are). Stats of a few demonstrations give near-zero
    # std to dims that barely moved there (a MetaWorld puck's quaternion: 0.002), so the policy's own
    # rollouts map them to hundreds of stds; a floor in the state's units (0.05 for MetaWorld's metres)
    # keeps them in range. It is stored in the saved processor stats, so a loaded policy uses it too.
    state_std_min: float = 0.0
    # Zero-pad or truncate `observation.state` to this size (>= 1); None leaves the state as it is.
    target_state_dim: int | None = None
    # Multi-task policies: the tasks the policy is conditioned on (distinct task names, e.g. MetaWorld's
    # ["push-v3", "reach-v3"]; lerobot_ript.train sets it from env.task when that names several tasks). The small
    # backbone adds a learned embedding of the batch's `task` string (the task's name or, for a MetaWorld task,
    # its instruction) to its observation encoding, zero at start; a `task` it does not know fails. The VLA
    # backbones read the instruction through their own tokenizer and ignore this list. None: one task, no
    # task input (no embedding parameters).
    task_names: list[str] | None = None

    # Training objective: "cfg" (label-conditioned flow matching with label dropout), "cfgrl" (one
    # shared noise/time draw, loss = 1[A>0] L(good) + cfg_alpha L(null)) or "weighted" (per-sample flow
    # loss times a non-negative weight from `advantage_weights` or `advantages`) or "repel" ("cfg" on the frames
    # with a non-negative advantage; each frame with a negative one pushes the good-conditioned velocity away
    # from its action with weight repel_weight * |A|, inside a trust region against the policy as it was when
    # the training loop last called `RiptPolicy.set_reference()`: the negative half of PPO's clipped ratio, with
    # the flow-matching loss difference standing in for the log-likelihood ratio as in Flow Policy
    # Optimization, McAllister et al. 2025). The two halves are averaged separately, so the failure frames
    # added to a batch do not dilute the successes' step.
    objective: str = "cfg"
    # Probability (0..1) that a label is replaced by the null label during "cfg" training.
    cfg_dropout_prob: float = 0.1
    # Training weight (>= 0) of the unconditional (null) branch in the "cfgrl" objective; not the guidance scale.
    cfg_alpha: float = 0.1
    # "repel" only: weight (>= 0) of the failure frames' push-away term against the successes' flow loss.
    repel_weight: float = 1.0
    # "repel" only: trust region epsilon in (0, 1); a failure frame stops pushing once its flow loss has risen
    # by -log(1 - repel_clip) over the reference's (ratio r = exp(L_ref - L) below 1 - repel_clip).
    repel_clip: float = 0.2
    # "repel" only: cap (> 1) on a failure frame's ratio, as in dual-clip PPO: no gradient once r exceeds it
    # (without it, one noisy draw with r in the thousands dominated the step).
    repel_ratio_cap: float = 3.0
    # Classifier-free guidance scale w (>= 0) used by select_action / lerobot-eval. 1 = plain conditional.
    guidance_scale: float = 1.0
    # The label guidance moves away from: "null" (classifier-free guidance, v_null + w (v_good - v_null)) or
    # "bad" (contrast with the failure-conditioned branch, v_bad + w (v_good - v_bad); needs the "cfg" objective,
    # the only one that trains the bad label). No effect at guidance_scale = 1.
    guidance_negative: str = "null"
    # At sampling time, check that the two guidance branches share no storage (cheap; raises if they do).
    enable_cfg_safe_copy: bool = False
    # Flow time t ~ Beta(alpha, beta) * scale + offset during training (openpi's convention).
    time_sampling_beta_alpha: float = 1.5
    # See time_sampling_beta_alpha.
    time_sampling_beta_beta: float = 1.0
    # See time_sampling_beta_alpha.
    time_sampling_scale: float = 0.999
    # See time_sampling_beta_alpha.
    time_sampling_offset: float = 0.001

    # AdamW learning rate (> 0).
    optimizer_lr: float = 3e-4
    # AdamW betas.
    optimizer_betas: tuple[float, float] = (0.9, 0.95)
    # AdamW epsilon.
    optimizer_eps: float = 1e-8
    # AdamW weight decay (>= 0).
    optimizer_weight_decay: float = 1e-6
    # Gradient clipping max norm (> 0).
    optimizer_grad_clip_norm: float = 10.0
    # Warmup steps of the cosine schedule (>= 0).
    scheduler_warmup_steps: int = 100
    # Decay steps of the cosine schedule (>= 1).
    scheduler_decay_steps: int = 30_000
    # Final learning rate of the cosine schedule.
    scheduler_decay_lr: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        self.validate_hyperparameters()

    def validate_hyperparameters(self) -> None:
        """Fail fast, with the fix in the message, on values that would break training or sampling."""
        if self.objective not in OBJECTIVES:
            raise _choice_error("objective", self.objective, OBJECTIVES)
        if self.backbone not in BACKBONES:
            raise _choice_error("backbone", self.backbone, BACKBONES)
        if self.backbone_config is not None and self.backbone_config.get("type") != self.backbone:
            raise ValueError(
                f"backbone_config is a {self.backbone_config.get('type')!r} config but backbone={self.backbone!r}; "
                "backbone_config is filled in when a checkpoint is wrapped: leave it unset."
            )
        if self.vla_dtype not in (None, "bfloat16", "float32"):
            raise _choice_error("vla_dtype", str(self.vla_dtype), ("bfloat16", "float32"))
        if self.n_obs_steps != 1:
            raise ValueError(
                f"n_obs_steps={self.n_obs_steps}: the ript policy uses one observation frame; set 1."
            )
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size} must be >= 1.")
        if not 1 <= self.n_action_steps <= self.chunk_size:
            raise ValueError(
                f"n_action_steps={self.n_action_steps} must be in [1, chunk_size={self.chunk_size}]."
            )
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps} must be >= 1.")
        if self.target_state_dim is not None and self.target_state_dim < 1:
            raise ValueError(
                f"target_state_dim={self.target_state_dim} must be >= 1, or None to keep the dataset's state size."
            )
        if self.state_std_min < 0:
            raise ValueError(f"state_std_min={self.state_std_min} must be >= 0 (0 = no floor).")
        if self.guidance_scale < 0:
            raise ValueError(
                f"guidance_scale={self.guidance_scale} must be >= 0 (1 = conditional policy, >1 = stronger guidance)."
            )
        if self.guidance_negative not in GUIDANCE_NEGATIVES:
            raise _choice_error("guidance_negative", self.guidance_negative, GUIDANCE_NEGATIVES)
        if self.guidance_negative == "bad" and self.objective != "cfg":
            raise ValueError(
                f"guidance_negative='bad' needs objective='cfg' (got '{self.objective}'): only it trains the bad "
                "label. Use guidance_negative='null' or objective='cfg'."
            )
        if not 0.0 <= self.cfg_dropout_prob <= 1.0:
            raise ValueError(f"cfg_dropout_prob={self.cfg_dropout_prob} must be a probability in [0, 1].")
        if self.cfg_alpha < 0:
            raise ValueError(f"cfg_alpha={self.cfg_alpha} must be >= 0.")
        if self.repel_weight < 0:
            raise ValueError(
                f"repel_weight={self.repel_weight} must be >= 0 (0 = failure frames are ignored)."
            )
        if not 0.0 < self.repel_clip < 1.0:
            raise ValueError(f"repel_clip={self.repel_clip} must be in (0, 1), e.g. PPO's 0.2.")
        if not self.repel_ratio_cap > 1.0:
            raise ValueError(f"repel_ratio_cap={self.repel_ratio_cap} must be > 1, e.g. dual-clip PPO's 3.")
        for name in ("hidden_dim", "cond_dim", "image_channels"):
            if getattr(self, name) < 8:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 8.")
        if self.num_denoiser_layers < 1:
            raise ValueError(f"num_denoiser_layers={self.num_denoiser_layers} must be >= 1.")
        if self.task_names is not None:
            task_vocabulary(self.task_names)  # non-empty, distinct, unambiguous

    def set_dataset_feature_metadata(self, features: dict) -> None:
        """LeRobot's `make_policy` calls this with the training dataset's features. Their names are kept for this
        process only (not saved): `RiptPolicy.forward` then refuses a batch that lost the dataset's `advantages`
        instead of training every frame as good."""
        self._dataset_feature_keys = frozenset(features)

    def validate_features(self) -> None:
        if ACTION not in self.output_features:
            raise ValueError(
                f"The ript policy needs an '{ACTION}' output feature, but the dataset has only "
                f"{sorted(self.output_features)}. Use a LeRobotDataset with an '{ACTION}' column."
            )
        has_input = self.robot_state_feature is not None or self.env_state_feature is not None
        if not has_input and not self.image_features:
            raise ValueError(
                "The ript policy needs an 'observation.state', 'observation.environment_state' or "
                f"'observation.images.*' input; got {sorted(self.input_features)}."
            )

    @property
    def is_vla(self) -> bool:
        """True for the pi0 / pi05 / SmolVLA backbones (a wrapped LeRobot checkpoint)."""
        return self.backbone in VLA_BACKBONES

    @property
    def state_dim(self) -> int:
        """Size of the state vector the model sees (after the state-dimension adapter)."""
        feat = self.robot_state_feature
        if feat is None:
            return 0
        return int(self.target_state_dim) if self.target_state_dim is not None else int(feat.shape[0])

    @property
    def action_dim(self) -> int:
        return int(self.action_feature.shape[0])

    def get_optimizer_preset(self) -> AdamWConfig:
        return AdamWConfig(
            lr=self.optimizer_lr,
            betas=self.optimizer_betas,
            eps=self.optimizer_eps,
            weight_decay=self.optimizer_weight_decay,
            grad_clip_norm=self.optimizer_grad_clip_norm,
        )

    def get_scheduler_preset(self) -> CosineDecayWithWarmupSchedulerConfig:
        return CosineDecayWithWarmupSchedulerConfig(
            peak_lr=self.optimizer_lr,
            decay_lr=self.scheduler_decay_lr,
            num_warmup_steps=self.scheduler_warmup_steps,
            num_decay_steps=self.scheduler_decay_steps,
        )

    @property
    def observation_delta_indices(self) -> None:
        return None

    @property
    def action_delta_indices(self) -> list[int]:
        return list(range(self.chunk_size))

    @property
    def reward_delta_indices(self) -> None:
        return None
