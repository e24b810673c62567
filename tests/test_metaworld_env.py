"""MetaWorldStateEnv and its LeRobot env config, on the real simulator (push-v3)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("metaworld")

from lerobot_ript.envs.metaworld import (  # noqa: E402
    TASK_INSTRUCTIONS,
    MetaWorldStateEnv,
    MetaWorldStateEnvConfig,
    make_vector_env,
    scripted_expert,
    task_instruction,
    valid_tasks,
)

TASK = "push-v3"


@pytest.fixture(scope="module")
def env():
    env = MetaWorldStateEnv(TASK, episode_length=100)
    yield env
    env.close()


def _run(env: MetaWorldStateEnv, seed: int, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    states, rewards = [obs["agent_pos"]], []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        states.append(obs["agent_pos"])
        rewards.append(reward)
        if terminated or truncated:
            break
    return np.stack(states), np.asarray(rewards)


def test_equal_seeds_give_bit_identical_states_and_trajectories(env):
    actions = np.random.default_rng(0).uniform(-1, 1, (40, 4)).astype(np.float32)
    other = MetaWorldStateEnv(TASK, episode_length=100)
    try:
        _run(other, 11, actions)  # a different episode first: nothing may carry over
        states_a, rewards_a = _run(env, 3, actions)
        states_b, rewards_b = _run(other, 3, actions)
    finally:
        other.close()
    assert states_a.dtype == np.float32 and states_a.shape == (41, 39)
    np.testing.assert_array_equal(states_a, states_b)
    np.testing.assert_array_equal(rewards_a, rewards_b)


def test_different_seeds_give_different_object_and_goal_positions(env):
    obs = {s: env.reset(seed=s)[0]["agent_pos"] for s in (0, 1, 2)}
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not np.allclose(obs[a][4:7], obs[b][4:7])  # puck position
        assert not np.allclose(obs[a][36:39], obs[b][36:39])  # goal position
    first = env.reset()[0]["agent_pos"]  # seed=None: the next state of the env's RNG
    second = env.reset()[0]["agent_pos"]
    assert not np.array_equal(first, second)


def test_initial_states_match_lerobot_route():
    """Same states as MT1 + `_freeze_rand_vec=False; seeded_rand_vec=True; seed(s)` (LeRobot's metaworld)."""
    import metaworld

    mt1 = metaworld.MT1(TASK, seed=42)
    raw = mt1.train_classes[TASK]()
    raw.set_task(mt1.train_tasks[0])
    raw._freeze_rand_vec, raw.seeded_rand_vec = False, True
    ours = MetaWorldStateEnv(TASK)
    try:
        for seed in (0, 7):
            raw.seed(seed)
            expected = raw.reset()[0].astype(np.float32)
            np.testing.assert_array_equal(ours.reset(seed=seed)[0]["agent_pos"], expected)
    finally:
        ours.close()
        raw.close()


def test_init_state_key_is_the_rounded_reset_state(env):
    obs, _ = env.reset(seed=5)
    key = env.init_state_key()
    assert key.dtype == np.float64 and key.shape == (39,)
    np.testing.assert_array_equal(key, np.round(obs["agent_pos"].astype(np.float64), 6))
    env.reset(seed=5)
    np.testing.assert_array_equal(env.init_state_key(), key)


def test_unknown_task_lists_valid_tasks_and_suggests():
    with pytest.raises(ValueError, match="Did you mean 'push-v3'") as err:
        MetaWorldStateEnv("psh-v3")
    assert "reach-v3" in str(err.value) and "window-open-v3" in str(err.value)
    assert TASK in valid_tasks() and len(valid_tasks()) == 50
    with pytest.raises(ValueError, match="Did you mean"):
        scripted_expert("push-v2")


def test_every_task_has_lerobots_instruction_and_the_env_describes_itself_with_it(env):
    """One instruction per MetaWorld v3 task, the same strings as LeRobot's own metaworld env and datasets; the
    env's task_description is the instruction while its task (the key of init_hash) stays the name."""
    import json
    from pathlib import Path

    import lerobot.envs

    assert sorted(TASK_INSTRUCTIONS) == valid_tasks()
    assert all(isinstance(v, str) and v.strip() == v and len(v) > 5 for v in TASK_INSTRUCTIONS.values())
    lerobot_table = json.loads((Path(lerobot.envs.__file__).parent / "metaworld_config.json").read_text())
    assert TASK_INSTRUCTIONS == lerobot_table["TASK_DESCRIPTIONS"]
    assert task_instruction("push-v3") == "Push the puck to a goal"
    assert task_instruction("door-open-v3") == "Open a door with a revolving joint"
    with pytest.raises(ValueError, match="Did you mean 'push-v3'"):
        task_instruction("psh-v3")
    assert env.task == TASK and env.task_description == "Push the puck to a goal"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "pushh-v3"}, "Did you mean 'push-v3'"),
        ({"episode_length": 0}, "1..500"),
        ({"episode_length": 501}, "1..500"),
        ({"obs_type": "pixels"}, "state_pixels"),
        ({"image_size": 4}, "image_size"),
    ],
)
def test_config_validates_before_building(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaWorldStateEnvConfig(**kwargs)


def test_env_task_takes_one_task_a_list_or_a_named_set():
    """`--env.task`: a name, a comma-separated list (spaces ignored) or a named set; unknown names get a "did you
    mean" over tasks and sets; a task named twice or two tasks sharing an instruction are refused."""
    from lerobot_ript.envs.metaworld import TASK_SETS, parse_tasks

    assert parse_tasks("push-v3") == ["push-v3"]
    assert parse_tasks(" push-v3, reach-v3 ,drawer-open-v3") == ["push-v3", "reach-v3", "drawer-open-v3"]
    assert parse_tasks("mt3") == list(TASK_SETS["mt3"]) and len(TASK_SETS["mt5"]) == 5
    for tasks in TASK_SETS.values():  # every set is valid: known names, distinct instructions
        assert parse_tasks(",".join(tasks)) == list(tasks)
    single = MetaWorldStateEnvConfig(task="push-v3")
    assert single.tasks == ["push-v3"] and not single.is_multi_task
    assert single.gym_kwargs == single.task_kwargs("push-v3") and single.gym_kwargs["task"] == "push-v3"
    multi = MetaWorldStateEnvConfig(task="mt3")
    assert multi.tasks == ["push-v3", "reach-v3", "drawer-open-v3"] and multi.is_multi_task
    with pytest.raises(ValueError, match=r"names 3 tasks.*task_kwargs"):
        multi.gym_kwargs  # noqa: B018 - the property raises
    for spec, message in [
        ("mt4", "task='mt4' is not a MetaWorld v3 task or task set. Did you mean 'mt5' or 'mt3'"),
        ("push-v3,rech-v3", r"task='rech-v3' \(in 'push-v3,rech-v3'\) is not .* Did you mean 'reach-v3'"),
        ("push-v3,push-v3", r"\['push-v3'\] more than once"),
        ("push-v3,push-back-v3", "push-v3 and push-back-v3 share the instruction 'Push the puck to a goal'"),
        (" , ", "names no task"),
    ]:
        with pytest.raises(ValueError, match=message):
            MetaWorldStateEnvConfig(task=spec)


def test_a_multi_task_config_builds_one_vector_env_per_task_for_lerobot():
    """create_envs (what LeRobot's make_env and lerobot-eval call) gives one vector env per task, each
    describing itself with its instruction; make_vector_env(task=...) builds any one of them."""
    from lerobot.envs.factory import make_env

    cfg = MetaWorldStateEnvConfig(task="push-v3,reach-v3", episode_length=10)
    envs = make_env(cfg, n_envs=1)
    try:
        assert list(envs) == ["metaworld_state"] and sorted(envs["metaworld_state"]) == [0, 1]
        descriptions = [envs["metaworld_state"][i].call("task_description") for i in (0, 1)]
        assert descriptions == [("Push the puck to a goal",), ("Reach a goal position",)]
    finally:
        for env in envs["metaworld_state"].values():
            env.close()
    single = make_env(MetaWorldStateEnvConfig(task="push-v3", episode_length=10), n_envs=1)
    try:
        assert sorted(single["metaworld_state"]) == [0]  # one task: LeRobot's single-task layout
    finally:
        single["metaworld_state"][0].close()


def test_success_flag_comes_from_metaworld_info():
    expert = scripted_expert(TASK)
    for terminate in (True, False):
        env = MetaWorldStateEnv(TASK, episode_length=150, terminate_on_success=terminate)
        obs, info = env.reset(seed=0)
        assert info["is_success"] is False
        flags, ended = [], False
        while not ended:
            obs, _, terminated, truncated, info = env.step(expert(obs["agent_pos"]))
            assert isinstance(info["success"], bool) and info["is_success"] == info["success"]
            assert terminated == (terminate and info["success"])
            flags.append(info["success"])
            ended = terminated or truncated
        env.close()
        assert any(flags), "the scripted expert solves push-v3 from seed 0"
        first = flags.index(True)
        assert not any(flags[:first])
        assert len(flags) == (first + 1 if terminate else 150)


def test_episode_truncates_at_episode_length_and_clips_actions():
    env = MetaWorldStateEnv(TASK, episode_length=5)
    try:
        env.reset(seed=1)
        for t in range(5):
            obs_big, _, terminated, truncated, _ = env.step(np.full(4, 7.0))
            assert not terminated and truncated == (t == 4)
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4))
        env.reset(seed=1)
        for _ in range(5):
            obs_one, *_ = env.step(np.ones(4))
        np.testing.assert_array_equal(obs_big["agent_pos"], obs_one["agent_pos"])  # clipped to [-1, 1]
    finally:
        env.close()


