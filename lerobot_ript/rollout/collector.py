"""Grouped rollout collection with the RIPT-VLA sampling rules.

K = `group_size` rollouts start from the same initial state (one gymnasium vector env of K sub-envs per group
slot, reset with K equal seeds); every slot steps in lockstep with ONE batched policy call per action chunk
(with `overlap_inference`, two half-batches, phase-shifted: one half steps while the other half's chunk is
inferred on a worker thread).
Groups whose K rewards are all equal carry no RLOO signal and are dropped (dynamic sampling); more groups are
sampled until `goal_rollouts` rollouts with signal are kept or `max_groups` groups were tried. Without dynamic
sampling every finished group is kept, and only as many groups are started as the goal needs. With `keep_solved`,
the rollouts of a group that ALL succeeded are kept as good data (advantage `solved_advantage(K)` = 1/(K-1), the
smallest advantage a success gets in a mixed group) instead of being dropped (dynamic sampling) or labelled
neutral (advantage 0): they have no RLOO signal, but for the cfg objective they are optimal behaviour, and
without them the policy is never trained on the states it already solves. A state solved
by every rollout `skip_threshold` times in a row is skipped (SkipTracker), and, with a `fail_tracker`, so is
a state failed by every rollout that many times in a row (its own threshold). An env that raises costs its own
group; its slot is rebuilt and the fault counted.

Probing (`probe_rollouts=P`, 1 <= P < K, with dynamic sampling): the episode-saving variant. A group first runs
P of its K rollouts; when none of them succeeds, the group is dropped after P episodes instead of K (its state
counts as failed for the trackers and the curriculum); otherwise the other K - P rollouts run from the same
initial state in a later round and the K rollouts form the group as usual. Probes and completions are vector
envs of P and K - P sub-envs (`make_group_env(num_envs=...)`), and a round holds up to `num_slots` of them.
A probe whose P rollouts all succeed is completed too (keep_solved and mixed groups need the other K - P).
The pending completions are run before collection stops, so no probe's episodes are left unused.

Several tasks (`tasks=[CollectTask(...), ...]`): an initial state is a (task, seed) pair, drawn by the seed
sampler over all of them (`SeedSampler(..., num_tasks=n)`: uniform over tasks and seeds, or the curriculum's
weights across tasks); `init_hash` keys on the task name, so the skip trackers tell the tasks apart. A slot
takes a vector env of its group's task from a per-task pool (each env built once, then reused), every episode
carries its task's instruction, the batched policy call gets each row's instruction in `obs["task"]`, and the
stats hold each task's success rate.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

from lerobot_ript.advantages import rloo_advantages
from lerobot_ript.data.writer import EpisodeRecord, init_hash_of
from lerobot_ript.rollout.sampling import SkipTracker, StateCurriculum, group_has_signal

logger = logging.getLogger(__name__)

# GIL switch interval while inference overlaps env stepping (Python's default is 5 ms)
SWITCH_INTERVAL_S = 2e-4

# obs dict of a vector env (numpy, leading dim N) -> action chunk (N, n_steps, action_dim) numpy
ChunkPolicy = Callable[[dict], np.ndarray]


@dataclass
class CollectionStats:
    """What one call of `GroupedCollector.collect` did. Rates are in [0, 1]."""

    success_rate: float = 0.0  # over every finished rollout, kept or dropped
    groups_sampled: int = 0
    groups_kept: int = 0
    groups_dropped: int = 0  # all-equal rewards (no signal), probes dropped included
    groups_probe_dropped: int = 0  # probe_rollouts: groups dropped after their P probe rollouts all failed
    # rollouts started (K a group; with probe_rollouts, P for a group dropped after its probe)
    episodes: int = 0
    groups_faulted: int = 0  # an env raised; the group was discarded and its slot rebuilt
    skipped_states: int = 0  # initial states skipped by the trackers (solved or failed N times in a row)
    env_steps: int = 0
    steps_per_second: float = 0.0
    wall_time_s: float = 0.0
    goal_reached: bool = True  # False when max_groups stopped sampling before goal_rollouts were kept
    rollouts_kept: int = 0
    solved_rollouts: int = 0  # rollouts of all-success groups kept as good data (keep_solved)
    # several tasks only: task name -> success rate over its finished rollouts (NaN when none was sampled)
    task_success_rate: dict[str, float] = field(default_factory=dict)

    @property
    def share_dropped(self) -> float:
        done = self.groups_kept + self.groups_dropped
        return self.groups_dropped / done if done else 0.0

    def as_dict(self, prefix: str = "rollout/") -> dict[str, float]:
        """Flat metrics; each task's success rate as `<prefix>success_rate/<task>` (several tasks only)."""
        out = {f"{prefix}{k}": float(v) for k, v in self.__dict__.items() if k != "task_success_rate"}
        out[f"{prefix}share_dropped"] = self.share_dropped
        out.update({f"{prefix}success_rate/{t}": float(v) for t, v in self.task_success_rate.items()})
        return out


