"""Success rate on held-out initial states: one vector env, batched chunk inference, success from the env."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from lerobot_ript.rollout.collector import ChunkPolicy


@dataclass
class EvalResult:
    successes: np.ndarray  # (n_episodes,) bool, in seed order
    env_steps: int

    @property
    def success_rate(self) -> float:
        return float(self.successes.mean()) if len(self.successes) else 0.0


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(
    make_env: Callable[[int], gym.vector.VectorEnv],
    policy: ChunkPolicy,
    seeds: list[int],
    *,
    num_envs: int,
    max_episode_steps: int,
) -> EvalResult:
    """Run one episode per seed, `num_envs` at a time; an episode succeeds if the env ever reports success.

    `policy` sees the env's observations as they are; the task's instruction travels in it (the training loop
    builds it with `make_chunk_policy(..., task=task_instruction(task))`, which adds the batch's `task`)."""
    successes, steps = [], 0
    env = make_env(num_envs)
    try:
        for i in range(0, len(seeds), num_envs):
            batch = seeds[i : i + num_envs]
            batch_seeds = batch + [batch[-1]] * (num_envs - len(batch))  # unused envs repeat a seed
            obs, _ = env.reset(seed=batch_seeds)
            done = np.zeros(num_envs, bool)
            done[len(batch) :] = True
            success = np.zeros(num_envs, bool)
            t = 0
            while not done.all() and t < max_episode_steps:
                chunk = policy(obs)  # (num_envs, n_steps, A)
                for j in range(chunk.shape[1]):
                    obs, _, terminated, truncated, info = env.step(chunk[:, j].astype(np.float32))
                    steps += int((~done).sum())
                    success |= np.asarray(info.get("is_success", info.get("success")), bool) & ~done
                    done |= np.asarray(terminated, bool) | np.asarray(truncated, bool)
                    t += 1
                    if done.all() or t >= max_episode_steps:
                        break
            successes.extend(success[: len(batch)].tolist())
    finally:
        env.close()
    return EvalResult(successes=np.asarray(successes, bool), env_steps=steps)