def test_make_env_through_lerobot_factory_with_per_env_seeds(env):
    from lerobot.envs.factory import make_env
    from lerobot.envs.utils import env_to_policy_features, preprocess_observation

    cfg = MetaWorldStateEnvConfig(task=TASK, episode_length=3)
    envs = make_env(cfg, n_envs=3)
    assert list(envs) == ["metaworld_state"] and list(envs["metaworld_state"]) == [0]
    vec = envs["metaworld_state"][0]
    try:
        obs, _ = vec.reset(seed=[5, 5, 6])
        assert obs["agent_pos"].shape == (3, 39)
        np.testing.assert_array_equal(obs["agent_pos"][0], obs["agent_pos"][1])
        assert not np.array_equal(obs["agent_pos"][0], obs["agent_pos"][2])
        np.testing.assert_array_equal(obs["agent_pos"][0], env.reset(seed=5)[0]["agent_pos"])
        batch = preprocess_observation(obs)
        assert batch["observation.state"].shape == (3, 39)
        for _ in range(3):
            obs, _, terminated, truncated, _ = vec.step(np.zeros((3, 4), np.float32))
        assert truncated.all() and not terminated.any()
        # A seeded reset after the episode ended starts a genuine new episode in every sub-env.
        obs_again, _ = vec.reset(seed=[6, 5, 5])
        np.testing.assert_array_equal(obs_again["agent_pos"][0], env.reset(seed=6)[0]["agent_pos"])
        np.testing.assert_array_equal(obs_again["agent_pos"][1], env.reset(seed=5)[0]["agent_pos"])
        assert vec.call("_max_episode_steps") == (3, 3, 3)
        assert vec.call("task") == (TASK,) * 3
        assert vec.call("task_description") == (task_instruction(TASK),) * 3  # what lerobot-eval sends
    finally:
        vec.close()
    features = env_to_policy_features(cfg)
    assert features["observation.state"].shape == (39,) and features["action"].shape == (4,)
    pixel_features = env_to_policy_features(
        MetaWorldStateEnvConfig(obs_type="state_pixels", cameras="corner2")
    )
    assert pixel_features["observation.images.corner2"].shape == (3, 64, 64)


