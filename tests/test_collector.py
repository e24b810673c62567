"""GroupedCollector, make_chunk_policy, SeedSampler and evaluate on the real MetaWorld push-v3 env.

Policies here are real `ChunkPolicy` callables (obs dict -> (N, n_steps, 4) numpy): MetaWorld's scripted
expert (solves push-v3 in 50-71 steps from seeds 0..11, never within 75 steps with random actions), uniform
random actions, or a mix chosen per sub-env and per initial state, which makes a group's K rewards whatever a
test needs ([1, 0], [1, 1], [0, 0], ...). Everything is seeded, so every outcome below is deterministic.

Building a MetaWorld env costs about 0.5 s on a loaded 2-core machine, so the collectors of this module draw
their vector envs from one pool (`EnvPool`) and give them back afterwards; a seeded reset starts a genuinely
new episode, so a reused env behaves exactly like a fresh one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from lerobot_ript.advantages import rloo_advantages
from lerobot_ript.data.writer import init_hash_of
from lerobot_ript.envs.metaworld import (
    MetaWorldStateEnv,
    MetaWorldStateEnvConfig,
    _make_frozen_env,
    make_vector_env,
    scripted_expert,
    task_instruction,
)
from lerobot_ript.rollout.collector import GroupedCollector, SeedSampler, make_chunk_policy
from lerobot_ript.rollout.evaluate import evaluate, wilson_interval
from lerobot_ript.rollout.sampling import SkipTracker, StateCurriculum

pytestmark = pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")

TASK = "push-v3"
ENV_HORIZON = 100  # the env's own truncation; collectors below stop earlier (max_episode_steps)
EXPERT_HORIZON = 75  # > the 71 steps the expert needs from seeds 0..11
ACTION_DIM = 4


# --------------------------------------------------------------------------------------------- helpers
def goal_key(state: np.ndarray) -> tuple[float, ...]:
    """The goal position (dims 36:39), constant within an episode and different between initial states."""
    return tuple(np.round(np.asarray(state, np.float64)[36:39], 4).tolist())


class GroupPolicy:
    """ChunkPolicy: row r is sub-env r % k of its group (each slot contributes K consecutive rows). It acts as
    the scripted expert when r % k is in `plan[goal]` (`default` for goals not in the plan), else uniformly at
    random. Records the batch size of every call and every chunk it returned."""

    def __init__(self, k: int, plan: dict | None = None, default=(), n_steps: int = 1, seed: int = 0):
        self.k, self.plan, self.default, self.n_steps = k, plan or {}, set(default), n_steps
        self.rng = np.random.default_rng(seed)
        self.expert = scripted_expert(TASK)
        self.calls: list[int] = []
        self.chunks: list[np.ndarray] = []

    def __call__(self, obs: dict) -> np.ndarray:
        states = obs["agent_pos"]  # (N, 39)
        chunk = self.rng.uniform(-1, 1, (len(states), self.n_steps, ACTION_DIM)).astype(np.float32)
        for r, state in enumerate(states):
            if r % self.k in self.plan.get(goal_key(state), self.default):
                chunk[r, :] = self.expert(state)
        self.calls.append(len(states))
        self.chunks.append(chunk.copy())
        return chunk


class SeedList:
    """A seed sampler that returns the given seeds in order (IndexError once they run out)."""

    def __init__(self, seeds: list[int]) -> None:
        self.seeds, self.drawn, self.recorded = list(seeds), [], []

    def __call__(self) -> int:
        seed = self.seeds[len(self.drawn)]
        self.drawn.append(seed)
        return seed

    def record(self, seed: int, successes: int, trials: int) -> None:
        self.recorded.append((seed, successes, trials))


class EnvPool:
    """Vector envs of K sub-envs built once per module and lent to collectors."""

    def __init__(self, cfg: MetaWorldStateEnvConfig) -> None:
        self.cfg, self.free, self.built = cfg, {}, 0

    def factory(self, k: int):
        def make() -> gym.vector.VectorEnv:
            if self.free.get(k):
                return self.free[k].pop()
            self.built += 1
            return make_vector_env(self.cfg, k)

        return make

    def give_back(self, env: gym.vector.VectorEnv) -> None:
        self.free.setdefault(env.num_envs, []).append(env)

    def close(self) -> None:
        for envs in self.free.values():
            for env in envs:
                env.close()


@pytest.fixture(scope="module")
def env_cfg() -> MetaWorldStateEnvConfig:
    return MetaWorldStateEnvConfig(task=TASK, episode_length=ENV_HORIZON)


@pytest.fixture(scope="module")
def pool(env_cfg):
    pool = EnvPool(env_cfg)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def initial_state():
    """seed -> the initial 39-dim state of that seed, from a separate single env."""
    env = MetaWorldStateEnv(task=TASK, episode_length=ENV_HORIZON)

    @functools.cache
    def state(seed: int) -> np.ndarray:
        return env.reset(seed=seed)[0]["agent_pos"]

    yield state
    env.close()


@contextlib.contextmanager
def grouped_collector(pool: EnvPool, policy, *, group_size: int, make_env=None, **kwargs):
    collector = GroupedCollector(
        make_env or pool.factory(group_size), policy, task=TASK, group_size=group_size, **kwargs
    )
    try:
        yield collector
    finally:
        for env in [s.env for s in collector.slots] + [
            e for envs in collector._spare_envs.values() for e in envs
        ]:
            pool.give_back(env)


def groups_of(episodes: list, k: int) -> list[list]:
    assert len(episodes) % k == 0
    return [episodes[i : i + k] for i in range(0, len(episodes), k)]


def assert_consistent(result, k: int) -> None:
    """Invariants of CollectionStats that hold for every collect() call."""
    s, episodes = result.stats, result.episodes
    assert s.groups_sampled == s.groups_kept + s.groups_dropped + s.groups_faulted
    assert s.rollouts_kept == len(episodes) == k * s.groups_kept == result.group_rewards.size
    assert result.group_rewards.shape == (s.groups_kept, k)
    done = s.groups_kept + s.groups_dropped
    assert s.share_dropped == pytest.approx(s.groups_dropped / done if done else 0.0)
    assert s.wall_time_s > 0 and s.steps_per_second == pytest.approx(s.env_steps / s.wall_time_s)
    assert 0.0 <= s.success_rate <= 1.0
    assert s.env_steps >= sum(ep.num_frames for ep in episodes)
    logged = s.as_dict()
    assert logged["rollout/share_dropped"] == pytest.approx(s.share_dropped)
    assert logged["rollout/env_steps"] == s.env_steps
    assert logged["rollout/goal_reached"] == float(s.goal_reached)
    assert len({id(ep) for ep in episodes}) == len(episodes)  # never the same record twice
    for group, rewards in zip(groups_of(episodes, k), result.group_rewards, strict=True):
        np.testing.assert_array_equal(rewards, [float(ep.success) for ep in group])


# ---------------------------------------------------------------------------- groups and initial states
def test_groups_share_initial_state_and_rows_of_one_batched_chunk(pool, initial_state):
    """2 slots x K=2, 12 steps, random chunks of 4: each group's rollouts start from one state (the state of
    its seed), slots get their own rows of ONE policy call per chunk, and the next call draws new states."""
    k, steps = 2, 12
    policy = GroupPolicy(k, n_steps=4, seed=1)
    sampler = SeedList([11, 5, 2, 9])
    with grouped_collector(
        pool,
        policy,
        group_size=k,
        num_slots=2,
        goal_rollouts=4,
        max_groups=2,
        seed_sampler=sampler,
        dynamic_sampling=False,
        max_episode_steps=steps,
    ) as collector:
        first = collector.collect()
        second = collector.collect()
    assert sampler.drawn == [11, 5, 2, 9]
    assert policy.calls == [4, 4, 4] * 2  # ceil(12 / 4) calls per round, each batching both slots
    hashes = []
    for result, seeds, chunks in ((first, [11, 5], policy.chunks[:3]), (second, [2, 9], policy.chunks[3:])):
        assert_consistent(result, k)
        assert result.stats.env_steps == 4 * steps and result.stats.success_rate == 0.0
        for i, (group, seed) in enumerate(zip(groups_of(result.episodes, k), seeds, strict=True)):
            start = initial_state(seed)
            expected_hash = init_hash_of(TASK, start)
            for j, ep in enumerate(group):
                assert ep.num_frames == steps and not ep.success and ep.task == TASK
                np.testing.assert_array_equal(ep.states[0], start)  # equal states, exactly
                assert ep.init_hash == expected_hash
                # row i*K + j of every chunk drove sub-env j of slot i
                np.testing.assert_array_equal(ep.actions, np.concatenate([c[i * k + j] for c in chunks]))
            assert not np.array_equal(group[0].states[-1], group[1].states[-1])  # two real rollouts
            hashes.append(expected_hash)
    assert len(set(hashes)) == 4  # different seeds, different initial states


def test_same_seed_in_two_slots_gives_equal_hashes_but_distinct_rollouts(pool):
    k = 2
    policy = GroupPolicy(k, n_steps=4, seed=2)
    with grouped_collector(
        pool,
        policy,
        group_size=k,
        num_slots=2,
        goal_rollouts=4,
        max_groups=2,
        seed_sampler=SeedSampler(pool_size=1, start=7),
        dynamic_sampling=False,
        max_episode_steps=8,
    ) as collector:
        result = collector.collect()
    assert_consistent(result, k)
    assert len({ep.init_hash for ep in result.episodes}) == 1
    actions = [ep.actions for ep in result.episodes]
    assert all(not np.array_equal(a, b) for i, a in enumerate(actions) for b in actions[i + 1 :])


def test_without_dynamic_sampling_every_group_is_kept_until_the_goal(pool):
    """All-equal groups are kept (with zero advantage), over as many rounds as the goal needs."""
    k = 2
    policy = GroupPolicy(k, n_steps=4, seed=3)
    with grouped_collector(
        pool,
        policy,
        group_size=k,
        num_slots=2,
        goal_rollouts=6,
        max_groups=10,
        seed_sampler=SeedSampler(pool_size=100, seed=3),
        dynamic_sampling=False,
        max_episode_steps=6,
    ) as collector:
        result = collector.collect()
    assert_consistent(result, k)
    s = result.stats
    assert (s.groups_sampled, s.groups_kept, s.groups_dropped) == (3, 3, 0)  # rounds of 2 + 1 groups
    assert s.goal_reached and s.rollouts_kept == 6
    assert policy.calls == [4, 4, 2, 2]  # the second round starts only the one group still needed
    assert [ep.advantage for ep in result.episodes] == [0.0] * 6
    assert s.env_steps == sum(ep.num_frames for ep in result.episodes) == 6 * 6


class StatePolicy:
    """Deterministic ChunkPolicy: each row's chunk depends on its own state only (the scripted expert plus a
    state-dependent wobble that makes some rollouts fail), so a row's actions do not depend on which other rows
    share its batch. Records the thread and batch size of every call."""

    def __init__(self, n_steps: int) -> None:
        self.n_steps, self.expert = n_steps, scripted_expert(TASK)
        self.calls: list[tuple[str, int]] = []

    def __call__(self, obs: dict) -> np.ndarray:
        import threading

        states = obs["agent_pos"]
        self.calls.append((threading.current_thread().name, len(states)))
        rows = [
            np.clip(self.expert(s) + 0.2 * np.sin(1e3 * s[:ACTION_DIM] + s[36] * 1e2), -1, 1) for s in states
        ]
        return np.repeat(np.stack(rows)[:, None].astype(np.float32), self.n_steps, axis=1)


def test_overlapped_inference_gives_the_same_rollouts_with_half_batches_on_a_worker_thread(pool):
    """overlap_inference=True: half of the slots step while the other half's chunk is inferred on the worker
    thread; with a policy whose rows depend on their own state only, every rollout equals the sequential one."""
    import sys

    k, seeds = 2, [3, 8, 1, 6, 4, 10]
    results, policies = {}, {}
    switch_interval = sys.getswitchinterval()
    for overlap in (False, True):
        policies[overlap] = StatePolicy(n_steps=4)
        with grouped_collector(
            pool,
            policies[overlap],
            group_size=k,
            num_slots=3,
            goal_rollouts=6,
            max_groups=3,
            seed_sampler=SeedList(seeds),
            dynamic_sampling=False,
            max_episode_steps=EXPERT_HORIZON,
            overlap_inference=overlap,
        ) as collector:
            results[overlap] = [collector.collect(), collector.collect()]
            assert sys.getswitchinterval() == switch_interval  # shortened during overlapped rounds only
            collector.close_executor()
            assert collector._executor is None
    for seq, ovl in zip(results[False], results[True], strict=True):
        assert_consistent(ovl, k)
        assert ovl.stats.env_steps == seq.stats.env_steps
        for a, b in zip(seq.episodes, ovl.episodes, strict=True):
            assert (a.init_hash, a.success, a.num_frames) == (b.init_hash, b.success, b.num_frames)
            np.testing.assert_array_equal(a.states, b.states)
            np.testing.assert_array_equal(a.actions, b.actions)
    successes = [ep.success for r in results[True] for ep in r.episodes]
    assert any(successes) and not all(successes)  # episodes of different lengths: the halves drift apart
    seq_calls, ovl_calls = policies[False].calls, policies[True].calls
    assert {name for name, _ in seq_calls} == {"MainThread"} and {n for _, n in seq_calls} <= {2, 4, 6}
    # slots 0 and 2 form one half (first chunk inferred in line), slot 1 the other (on the worker thread)
    workers = [n for name, n in ovl_calls if name.startswith("ript-inference")]
    assert workers and len(workers) >= len(ovl_calls) // 2 - 1
    assert max(n for _, n in ovl_calls) <= 4 and sum(n for _, n in ovl_calls) >= sum(n for _, n in seq_calls)


# ------------------------------------------------------------------------------------------ advantages
def test_rloo_advantages_of_episodes_match_their_group_rewards(pool, initial_state):
    """K=3, one slot, two rounds: rewards [1, 0, 0] and [1, 1, 0] from the real env; each episode carries
    A_i = R_i - mean(other rewards) of its own group."""
    k = 3
    plan = {goal_key(initial_state(3)): {0}, goal_key(initial_state(6)): {0, 1}}
    policy = GroupPolicy(k, plan, seed=4)
    with grouped_collector(
        pool,
        policy,
        group_size=k,
        num_slots=1,
        goal_rollouts=6,
        max_groups=4,
        seed_sampler=SeedList([3, 6]),
        max_episode_steps=EXPERT_HORIZON,
    ) as collector:
        result = collector.collect()
    assert_consistent(result, k)
    np.testing.assert_array_equal(result.group_rewards, [[1, 0, 0], [1, 1, 0]])
    expected = rloo_advantages(torch.from_numpy(result.group_rewards)).reshape(-1).tolist()
    assert [ep.advantage for ep in result.episodes] == pytest.approx(expected)
    assert [ep.advantage for ep in result.episodes] == pytest.approx([1, -0.5, -0.5, 0.5, 0.5, -1])
    for group, rewards in zip(groups_of(result.episodes, k), result.group_rewards, strict=True):
        for i, ep in enumerate(group):
            assert ep.advantage == pytest.approx(rewards[i] - np.delete(rewards, i).mean())
            # a success ends the episode at the success step; a failure runs to the horizon
            assert ep.num_frames < EXPERT_HORIZON if ep.success else ep.num_frames == EXPERT_HORIZON


# ------------------------------------------------------------------------------------ dynamic sampling
def test_dynamic_sampling_drops_all_equal_groups_and_samples_more(pool, initial_state):
    """Round 1: seed 3 fails in both rollouts, seed 6 succeeds in both: both dropped. Round 2: seeds 8 and 9
    give [1, 0]: kept, goal of 4 reached. Dropped groups still count for the success rate and the skip tracker."""
    k = 2
    plan = {
        goal_key(initial_state(6)): {0, 1},
        goal_key(initial_state(8)): {0},
        goal_key(initial_state(9)): {0},
    }
    policy = GroupPolicy(k, plan, seed=5)
    tracker = SkipTracker(1)
    with grouped_collector(
        pool,
        policy,
        group_size=k,
        num_slots=2,
        goal_rollouts=4,
        max_groups=10,
        seed_sampler=SeedList([3, 6, 8, 9]),
        skip_tracker=tracker,
        max_episode_steps=EXPERT_HORIZON,
    ) as collector:
        result = collector.collect()
    assert_consistent(result, k)
    s = result.stats
    assert (s.groups_sampled, s.groups_kept, s.groups_dropped, s.groups_faulted) == (4, 2, 2, 0)
    assert s.goal_reached and s.share_dropped == 0.5
    assert s.success_rate == pytest.approx(4 / 8)  # 0 + 2 + 1 + 1 successes over all 8 rollouts
    assert [ep.init_hash for ep in result.episodes] == [
        init_hash_of(TASK, initial_state(s)) for s in (8, 8, 9, 9)
    ]
    assert [ep.success for ep in result.episodes] == [True, False, True, False]
    assert [ep.advantage for ep in result.episodes] == [1.0, -1.0, 1.0, -1.0]
    # the dropped groups were simulated: 2 x 75 steps for seed 3, two expert runs for seed 6
    assert s.env_steps > sum(ep.num_frames for ep in result.episodes) + 2 * EXPERT_HORIZON
    assert tracker.num_skipping == 1  # seed 6's all-success group, although dropped, counts for skipping


@pytest.mark.parametrize("dynamic", [True, False])
def test_keep_solved_keeps_all_success_groups_as_good_data(pool, initial_state, dynamic):
    """keep_solved: seed 6's all-success group is kept with advantage 1/(K-1) (good). With dynamic sampling it
    is still dropped for the goal (only seed 8's mixed group counts) and comes back in `solved_episodes`;
    without, it is one of the kept groups and only its advantage changes (RLOO would give 0, neutral)."""
    k = 3
    plan = {goal_key(initial_state(6)): {0, 1, 2}, goal_key(initial_state(8)): {0}}
    with grouped_collector(
        pool,
        GroupPolicy(k, plan, seed=5),
        group_size=k,
        num_slots=2,
        goal_rollouts=3 if dynamic else 6,
        max_groups=2,
        seed_sampler=SeedList([6, 8]),
        dynamic_sampling=dynamic,
        keep_solved=True,
        max_episode_steps=EXPERT_HORIZON,
    ) as collector:
        result = collector.collect()
    assert_consistent(result, k)
    s, hash6 = result.stats, init_hash_of(TASK, initial_state(6))
    assert s.solved_rollouts == k and s.goal_reached
    solved = [ep for ep in result.all_episodes if ep.init_hash == hash6]
    assert len(solved) == k and all(ep.success and ep.advantage == pytest.approx(0.5) for ep in solved)
    mixed = [ep for ep in result.all_episodes if ep.init_hash != hash6]
    assert [ep.advantage for ep in mixed] == pytest.approx([1.0, -0.5, -0.5])
    if dynamic:
        assert (s.groups_kept, s.groups_dropped) == (1, 1) and result.solved_episodes == solved
        assert result.episodes == mixed
    else:
        assert (s.groups_kept, s.groups_dropped) == (2, 0) and result.solved_episodes == []
        np.testing.assert_array_equal(result.group_rewards[0], [1.0, 1.0, 1.0])


def test_dynamic_sampling_stops_at_max_groups_without_padding(pool, initial_state, caplog):
    """A policy that always fails never reaches the goal: exactly max_groups groups (rounds of 2 + 1), no
    episode, a warning; a short-of-goal batch holds only real rollouts, never copies to fill the goal."""
    k = 2
    with (
        grouped_collector(
            pool,
            GroupPolicy(k, n_steps=4, seed=6),
            group_size=k,
            num_slots=2,
            goal_rollouts=4,
            max_groups=3,
            seed_sampler=SeedSampler(pool_size=100, seed=6),
            max_episode_steps=8,
        ) as collector,
        caplog.at_level(logging.WARNING, logger="lerobot_ript.rollout.collector"),
    ):
        failed = collector.collect()
    assert_consistent(failed, k)
    s = failed.stats
    assert (s.groups_sampled, s.groups_dropped, s.rollouts_kept) == (3, 3, 0) and not s.goal_reached
    assert failed.episodes == [] and failed.group_rewards.shape == (0, k) and s.share_dropped == 1.0
    assert "max_groups=3" in caplog.text

    plan = {goal_key(initial_state(8)): {0}}
    with grouped_collector(
        pool,
        GroupPolicy(k, plan, seed=7),
        group_size=k,
        num_slots=1,
        goal_rollouts=6,
        max_groups=1,
        seed_sampler=SeedList([8]),
        max_episode_steps=EXPERT_HORIZON,
    ) as collector:
        short = collector.collect()
    assert_consistent(short, k)
    assert not short.stats.goal_reached and short.stats.rollouts_kept == len(short.episodes) == 2
    a, b = short.episodes
    assert a is not b and a.success and not b.success and a.num_frames < b.num_frames == EXPERT_HORIZON
    assert not np.shares_memory(a.actions, b.actions) and not np.shares_memory(a.states, b.states)


def test_probe_drops_a_state_after_its_failed_probe_and_completes_the_others(pool, initial_state):
    """probe_rollouts=2 of K=4, two slots of 2 sub-envs. Round 1: probes of seed 3 (all fail: dropped after 2
    episodes) and seed 8 (one success: queued). Round 2: seed 8's completion (a group [1, 0, 1, 0], kept: goal
    reached) and the probe of seed 6 (all succeed: queued, not dropped). Round 3: seed 6's completion only (no new
    state once the goal is reached), all-success, dropped and kept as solved. 10 episodes instead of 12."""
    k, probe = 4, 2
    plan = {goal_key(initial_state(8)): {0}, goal_key(initial_state(6)): {0, 1}}  # row within its slot of 2
    policy, sampler, fails = GroupPolicy(probe, plan, seed=5), SeedList([3, 8, 6]), SkipTracker(1)
    with grouped_collector(
        pool,
        policy,
        group_size=k,
        make_env=lambda num_envs=k: pool.factory(num_envs)(),  # probes and completions: 2 sub-envs each
        num_slots=2,
        goal_rollouts=4,
        max_groups=10,
        seed_sampler=sampler,
        fail_tracker=fails,
        keep_solved=True,
        probe_rollouts=probe,
        max_episode_steps=EXPERT_HORIZON,
    ) as collector:
        result = collector.collect()
    assert_consistent(result, k)
    s = result.stats
    assert (s.groups_sampled, s.groups_kept, s.groups_dropped, s.groups_probe_dropped) == (3, 1, 2, 1)
    assert s.episodes == 10 and s.goal_reached and s.solved_rollouts == k
    assert policy.calls[0] == 4  # every round batches both slots' 2 sub-envs in one call
    hash8, hash6 = (init_hash_of(TASK, initial_state(seed)) for seed in (8, 6))
    assert [ep.init_hash for ep in result.episodes] == [hash8] * k
    assert [ep.success for ep in result.episodes] == [True, False, True, False]  # probe, then completion
    assert [ep.advantage for ep in result.episodes] == pytest.approx([2 / 3, -2 / 3, 2 / 3, -2 / 3])
    assert [ep.init_hash for ep in result.solved_episodes] == [hash6] * k
    assert all(ep.success for ep in result.solved_episodes)
    # seed 3 counts as one failed group of its 2 probe rollouts, the others as groups of K
    assert sampler.recorded == [(3, 0, probe), (8, 2, k), (6, 4, k)]
    assert fails.should_skip(init_hash_of(TASK, initial_state(3))) and s.success_rate == pytest.approx(6 / 10)


# -------------------------------------------------------------------------------------------- skipping
def test_skip_tracker_skips_a_solved_state_then_retries_it(pool, initial_state):
    """threshold=2, the expert solves every state. Seed 3 is solved twice, so the next two draws of seed 3 are
    skipped (seed 6 runs instead); after those 2 skips its history is cleared and seed 3 runs again."""
    k = 2
    tracker = SkipTracker(2)
    sampler = SeedList([3, 3, 3, 6, 3, 3])
    policy = GroupPolicy(k, default={0, 1})
    runs, skipped = [], []
    with grouped_collector(
        pool,
        policy,
        group_size=k,
        num_slots=1,
        goal_rollouts=k,
        max_groups=1,
        seed_sampler=sampler,
        skip_tracker=tracker,
        dynamic_sampling=False,
        max_episode_steps=EXPERT_HORIZON,
    ) as collector:
        for _ in range(4):
            result = collector.collect()
            assert_consistent(result, k)
            assert result.stats.success_rate == 1.0
            runs.append(result.episodes[0].init_hash)
            skipped.append(result.stats.skipped_states)
    h3, h6 = (init_hash_of(TASK, initial_state(s)) for s in (3, 6))
    assert sampler.drawn == [3, 3, 3, 6, 3, 3]
    assert runs == [h3, h3, h6, h3] and skipped == [0, 0, 1, 1]
    assert tracker.state_dict()["streaks"] == {str(h3): 1, str(h6): 1}  # seed 3's history restarted

    # A state whose groups fail is never skipped, even with threshold 1.
    failing = SkipTracker(1)
    with grouped_collector(
        pool,
        GroupPolicy(k, n_steps=4, seed=8),
        group_size=k,
        num_slots=1,
        goal_rollouts=k,
        max_groups=1,
        seed_sampler=SeedList([3, 3, 3]),
        skip_tracker=failing,
        dynamic_sampling=False,
        max_episode_steps=6,
    ) as collector:
        assert all(collector.collect().stats.skipped_states == 0 for _ in range(3))
    assert failing.num_skipping == 0


def test_fail_tracker_skips_a_failed_state_then_retries_it(pool, initial_state):
    """fail_tracker threshold=1, a policy that never succeeds in 6 steps: seed 3 fails all K once, so its next
    draw is skipped (seed 6 runs instead), then its history is cleared and seed 3 runs again."""
    k = 2
    fail_tracker = SkipTracker(1)
    sampler = SeedList([3, 3, 6, 3])
    runs, skipped = [], []
    with grouped_collector(
        pool,
        GroupPolicy(k, n_steps=4, seed=8),
        group_size=k,
        num_slots=1,
        goal_rollouts=k,
        max_groups=1,
        seed_sampler=sampler,
        fail_tracker=fail_tracker,
        dynamic_sampling=False,
        max_episode_steps=6,
    ) as collector:
        for _ in range(3):
            result = collector.collect()
            assert result.stats.success_rate == 0.0
            runs.append(result.episodes[0].init_hash)
            skipped.append(result.stats.skipped_states)
    h3, h6 = (init_hash_of(TASK, initial_state(s)) for s in (3, 6))
    assert sampler.drawn == [3, 3, 6, 3]
    assert runs == [h3, h6, h3] and skipped == [0, 1, 0]
    assert fail_tracker.state_dict()["streaks"] == {str(h3): 1, str(h6): 1}
    # every finished group reached the sampler (its curriculum, if any): seed, successes, trials
    assert sampler.recorded == [(3, 0, k), (6, 0, k), (3, 0, k)]


# ---------------------------------------------------------------------------------------------- faults
class FaultyEnv(gym.Wrapper):
    """Raises in reset, or in the `at`-th step, once."""

    def __init__(self, env: gym.Env, where: str, at: int) -> None:
        super().__init__(env)
        self.where, self.at, self.steps, self.closed = where, at, 0, False

    def reset(self, **kwargs):
        if self.where == "reset":
            raise RuntimeError("injected reset fault")
        return super().reset(**kwargs)

    def step(self, action):
        self.steps += 1
        if self.where == "step" and self.steps == self.at:
            raise RuntimeError("injected step fault")
        return super().step(action)

    def close(self):
        self.closed = True
        super().close()


@pytest.mark.parametrize("where", ["reset", "step"])
def test_env_fault_costs_only_its_group_and_the_slot_is_rebuilt(pool, env_cfg, where, caplog):
    """The first vector env built has a sub-env that raises (in reset, or at its 5th step). Its group is
    discarded and counted, its slot gets a new env, the other slot's group is kept, and collection goes on
    until the goal; the next collect() has no fault."""
    k, steps, at = 2, 8, 5
    built: list[gym.vector.VectorEnv] = []
    faulty: list[FaultyEnv] = []

    def make_group_env() -> gym.vector.VectorEnv:
        if built:  # every rebuild is a healthy env
            env = pool.factory(k)()
        else:

            def bad_env() -> gym.Env:
                faulty.append(FaultyEnv(_make_frozen_env(env_cfg.gym_kwargs), where, at))
                return faulty[-1]

            fns = [bad_env] + [functools.partial(_make_frozen_env, env_cfg.gym_kwargs)] * (k - 1)
            env = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
        built.append(env)
        return env

    policy = GroupPolicy(k, n_steps=4, seed=9)
    with (
        grouped_collector(
            pool,
            policy,
            group_size=k,
            make_env=make_group_env,
            num_slots=2,
            goal_rollouts=6,
            max_groups=10,
            seed_sampler=SeedSampler(pool_size=100, seed=9),
            dynamic_sampling=False,
            max_episode_steps=steps,
        ) as collector,
        caplog.at_level(logging.WARNING, logger="lerobot_ript.rollout.collector"),
    ):
        result = collector.collect()
        after = collector.collect()
    assert_consistent(result, k)
    s = result.stats
    assert (s.groups_faulted, s.groups_kept, s.groups_sampled) == (1, 3, 4) and s.goal_reached
    assert len(built) == 3 and faulty[0].closed  # 2 slots + 1 rebuild; the broken env was closed
    assert collector.slots[0].env is built[2]
    assert all(ep.num_frames == steps for ep in result.episodes)
    # the faulted group's steps before the fault were simulated and counted, its rollouts are not returned
    partial = 0 if where == "reset" else k * (at - 1)
    assert s.env_steps == sum(ep.num_frames for ep in result.episodes) + partial
    assert f"injected {where} fault" in caplog.text and "rebuilding" in caplog.text
    assert_consistent(after, k)
    assert after.stats.groups_faulted == 0 and after.stats.rollouts_kept == 6 and len(built) == 3


# --------------------------------------------------------------------------------------- seed sampler
def test_seed_sampler_range_and_exact_resume():
    sampler = SeedSampler(pool_size=5, start=100, seed=1)
    first = [sampler() for _ in range(50)]
    assert set(first) == set(range(100, 105))
    state = sampler.state_dict()
    expected = [sampler() for _ in range(20)]
    resumed = SeedSampler(pool_size=5, start=100, seed=999)
    resumed.load_state_dict(state)
    assert [resumed() for _ in range(20)] == expected
    with pytest.raises(ValueError, match="pool_size"):
        SeedSampler(pool_size=0)


def test_collector_rejects_bad_settings(pool):
    # K = 1; a probe that leaves no rollout to complete it; a probe without dynamic sampling
    for k, probe, dynamic, match in (
        (1, 0, True, "RLOO"),
        (4, 4, True, "probe_rollouts"),
        (4, 2, False, "probe"),
    ):
        with pytest.raises(ValueError, match=match):
            GroupedCollector(
                pool.factory(2),
                None,
                task=TASK,
                group_size=k,
                num_slots=1,
                goal_rollouts=1,
                max_groups=1,
                seed_sampler=SeedSampler(1),
                dynamic_sampling=dynamic,
                probe_rollouts=probe,
            )
    built = []

    def wrong_size():
        built.append(pool.factory(2)())
        return built[-1]

    with pytest.raises(ValueError, match="expected rloo_batch_size=3"):
        GroupedCollector(
            wrong_size,
            None,
            task=TASK,
            group_size=3,
            num_slots=1,
            goal_rollouts=1,
            max_groups=1,
            seed_sampler=SeedSampler(1),
        )
    assert built[0].closed  # the rejected env is not leaked


# -------------------------------------------------------------------------------- a real ript policy
@pytest.fixture(scope="module")
def ript_policy(tmp_path_factory):
    """A tiny RiptPolicy made by LeRobot's make_policy from 2 recorded push-v3 demos, with its processors;
    weights perturbed so that the good and null branches differ (adaLN-zero init makes them equal)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    from lerobot_ript.data.record_demos import record_demos
    from lerobot_ript.policy.configuration_ript import RiptConfig

    root = Path(tmp_path_factory.mktemp("demos")) / "push"
    record_demos(TASK, 2, 0.3, root, episode_length=30)
    meta = LeRobotDatasetMetadata("local/push-v3-demos", root=root)
    cfg = RiptConfig(
        device="cpu",
        chunk_size=8,
        n_action_steps=4,
        hidden_dim=32,
        cond_dim=16,
        num_denoiser_layers=1,
        num_inference_steps=3,
    )
    policy = make_policy(cfg, ds_meta=meta)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy.eval()
    pre, post = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    return policy, pre, post, meta


