"""MetaWorld v3 with the full 39-dim state, as a LeRobot env type (`--env.type=metaworld_state`).

LeRobot 0.6.1's own `metaworld` env is pixels-only (its `agent_pos` is the first 4 dims), so this module
adds an env with the 39-dim state (hand, gripper, object poses, goal), optional camera images, and initial
states controlled by the reset seed:

- `MetaWorldStateEnv`: one gymnasium env; `reset(seed=s)` gives the same initial state (goal and object
  positions) for the same `s`, and equal actions from it give bit-identical trajectories.
- `MetaWorldStateEnvConfig`: the draccus `EnvConfig` subclass; `lerobot.envs.factory.make_env(cfg, n_envs)`
  returns `{"metaworld_state": {0: VectorEnv}}`, which LeRobot's `rollout` / `eval_policy` run.
- `make_vector_env(cfg, n_envs)`: one vector env whose `reset(seed=[...])` takes one seed per sub-env.
- `scripted_expert(task)`: MetaWorld's scripted policy, `obs (39,) -> action (4,)`.
- `task_instruction(task)`: the task's language instruction (the env's `task_description`, the batch's `task`).
- `parse_tasks(spec)`: the tasks of `--env.task`: one name, a comma-separated list, or a named set
  (`TASK_SETS`: mt3, mt5). A config with several tasks builds one vector env per task
  (`make_vector_env(cfg, n, task=...)`; `create_envs` gives LeRobot `{"metaworld_state": {i: VectorEnv}}`).

Seeds: training data (demos, RL initial states) uses seeds from 0; held-out evaluation uses seeds from
`HELD_OUT_SEED_START` on, so the two sets of initial states never overlap.

Importing this module is cheap: metaworld and mujoco are imported inside the functions that need them.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import pickle
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import ACTION, OBS_IMAGES, OBS_STATE

from lerobot_ript.envs.rotation import quat_from_matrix

logger = logging.getLogger(__name__)

ENV_TYPE = "metaworld_state"
OBS_TYPES = ("state", "state_pixels")
STATE_DIM = 39  # hand xyz, gripper, 2 object poses (7 each), the same 18 dims one step earlier, goal xyz
ACTION_DIM = 4  # hand xyz delta, gripper effort; each in [-1, 1]
# MetaWorld raises once an episode reaches its `max_path_length` (500 steps); episodes must stay within it.
MAX_EPISODE_LENGTH = 500
# MetaWorld steps at 80 Hz (5 physics substeps of 2.5 ms).
METAWORLD_FPS = 80
# First seed of the held-out evaluation initial states; training demos and RL rollouts use seeds below it.
HELD_OUT_SEED_START = 1_000_000
# Limits on the square camera image side, in pixels.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
# MetaWorld's corner cameras render upside down; their images are rotated by 180 degrees
# (LeRobot's own metaworld env does this for corner2).
_UPSIDE_DOWN_CAMERAS = frozenset({"corner", "corner2", "corner3", "corner4"})
# LeRobot's metaworld env moves corner2 to this position (metres) for a closer view of the table.
_CORNER2_POSITION = (0.75, 0.075, 0.7)
_INSTALL_HINT = 'pip install "lerobot_policy_ript[metaworld]"'
_MAX_RENDER_GEOMS = 10_000


# ----------------------------------------------------------------------------------------------------------
# Lazy imports and task names
# ----------------------------------------------------------------------------------------------------------


def _import_metaworld() -> Any:
    try:
        import metaworld
        import metaworld.env_dict
    except ImportError as err:
        raise ImportError(
            f"The '{ENV_TYPE}' env needs MetaWorld, which could not be imported ({err}). "
            f"Install it with: {_INSTALL_HINT}"
        ) from err
    return metaworld


def valid_tasks() -> list[str]:
    """The MetaWorld v3 task names (e.g. 'push-v3'), sorted."""
    return sorted(_import_metaworld().env_dict.ALL_V3_ENVIRONMENTS)


def _check_task(task: str) -> None:
    tasks = valid_tasks()
    if task in tasks:
        return
    close = difflib.get_close_matches(str(task), tasks, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"Unknown MetaWorld task {task!r}.{hint} Valid tasks: {', '.join(tasks)}.")


# The language instruction of each MetaWorld v3 task: what a vision-language-action policy reads from the batch's
# `task` key. The strings are LeRobot 0.6.1's (`lerobot/envs/metaworld_config.json`, from the MetaWorld paper),
# so a policy fine-tuned on LeRobot's MetaWorld datasets or evaluated with LeRobot's own `metaworld` env sees the
# same text here. push-v3 and push-back-v3 share one string there, and so here.
TASK_INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "Pick up a nut and place it onto a peg",
    "basketball-v3": "Dunk the basketball into the basket",
    "bin-picking-v3": "Grasp the puck from one bin and place it into another bin",
    "box-close-v3": "Grasp the cover and close the box with it",
    "button-press-topdown-v3": "Press a button from the top",
    "button-press-topdown-wall-v3": "Bypass a wall and press a button from the top",
    "button-press-v3": "Press a button",
    "button-press-wall-v3": "Bypass a wall and press a button",
    "coffee-button-v3": "Push a button on the coffee machine",
    "coffee-pull-v3": "Pull a mug from a coffee machine",
    "coffee-push-v3": "Push a mug under a coffee machine",
    "dial-turn-v3": "Rotate a dial 180 degrees",
    "disassemble-v3": "Pick a nut out of a peg",
    "door-close-v3": "Close a door with a revolving joint",
    "door-lock-v3": "Lock the door by rotating the lock clockwise",
    "door-open-v3": "Open a door with a revolving joint",
    "door-unlock-v3": "Unlock the door by rotating the lock counter-clockwise",
    "drawer-close-v3": "Push and close a drawer",
    "drawer-open-v3": "Open a drawer",
    "faucet-close-v3": "Rotate the faucet clockwise",
    "faucet-open-v3": "Rotate the faucet counter-clockwise",
    "hammer-v3": "Hammer a screw on the wall",
    "hand-insert-v3": "Insert the gripper into a hole",
    "handle-press-side-v3": "Press a handle down sideways",
    "handle-press-v3": "Press a handle down",
    "handle-pull-side-v3": "Pull a handle up sideways",
    "handle-pull-v3": "Pull a handle up",
    "lever-pull-v3": "Pull a lever down 90 degrees",
    "peg-insert-side-v3": "Insert a peg sideways",
    "peg-unplug-side-v3": "Unplug a peg sideways",
    "pick-out-of-hole-v3": "Pick up a puck from a hole",
    "pick-place-v3": "Pick and place a puck to a goal",
    "pick-place-wall-v3": "Pick a puck, bypass a wall and place the puck",
    "plate-slide-back-side-v3": "Get a plate from the cabinet sideways",
    "plate-slide-back-v3": "Get a plate from the cabinet",
    "plate-slide-side-v3": "Slide a plate into a cabinet sideways",
    "plate-slide-v3": "Slide a plate into a cabinet",
    "push-back-v3": "Push the puck to a goal",
    "push-v3": "Push the puck to a goal",
    "push-wall-v3": "Bypass a wall and push a puck to a goal",
    "reach-v3": "Reach a goal position",
    "reach-wall-v3": "Bypass a wall and reach a goal",
    "shelf-place-v3": "Pick and place a puck onto a shelf",
    "soccer-v3": "Kick a soccer into the goal",
    "stick-pull-v3": "Grasp a stick and pull a box with the stick",
    "stick-push-v3": "Grasp a stick and push a box using the stick",
    "sweep-into-v3": "Sweep a puck into a hole",
    "sweep-v3": "Sweep a puck off the table",
    "window-close-v3": "Push and close a window",
    "window-open-v3": "Push and open a window",
}


def task_instruction(task: str) -> str:
    """The natural-language instruction of a MetaWorld v3 task, e.g. 'push-v3' -> 'Push the puck to a goal'.

    It is the env's `task_description` (LeRobot's rollout sends it as the batch's `task`) and the `task` column
    of recorded demos and rollouts; the task NAME stays the key of everything else (init_hash, configs).
    """
    if task in TASK_INSTRUCTIONS:
        return TASK_INSTRUCTIONS[task]
    close = difflib.get_close_matches(str(task), list(TASK_INSTRUCTIONS), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"No instruction for MetaWorld task {task!r}.{hint} Known tasks: {', '.join(TASK_INSTRUCTIONS)}."
    )


# Named task sets of `--env.task`, for one policy trained on several tasks. Each task's scripted expert solves it
# from noisy demos (the demos the loop records), and their instructions differ: a policy tells the tasks apart by
# the batch's `task` string (push-v3 and push-back-v3 share one, so never appear in one set).
TASK_SETS: dict[str, tuple[str, ...]] = {
    "mt3": ("push-v3", "reach-v3", "drawer-open-v3"),
    "mt5": ("push-v3", "reach-v3", "drawer-open-v3", "door-open-v3", "pick-place-v3"),
}


def parse_tasks(spec: str | None) -> list[str]:
    """The MetaWorld tasks of an `env.task` value, in order: one task name ("push-v3"), a comma-separated list
    ("push-v3,reach-v3"; spaces around names are ignored) or a named set of `TASK_SETS` ("mt3").

    Fails with a "did you mean" on an unknown name, and on a task named twice or two tasks sharing one
    instruction (a policy could not tell them apart).
    """
    names = [name.strip() for name in str(spec).split(",") if name.strip()] if spec is not None else []
    if not names:
        raise ValueError(
            f"task={spec!r} names no task: give a MetaWorld task (e.g. push-v3), a comma-separated list "
            f"(push-v3,reach-v3) or a named set ({', '.join(TASK_SETS)})."
        )
    if len(names) == 1 and names[0] in TASK_SETS:
        return list(TASK_SETS[names[0]])
    tasks = valid_tasks()
    for name in names:
        if name not in tasks:
            close = difflib.get_close_matches(name, tasks + sorted(TASK_SETS), n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            sets = "; ".join(f"{k} ({', '.join(v)})" for k, v in TASK_SETS.items())
            where = f" (in {spec!r})" if len(names) > 1 else ""
            raise ValueError(
                f"task={name!r}{where} is not a MetaWorld v3 task or task set.{hint} Valid tasks: "
                f"{', '.join(tasks)}. Named sets: {sets}. Several tasks: a comma-separated list."
            )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"task={spec!r} names {repeated} more than once; name each task once.")
    by_instruction: dict[str, list[str]] = {}
    for name in names:
        by_instruction.setdefault(task_instruction(name), []).append(name)
    shared = [group for group in by_instruction.values() if len(group) > 1]
    if shared:
        raise ValueError(
            f"task={spec!r}: {' and '.join(shared[0])} share the instruction "
            f"{task_instruction(shared[0][0])!r}, and a policy tells tasks apart by their instruction (the "
            "batch's `task`). Train them in separate runs, or keep one of them."
        )
    return names


def _check_settings(
    episode_length: int, obs_type: str, image_size: int, cameras: Sequence[str], fps: int | None = None
) -> None:
    """Fail-fast checks shared by the env and its config (all cheap: nothing is imported or built)."""
    if not 1 <= int(episode_length) <= MAX_EPISODE_LENGTH:
        raise ValueError(
            f"episode_length={episode_length} is out of range: it must be in 1..{MAX_EPISODE_LENGTH} "
            f"(MetaWorld raises once an episode reaches {MAX_EPISODE_LENGTH} steps). Use a value in that range."
        )
    if obs_type not in OBS_TYPES:
        raise ValueError(f"obs_type={obs_type!r} is not supported; choose one of {list(OBS_TYPES)}.")
    if not MIN_IMAGE_SIZE <= int(image_size) <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size={image_size} is out of range: it must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels."
        )
    if len(cameras) == 0 or len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras={list(cameras)} must name at least one camera, each once.")
    if fps is not None and fps <= 0:
        raise ValueError(f"fps={fps} must be a positive number of frames per second (MetaWorld runs at 80).")


# ----------------------------------------------------------------------------------------------------------
# The raw MetaWorld env, with fast object quaternions
# ----------------------------------------------------------------------------------------------------------

# Tasks whose `_get_quat_objects` (metaworld 3.1.1) is
#     Rotation.from_matrix(self.data.<kind>(<name>).xmat.reshape(3, 3)).as_quat()
# followed by <n_zeros> zeros (stick-pull / stick-push append a zero quaternion for a second object), as
# (kind, name, n_zeros). scipy spends about 100 us on that one conversion, 5% of a step; `quat_from_matrix`
# returns the same bits in about 5 us. The other 28 tasks read MuJoCo's `xquat` or a constant and keep
# MetaWorld's method. A table rather than pattern detection: the entries were read off MetaWorld's source, and
# `_reads_xmat_quaternion` only confirms that the installed method still names the same element.
_XMAT_QUATERNION_TASKS: dict[str, tuple[str, str, int]] = {
    "coffee-pull-v3": ("geom", "mug", 0),
    "coffee-push-v3": ("geom", "mug", 0),
    "door-close-v3": ("geom", "handle", 0),
    "door-open-v3": ("geom", "handle", 0),
    "lever-pull-v3": ("geom", "objGeom", 0),
    "peg-insert-side-v3": ("site", "pegGrasp", 0),
    "pick-place-v3": ("geom", "objGeom", 0),
    "pick-place-wall-v3": ("geom", "objGeom", 0),
    "plate-slide-back-side-v3": ("geom", "puck", 0),
    "plate-slide-back-v3": ("geom", "puck", 0),
    "plate-slide-side-v3": ("geom", "puck", 0),
    "plate-slide-v3": ("geom", "puck", 0),
    "push-back-v3": ("geom", "objGeom", 0),
    "push-v3": ("geom", "objGeom", 0),
    "push-wall-v3": ("geom", "objGeom", 0),
    "reach-v3": ("geom", "objGeom", 0),
    "reach-wall-v3": ("geom", "objGeom", 0),
    "shelf-place-v3": ("geom", "objGeom", 0),
    "soccer-v3": ("body", "soccer_ball", 0),
    "stick-pull-v3": ("body", "stick", 4),
    "stick-push-v3": ("body", "stick", 4),
    "sweep-into-v3": ("geom", "objGeom", 0),
}


def _reads_xmat_quaternion(method: Any, kind: str, name: str) -> bool:
    """Whether MetaWorld's `_get_quat_objects` still converts `data.<kind>(<name>).xmat` with scipy.

    A cheap guard against a MetaWorld whose method differs from the table: it must reference the element's
    name and the attributes the pattern uses; anything else keeps MetaWorld's own method.
    """
    code = getattr(method, "__code__", None)
    if code is None:
        return False
    names_used = {"Rotation", "from_matrix", "as_quat", "xmat", kind} <= set(code.co_names)
    return names_used and name in code.co_consts


class _XmatQuaternion:
    """An env's `_get_quat_objects` for a `_XMAT_QUATERNION_TASKS` task, with `quat_from_matrix` for scipy.

    Holds the env weakly (no reference cycle, so a closed env is freed at once); pickles with the env.
    """

    def __init__(self, env: Any, kind: str, name: str, n_zeros: int) -> None:
        self._env_ref = weakref.ref(env)
        self._kind, self._name, self._n_zeros = kind, name, n_zeros

    def __call__(self) -> np.ndarray:
        element = getattr(self._env_ref().data, self._kind)(self._name)
        quat = quat_from_matrix(element.xmat)  # (4,)
        if self._n_zeros:
            return np.concatenate((quat, np.zeros(self._n_zeros)))
        return quat

    def __reduce__(self) -> tuple[type, tuple[Any, str, str, int]]:
        return type(self), (self._env_ref(), self._kind, self._name, self._n_zeros)


def _use_fast_quaternions(env: Any, task: str) -> bool:
    """Give `env` (this instance only) the fast `_get_quat_objects` if its task is in the table; True if so."""
    entry = _XMAT_QUATERNION_TASKS.get(task)
    if entry is None or not _reads_xmat_quaternion(type(env)._get_quat_objects, entry[0], entry[1]):
        return False
    env._get_quat_objects = _XmatQuaternion(env, *entry)
    return True


def _build_metaworld_env(task: str, fast_quaternions: bool = True) -> Any:
    """A raw MetaWorld v3 env whose initial states are drawn from its own seeded RNG at every reset.

    Equivalent to LeRobot's route (`MT1(task).train_classes[task]()`, `set_task`, then
    `_freeze_rand_vec=False; seeded_rand_vec=True`) without MT1's 50 warm-up resets (about 1 s): the task
    is set with MT1's arguments and the goal observable (`partially_observable=False`, as in MT1).
    `fast_quaternions` swaps scipy's matrix-to-quaternion conversion for a bit-identical one where the task
    uses it (see `_XMAT_QUATERNION_TASKS`); False keeps MetaWorld's method (for tests and benchmarks).
    """
    metaworld = _import_metaworld()
    from metaworld.types import Task

    env_cls = metaworld.env_dict.ALL_V3_ENVIRONMENTS[task]
    kwargs = dict(metaworld.env_dict.ML1_ARGS_KWARGS[task]["kwargs"])
    kwargs.pop("task_id", None)
    env = env_cls()
    placeholder = np.zeros(len(env._random_reset_space.low))  # replaced by the first reset's draw
    data = {**kwargs, "rand_vec": placeholder, "env_cls": env_cls, "partially_observable": False}
    env.set_task(Task(env_name=task, data=pickle.dumps(data)))
    env._freeze_rand_vec = False  # draw a new initial state at every reset ...
    env.seeded_rand_vec = True  # ... from env.np_random, which `env.seed(s)` resets
    if fast_quaternions:
        _use_fast_quaternions(env, task)
    return env


# ----------------------------------------------------------------------------------------------------------
# Offscreen rendering
# ----------------------------------------------------------------------------------------------------------


def _use_default_gl_backend() -> None:
    """Software EGL is the only backend that works headless here; set it unless the user chose one."""
    if "MUJOCO_GL" not in os.environ:
        os.environ["MUJOCO_GL"] = "egl"
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")


def _gl_context_class() -> type:
    """The GL context class for MUJOCO_GL, chosen now (mujoco picks its own once, when first imported)."""
    backend = os.environ.get("MUJOCO_GL", "egl").lower().strip()
    if backend == "egl":
        from mujoco.egl import GLContext
    elif backend == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
        from mujoco.osmesa import GLContext
    elif backend in ("glfw", "glx", "enable", "enabled", "on", "true", "1", ""):
        from mujoco.glfw import GLContext
    else:
        raise RuntimeError(
            f"MUJOCO_GL={backend!r} cannot render camera images; set MUJOCO_GL=egl (headless) or unset it."
        )
    return GLContext


class _CameraRenderer:
    """Renders named fixed cameras of a MuJoCo model to (size, size, 3) uint8 images.

    Like `mujoco.Renderer`, but the GL context follows MUJOCO_GL at construction, so it also works when
    mujoco was imported (e.g. by a state-only env) before MUJOCO_GL was set. Shadows and multisampling are
    off: with them software EGL renders about 10 frames/s, without them about 70.
    """

    def __init__(self, model: Any, size: int, cameras: Sequence[str]) -> None:
        import mujoco

        names = [model.camera(i).name for i in range(model.ncam)]
        unknown = [c for c in cameras if c not in names]
        if unknown:
            raise ValueError(f"Unknown MetaWorld camera(s) {unknown}; valid cameras: {names}.")
        self._mujoco, self._model, self._size = mujoco, model, size
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, size)
        if "corner2" in cameras:
            model.cam_pos[model.camera("corner2").id] = _CORNER2_POSITION
        self._gl = _gl_context_class()(size, size)
        self._gl.make_current()
        self._scene = mujoco.MjvScene(model, maxgeom=_MAX_RENDER_GEOMS)
        self._option = mujoco.MjvOption()
        self._context = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        mujoco.mjr_setBuffer(mujoco.mjtFramebuffer.mjFB_OFFSCREEN, self._context)
        self._rect = mujoco.MjrRect(0, 0, size, size)
        self._cameras = {}
        for name in cameras:
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FIXED
            cam.fixedcamid = model.camera(name).id
            self._cameras[name] = cam

    def render(self, data: Any, camera: str) -> np.ndarray:
        mj = self._mujoco
        self._gl.make_current()
        mj.mjv_updateScene(
            self._model, data, self._option, None, self._cameras[camera], mj.mjtCatBit.mjCAT_ALL, self._scene
        )
        mj.mjr_render(self._rect, self._scene, self._context)
        image = np.empty((self._size, self._size, 3), dtype=np.uint8)
        mj.mjr_readPixels(image, None, self._rect, self._context)
        image = np.flipud(image)  # OpenGL rows run bottom-up
        if camera in _UPSIDE_DOWN_CAMERAS:
            image = np.flip(image, (0, 1))
        return np.ascontiguousarray(image)

    def close(self) -> None:
        if self._gl is not None:
            self._context.free()
            self._gl.free()
            self._gl = None


# ----------------------------------------------------------------------------------------------------------
# The env
# ----------------------------------------------------------------------------------------------------------


class MetaWorldStateEnv(gym.Env):
    """One MetaWorld v3 task with the 39-dim state, seed-controlled initial states and a step limit.

    Observations: `{"agent_pos": float32 (39,)}`, plus `{"pixels": {camera: uint8 (H, W, 3)}}` for
    obs_type="state_pixels". Actions: float32 (4,), clipped to [-1, 1]. `reset(seed=s)` reseeds the
    initial-state RNG (equal `s`, equal state); `seed=None` draws the next state from that RNG.
    `info["success"]` / `info["is_success"]` are MetaWorld's success flag of this step, as a bool.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": METAWORLD_FPS}

    def __init__(
        self,
        task: str = "push-v3",
        episode_length: int = 200,
        obs_type: str = "state",
        image_size: int = 64,
        cameras: Sequence[str] = ("corner2",),
        terminate_on_success: bool = True,
    ) -> None:
        super().__init__()
        cameras = tuple(cameras)
        _check_settings(episode_length, obs_type, image_size, cameras)
        if obs_type == "state_pixels":
            _use_default_gl_backend()  # before metaworld imports mujoco, where possible
        _check_task(task)
        self.task = task  # the task NAME: the key of init_hash and configs
        # The language instruction: LeRobot's rollout (lerobot-eval) sends it to the policy as the batch's `task`,
        # and recorded demos and rollouts carry it in their `task` column.
        self.task_description = task_instruction(task)
        self.episode_length = int(episode_length)
        self._max_episode_steps = self.episode_length  # read by lerobot_eval.rollout
        self.obs_type = obs_type
        self.image_size = int(image_size)
        self.cameras = cameras
        self.terminate_on_success = bool(terminate_on_success)
        self.render_mode = "rgb_array"
        self._env = _build_metaworld_env(task)
        self._renderer: _CameraRenderer | None = None
        if obs_type == "state_pixels":
            self._renderer = _CameraRenderer(self._env.model, self.image_size, cameras)

        spaces: dict[str, gym.Space] = {
            "agent_pos": gym.spaces.Box(-np.inf, np.inf, shape=(STATE_DIM,), dtype=np.float32)
        }
        if obs_type == "state_pixels":
            image_space = gym.spaces.Box(0, 255, shape=(self.image_size, self.image_size, 3), dtype=np.uint8)
            spaces["pixels"] = gym.spaces.Dict({cam: image_space for cam in cameras})
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)

        self._elapsed_steps = 0
        self._needs_reset = True
        self._init_state_key: np.ndarray | None = None

    def _observation(self, raw_obs: np.ndarray) -> dict[str, Any]:
        obs: dict[str, Any] = {"agent_pos": np.asarray(raw_obs, dtype=np.float32)}
        if self._renderer is not None:
            obs["pixels"] = {cam: self._renderer.render(self._env.data, cam) for cam in self.cameras}
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))
        raw_obs, _ = self._env.reset()
        self._elapsed_steps = 0
        self._needs_reset = False
        obs = self._observation(raw_obs)
        self._init_state_key = np.round(obs["agent_pos"].astype(np.float64), 6)
        return obs, {"is_success": False, "success": False}

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError(
                "step() called on a MetaWorldStateEnv whose episode has not started or has ended; "
                "call reset() first."
            )
        action = np.asarray(action, dtype=np.float32).reshape(-1)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"Expected an action of shape ({ACTION_DIM},), got shape {action.shape}.")
        action = np.clip(action, -1.0, 1.0)
        raw_obs, reward, _, _, mw_info = self._env.step(action)
        self._elapsed_steps += 1
        success = bool(mw_info.get("success", False))
        terminated = self.terminate_on_success and success
        truncated = self._elapsed_steps >= self.episode_length
        self._needs_reset = terminated or truncated
        info = {**mw_info, "success": success, "is_success": success}
        return self._observation(raw_obs), float(reward), terminated, truncated, info

    def init_state_key(self) -> np.ndarray:
        """The initial state of the current episode: the reset `agent_pos` as float64, rounded to 1e-6.

        `lerobot_ript.data.writer.init_hash_of(task, key)` equals `init_hash_of(task, obs["agent_pos"])`.
        """
        if self._init_state_key is None:
            raise RuntimeError("init_state_key() needs a reset() first.")
        return self._init_state_key.copy()

    def render(self) -> np.ndarray:
        """The first camera's current image (for LeRobot's eval videos); built lazily for obs_type='state'."""
        if self._renderer is None:
            _use_default_gl_backend()
            self._renderer = _CameraRenderer(self._env.model, self.image_size, self.cameras)
        return self._renderer.render(self._env.data, self.cameras[0])

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        if self._env is not None:
            self._env.close()
            self._env = None