def test_lerobot_rollout_runs_the_vector_env():
    """LeRobot's own `rollout` drives the env: success is reported, finished sub-envs stay done, and every
    policy call gets the env's instruction as the batch's `task` (what a VLA's tokenizer reads)."""
    import torch
    from lerobot.processor import (
        PolicyProcessorPipeline,
        policy_action_to_transition,
        transition_to_policy_action,
    )
    from lerobot.scripts.lerobot_eval import rollout

    expert = scripted_expert(TASK)
    tasks = []

    class ExpertPolicy(torch.nn.Module):
        def reset(self):
            pass

        def select_action(self, batch):
            tasks.append(batch["task"])
            states = batch["observation.state"].numpy()
            return torch.from_numpy(np.stack([expert(s) for s in states]))

    vec = make_vector_env(MetaWorldStateEnvConfig(task=TASK, episode_length=120), n_envs=2)
    identity = PolicyProcessorPipeline(steps=[])
    action_identity = PolicyProcessorPipeline(
        steps=[], to_transition=policy_action_to_transition, to_output=transition_to_policy_action
    )
    try:
        out = rollout(vec, ExpertPolicy(), identity, identity, identity, action_identity, seeds=[0, 1])
    finally:
        vec.close()
    assert out["success"].any(dim=1).all()
    done = out["done"]
    assert done[:, -1].all() and done.shape[1] < 120  # all ended on success before the horizon
    assert (done.int().diff(dim=1) >= 0).all()
    assert len(tasks) == done.shape[1] and all(t == ["Push the puck to a goal"] * 2 for t in tasks)


