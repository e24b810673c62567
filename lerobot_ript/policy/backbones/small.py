"""The built-in small backbone: a CNN per camera, a state MLP and an adaLN-conditioned MLP denoiser.

Runs on a CPU, downloads nothing, accepts any number of cameras and any image size (images are resized to
`config.image_size`), and state-only datasets. A multi-task policy (`config.task_names`) also reads the batch's
`task` strings: a learned per-task embedding, zero at start, is added to the observation encoding, so it reaches
the denoiser's input and, through `context_to_cond`, the condition of every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lerobot_ript.policy.backbones.base import RiptBackbone
from lerobot_ript.policy.configuration_ript import RiptConfig, task_vocabulary

TASK_KEY = "task"


class ImageEncoder(nn.Module):
    """Three strided convolutions and global average pooling: (B, 3, H, W) in [0, 1] -> (B, hidden)."""

    def __init__(self, image_size: tuple[int, int], channels: int, hidden_dim: int) -> None:
        super().__init__()
        self.image_size = tuple(image_size)
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c // 2, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1),
            nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(c, hidden_dim),
        )

    def resize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 3, *image_size); no copy when the size already matches."""
        if images.shape[-2:] != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        return images

    def forward(self, images: Tensor) -> Tensor:
        return self.net(self.resize(images))


class AdaLNBlock(nn.Module):
    """Residual MLP block modulated by `cond` (adaLN-zero: scale, shift and gate from the condition)."""

    def __init__(self, hidden_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim * 2), nn.SiLU(), nn.Linear(hidden_dim * 2, hidden_dim)
        )
        self.modulation = nn.Linear(cond_dim, hidden_dim * 3)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift, gate = self.modulation(cond).chunk(3, dim=-1)  # each (B, hidden)
        h = self.norm(x) * (1 + scale) + shift
        return x + (1 + gate) * self.mlp(h)

    def modulated(self, x: Tensor, scale1: Tensor, shift: Tensor, gate1: Tensor) -> Tensor:
        """`forward` with the modulation already computed: scale1 = 1 + scale, gate1 = 1 + gate, each
        (B, hidden). For sampling only (training keeps `forward`): functional calls on the block's own layers
        skip the module dispatch, a measurable share of a denoising step at small batches."""
        fc1, _, fc2 = self.mlp  # Linear, SiLU, Linear
        h = torch.addcmul(shift, _layer_norm(self.norm, x), scale1)
        h = F.silu(F.linear(h, fc1.weight, fc1.bias), inplace=True)
        return torch.addcmul(x, gate1, F.linear(h, fc2.weight, fc2.bias))


