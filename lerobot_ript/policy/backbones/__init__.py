"""Backbones behind the RIPT seam. `make_backbone(config)` picks one by `config.backbone`."""

from __future__ import annotations

from lerobot_ript.policy.backbones.base import RiptBackbone


def make_backbone(config) -> RiptBackbone:
    """The backbone named by `config.backbone` (validated by RiptConfig). The VLA backbones import LeRobot's
    pi0 / pi05 / SmolVLA (and transformers) only when chosen."""
    if config.backbone == "small":
        from lerobot_ript.policy.backbones.small import SmallBackbone

        return SmallBackbone(config)
    if config.backbone in ("pi0", "pi05"):
        from lerobot_ript.policy.backbones.pi import Pi0Backbone, Pi05Backbone

        return (Pi0Backbone if config.backbone == "pi0" else Pi05Backbone)(config)
    if config.backbone == "smolvla":
        from lerobot_ript.policy.backbones.smolvla import SmolVLABackbone

        return SmolVLABackbone(config)
    raise ValueError(f"backbone={config.backbone!r} is not one of small, pi0, pi05, smolvla.")


__all__ = ["RiptBackbone", "make_backbone"]