def test_make_chunk_policy_with_a_real_ript_policy(ript_policy, pool):
    from lerobot.envs.utils import preprocess_observation

    policy, pre, post, meta = ript_policy
    env = pool.factory(3)()
    try:
        obs, _ = env.reset(seed=[1, 2, 3])
    finally:
        pool.give_back(env)
    threads = torch.get_num_threads()
    chunks = {}
    for w in (1.0, 2.0):
        act = make_chunk_policy(policy, pre, post, guidance_scale=w, n_action_steps=4)
        torch.manual_seed(123)
        chunks[w] = act(obs)
        assert torch.get_num_threads() == threads  # restored after inference on 1 thread
        torch.manual_seed(123)
        with torch.inference_mode():
            manual = policy.predict_action_chunk(pre(preprocess_observation(obs)), guidance_scale=w)[:, :4]
        np.testing.assert_allclose(chunks[w], post(manual).numpy(), rtol=1e-5, atol=1e-6)
    for chunk in chunks.values():
        assert isinstance(chunk, np.ndarray) and chunk.shape == (3, 4, ACTION_DIM)
        assert np.isfinite(chunk).all()
        # unnormalised with the demo statistics: within a few demo std of the demo mean, in action units
        mean, std = meta.stats["action"]["mean"], meta.stats["action"]["std"]
        assert (np.abs(chunk - mean) < 6 * std + 0.5).all() and np.abs(chunk).max() < 5
    assert not np.allclose(chunks[1.0], chunks[2.0], atol=1e-4)  # guidance changes the actions


