"""What the VLA backbones (pi0 / pi05 / SmolVLA) share: loading the LeRobot checkpoint they wrap, checking it fits
the env, and rebuilding its architecture when a saved `ript` checkpoint is reloaded.

A `ript` policy with a VLA backbone is built in one of two ways:
- first wrap (`make_policy`, our training loop): the LeRobot policy is loaded from `config.backbone_path` with its
  weights, and its config is copied into `config.backbone_config`, which is saved in the ript `config.json`;
- reload (`RiptPolicy.from_pretrained`, `lerobot-eval --policy.path`): the architecture is rebuilt from
  `config.backbone_config` without weights, and the ript checkpoint's `model.safetensors` fills it.
`RiptPolicy.from_pretrained` enters `architecture_only()` to choose the second.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lerobot_ript.policy.backbones.base import RiptBackbone

logger = logging.getLogger(__name__)

_ARCHITECTURE_ONLY = contextvars.ContextVar("ript_vla_architecture_only", default=False)
# LeRobot 0.6.1's pi / smolvla extras pin this range; outside it their samplers break (see pyproject.toml).
TRANSFORMERS_RANGE = ((5, 4), (5, 6))
INSTALL_HINT = (
    "pip install 'lerobot_policy_ript[vla]' (LeRobot's pi / smolvla extras, transformers >=5.4,<5.6)"
)


@contextlib.contextmanager
def architecture_only() -> Iterator[None]:
    """Within this block a VLA backbone is built from `config.backbone_config` without loading any weights."""
    token = _ARCHITECTURE_ONLY.set(True)
    try:
        yield
    finally:
        _ARCHITECTURE_ONLY.reset(token)


class VLABackbone(RiptBackbone):
    """What every wrapped LeRobot VLA backbone is: the LeRobot policy (`self.vla`, loaded or rebuilt by
    `load_wrapped_policy`), its core model, a flow at `max_action_dim`, and its own time / label condition."""

    owns_condition = True

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.vla = load_wrapped_policy(config)  # PI0Policy / PI05Policy / SmolVLAPolicy

    @property
    def model(self):
        return self.vla.model  # PI0Pytorch / PI05Pytorch / VLAFlowMatching

    @property
    def flow_action_dim(self) -> int:
        return int(self.vla.config.max_action_dim)


def check_transformers() -> None:
    """Fail with the install command when transformers is missing or outside the range LeRobot's VLAs work with."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"The VLA backbones need transformers: {INSTALL_HINT}.") from err
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    low, high = TRANSFORMERS_RANGE
    if not low <= version < high:
        raise ImportError(
            f"transformers {transformers.__version__} is installed; LeRobot 0.6.1's pi0 / pi05 / SmolVLA sample "
            f"correctly only with transformers >={low[0]}.{low[1]},<{high[0]}.{high[1]} (newer versions break their "
            f"prefix cache). Fix: {INSTALL_HINT}."
        )


def load_wrapped_policy(config) -> nn.Module:
    """The LeRobot policy of type `config.backbone` that the backbone wraps (see the module docstring)."""
    import draccus
    from lerobot.configs import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class

    check_transformers()
    kind = config.backbone
    if _ARCHITECTURE_ONLY.get():
        if config.backbone_config is None:
            raise ValueError(
                f"this ript checkpoint has backbone={kind!r} but no backbone_config; it was not saved by "
                "lerobot-ript. Rebuild it from the LeRobot checkpoint with --policy.backbone_path."
            )
        vla_config = draccus.decode(PreTrainedConfig, config.backbone_config)
        _apply_switches(vla_config, config)
        return get_policy_class(kind)(vla_config)
    path = config.backbone_path
    if path is None:
        raise ValueError(
            f"backbone={kind!r} wraps a LeRobot {kind} checkpoint: set --policy.backbone_path=<a local "
            f"directory or a Hub id of a {kind} policy fine-tuned on this robot>."
        )
    vla_config = PreTrainedConfig.from_pretrained(path)
    if vla_config.type != kind:
        raise ValueError(
            f"policy.backbone_path={path} holds a {vla_config.type!r} policy but backbone={kind!r}; set "
            f"--policy.backbone={vla_config.type} or point backbone_path at a {kind} checkpoint."
        )
    _apply_switches(vla_config, config)
    check_fits(config, vla_config, path)
    weights = _resolve_weights(path)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):  # LeRobot's pi loaders print their progress
        policy = get_policy_class(kind).from_pretrained(path, config=vla_config)
    for line in captured.getvalue().splitlines():
        logger.debug("%s loader: %s", kind, line)
    _check_weights_loaded(policy, weights, path)
    config.backbone_config = draccus.encode(vla_config, PreTrainedConfig)
    logger.info("Wrapped the %s checkpoint %s (%d parameters).", kind, path, _num_params(policy))
    return policy


