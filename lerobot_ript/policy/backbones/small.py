"""The built-in small backbone: a CNN per camera, a state MLP and an adaLN-conditioned MLP denoiser.

Runs on a CPU, downloads nothing, accepts any number of cameras and any image size (images are resized to
`config.image_size`), and state-only datasets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lerobot_ript.policy.backbones.base import RiptBackbone
from lerobot_ript.policy.configuration_ript import RiptConfig


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
        return self.obs_proj(torch.cat(feats, dim=-1))  # (B, hidden)

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