def solved_advantage(group_size: int) -> float:
    """Advantage of a rollout of an all-success group under `keep_solved`: 1/(K-1), the RLOO advantage of a
    success whose group has exactly one failure (the smallest positive one), so it is labelled good."""
    return 1.0 / (group_size - 1)


@dataclass
class CollectionResult:
    """Episodes of the kept groups, with their per-episode RLOO advantage in `EpisodeRecord.advantage`.

    `solved_episodes` (dynamic sampling with `keep_solved` only): rollouts of all-success groups, which dynamic
    sampling dropped for lack of RLOO signal, kept as good data with advantage `solved_advantage(K)`. They do not
    count toward the goal and are not in `group_rewards`. Train on `all_episodes`.
    """

    episodes: list[EpisodeRecord]
    group_rewards: np.ndarray  # (num_kept_groups, K)
    stats: CollectionStats = field(default_factory=CollectionStats)
    solved_episodes: list[EpisodeRecord] = field(default_factory=list)

    @property
    def all_episodes(self) -> list[EpisodeRecord]:
        return self.episodes + self.solved_episodes


class SeedSampler:
    """Draws initial states with its own RNG (resumable): uniformly, or with a `StateCurriculum`'s weights (the
    collector records every finished group in it).

    One task: a state is a seed of [start, start + pool_size). `num_tasks` > 1: a state is an id of
    [start, start + num_tasks * pool_size) standing for (task index, seed) = `split(state)`, each task with its
    own pool of seeds [start, start + pool_size); draws are uniform over every (task, seed), so over tasks, and
    the curriculum weighs the states of all tasks against each other."""

    def __init__(
        self,
        pool_size: int,
        start: int = 0,
        seed: int = 0,
        curriculum: StateCurriculum | None = None,
        num_tasks: int = 1,
    ) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size={pool_size} must be >= 1.")
        if num_tasks < 1:
            raise ValueError(f"num_tasks={num_tasks} must be >= 1.")
        self.pool_size, self.start, self.num_tasks = pool_size, start, num_tasks
        self.rng = np.random.default_rng(seed)
        self.curriculum = curriculum

    def __call__(self) -> int:
        n = self.pool_size * self.num_tasks
        if self.curriculum is None:
            return self.start + int(self.rng.integers(n))
        states = np.arange(self.start, self.start + n)
        return int(self.rng.choice(states, p=self.curriculum.weights(states)))

    def split(self, state: int) -> tuple[int, int]:
        """(task index, env seed) of a drawn state; one task: (0, state)."""
        task, offset = divmod(int(state) - self.start, self.pool_size)
        return task, self.start + offset

    def record(self, seed: int, successes: int, trials: int) -> None:
        """A finished group's outcome, by the state it was drawn as (used by the curriculum, if any)."""
        if self.curriculum is not None:
            self.curriculum.record(seed, successes, trials)

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]