def test_collector_runs_a_real_ript_policy_in_batched_chunks(ript_policy, pool):
    policy, pre, post, _ = ript_policy
    act = make_chunk_policy(policy, pre, post, guidance_scale=1.5, n_action_steps=4)
    calls = []

    def counted(obs):
        calls.append(len(obs["agent_pos"]))
        return act(obs)

    with grouped_collector(
        pool,
        counted,
        group_size=2,
        num_slots=2,
        goal_rollouts=4,
        max_groups=2,
        seed_sampler=SeedSampler(pool_size=100),
        dynamic_sampling=False,
        max_episode_steps=8,
    ) as collector:
        result = collector.collect()
    assert_consistent(result, 2)
    assert calls == [4, 4]  # two chunks of 4 steps, both slots in each call
    assert all(ep.num_frames == 8 and np.isfinite(ep.actions).all() for ep in result.episodes)


def test_make_chunk_policy_sends_the_instruction_as_task_and_the_small_backbone_ignores_it(ript_policy, pool):
    """With `task`, the batch handed to the preprocessor carries the instruction once per row (as LeRobot's
    rollout sends it) and the preprocessor passes it on to the policy; the small backbone's actions are the same
    with and without it."""
    policy, pre, post, _ = ript_policy
    env = pool.factory(3)()
    try:
        obs, _ = env.reset(seed=[1, 2, 3])
    finally:
        pool.give_back(env)
    seen = []

    def spy(batch):
        seen.append(dict(batch))
        return pre(batch)

    instruction = task_instruction(TASK)
    chunks = []
    for task in (instruction, None):
        act = make_chunk_policy(policy, spy, post, guidance_scale=1.5, n_action_steps=4, task=task)
        torch.manual_seed(7)
        chunks.append(act(obs))
    assert seen[0]["task"] == [instruction] * 3 and "task" not in seen[1]
    assert pre(seen[0])["task"] == [instruction] * 3  # what reaches predict_action_chunk
    np.testing.assert_array_equal(chunks[0], chunks[1])