def test_importing_the_package_does_not_import_the_simulator():
    code = (
        "import sys, lerobot_ript.envs as e; "
        "from lerobot.envs.configs import EnvConfig; "
        "assert 'metaworld_state' in EnvConfig.get_known_choices(); "
        "bad = [m for m in ('metaworld', 'mujoco') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_state_pixels_env_renders_uint8_images():
    env = MetaWorldStateEnv(TASK, obs_type="state_pixels", image_size=32, cameras=("corner2", "topview"))
    try:
        assert env.observation_space["pixels"]["corner2"].shape == (32, 32, 3)
        obs, _ = env.reset(seed=0)
        again, _ = env.reset(seed=0)
        obs_next, *_ = env.step(np.ones(4))
    finally:
        env.close()
    for cam in ("corner2", "topview"):
        image = obs["pixels"][cam]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert image.std() > 5  # a scene, not a blank frame
        np.testing.assert_array_equal(image, again["pixels"][cam])
    assert not np.array_equal(obs["pixels"]["corner2"], obs_next["pixels"]["corner2"])  # the arm moved


@pytest.mark.slow
def test_async_vector_env_workers_build_the_env_without_a_registry(env):
    """Forkserver workers unpickle the top-level factory (about 10-40 s here: each imports LeRobot)."""
    vec = make_vector_env(MetaWorldStateEnvConfig(task=TASK, episode_length=10), n_envs=2, use_async=True)
    try:
        obs, _ = vec.reset(seed=[4, 9])
        expected = [env.reset(seed=s)[0]["agent_pos"] for s in (4, 9)]
        np.testing.assert_array_equal(obs["agent_pos"], np.stack(expected))
    finally:
        vec.close()


# ----------------------------------------------------------------------------------------------------------
# Fast object quaternions: the same bits as MetaWorld's scipy conversion
# ----------------------------------------------------------------------------------------------------------


def test_fast_quaternion_table_lists_exactly_the_tasks_that_call_scipy():
    import metaworld.env_dict

    from lerobot_ript.envs.metaworld import _XMAT_QUATERNION_TASKS, _reads_xmat_quaternion

    uses_scipy = {
        task
        for task, cls in metaworld.env_dict.ALL_V3_ENVIRONMENTS.items()
        if "Rotation" in cls._get_quat_objects.__code__.co_names
    }
    assert set(_XMAT_QUATERNION_TASKS) == uses_scipy
    for task, (kind, name, _) in _XMAT_QUATERNION_TASKS.items():
        method = metaworld.env_dict.ALL_V3_ENVIRONMENTS[task]._get_quat_objects
        assert _reads_xmat_quaternion(method, kind, name), task
    push = metaworld.env_dict.ALL_V3_ENVIRONMENTS["push-v3"]._get_quat_objects
    assert not _reads_xmat_quaternion(push, "geom", "puck")  # a stale entry keeps MetaWorld's method


def _same_bits(a, b) -> bool:
    return (
        type(a) is type(b)
        and np.asarray(a).dtype == np.asarray(b).dtype
        and (np.asarray(a).tobytes() == np.asarray(b).tobytes())
    )


@pytest.mark.parametrize(
    "task",
    ["push-v3", "pick-place-v3", "door-open-v3", "stick-pull-v3", "peg-insert-side-v3", "drawer-open-v3"],
)
def test_fast_quaternions_give_bit_identical_rollouts(task):
    """50 random actions from the same seed: equal bytes in observations, rewards and every info value."""
    from lerobot_ript.envs.metaworld import _XMAT_QUATERNION_TASKS, _build_metaworld_env

    fast, reference = _build_metaworld_env(task), _build_metaworld_env(task, fast_quaternions=False)
    patched = "_get_quat_objects" in vars(fast)
    assert patched == (task in _XMAT_QUATERNION_TASKS)  # drawer-open reads xquat: left as MetaWorld's
    assert "_get_quat_objects" not in vars(reference)
    actions = np.random.default_rng(0).uniform(-1, 1, (50, 4)).astype(np.float32)
    try:
        for env in (fast, reference):
            env.seed(7)
        obs_fast, _ = fast.reset()
        obs_ref, _ = reference.reset()
        assert _same_bits(obs_fast, obs_ref)
        for action in actions:
            step_fast, step_ref = fast.step(action), reference.step(action)
            for value_fast, value_ref in zip(step_fast[:4], step_ref[:4], strict=True):
                assert _same_bits(value_fast, value_ref)
            info_fast, info_ref = step_fast[4], step_ref[4]
            assert info_fast.keys() == info_ref.keys()
            assert all(_same_bits(info_fast[k], info_ref[k]) for k in info_ref)
    finally:
        fast.close()
        reference.close()


def test_fast_quaternion_env_pickles_and_frees_without_garbage_collection():
    """A pickled copy steps like a pickled copy of MetaWorld's env (its pickling restores qpos / qvel only)."""
    import gc
    import pickle
    import weakref

    from lerobot_ript.envs.metaworld import _build_metaworld_env

    copies = []
    for fast_quaternions in (True, False):
        env = _build_metaworld_env("push-v3", fast_quaternions=fast_quaternions)
        env.seed(1)
        env.reset()
        copies.append(pickle.loads(pickle.dumps(env)))
        env.close()
    fast_copy, reference_copy = copies
    assert fast_copy._get_quat_objects._env_ref() is fast_copy  # the copy reads its own simulator state
    action = np.array([0.3, 1.0, -0.5, 0.0], dtype=np.float32)
    for _ in range(5):
        assert fast_copy.step(action)[0].tobytes() == reference_copy.step(action)[0].tobytes()
    reference_copy.close()
    gc.disable()
    try:
        ref = weakref.ref(fast_copy)
        fast_copy.close()
        del fast_copy, copies
        assert ref() is None  # no reference cycle through the instance's `_get_quat_objects`
    finally:
        gc.enable()
