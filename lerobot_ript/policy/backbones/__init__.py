"""Backbones behind the RIPT seam. `make_backbone(config)` picks one by `config.backbone`."""

from __future__ import annotations

from lerobot_ript.policy.backbones.base import RiptBackbone


def make_backbone(config) -> RiptBackbone:
    if config.backbone == "small":
        from lerobot_ript.policy.backbones.small import SmallBackbone

        return SmallBackbone(config)
    from lerobot_ript.policy.backbones.vla import make_vla_backbone

    return make_vla_backbone(config)


__all__ = ["RiptBackbone", "make_backbone"]
