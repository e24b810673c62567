"""Discovery shim: LeRobot 0.6 imports every installed `lerobot_policy_*` distribution; this registers `ript`."""

import lerobot_ript  # noqa: F401