def preflight(config, features: dict) -> None:
    """Before anything is recorded or trained: fail, with the fix, when the checkpoint at `config.backbone_path`
    cannot take `features` (the env's policy features: cameras, state, action). Reads only its config.json."""
    import dataclasses

    from lerobot.configs import FeatureType, PreTrainedConfig

    vla_config = PreTrainedConfig.from_pretrained(config.backbone_path)
    if vla_config.type != config.backbone:
        raise ValueError(
            f"policy.backbone_path={config.backbone_path} holds a {vla_config.type!r} policy but "
            f"backbone={config.backbone!r}; set --policy.backbone={vla_config.type} or point backbone_path at a "
            f"{config.backbone} checkpoint."
        )
    inputs = {k: f for k, f in features.items() if f.type is not FeatureType.ACTION}
    outputs = {k: f for k, f in features.items() if f.type is FeatureType.ACTION}
    check_fits(
        dataclasses.replace(config, input_features=inputs, output_features=outputs),
        vla_config,
        config.backbone_path,
    )


def _apply_switches(vla_config, config) -> None:
    """The ript config's device and LeRobot training switches (None = the checkpoint's) onto the VLA config."""
    vla_config.device = config.device
    for name, vla_name in (
        ("freeze_vision_encoder", "freeze_vision_encoder"),
        ("train_expert_only", "train_expert_only"),
        ("gradient_checkpointing", "gradient_checkpointing"),
        ("vla_dtype", "dtype"),
    ):
        value = getattr(config, name)
        if value is None:
            continue
        if not hasattr(vla_config, vla_name):
            raise ValueError(
                f"policy.{name}={value}: the {config.backbone} config has no '{vla_name}' switch; leave it unset."
            )
        setattr(vla_config, vla_name, value)


def check_fits(config, vla_config, path: str) -> None:
    """Fail before training when the wrapped checkpoint cannot take the env's (the dataset's) inputs / outputs."""
    from lerobot.utils.constants import ACTION, OBS_STATE

    ckpt_action = int(vla_config.output_features[ACTION].shape[0])
    if ckpt_action != config.action_dim:
        raise ValueError(
            f"the {config.backbone} checkpoint {path} predicts {ckpt_action}-dim actions but the env / dataset has "
            f"{config.action_dim}-dim actions. RIPT fine-tunes a policy on the robot it was trained for: use a "
            f"checkpoint fine-tuned on this robot's action space (action size {config.action_dim})."
        )
    ckpt_state = vla_config.input_features.get(OBS_STATE)
    if ckpt_state is not None and config.robot_state_feature is not None:
        want = int(ckpt_state.shape[0])
        if want != config.state_dim:
            raise ValueError(
                f"the {config.backbone} checkpoint {path} reads a {want}-dim observation.state but the policy "
                f"gets {config.state_dim} dims. Set --policy.target_state_dim={want}: the state adapter step "
                f"(ript_state_dim_adapter) then zero-pads or truncates the env's state to {want} before the "
                "checkpoint's normaliser."
            )
    ckpt_images = set(vla_config.image_features)
    if ckpt_images and not ckpt_images & set(config.image_features):
        raise ValueError(
            f"the {config.backbone} checkpoint {path} reads the cameras {sorted(ckpt_images)} but the env / "
            f"dataset gives {sorted(config.image_features) or 'no camera'}. Render the camera(s) it was trained "
            "on (metaworld_state: --env.obs_type=state_pixels --env.cameras=...) or rename the keys."
        )
    if int(vla_config.chunk_size) != config.chunk_size:
        raise ValueError(
            f"the {config.backbone} checkpoint {path} predicts chunks of {vla_config.chunk_size} actions but "
            f"policy.chunk_size={config.chunk_size}; set --policy.chunk_size={vla_config.chunk_size} (and "
            f"--policy.n_action_steps <= {vla_config.chunk_size})."
        )


def _resolve_weights(path: str) -> Path:
    """The checkpoint's model.safetensors, local or downloaded; a clear error instead of a random model."""
    local = Path(path)
    if local.is_dir():
        file = local / "model.safetensors"
        if not file.is_file():
            raise FileNotFoundError(
                f"{path} has no model.safetensors: it is not a LeRobot policy checkpoint."
            )
        return file
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, "model.safetensors"))
    except Exception as err:  # any Hub failure: say what to do instead
        raise FileNotFoundError(
            f"could not fetch model.safetensors of {path!r} from the Hub ({type(err).__name__}: {err}). Pass a "
            "local checkpoint directory as --policy.backbone_path on a machine without Hub access."
        ) from err