def test_collector_records_camera_frames_aligned_with_states_and_the_instruction(initial_state):
    """record_images on a state_pixels env: every episode keeps its own sub-env's frames (frame t: the images
    before action t, the same as a fresh env replaying the actions renders), uint8 (T, H, W, 3) per camera; its
    `task` is the instruction while its init_hash keys on the task name."""
    size, steps, seed = 16, 6, 5
    cfg = MetaWorldStateEnvConfig(
        task=TASK,
        episode_length=ENV_HORIZON,
        obs_type="state_pixels",
        image_size=size,
        cameras="corner2,topview",
    )
    collector = GroupedCollector(
        lambda: make_vector_env(cfg, 2),
        GroupPolicy(2, n_steps=3, seed=4),
        task=TASK,
        instruction=task_instruction(TASK),
        group_size=2,
        num_slots=1,
        goal_rollouts=2,
        max_groups=1,
        seed_sampler=SeedList([seed]),
        dynamic_sampling=False,
        max_episode_steps=steps,
        record_images=True,
    )
    try:
        episodes = collector.collect().episodes
    finally:
        collector.close()
    replay = MetaWorldStateEnv(TASK, obs_type="state_pixels", image_size=size, cameras=("corner2", "topview"))
    try:
        for ep in episodes:
            assert ep.task == "Push the puck to a goal"
            assert ep.init_hash == init_hash_of(TASK, initial_state(seed))
            assert sorted(ep.images) == ["corner2", "topview"]
            ep.validate(with_advantages=True)  # uint8 (T, H, W, 3), T = the episode's frames
            obs, _ = replay.reset(seed=seed)
            for t in range(ep.num_frames):
                for cam in ("corner2", "topview"):
                    np.testing.assert_array_equal(ep.images[cam][t], obs["pixels"][cam])
                obs, *_ = replay.step(ep.actions[t])
            assert ep.images["corner2"].shape == (steps, size, size, 3)
            assert not np.array_equal(ep.images["corner2"][0], ep.images["corner2"][-1])  # the arm moved
    finally:
        replay.close()
    assert not np.array_equal(episodes[0].images["corner2"][-1], episodes[1].images["corner2"][-1])


