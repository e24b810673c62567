"""LeRobot env types of lerobot_ript. Importing this registers `--env.type=metaworld_state`.

Only the config class is imported here; the simulator (metaworld, mujoco) is imported when an env is built.
"""

from lerobot_ript.envs.metaworld import MetaWorldStateEnvConfig

__all__ = ["MetaWorldStateEnvConfig"]