def _check_weights_loaded(policy: nn.Module, weights: Path, path: str, probes: int = 8) -> None:
    """LeRobot's pi0 / pi05 `from_pretrained` return a RANDOM model when loading fails; compare a few tensors."""
    from safetensors import safe_open

    state = policy.state_dict()
    checked = 0
    with safe_open(str(weights), framework="pt") as f:
        for key in list(f.keys()):
            name = key if key in state else f"model.{key}"
            if name not in state or tuple(state[name].shape) != tuple(f.get_slice(key).get_shape()):
                continue
            # compared in the model's dtype: a float32 checkpoint loaded with vla_dtype=bfloat16 was rounded
            if not torch.equal(state[name].cpu(), f.get_tensor(key).to(state[name].dtype)):
                raise RuntimeError(
                    f"the {path} weights were not loaded into the {type(policy).__name__} ('{name}' differs from "
                    "the file): LeRobot returned a randomly initialised model. Check the checkpoint and the "
                    "installed LeRobot / transformers versions."
                )
            checked += 1
            if checked >= probes:
                break
    if checked == 0:
        raise RuntimeError(f"no tensor of {weights} matches the {type(policy).__name__}'s parameters.")


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def zero_linear(in_features: int, out_features: int) -> nn.Linear:
    """A Linear layer initialised to zero, without bias (the label path: no effect on the wrapped model at start;
    its input is a label embedding, which already gives each of the three labels its own output, so a bias would
    add nothing but one more tensor to every optimizer step)."""
    layer = nn.Linear(in_features, out_features, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


class PrefixInputs(NamedTuple):
    """Training context of a VLA backbone: the prefix embeddings, run with the suffix in one pass (gradients
    reach the VLM, gradient checkpointing applies)."""

    embs: Tensor  # (B, L, width)
    pad_masks: Tensor  # (B, L) bool
    att_masks: Tensor  # (B, L)
    state: Tensor | None = (
        None  # (B, max_state_dim) for pi0 (a suffix token); in the prefix for pi05 / SmolVLA
    )


class PrefixCache(NamedTuple):
    """Sampling context of a VLA backbone: the prefix's KV cache, computed once per observation and reused by
    every Euler step and both guidance branches."""

    pad_masks: Tensor  # (B, L) bool
    cache: Any  # transformers DynamicCache
    state: Tensor | None = None


def repeat_prefix(context: PrefixInputs | PrefixCache, repeats: int) -> PrefixInputs | PrefixCache:
    """A context tiled `repeats` times along the batch (new storage; the KV cache too)."""
    if isinstance(context, PrefixCache):
        return PrefixCache(
            repeat_rows(context.pad_masks, repeats),
            repeat_cache(context.cache, repeats),
            repeat_rows(context.state, repeats),
        )
    return PrefixInputs(*(repeat_rows(x, repeats) for x in context))


class LabelMods(NamedTuple):
    """Every norm's label modulation for one expert pass: `scale1[i]` (= 1 + scale) and `shift[i]`, (B, 1, dim)."""

    scale1: tuple[Tensor, ...]
    shift: tuple[Tensor, ...]


class StackedLabelFilm(nn.Module):
    """The label's whole path into an action expert from ONE zero-initialised table: per label (good / bad / null)
    a row [a term of width `extra` for the action-time MLP | every norm's scale and shift]. `embed(labels)` gives
    the rows (N, width), the label part of the condition; `forward(rows)` splits them into (term, `LabelMods`).
    One parameter and no matmul on the label path (`benchmarks/vla_overhead.py`: on a CPU with tiny models every
    extra tensor and op shows; a small layer per norm, then an embedding followed by a zero linear layer, made
    SmolVLA's update 1.12x, then 1.10x, LeRobot's)."""

    def __init__(self, num_norms: int, dim: int, extra: int = 0) -> None:
        super().__init__()
        self.num_norms, self.dim, self.extra = num_norms, dim, extra
        self.width = extra + num_norms * 2 * dim
        self.table = nn.Embedding(3, self.width)
        nn.init.zeros_(self.table.weight)

    def embed(self, labels: Tensor) -> Tensor:
        return self.table(labels)  # (N, width), zero at start

    def forward(self, rows: Tensor) -> tuple[Tensor, LabelMods]:
        term, mods = rows[:, : self.extra], rows[:, self.extra :]
        scale, shift = mods.view(-1, 2, self.num_norms, 1, self.dim).unbind(1)  # (B, n, 1, dim)
        return term, LabelMods((scale + 1.0).unbind(1), shift.unbind(1))


def label_modulate(out: Tensor, mods: LabelMods, index: int) -> Tensor:
    """`out * (1 + scale) + shift` of norm `index`; out (B, T, dim). (A multiply and an add: fewer dispatched ops
    over forward and backward than one addcmul, whose backward scales both products by its `value`.)"""
    return (out * mods.scale1[index] + mods.shift[index]).to(out.dtype)


def language_inputs(batch: dict[str, Tensor], backbone: str) -> tuple[Tensor, Tensor]:
    """The instruction tokens and their mask (B, L) that the backbone's processors wrote; a clear error without."""
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    if OBS_LANGUAGE_TOKENS not in batch:
        raise ValueError(
            f"the batch has no '{OBS_LANGUAGE_TOKENS}': a {backbone} backbone reads the task instruction "
            "tokenised by its processors. Run the batch (with a 'task' string per row) through the policy's "
            "preprocessor (make_pre_post_processors)."
        )
    return batch[OBS_LANGUAGE_TOKENS], batch[OBS_LANGUAGE_ATTENTION_MASK]


def label_expert_norms(expert: nn.Module, make_norm, extra: int = 0) -> StackedLabelFilm:
    """Replace every norm of `expert` (each layer's input and post-attention norm, then the final one) by
    `make_norm(norm, index)`, indices in that order; returns the one table giving them their modulations (and a
    term of width `extra` for the action-time MLP) per label."""
    for i, layer in enumerate(expert.layers):
        layer.input_layernorm = make_norm(layer.input_layernorm, 2 * i)
        layer.post_attention_layernorm = make_norm(layer.post_attention_layernorm, 2 * i + 1)
    expert.norm = make_norm(expert.norm, 2 * len(expert.layers))
    return StackedLabelFilm(2 * len(expert.layers) + 1, int(expert.norm.weight.shape[0]), extra)


class TimeLabelCondition:
    """pi0's and SmolVLA's condition layout, [time embedding (width) | label row of `label_film` (its width)]: the
    two parts are summed by the policy and split again by the backbone; the label row holds the term added inside
    the action-time MLP and every expert norm's modulation, zero at start. Mixed into a backbone that sets
    `label_film` (`label_expert_norms(..., extra=width)`) and `width`."""

    def _time_part(self, emb: Tensor) -> Tensor:
        zeros = emb.new_zeros(emb.shape[0], self.label_film.width)
        return torch.cat([emb, zeros], dim=-1)  # [time | 0]

    def label_condition(self, labels: Tensor) -> Tensor:
        rows = self.label_film.embed(labels)
        return torch.cat([rows.new_zeros(rows.shape[0], self.width), rows], dim=-1)  # [0 | label row]

    def _action_time(self, model, noisy_actions: Tensor, cond: Tensor) -> tuple[Tensor, LabelMods]:
        """(the action-time MLP's tokens (B, T, width), every expert norm's label modulation) from the condition:
        the tokens as LeRobot's `embed_suffix` computes them, plus the label term."""
        time_emb, label = cond[:, : self.width], cond[:, self.width :]
        term, mods = self.label_film(label)  # (B, width), the norms' (1 + scale, shift)
        action_emb = model.action_in_proj(noisy_actions)  # (B, T, width)
        x = torch.cat([action_emb, time_emb.to(action_emb.dtype)[:, None, :].expand_as(action_emb)], dim=2)
        x = model.action_time_mlp_in(x) + term[:, None, :]
        return model.action_time_mlp_out(F.silu(x)), mods


def repeat_cache(cache, repeats: int):
    """A transformers DynamicCache whose every layer's keys / values are tiled `repeats` times along the batch
    (new storage), as `torch.repeat` tiles the other context tensors: rows [c, c, ...] not interleaved."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(
        tuple(
            (keys.repeat(repeats, 1, 1, 1), values.repeat(repeats, 1, 1, 1), window)
            for keys, values, window in cache
        )
    )


def repeat_rows(x: Tensor | None, repeats: int) -> Tensor | None:
    """x tiled `repeats` times along dim 0 (new storage); None stays None."""
    if x is None:
        return None
    return x.repeat(repeats, *([1] * (x.dim() - 1)))