def test_record_images_without_camera_observations_fails_with_a_fix(pool):
    with grouped_collector(
        pool,
        GroupPolicy(2),
        group_size=2,
        num_slots=1,
        goal_rollouts=2,
        max_groups=1,
        seed_sampler=SeedSampler(1),
        record_images=True,
    ) as collector:
        with pytest.raises(ValueError, match="no 'pixels'.*obs_type='state_pixels'"):
            collector.collect()


# ------------------------------------------------------------------------------------------- evaluate
def test_wilson_interval_known_values():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    lo, hi = wilson_interval(40, 50)
    assert lo < 0.8 < hi and hi - lo < wilson_interval(4, 5)[1] - wilson_interval(4, 5)[0]  # narrower with n
    (lo3, hi3), (lo7, hi7) = wilson_interval(3, 10), wilson_interval(7, 10)
    assert math.isclose(lo3, 1 - hi7) and math.isclose(hi3, 1 - lo7)  # symmetric in successes / failures


def test_evaluate_is_independent_of_how_seeds_are_batched(env_cfg):
    """The expert solves seeds 3, 6, 8 (success read from the env); 2 envs (one padded slot) or 1 env at a
    time give the same per-seed results and the same count of real env steps."""
    expert = GroupPolicy(1, default={0})
    make = functools.partial(make_vector_env, env_cfg)
    batched = evaluate(make, expert, [3, 6, 8], num_envs=2, max_episode_steps=EXPERT_HORIZON)
    single = evaluate(make, expert, [3, 6, 8], num_envs=1, max_episode_steps=EXPERT_HORIZON)
    assert batched.successes.tolist() == single.successes.tolist() == [True, True, True]
    assert batched.env_steps == single.env_steps < 3 * EXPERT_HORIZON
    assert batched.success_rate == 1.0

    failing = evaluate(make, GroupPolicy(1, n_steps=4), [3, 6, 8], num_envs=2, max_episode_steps=6)
    assert failing.successes.tolist() == [False] * 3 and failing.env_steps == 3 * 6