# ----------------------------------------------------------------------------------------------------------
# Vector envs
# ----------------------------------------------------------------------------------------------------------


@functools.cache
def _freeze_after_episode_end_cls() -> type:
    from lerobot.envs.utils import NEW_ROLLOUT_OPTION, FreezeAfterEpisodeEnd

    class FreezeUntilNewEpisode(FreezeAfterEpisodeEnd):
        """LeRobot's `FreezeAfterEpisodeEnd`, also thawed by a reset that carries a seed.

        A finished sub-env replays its last transition (no simulation) until a genuine new episode starts.
        LeRobot's `rollout` marks that with `NEW_ROLLOUT_OPTION`; a seeded reset (`reset(seed=[...])`) is
        just as unambiguous, because Gymnasium's autoreset never passes a seed. An unseeded reset without
        the option keeps a finished sub-env frozen.
        """

        def reset(self, *, seed=None, options=None):
            if seed is not None:
                options = {**(options or {}), NEW_ROLLOUT_OPTION: True}
            return super().reset(seed=seed, options=options)

    return FreezeUntilNewEpisode


def _make_frozen_env(env_kwargs: dict[str, Any]) -> gym.Env:
    """Top-level (picklable) factory: AsyncVectorEnv workers import only this module to call it."""
    return _freeze_after_episode_end_cls()(MetaWorldStateEnv(**env_kwargs))


