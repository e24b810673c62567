"""Processors of the `ript` policy: LeRobot's default pipeline, a state-dimension adapter step, and a batch
converter that carries the RIPT keys (`advantages`, `advantage_weights`, `init_hash`) past the pipeline.

LeRobot's `batch_to_transition` drops batch keys it does not know. The pipelines built here use
`ript_batch_to_transition`, which keeps the RIPT keys as complementary data, so they reach
`RiptPolicy.forward` under `lerobot-train` too. A converter is not serialised with a pipeline: after
`PolicyProcessorPipeline.from_pretrained`, call `attach_ript_converter(preprocessor)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lerobot.configs import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.processor import (
    ObservationProcessorStep,
    PolicyAction,
    PolicyProcessorPipeline,
    ProcessorStepRegistry,
    TransitionKey,
)
from lerobot.processor.converters import batch_to_transition
from lerobot.processor.factory import make_default_policy_processor_steps, make_policy_processor_pipelines
from lerobot.utils.constants import OBS_STATE

from lerobot_ript.policy.configuration_ript import RiptConfig
from lerobot_ript.shapes import pad_or_truncate

RIPT_EXTRA_KEYS = ("advantages", "advantage_weights", "init_hash")


def ript_batch_to_transition(batch: dict[str, Any]) -> dict:
    """`batch_to_transition`, keeping the RIPT keys as complementary data (so they survive the pipeline)."""
    transition = batch_to_transition(batch)
    extras = {k: batch[k] for k in RIPT_EXTRA_KEYS if k in batch}
    if extras:
        comp = dict(transition.get(TransitionKey.COMPLEMENTARY_DATA) or {})
        comp.update(extras)
        transition[TransitionKey.COMPLEMENTARY_DATA] = comp
    return transition


def attach_ript_converter(preprocessor: PolicyProcessorPipeline) -> PolicyProcessorPipeline:
    """Make a (reloaded) preprocessor keep the RIPT keys. Returns the same pipeline."""
    preprocessor.to_transition = ript_batch_to_transition
    return preprocessor


@ProcessorStepRegistry.register(name="ript_state_dim_adapter")
@dataclass
class StateDimAdapterStep(ObservationProcessorStep):
    """Zero-pads or truncates `observation.state` to `target_state_dim`, per sample (S,) or per batch
    (B, S) / (B, T, S). `target_state_dim=None` turns the step off."""

    target_state_dim: int | None = None

    def __post_init__(self) -> None:
        if self.target_state_dim is not None and self.target_state_dim < 1:
            raise ValueError(
                f"target_state_dim={self.target_state_dim} must be >= 1 (or None to turn it off)."
            )

    def observation(self, observation: dict) -> dict:
        if self.target_state_dim is None or OBS_STATE not in observation:
            return observation
        observation[OBS_STATE] = pad_or_truncate(
            torch.as_tensor(observation[OBS_STATE]), self.target_state_dim
        )
        return observation

    def get_config(self) -> dict[str, Any]:
        return {"target_state_dim": self.target_state_dim}

    def transform_features(
        self, features: dict[PipelineFeatureType, dict[str, PolicyFeature]]
    ) -> dict[PipelineFeatureType, dict[str, PolicyFeature]]:
        obs = features.get(PipelineFeatureType.OBSERVATION, {})
        if self.target_state_dim is not None and OBS_STATE in obs:
            obs[OBS_STATE] = PolicyFeature(type=FeatureType.STATE, shape=(self.target_state_dim,))
        return features


def floor_state_std(
    config: RiptConfig, dataset_stats: dict[str, dict[str, Any]] | None
) -> dict[str, dict[str, Any]] | None:
    """A copy of `dataset_stats` whose STATE input features have std >= `config.state_std_min`."""
    if not dataset_stats or config.state_std_min <= 0:
        return dataset_stats
    stats = {key: dict(value) for key, value in dataset_stats.items()}
    for key, feature in config.input_features.items():
        if feature.type is FeatureType.STATE and key in stats and "std" in stats[key]:
            std = torch.as_tensor(stats[key]["std"], dtype=torch.float32)
            stats[key]["std"] = std.clamp(min=config.state_std_min)
    return stats


def make_ript_pre_post_processors(
    config: RiptConfig,
    dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[
    PolicyProcessorPipeline[dict[str, Any], dict[str, Any]],
    PolicyProcessorPipeline[PolicyAction, PolicyAction],
]:
    """Rename -> batch -> device -> normalise -> state adapter; unnormalise -> cpu.

    With `config.state_std_min > 0`, the std of every STATE input feature in `dataset_stats` is raised to at
    least that value first (the stats passed in are not modified).

    A VLA backbone (pi0 / pi05 / SmolVLA) keeps the wrapped checkpoint's own pipelines instead (its normalisation
    stats, tokenizer and prompt format): see `wrapped_pre_post_processors`; `dataset_stats` are not used."""
    if config.is_vla:
        return wrapped_pre_post_processors(config)
    dataset_stats = floor_state_std(config, dataset_stats)
    s = make_default_policy_processor_steps(config, dataset_stats, normalizer_device=config.device)
    pre, post = make_policy_processor_pipelines(
        input_steps=[
            s.rename_observations,
            s.add_batch_dim,
            s.to_device,
            s.normalize,
            StateDimAdapterStep(target_state_dim=config.target_state_dim),
        ],
        output_steps=[s.unnormalize, s.to_cpu],
    )
    return attach_ript_converter(pre), post


def wrapped_pre_post_processors(
    config: RiptConfig,
) -> tuple[PolicyProcessorPipeline[dict[str, Any], dict[str, Any]], PolicyProcessorPipeline]:
    """The pipelines saved with the LeRobot checkpoint at `config.backbone_path`, reused as they are (its
    normaliser stats, its tokenizer and prompt format), on `config.device`, with `config.tokenizer_path` instead
    of the checkpoint's tokenizer when set, the state adapter inserted before the normaliser (the checkpoint's
    stats are in its own state size) and our batch converter attached."""
    from lerobot.processor import NormalizerProcessorStep
    from lerobot.processor.converters import (
        policy_action_to_transition,
        transition_to_batch,
        transition_to_policy_action,
    )

    path = config.backbone_path
    if path is None:
        raise ValueError(
            f"backbone={config.backbone!r}: the processors come from the wrapped checkpoint; set "
            "--policy.backbone_path, or load a saved ript checkpoint's processors with "
            "make_pre_post_processors(config, pretrained_path=<ript checkpoint>)."
        )
    overrides: dict[str, dict[str, Any]] = {"device_processor": {"device": config.device}}
    if config.tokenizer_path is not None:
        overrides["tokenizer_processor"] = {"tokenizer_name": config.tokenizer_path}
    pre = PolicyProcessorPipeline.from_pretrained(
        path, config_filename="policy_preprocessor.json", overrides=overrides, to_output=transition_to_batch
    )
    post = PolicyProcessorPipeline.from_pretrained(
        path,
        config_filename="policy_postprocessor.json",
        to_transition=policy_action_to_transition,
        to_output=transition_to_policy_action,
    )
    steps = list(pre.steps)
    at = next((i for i, step in enumerate(steps) if isinstance(step, NormalizerProcessorStep)), len(steps))
    steps.insert(at, StateDimAdapterStep(target_state_dim=config.target_state_dim))
    pre.steps = steps
    return attach_ript_converter(pre), post