# ------------------------------------------------------------------------------------------ several tasks
OTHER_TASK = (
    "reach-v3"  # the scripted expert reaches within 51 steps from seeds 0..5; random actions never do
)


class TaskPolicy:
    """ChunkPolicy for a multi-task collector: each row acts by the instruction the collector sent with it
    (`obs["task"]`): the reach expert on reach-v3 rows, uniform random actions on push-v3 rows. Records the
    (instruction, goal) of every row of every call."""

    def __init__(self, seed: int = 0) -> None:
        self.expert = scripted_expert(OTHER_TASK)
        self.rng = np.random.default_rng(seed)
        self.rows: list[tuple[str, tuple[float, ...]]] = []

    def __call__(self, obs: dict) -> np.ndarray:
        states, tasks = obs["agent_pos"], obs["task"]
        assert len(tasks) == len(states)
        chunk = self.rng.uniform(-1, 1, (len(states), 1, ACTION_DIM)).astype(np.float32)
        for r, (state, task) in enumerate(zip(states, tasks, strict=True)):
            self.rows.append((task, goal_key(state)))
            if task == task_instruction(OTHER_TASK):
                chunk[r, 0] = self.expert(state)
        return chunk


def test_multi_task_collector_draws_groups_across_tasks_with_their_envs_hashes_and_instructions(env_cfg):
    """push-v3 and reach-v3, 2 slots x K=2, 4 groups per collect(), states drawn by SeedSampler(num_tasks=2):
    both tasks are drawn; each group ran in an env of its task (the reach expert, chosen by each row's
    `obs["task"]`, solves exactly the reach groups); every episode carries its task's instruction and
    init_hash_of(its task NAME, its initial state), equal to a fresh env's of that task and seed; per-task
    success rates are in the stats; the envs of each task are built once and reused by the next collect()."""
    from lerobot_ript.rollout.collector import CollectTask

    k, names = 2, (TASK, OTHER_TASK)
    built = {name: 0 for name in names}

    def factory(name: str):
        def make() -> gym.vector.VectorEnv:
            built[name] += 1
            return make_vector_env(env_cfg, k, task=name)

        return make

    tasks = [CollectTask(name, task_instruction(name), factory(name)) for name in names]
    sampler = SeedSampler(pool_size=3, seed=2, num_tasks=2)  # draws both tasks in each collect()
    policy = TaskPolicy()
    collector = GroupedCollector(
        policy=policy,
        tasks=tasks,
        group_size=k,
        num_slots=2,
        goal_rollouts=8,
        max_groups=4,
        seed_sampler=sampler,
        dynamic_sampling=False,
        max_episode_steps=60,
    )
    try:
        first = collector.collect()
        built_first = dict(built)
        second = collector.collect()
        for slot in collector.slots:  # each slot holds an env of the task it ran last
            assert slot.env.call("task_description") == (tasks[slot.task].instruction,) * k
    finally:
        collector.close()
    # (task, seed) -> (initial state, init_hash) of a fresh single env of that task
    expected = {}
    for name in names:
        env = MetaWorldStateEnv(task=name, episode_length=ENV_HORIZON)
        try:
            for seed in range(3):
                state = env.reset(seed=seed)[0]["agent_pos"]
                expected[name, seed] = (state, init_hash_of(name, env.init_state_key()))
        finally:
            env.close()
    for result in (first, second):
        assert_consistent(result, k)
        drawn = {ep.task for ep in result.episodes}
        assert drawn == {task_instruction(n) for n in names}  # both tasks, 4 groups each call
        for group in groups_of(result.episodes, k):
            name = next(n for n in names if task_instruction(n) == group[0].task)
            seeds = [s for s in range(3) if np.array_equal(expected[name, s][0], group[0].states[0])]
            assert len(seeds) == 1  # the group started from one of its task's pool states
            assert {ep.init_hash for ep in group} == {expected[name, seeds[0]][1]}
            assert all(ep.success == (name == OTHER_TASK) for ep in group)
        assert result.stats.task_success_rate == {TASK: 0.0, OTHER_TASK: 1.0}
        logged = result.stats.as_dict()
        assert logged[f"rollout/success_rate/{TASK}"] == 0.0
        assert logged[f"rollout/success_rate/{OTHER_TASK}"] == 1.0
    # the same seed of the two tasks: different hashes (init_hash keys on the task)
    assert all(expected[TASK, s][1] != expected[OTHER_TASK, s][1] for s in range(3))
    # every row the policy saw carried the instruction of the task its goal belongs to
    goals = {task_instruction(n): set() for n in names}
    for task, goal in policy.rows:
        goals[task].add(goal)
    assert goals[task_instruction(TASK)].isdisjoint(goals[task_instruction(OTHER_TASK)])
    # envs are built once per task and slot at most, then reused (the second collect() built none)
    assert built == built_first and all(1 <= n <= 2 for n in built.values())
    assert sum(len(g) for g in first.group_rewards) == 8


