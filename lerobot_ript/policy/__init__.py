"""The `ript` policy: configuration, model and processors (LeRobot's one-folder-per-policy layout)."""

from lerobot_ript.policy.configuration_ript import RiptConfig

__all__ = ["RiptConfig"]