@dataclass(frozen=True)
class CollectTask:
    """One task of a multi-task collector: its name keys `init_hash`, its instruction is each episode's `task`
    (and each policy row's `obs["task"]`), `make_group_env()` builds one vector env of K sub-envs of it
    (`make_group_env(num_envs=n)`: of n, for a collector with `probe_rollouts`)."""

    name: str
    instruction: str
    make_group_env: Callable[..., gym.vector.VectorEnv]


@dataclass
class _Slot:
    env: gym.vector.VectorEnv
    task: int = 0  # index into the collector's tasks: the task of `env`
    probe: _Probe | None = None  # a completion: the probe it completes
    state: int = -1  # the sampler's state (the seed, for one task)
    seed: int = -1
    init_hash: int = 0
    obs: dict | None = None
    done: np.ndarray | None = None  # (K,) bool
    success: np.ndarray | None = None  # (K,) bool
    # per step: (states (K, S), actions (K, A), rewards (K,), alive (K,))
    steps: list = field(default_factory=list)
    images: list = field(default_factory=list)
    faulted: bool = False

    @property
    def size(self) -> int:
        """Sub-envs of `env`: K, or with probe_rollouts P (a probe) or K - P (its completion)."""
        return self.env.num_envs


@dataclass
class _Probe:
    """The first P rollouts of a group whose other K - P are still to run (probe_rollouts)."""

    task: int
    state: int
    seed: int
    init_hash: int
    success: np.ndarray  # (P,) bool
    episodes: list  # P EpisodeRecords


@dataclass
class _Collected:
    """What one collect() call has gathered so far."""

    kept: list = field(default_factory=list)  # per kept group: its K EpisodeRecords
    rewards: list = field(default_factory=list)  # per kept group: (K,) float rewards
    solved: list = field(default_factory=list)  # EpisodeRecords of dropped all-success groups (keep_solved)
    successes: list = field(default_factory=list)  # every finished rollout's success
    task_successes: list = field(default_factory=list)  # per task: its finished rollouts' successes

    @property
    def rollouts_kept(self) -> int:
        return sum(len(g) for g in self.kept)


