"""Backbones behind the RIPT seam. `make_backbone(config)` picks one by `config.backbone`."""

from __future__ import annotations

from lerobot_ript.policy.backbones.base import RiptBackbone


def make_backbone(config) -> RiptBackbone:
    """The backbone named by `config.backbone` (validated by RiptConfig: only "small" exists today)."""
    from lerobot_ript.policy.backbones.small import SmallBackbone

    if config.backbone != "small":
        raise ValueError(f"backbone={config.backbone!r} is not available; use 'small'.")
    return SmallBackbone(config)


__all__ = ["RiptBackbone", "make_backbone"]