class SmallBackbone(RiptBackbone):
    """State / camera encoder and an adaLN MLP denoiser over the flattened action chunk."""

    def __init__(self, config: RiptConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_dim
        self.state_dim = config.state_dim
        self.state_clip = config.state_clip
        env_feat = config.env_state_feature
        self.env_state_dim = 0 if env_feat is None else int(env_feat.shape[0])
        self.image_keys = sorted(config.image_features)
        self.chunk_size = config.chunk_size
        self.action_dim = config.action_dim

        parts = 0
        if self.state_dim:
            self.state_proj = nn.Sequential(nn.Linear(self.state_dim, h), nn.GELU(), nn.Linear(h, h))
            parts += 1
        if self.env_state_dim:
            self.env_state_proj = nn.Sequential(nn.Linear(self.env_state_dim, h), nn.GELU(), nn.Linear(h, h))
            parts += 1
        if self.image_keys:
            self.image_encoder = ImageEncoder(config.image_size, config.image_channels, h)
            self.camera_embedding = nn.Parameter(torch.zeros(len(self.image_keys), h))
            parts += len(self.image_keys)
        self.obs_proj = nn.Sequential(nn.Linear(parts * h, h), nn.GELU(), nn.Linear(h, h))

        flat = self.chunk_size * self.action_dim
        self.context_to_cond = nn.Linear(h, config.cond_dim)
        self.in_proj = nn.Linear(flat + h, h)
        self.blocks = nn.ModuleList(AdaLNBlock(h, config.cond_dim) for _ in range(config.num_denoiser_layers))
        self.out_norm = nn.LayerNorm(h, elementwise_affine=False)
        self.out_modulation = nn.Linear(config.cond_dim, 2 * h)
        nn.init.zeros_(self.out_modulation.weight)
        nn.init.zeros_(self.out_modulation.bias)
        self.out_proj = nn.Linear(h, flat)
        # Multi-task: one row per task of config.task_names, zeros at start (no random draw, so every other
        # parameter is initialised exactly as in a single-task policy of the same seed).
        self.task_names = None if config.task_names is None else list(config.task_names)
        if self.task_names is not None:
            self._task_index = task_vocabulary(self.task_names)
            self.task_embedding = nn.Parameter(torch.zeros(len(self.task_names), h))

    def task_indices(self, batch: dict, batch_size: int) -> Tensor:
        """(B,) long: the index in `task_names` of each row's `task` string (one string applies to every row)."""
        tasks = batch.get(TASK_KEY)
        if tasks is None:
            raise ValueError(
                f"This policy is conditioned on the tasks {self.task_names} (policy.task_names) but the batch has "
                f"no '{TASK_KEY}' key. Send each row's task or instruction as batch['{TASK_KEY}'] (LeRobot's "
                "rollout does from the env's task_description; lerobot_ript's collector and evaluation do)."
            )
        if isinstance(tasks, str):
            tasks = [tasks] * batch_size
        if len(tasks) != batch_size:
            raise ValueError(
                f"batch['{TASK_KEY}'] holds {len(tasks)} strings for {batch_size} rows; send one per row."
            )
        try:
            index = [self._task_index[t] for t in tasks]
        except KeyError as err:
            raise ValueError(
                f"batch['{TASK_KEY}'] holds {err.args[0]!r}, which is none of this policy's tasks {self.task_names} "
                "(policy.task_names; each task's name or MetaWorld instruction). Evaluate the policy on the tasks it "
                "was trained on, or train it with this task in env.task."
            ) from None
        return torch.tensor(index, dtype=torch.long, device=self.task_embedding.device)

    def encode_observation(self, batch: dict[str, Tensor]) -> Tensor:
        feats = []
        if self.state_dim:
            state = batch["observation.state"]
            if state.shape[-1] != self.state_dim:
                raise ValueError(
                    f"observation.state has {state.shape[-1]} dims but the policy expects {self.state_dim}. "
                    "Set policy.target_state_dim to pad/truncate states, or train on a dataset of this robot."
                )
            feats.append(self.state_proj(state.clamp(-self.state_clip, self.state_clip)))
        if self.env_state_dim:
            env_state = batch["observation.environment_state"].clamp(-self.state_clip, self.state_clip)
            feats.append(self.env_state_proj(env_state))
        if self.image_keys:
            # Resize per camera first: cameras may differ in size, so they cannot be stacked before.
            images = torch.stack([self.image_encoder.resize(batch[k]) for k in self.image_keys], dim=1)
            b, n = images.shape[:2]
            enc = self.image_encoder(images.flatten(0, 1)).view(b, n, -1) + self.camera_embedding
            feats.append(enc.flatten(1))
        context = self.obs_proj(torch.cat(feats, dim=-1))  # (B, hidden)
        if self.task_names is not None:
            context = context + self.task_embedding[self.task_indices(batch, context.shape[0])]
        return context

    def repeat_context(self, context: Tensor, repeats: int) -> Tensor:
        return context.repeat(repeats, 1)

    def denoise(self, context: Tensor, noisy_actions: Tensor, cond: Tensor) -> Tensor:
        b = noisy_actions.shape[0]
        cond = cond + self.context_to_cond(context)  # (B, cond_dim)
        x = self.in_proj(torch.cat([noisy_actions.reshape(b, -1), context], dim=-1))
        for block in self.blocks:
            x = block(x, cond)
        scale, shift = self.out_modulation(cond).chunk(2, dim=-1)
        x = self.out_norm(x) * (1 + scale) + shift
        return self.out_proj(x).view(b, self.chunk_size, self.action_dim)

    def prepare_denoise(self, context: Tensor, row_cond: Tensor, step_conds: Tensor) -> PreparedDenoiser:
        return PreparedDenoiser(self, context, row_cond, step_conds)


class PreparedDenoiser:
    """`SmallBackbone.denoise` for one sampling call, the work constant within the call done once.

    The condition of row i at Euler step s is row_cond[i] + context_to_cond(context)[i] (fixed for the call)
    plus step_conds[s] (the same for every row), and every modulation and the input projection are linear:
        1 + modulation(cond) = [W (row_cond + context_to_cond(context)) + b + 1]   (N, k)         once
                             + [W step_conds]                                     (num_steps, k) once
        in_proj([noisy, context]) = [W_ctx context + b]                           (N, hidden)    once
                                  + W_noisy noisy                                                per step
    (the "+ 1" only on the scale and gate chunks). Each step then runs the input projection of the actions,
    the block MLPs and the output projection, and adds one precomputed row per modulation.
    """

    def __init__(
        self, backbone: SmallBackbone, context: Tensor, row_cond: Tensor, step_conds: Tensor
    ) -> None:
        self.backbone = backbone
        h = backbone.config.hidden_dim
        cond = row_cond + backbone.context_to_cond(context)  # (N, cond_dim)
        # Chunks (scale, shift, gate) of every block, then (scale, shift) of the output.
        mods = [(block.modulation, (1.0, 0.0, 1.0)) for block in backbone.blocks]
        mods.append((backbone.out_modulation, (1.0, 0.0)))
        self.row_mods, self.step_mods = [], []
        for linear, ones in mods:
            one = torch.tensor(ones, dtype=linear.bias.dtype, device=linear.bias.device).repeat_interleave(h)
            self.row_mods.append(F.linear(cond, linear.weight, linear.bias + one))  # (N, k)
            self.step_mods.append(F.linear(step_conds, linear.weight))  # (num_steps, k)
        flat = backbone.chunk_size * backbone.action_dim
        w_in = backbone.in_proj.weight  # (hidden, flat + hidden): [noisy actions | context]
        self.w_noisy_t = w_in[:, :flat].t()  # (flat, hidden)
        self.ctx_in = F.linear(context, w_in[:, flat:], backbone.in_proj.bias)  # (N, hidden)

    def __call__(self, noisy_actions: Tensor, step: int) -> Tensor:
        """Velocity (N, chunk, action_dim) of `noisy_actions` (N, chunk, action_dim) at Euler step `step`."""
        bb, n, h = self.backbone, noisy_actions.shape[0], self.backbone.config.hidden_dim
        mods = [(r + s[step]).split(h, dim=-1) for r, s in zip(self.row_mods, self.step_mods, strict=True)]
        x = torch.addmm(self.ctx_in, noisy_actions.reshape(n, -1), self.w_noisy_t)  # (N, hidden)
        for block, (scale1, shift, gate1) in zip(bb.blocks, mods[:-1], strict=True):
            x = block.modulated(x, scale1, shift, gate1)
        scale1, shift = mods[-1]  # each (N, hidden)
        x = torch.addcmul(shift, _layer_norm(bb.out_norm, x), scale1)
        return F.linear(x, bb.out_proj.weight, bb.out_proj.bias).view(n, bb.chunk_size, bb.action_dim)


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """`norm(x)` for a LayerNorm without affine parameters, minus the module call."""
    return F.layer_norm(x, norm.normalized_shape, eps=norm.eps)
