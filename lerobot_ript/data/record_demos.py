"""Record MetaWorld scripted-expert demonstrations (with Gaussian action noise) as a LeRobotDataset.

Episode k starts from the initial state of seed `seed + k`. Training demos use seeds from 0; held-out
evaluation should use seeds from `HELD_OUT_SEED_START` (1_000_000) on, so that no evaluation state was
demonstrated. Every episode is kept, successful or not, with its outcome in the `success` column. Several tasks
(a list, or `--task` with a comma-separated list or a named set such as mt3) give one dataset holding `episodes`
episodes of each task, task after task, each episode with its task's instruction in the `task` column.

CLI: `python -m lerobot_ript.data.record_demos --task push-v3 --episodes 20 --noise 0.3 --output DIR`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lerobot_ript.data.writer import EpisodeRecord, init_hash_of, write_episodes
from lerobot_ript.envs.metaworld import (
    HELD_OUT_SEED_START,
    METAWORLD_FPS,
    OBS_TYPES,
    MetaWorldStateEnv,
    parse_tasks,
    scripted_expert,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordResult:
    """Where the demos went and how well the noisy expert did (success_rate in [0, 1])."""

    dataset_root: Path
    num_episodes: int
    success_rate: float
    # task name -> success rate of its demos (every task recorded)
    task_success_rate: dict[str, float] = field(default_factory=dict)


def demos_repo_id(tasks: str | Sequence[str]) -> str:
    """The default repo id of recorded demos: `local/<task>-demos`, with the task names joined by '_' for
    several tasks (a valid Hub repo id either way)."""
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    return f"local/{'_'.join(names)}-demos"


def _record_episode(
    env: MetaWorldStateEnv, expert, noise: float, seed: int, episode_length: int
) -> EpisodeRecord:
    """One expert episode from the initial state of `seed`; the action noise is drawn from an RNG of `seed`."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    states, actions, rewards = [], [], []
    images: dict[str, list[np.ndarray]] = {cam: [] for cam in obs.get("pixels", {})}
    success_step = None
    for t in range(episode_length):
        action = expert(obs["agent_pos"])
        if noise > 0:
            action = action + rng.normal(0.0, noise, size=action.shape)
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        states.append(obs["agent_pos"])
        actions.append(action)
        for cam, frames in images.items():
            frames.append(obs["pixels"][cam])
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(reward)
        if info["success"] and success_step is None:
            success_step = t
        if terminated or truncated:
            break
    return EpisodeRecord(
        task=env.task_description,  # the instruction, as at rollout time; init_hash keys on the name
        states=np.stack(states).astype(np.float32),  # (T, 39)
        actions=np.stack(actions),  # (T, 4)
        rewards=np.asarray(rewards, dtype=np.float32),  # (T,)
        success=success_step is not None,
        init_hash=init_hash_of(env.task, env.init_state_key()),
        images={cam: np.stack(frames) for cam, frames in images.items()} or None,
        success_step=success_step,
    )


def record_demos(
    task: str | Sequence[str],
    episodes: int,
    noise: float,
    output: str | Path,
    *,
    seed: int = 0,
    episode_length: int = 200,
    repo_id: str | None = None,
    obs_type: str = "state",
    image_size: int = 64,
    cameras: Sequence[str] = ("corner2",),
) -> RecordResult:
    """Run the scripted expert of `task` for `episodes` episodes (seeds seed..seed+episodes-1) and write them.

    `task`: one MetaWorld task, or several (a sequence of names): `episodes` episodes of each, in one dataset
    (repo id `demos_repo_id(tasks)` by default).

    noise: standard deviation of the Gaussian noise added to every action component (actions in [-1, 1]),
    then clipped to [-1, 1]. The dataset has no `advantages` column (demos are written as-is). Its `task`
    column holds the task's instruction (`task_instruction(task)`). obs_type="state_pixels" also records
    `observation.images.<camera>` for each of `cameras`, `image_size` pixels square (the env's settings).
    """
    if episodes < 1:
        raise ValueError(f"episodes={episodes} must be >= 1.")
    if not noise >= 0:
        raise ValueError(
            f"noise={noise} must be a standard deviation >= 0 (in action units, actions in [-1, 1])."
        )
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0.")
    if seed + episodes > HELD_OUT_SEED_START:
        logger.warning(
            "Demo seeds %d..%d reach the held-out evaluation seeds (>= %d).",
            seed,
            seed + episodes - 1,
            HELD_OUT_SEED_START,
        )
    tasks = [task] if isinstance(task, str) else list(task)
    if len(tasks) != 1:  # every name checked (a "did you mean"), each once, before anything is recorded
        parse_tasks(",".join(tasks))
    records, task_success = [], {}
    for name in tasks:
        env = MetaWorldStateEnv(
            task=name,
            episode_length=episode_length,
            obs_type=obs_type,
            image_size=image_size,
            cameras=cameras,
        )
        expert = scripted_expert(name)
        try:
            ours = [_record_episode(env, expert, noise, seed + k, episode_length) for k in range(episodes)]
        finally:
            env.close()
        records += ours
        task_success[name] = float(np.mean([ep.success for ep in ours]))
        logger.info(
            "Recorded %d %s demos (noise %.3g, seeds %d..%d): success rate %.1f%%",
            episodes,
            name,
            noise,
            seed,
            seed + episodes - 1,
            100 * task_success[name],
        )
    success_rate = float(np.mean([ep.success for ep in records]))
    root = Path(output)
    write_episodes(records, root, repo_id or demos_repo_id(tasks), METAWORLD_FPS, with_advantages=False)
    logger.info("%d demos at %s", len(records), root)
    return RecordResult(
        dataset_root=root,
        num_episodes=len(records),
        success_rate=success_rate,
        task_success_rate=task_success,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="record-demos", description="Record noisy MetaWorld scripted-expert demos as a LeRobotDataset."
    )
    parser.add_argument(
        "--task",
        default="push-v3",
        help="MetaWorld v3 task name, a comma-separated list of them, or a named set (mt3, mt5) (default: push-v3).",
    )
    parser.add_argument(
        "--episodes", type=int, default=20, help="Number of episodes per task, >= 1 (default: 20)."
    )
    parser.add_argument(
        "--noise", type=float, default=0.3, help="Std of the Gaussian action noise, >= 0 (default: 0.3)."
    )
    parser.add_argument("--output", required=True, help="New dataset folder (must not exist or be empty).")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the first episode; held-out eval uses >= 1000000 (default: 0).",
    )
    parser.add_argument(
        "--episode-length", type=int, default=200, help="Episode horizon in steps, 1..500 (default: 200)."
    )
    parser.add_argument("--repo-id", default=None, help="Dataset repo id (default: local/<task>-demos).")
    parser.add_argument(
        "--obs-type", default="state", choices=list(OBS_TYPES), help="Observations to record."
    )
    parser.add_argument(
        "--image-size", type=int, default=64, help="Camera image side in pixels (state_pixels; default: 64)."
    )
    parser.add_argument(
        "--cameras",
        default="corner2",
        help="Comma-separated MetaWorld cameras (state_pixels; default: corner2).",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tasks = parse_tasks(args.task)
    result = record_demos(
        tasks[0] if len(tasks) == 1 else tasks,
        args.episodes,
        args.noise,
        args.output,
        seed=args.seed,
        episode_length=args.episode_length,
        repo_id=args.repo_id,
        obs_type=args.obs_type,
        image_size=args.image_size,
        cameras=tuple(c.strip() for c in args.cameras.split(",") if c.strip()),
    )
    logger.info("success rate %.3f over %d episodes", result.success_rate, result.num_episodes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
