"""lerobot-ript: RIPT-style RL post-training for LeRobot policies.

Importing the package registers the `ript` policy type (and its processor step) with LeRobot, and the
`metaworld_state` env type when the env module is present. Heavy simulators are imported lazily.
"""

from lerobot_ript.policy.configuration_ript import RiptConfig
from lerobot_ript.policy.processor_ript import StateDimAdapterStep, make_ript_pre_post_processors

try:  # the env config module is light (no simulator import); it registers `--env.type=metaworld_state`
    from lerobot_ript.envs import MetaWorldStateEnvConfig  # noqa: F401
except ImportError as err:  # pragma: no cover - only while the env module is being written
    if "lerobot_ript.envs" not in str(err):
        raise

__version__ = "0.1.0"
__all__ = ["RiptConfig", "StateDimAdapterStep", "make_ript_pre_post_processors", "__version__"]