class GroupedCollector:
    """Collects groups of K rollouts per initial state; see the module docstring for the rules.

    One task: `make_group_env`, `task` (the task name, keys `init_hash`) and `instruction` (default: the name),
    each EpisodeRecord's `task`. Several: `tasks` instead (one `CollectTask` each; the seed sampler must draw
    states of that many tasks, e.g. `SeedSampler(..., num_tasks=len(tasks))`).
    `record_images`: keep every step's camera images (`obs["pixels"]`, uint8 (H, W, 3) per camera) in
    `EpisodeRecord.images`; the env must render them (MetaWorld: obs_type="state_pixels").
    """

    def __init__(
        self,
        make_group_env: Callable[[], gym.vector.VectorEnv] | None = None,
        policy: ChunkPolicy | None = None,
        *,
        task: str | None = None,
        instruction: str | None = None,
        tasks: Sequence[CollectTask] | None = None,
        group_size: int,
        num_slots: int,
        goal_rollouts: int,
        max_groups: int,
        seed_sampler: SeedSampler,
        skip_tracker: SkipTracker | None = None,
        fail_tracker: SkipTracker | None = None,
        dynamic_sampling: bool = True,
        max_episode_steps: int = 200,
        record_images: bool = False,
        overlap_inference: bool = False,
        keep_solved: bool = False,
        probe_rollouts: int = 0,
    ) -> None:
        if group_size < 2:
            raise ValueError(
                f"rloo_batch_size={group_size} must be >= 2: RLOO needs a leave-one-out baseline."
            )
        if probe_rollouts and not (0 < probe_rollouts < group_size and dynamic_sampling):
            raise ValueError(
                f"probe_rollouts={probe_rollouts} must be 0 (off) or in [1, rloo_batch_size - 1] = [1, "
                f"{group_size - 1}], with dynamic sampling on (a probe drops a group without signal early)."
            )
        if num_slots < 1 or max_groups < 1 or goal_rollouts < 1:
            raise ValueError("num_slots, max_groups and goal_rollouts must all be >= 1.")
        if tasks is None:
            if make_group_env is None or task is None:
                raise ValueError(
                    "GroupedCollector needs make_group_env and task (one task), or tasks (several)."
                )
            # EpisodeRecord.task (the datasets' `task` column): the language instruction; init_hash keys on `task`
            tasks = [CollectTask(task, task if instruction is None else instruction, make_group_env)]
        elif make_group_env is not None or task is not None:
            raise ValueError("GroupedCollector takes make_group_env and task (one task) or tasks, not both.")
        self.tasks = list(tasks)
        if not self.tasks or len({t.name for t in self.tasks}) != len(self.tasks):
            raise ValueError(
                f"tasks must name at least one task, each once; got {[t.name for t in self.tasks]}."
            )
        if isinstance(seed_sampler, SeedSampler) and seed_sampler.num_tasks != len(self.tasks):
            raise ValueError(
                f"{len(self.tasks)} task(s), but the seed sampler draws states of {seed_sampler.num_tasks}; build "
                f"it with SeedSampler(..., num_tasks={len(self.tasks)})."
            )
        self.policy = policy
        # the first (or only) task
        self.task, self.instruction = self.tasks[0].name, self.tasks[0].instruction
        self.k, self.goal, self.max_groups = group_size, goal_rollouts, max_groups
        self.seed_sampler = seed_sampler
        self.skip_tracker = skip_tracker or SkipTracker(0)  # streaks of all-success groups
        self.fail_tracker = fail_tracker or SkipTracker(0)  # streaks of all-failure groups
        self.dynamic_sampling = dynamic_sampling
        self.keep_solved = keep_solved
        self.probe = probe_rollouts
        self.max_episode_steps = max_episode_steps
        self.record_images = record_images
        self._seed_hash: dict[int, int] = {}  # state -> init_hash (initial states are seed-determined)
        first = self.probe or self.k  # probing: every slot starts with a probe
        self.slots = [_Slot(env=self._build_env(0, first)) for _ in range(num_slots)]
        # (task index, sub-envs) -> vector envs of that task and size that no slot holds now
        self._spare_envs: dict[tuple[int, int], list[gym.vector.VectorEnv]] = {}
        # overlap_inference: half of the slots step while the policy infers the other half's next chunk
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ript-inference")
            if overlap_inference and num_slots >= 2
            else None
        )

    @property
    def multi_task(self) -> bool:
        return len(self.tasks) > 1

    def _build_env(self, task: int, size: int) -> gym.vector.VectorEnv:
        make = self.tasks[task].make_group_env
        env = make() if size == self.k else make(num_envs=size)
        if env.num_envs != size:
            env.close()
            raise ValueError(
                f"make_group_env built a vector env of {env.num_envs} sub-envs; expected "
                + (f"rloo_batch_size={self.k}" if size == self.k else f"{size} (probe_rollouts={self.probe})")
                + ": build one sub-env per rollout of a group (and take num_envs=n when the collector probes)."
            )
        return env

    def close_executor(self) -> None:
        """Stop the inference worker thread (overlap_inference); the next collect() infers in line."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def close(self) -> None:
        self.close_executor()
        for slot in self.slots:
            slot.env.close()
        for envs in self._spare_envs.values():
            for env in envs:
                env.close()
        self._spare_envs.clear()

    # ----- one call: rounds of parallel groups until the goal or the cap -----
    def collect(self) -> CollectionResult:
        stats, acc = CollectionStats(), _Collected(task_successes=[[] for _ in self.tasks])
        pending: list[_Probe] = []  # probes with a success, waiting for their completion
        t0 = time.perf_counter()
        while stats.groups_sampled < self.max_groups:
            # completions first; new groups only while the goal is not reached (and within the cap)
            completions = pending[: len(self.slots)]
            pending = pending[len(completions) :]
            n = 0
            if acc.rollouts_kept < self.goal:
                taken = stats.groups_sampled + len(pending) + len(completions)  # decided or on their way
                n = min(len(self.slots) - len(completions), self.max_groups - taken)
                if not self.dynamic_sampling:
                    # every finished group is kept: start only the groups the goal still needs
                    n = min(n, -(-(self.goal - acc.rollouts_kept) // self.k))
            if not completions and n <= 0:
                break
            active = self.slots[: len(completions) + max(n, 0)]
            for slot, probe in zip(active, completions + [None] * len(active), strict=False):
                self._start_slot(slot, stats, probe)
            self._run_round(active, stats)
            for slot in active:
                self._finish_slot(slot, stats, acc, pending)
            if acc.rollouts_kept >= self.goal and not pending:
                break
        return self._result(stats, acc, t0)

    def _finish_slot(
        self, slot: _Slot, stats: CollectionStats, acc: _Collected, pending: list[_Probe]
    ) -> None:
        """A finished slot: a whole group, a probe (dropped, or queued for its completion) or a completion."""
        if slot.faulted:
            stats.groups_sampled += 1
            stats.groups_faulted += 1
            return
        acc.successes.extend(slot.success.tolist())
        acc.task_successes[slot.task].extend(slot.success.tolist())
        success, first = slot.success, []
        if self.probe and slot.probe is None:  # a probe
            if slot.success.any():
                episodes = self._episodes(slot)
                pending.append(
                    _Probe(slot.task, slot.state, slot.seed, slot.init_hash, slot.success, episodes)
                )
                return
            stats.groups_probe_dropped += 1  # all P failed: judged (and dropped) as a group of P
        elif slot.probe is not None:  # a completion: the probe's rollouts first
            success, first = np.concatenate([slot.probe.success, slot.success]), slot.probe.episodes
        self._finish_group(
            slot.state, slot.init_hash, success, lambda: first + self._episodes(slot), stats, acc
        )

    def _finish_group(
        self, state: int, init_hash: int, success: np.ndarray, episodes: Callable[[], list], stats, acc
    ) -> None:
        """The rollouts of one group (K; P for a failed probe): trackers, curriculum, and dynamic sampling's
        keep or drop. `episodes()` builds their records, only for a group that is kept."""
        stats.groups_sampled += 1
        rewards = success.astype(np.float32)  # (K,) binary task success
        self.seed_sampler.record(state, int(success.sum()), len(success))
        self.skip_tracker.update(init_hash, bool(success.all()))
        self.fail_tracker.update(init_hash, not success.any())
        if self.dynamic_sampling and not group_has_signal(rewards):
            stats.groups_dropped += 1
            if self.keep_solved and success.all():
                acc.solved.extend(episodes())
            return
        stats.groups_kept += 1
        acc.rewards.append(rewards)
        acc.kept.append(episodes())

    def _result(self, stats: CollectionStats, acc: _Collected, t0: float) -> CollectionResult:
        stats.rollouts_kept = acc.rollouts_kept
        stats.goal_reached = stats.rollouts_kept >= self.goal
        if not stats.goal_reached:
            logger.warning(
                "Collection stopped at max_groups=%d with %d/%d rollouts kept (%d groups without signal, "
                "%d faulted).",
                self.max_groups,
                stats.rollouts_kept,
                self.goal,
                stats.groups_dropped,
                stats.groups_faulted,
            )
        stats.success_rate = float(np.mean(acc.successes)) if acc.successes else 0.0
        if self.multi_task:
            stats.task_success_rate = {
                t.name: float(np.mean(s)) if s else float("nan")
                for t, s in zip(self.tasks, acc.task_successes, strict=True)
            }
        stats.wall_time_s = time.perf_counter() - t0
        stats.steps_per_second = stats.env_steps / max(stats.wall_time_s, 1e-9)
        group_rewards = np.stack(acc.rewards) if acc.rewards else np.zeros((0, self.k), np.float32)
        episodes = [ep for group in acc.kept for ep in group]
        if episodes:
            adv = rloo_advantages(torch.from_numpy(group_rewards)).reshape(-1).tolist()  # (G*K,)
            for ep, a in zip(episodes, adv, strict=True):
                ep.advantage = float(a)
        # solved groups: dropped ones are in `solved` (dynamic sampling), kept ones are in `episodes` (without)
        if self.keep_solved:
            solved_kept = [ep for g, r in zip(acc.kept, acc.rewards, strict=True) if r.all() for ep in g]
            for ep in acc.solved + solved_kept:
                ep.advantage = solved_advantage(self.k)
            stats.solved_rollouts = len(acc.solved) + len(solved_kept)
        return CollectionResult(
            episodes=episodes, group_rewards=group_rewards, stats=stats, solved_episodes=acc.solved
        )

    def _draw_state(self, stats: CollectionStats) -> int:
        """A fresh initial state of the sampler that neither tracker skips (after 100 draws, the last)."""
        for _ in range(100):
            state = self.seed_sampler()
            h = self._hash_for_seed(state)
            if not (self.skip_tracker.should_skip(h) or self.fail_tracker.should_skip(h)):
                break
            stats.skipped_states += 1
        return state

    def _start_slot(self, slot: _Slot, stats: CollectionStats, probe: _Probe | None = None) -> None:
        """Reset a slot on a fresh (non-skipped) initial state, equal seeds: a whole group of K, a probe of P, or
        (`probe` given) the K - P rollouts completing that probe. An env that faults marks the slot faulted."""
        if probe is not None:
            task, state, seed, size = probe.task, probe.state, probe.seed, self.k - self.probe
        else:
            state = self._draw_state(stats)
            task, seed = self.seed_sampler.split(state) if self.multi_task else (0, state)
            size = self.probe or self.k
        if (task, size) != (slot.task, slot.size):
            self._swap_env(slot, task, size)
        slot.probe = probe
        stats.episodes += size
        slot.state, slot.seed, slot.steps, slot.images, slot.faulted = state, seed, [], [], False
        try:
            obs, _ = slot.env.reset(seed=[seed] * size)
        except Exception as err:  # noqa: BLE001 - any env error costs this group only; counted and logged
            self._fault(slot, err)
            return
        if self.record_images and "pixels" not in obs:
            raise ValueError(
                "record_images=True, but the env's observations have no 'pixels' (camera images). Build the "
                "env with cameras (MetaWorld: obs_type='state_pixels'), or collect with record_images=False."
            )
        slot.obs = obs
        slot.init_hash = init_hash_of(self.tasks[task].name, obs["agent_pos"][0])
        if probe is not None and slot.init_hash != probe.init_hash:
            raise RuntimeError(
                f"seed {seed} of task {self.tasks[task].name!r} gave another initial state for the completion of "
                "its probe: probe_rollouts needs an env whose reset(seed=...) fixes the initial state."
            )
        self._seed_hash[state] = slot.init_hash
        slot.done = np.zeros(size, dtype=bool)
        slot.success = np.zeros(size, dtype=bool)

    def _hash_for_seed(self, state: int) -> int:
        """init_hash of a state seen before (states are seed-determined); -1 for a new one (never skipped)."""
        return self._seed_hash.get(state, -1)

    def _swap_env(self, slot: _Slot, task: int, size: int) -> None:
        """Give the slot a vector env of `task` with `size` sub-envs: a spare one, or a new one (built once, kept
        for reuse)."""
        spare = self._spare_envs.get((task, size))
        env = spare.pop() if spare else self._build_env(task, size)
        self._spare_envs.setdefault((slot.task, slot.size), []).append(slot.env)
        slot.env, slot.task = env, task

    def _fault(self, slot: _Slot, err: BaseException) -> None:
        logger.warning(
            "Env fault (%s: %s): dropping its group and rebuilding the env.", type(err).__name__, err
        )
        slot.faulted = True
        try:
            slot.env.close()
        except Exception:  # noqa: BLE001 - a broken env may fail to close; it is replaced below
            logger.debug("closing a faulted env failed", exc_info=True)
        slot.env = self._build_env(slot.task, slot.size)

    def _run_round(self, slots: list[_Slot], stats: CollectionStats) -> None:
        live = [s for s in slots if not s.faulted]
        if self._executor is not None and len(live) >= 2:
            self._run_pipelined([live[0::2], live[1::2]], stats)
        else:
            for _ in range(self.max_episode_steps):  # each chunk steps every live slot at least once
                live = _unfinished(live)
                if not live:
                    break
                self._step_chunk(live, self.policy(self._batch_obs(live)), stats)
        for slot in slots:  # horizon reached: the rest are truncated
            if slot.done is not None:
                slot.done[:] = True

    def _run_pipelined(self, halves: list[list[_Slot]], stats: CollectionStats) -> None:
        """Two halves of the slots, phase-shifted: while one half steps its envs with its chunk, the policy
        infers the other half's next chunk on the worker thread (torch releases the GIL in its kernels)."""
        switch = sys.getswitchinterval()
        # the worker dispatches hundreds of small torch ops, each re-taking the GIL from the stepping thread:
        # a short switch interval keeps it from waiting up to 5 ms per op
        sys.setswitchinterval(min(switch, SWITCH_INTERVAL_S))
        try:
            ready = _unfinished(halves[0])
            chunk = self.policy(self._batch_obs(ready)) if ready else None
            waiting = halves[1]
            for _ in range(2 * self.max_episode_steps):
                waiting = _unfinished(waiting)
                future = self._executor.submit(self.policy, self._batch_obs(waiting)) if waiting else None
                if ready:
                    self._step_chunk(ready, chunk, stats)
                chunk = future.result() if future is not None else None
                ready, waiting = waiting, ready
                if not ready and not _unfinished(waiting):
                    break
        finally:
            sys.setswitchinterval(switch)

    def _step_chunk(self, live: list[_Slot], chunk: np.ndarray, stats: CollectionStats) -> None:
        """Step every live slot through the chunk's actions (chunk rows: the slots' sub-envs, slot after slot)."""
        ends = np.cumsum([s.size for s in live])
        for j in range(chunk.shape[1]):
            for slot, end in zip(live, ends, strict=True):
                if not _finished(slot):
                    stats.env_steps += self._step_slot(slot, chunk[end - slot.size : end, j])
            if all(_finished(s) for s in live):
                break

    def _step_slot(self, slot: _Slot, actions: np.ndarray) -> int:
        alive = ~slot.done
        state = slot.obs["agent_pos"].astype(np.float32)
        try:
            obs, reward, terminated, truncated, info = slot.env.step(actions.astype(np.float32))
        except Exception as err:  # noqa: BLE001 - any env error costs this group only; counted and logged
            self._fault(slot, err)
            return 0
        if self.record_images and "pixels" in slot.obs:
            slot.images.append({c: v.copy() for c, v in slot.obs["pixels"].items()})
        slot.steps.append((state, actions.astype(np.float32), np.asarray(reward, np.float32), alive.copy()))
        success = np.asarray(info.get("is_success", info.get("success", np.zeros(slot.size))), dtype=bool)
        slot.success |= success & alive
        slot.done |= np.asarray(terminated, bool) | np.asarray(truncated, bool)
        if len(slot.steps) >= self.max_episode_steps:  # horizon: done now, so no chunk is inferred for it
            slot.done[:] = True
        slot.obs = obs
        return int(alive.sum())

    def _batch_obs(self, live: list[_Slot]) -> dict:
        """The live slots' batched observation; with several tasks also `task`, each row's instruction."""
        obs = _batch_obs(live)
        if self.multi_task:
            obs["task"] = [self.tasks[s.task].instruction for s in live for _ in range(s.size)]
        return obs

    def _episodes(self, slot: _Slot) -> list[EpisodeRecord]:
        states = np.stack([s[0] for s in slot.steps], axis=1)  # (K, T, S)
        actions = np.stack([s[1] for s in slot.steps], axis=1)  # (K, T, A)
        rewards = np.stack([s[2] for s in slot.steps], axis=1)  # (K, T)
        alive = np.stack([s[3] for s in slot.steps], axis=1)  # (K, T)
        episodes = []
        for k in range(slot.size):
            n = int(alive[k].sum())  # alive steps form a prefix
            images = None
            if slot.images:
                images = {c: np.stack([im[c][k] for im in slot.images[:n]]) for c in slot.images[0]}
            episodes.append(
                EpisodeRecord(
                    task=self.tasks[slot.task].instruction,
                    states=states[k, :n],
                    actions=actions[k, :n],
                    rewards=rewards[k, :n],
                    success=bool(slot.success[k]),
                    init_hash=slot.init_hash,
                    images=images,
                )
            )
        return episodes