def test_seed_sampler_over_several_tasks_and_its_checks(pool):
    """num_tasks=3, 4 seeds from 10: states 10..21 cover every (task, seed); split gives each back; one task
    draws what it always drew; a collector whose sampler draws another number of tasks is refused."""
    sampler = SeedSampler(pool_size=4, start=10, seed=2, num_tasks=3)
    states = {sampler() for _ in range(300)}
    assert states == set(range(10, 22))
    assert [sampler.split(s) for s in (10, 13, 14, 21)] == [(0, 10), (0, 13), (1, 10), (2, 13)]
    # the curriculum weighs the states of every task against each other: task 0's states, always solved, are
    # drawn less than task 1's, never tried (K = 8: weight about 0.23 against the prior's 0.61)
    curriculum = StateCurriculum(group_size=8)
    cur_sampler = SeedSampler(pool_size=4, start=10, seed=2, curriculum=curriculum, num_tasks=3)
    for state in range(10, 14):
        for _ in range(3):
            cur_sampler.record(state, 8, 8)
    drawn = [cur_sampler.split(cur_sampler())[0] for _ in range(600)]
    assert drawn.count(0) < drawn.count(1) / 2 and drawn.count(1) > 150 and drawn.count(2) > 150
    single, legacy = SeedSampler(pool_size=4, start=10, seed=2), np.random.default_rng(2)
    assert [single() for _ in range(20)] == [10 + int(legacy.integers(4)) for _ in range(20)]
    assert single.split(12) == (0, 12)
    from lerobot_ript.rollout.collector import CollectTask

    with pytest.raises(ValueError, match=r"num_tasks=2"):
        GroupedCollector(
            tasks=[CollectTask(TASK, "a", pool.factory(2)), CollectTask(OTHER_TASK, "b", pool.factory(2))],
            group_size=2,
            num_slots=1,
            goal_rollouts=1,
            max_groups=1,
            seed_sampler=SeedSampler(3),
        )
    with pytest.raises(ValueError, match="not both"):
        GroupedCollector(
            pool.factory(2),
            task=TASK,
            tasks=[CollectTask(TASK, "a", pool.factory(2))],
            group_size=2,
            num_slots=1,
            goal_rollouts=1,
            max_groups=1,
            seed_sampler=SeedSampler(3),
        )


def test_make_chunk_policy_sends_each_rows_task_from_the_observation(ript_policy, pool):
    """A multi-task collector's `obs["task"]` (one instruction per row) becomes the batch's `task` as it is, in
    place of the fixed `task` argument, and never reaches preprocess_observation as an observation."""
    policy, pre, post, _ = ript_policy
    env = pool.factory(2)()
    try:
        obs, _ = env.reset(seed=[1, 2])
    finally:
        pool.give_back(env)
    seen = []

    def spy(batch):
        seen.append(dict(batch))
        return pre(batch)

    act = make_chunk_policy(policy, spy, post, guidance_scale=1.0, n_action_steps=4, task="fixed")
    act({**obs, "task": ["first", "second"]})
    assert seen[0]["task"] == ["first", "second"]
    assert sorted(k for k in seen[0] if k != "task") == ["observation.state"]