def make_vector_env(
    cfg: MetaWorldStateEnvConfig, n_envs: int, use_async: bool = False, task: str | None = None
) -> gym.vector.VectorEnv:
    """One vector env of `n_envs` copies of the configured task (`task`: that task of a multi-task config, or any
    MetaWorld task with the config's other settings); `reset(seed=[s_0, ..., s_{n-1}])` seeds each.

    Autoreset is NEXT_STEP and each sub-env freezes once its episode ends (LeRobot's `FreezeAfterEpisodeEnd`),
    so the terminal observation is returned as-is and a finished sub-env costs nothing until the next
    `reset(seed=...)` or `rollout()`. `use_async` runs the sub-envs in processes (forkserver), which does not
    pay off on 2 CPU cores.
    """
    if int(n_envs) < 1:
        raise ValueError(f"n_envs={n_envs} must be >= 1.")
    kwargs = cfg.gym_kwargs if task is None else cfg.task_kwargs(task)
    env_fns = [functools.partial(_make_frozen_env, kwargs) for _ in range(int(n_envs))]
    autoreset = gym.vector.AutoresetMode.NEXT_STEP
    if use_async and n_envs > 1:
        return gym.vector.AsyncVectorEnv(
            env_fns, context="forkserver", shared_memory=True, autoreset_mode=autoreset
        )
    return gym.vector.SyncVectorEnv(env_fns, autoreset_mode=autoreset)


# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------


def _camera_names(cameras: str | Sequence[str]) -> tuple[str, ...]:
    from lerobot.envs.utils import parse_camera_names

    return tuple(parse_camera_names(cameras))


@EnvConfig.register_subclass(ENV_TYPE)
@dataclass
class MetaWorldStateEnvConfig(EnvConfig):
    """MetaWorld v3 with the 39-dim state (and optional images); `make_env(cfg, n_envs)` builds it."""

    # MetaWorld v3 task name, e.g. "push-v3", "pick-place-v3" (see `valid_tasks()` for all 50); or several tasks
    # for one policy: a comma-separated list ("push-v3,reach-v3,drawer-open-v3") or a named set of TASK_SETS
    # ("mt3", "mt5"). With several, each gets its own vector env, its instruction and its success rate.
    task: str | None = "push-v3"
    # Control frequency in Hz, written into datasets; MetaWorld steps at 80 Hz. Must be > 0.
    fps: int = METAWORLD_FPS
    # Episode horizon in env steps, 1..500; the episode is truncated after this many steps.
    episode_length: int = 200
    # "state": 39-dim state only; "state_pixels": the state plus camera images (software EGL, ~70 steps/s).
    obs_type: str = "state"
    # Side of the square camera images in pixels, 8..1024 (state_pixels only).
    image_size: int = 64
    # Comma-separated MetaWorld camera names (corner, corner2, corner3, corner4, topview, behindGripper,
    # gripperPOV); images appear as observation.images.<camera> (state_pixels only).
    cameras: str = "corner2"
    # End the episode (terminated=True) at the first step MetaWorld reports success; else run to the horizon.
    terminate_on_success: bool = True
    # Env-side features (filled in __post_init__ from obs_type): action (4,), agent_pos (39,), pixels/<cam>.
    features: dict[str, PolicyFeature] = field(
        default_factory=lambda: {ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}
    )
    # Env feature name -> policy feature name (filled in __post_init__).
    features_map: dict[str, str] = field(default_factory=lambda: {ACTION: ACTION, "agent_pos": OBS_STATE})

    def __post_init__(self) -> None:
        cameras = _camera_names(self.cameras)
        _check_settings(self.episode_length, self.obs_type, self.image_size, cameras, fps=self.fps)
        if self.obs_type == "state_pixels":
            _use_default_gl_backend()  # before metaworld imports mujoco below, where possible
        parse_tasks(self.task)  # fails with a "did you mean" on an unknown task or set
        # Rebuilt from obs_type every time, so a config copied with another obs_type keeps no stale keys.
        self.features = {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,)),
        }
        self.features_map = {ACTION: ACTION, "agent_pos": OBS_STATE}
        if self.obs_type == "state_pixels":
            for cam in cameras:
                # (H, W, C) like LeRobot's env configs; env_to_policy_features makes it (C, H, W).
                self.features[f"pixels/{cam}"] = PolicyFeature(
                    type=FeatureType.VISUAL, shape=(self.image_size, self.image_size, 3)
                )
                self.features_map[f"pixels/{cam}"] = f"{OBS_IMAGES}.{cam}"

    @property
    def tasks(self) -> list[str]:
        """The task names of `task` (one, or several for a multi-task run), in order; see `parse_tasks`."""
        return parse_tasks(self.task)

    @property
    def is_multi_task(self) -> bool:
        return len(self.tasks) > 1

    def task_kwargs(self, task: str) -> dict:
        """`MetaWorldStateEnv` keyword arguments of one task with this config's other settings."""
        return {
            "task": task,
            "episode_length": self.episode_length,
            "obs_type": self.obs_type,
            "image_size": self.image_size,
            "cameras": _camera_names(self.cameras),
            "terminate_on_success": self.terminate_on_success,
        }

    @property
    def gym_kwargs(self) -> dict:
        """`MetaWorldStateEnv` keyword arguments of the configured task (one task only: see `task_kwargs`)."""
        tasks = self.tasks
        if len(tasks) > 1:
            raise ValueError(
                f"env.task={self.task!r} names {len(tasks)} tasks, and gym_kwargs describes one env; use "
                "task_kwargs(<task>) (or make_vector_env(cfg, n, task=<task>)) for each of cfg.tasks."
            )
        return self.task_kwargs(tasks[0])

    def create_envs(
        self, n_envs: int, use_async_envs: bool = False
    ) -> dict[str, dict[int, gym.vector.VectorEnv]]:
        """`{"metaworld_state": {i: VectorEnv}}`, one vector env per task of `tasks` (i = its position; one task:
        `{0: ...}`), built directly (no gym registry, no package import). LeRobot's eval runs each and reports
        per-task success."""
        return {
            self.type: {
                i: make_vector_env(self, n_envs, use_async=use_async_envs, task=task)
                for i, task in enumerate(self.tasks)
            }
        }


# ----------------------------------------------------------------------------------------------------------
# Scripted expert
# ----------------------------------------------------------------------------------------------------------


def scripted_expert(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """MetaWorld's scripted policy for `task`: `obs (39,) -> action float32 (4,)` in [-1, 1], stateless."""
    _check_task(task)
    from metaworld.policies import ENV_POLICY_MAP

    policy = ENV_POLICY_MAP[task]()

    def act(obs: np.ndarray) -> np.ndarray:
        action = policy.get_action(np.asarray(obs, dtype=np.float64).reshape(-1))
        return np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)

    return act