def _finished(slot: _Slot) -> bool:
    """Faulted, or every sub-env of the group is done."""
    return slot.faulted or bool(slot.done.all())


def _unfinished(slots: list[_Slot]) -> list[_Slot]:
    return [s for s in slots if not _finished(s)]


def _batch_obs(live: list[_Slot]) -> dict:
    """One batched observation of the live slots' sub-envs, slot after slot."""
    obs = {k: np.concatenate([s.obs[k] for s in live]) for k in live[0].obs if k != "pixels"}
    if "pixels" in live[0].obs:
        obs["pixels"] = {
            cam: np.concatenate([s.obs["pixels"][cam] for s in live]) for cam in live[0].obs["pixels"]
        }
    return obs


def make_chunk_policy(
    policy,
    preprocessor,
    postprocessor,
    *,
    guidance_scale: float,
    n_action_steps: int,
    num_threads: int = 1,
    noise_scale: float = 1.0,
    task: str | None = None,
) -> ChunkPolicy:
    """Wrap a RiptPolicy and its processors into one batched call: vector-env obs -> (N, n_steps, A) numpy.

    noise_scale multiplies the initial flow noise (see `RiptPolicy.predict_action_chunk`). `task`: the language
    instruction, sent as the batch's `task` key (one copy per row, as LeRobot's rollout sends the env's
    `task_description`) for the tokenizer steps of vision-language-action preprocessors and a task-conditioned
    small backbone; None sends none. An `obs["task"]` (one string per row: a multi-task collector's) is sent
    instead.

    Inference of a small policy on a CPU runs on `num_threads` threads (1 by default: for small matrices,
    a second thread costs more in synchronisation than it gains, up to 4x on a loaded 2-core machine).
    """
    from lerobot.envs.utils import preprocess_observation

    def act(obs: dict) -> np.ndarray:
        threads = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            rows = obs.get("task")
            batch = preprocess_observation({k: v for k, v in obs.items() if k != "task"})
            if rows is not None:
                batch["task"] = list(rows)
            elif task is not None:
                batch["task"] = [task] * next(iter(batch.values())).shape[0]
            batch = preprocessor(batch)
            with torch.inference_mode():
                chunk = policy.predict_action_chunk(
                    batch, guidance_scale=guidance_scale, noise_scale=noise_scale
                )[:, :n_action_steps]
            return postprocessor(chunk).numpy()
        finally:
            torch.set_num_threads(threads)

    return act
