"""Rollout throughput: our GroupedCollector vs LeRobot's `rollout` vs random actions, same envs, same policy.

All three step `num_envs` sub-envs of the same MetaWorld state env (`metaworld_state`, SyncVectorEnv, sub-envs
frozen once their episode ends) for one episode of `episode_length` steps, and count env steps of live
sub-envs (steps of finished, frozen sub-envs are not counted). The policy is the same small `ript` policy
(hidden 256, chunk 8, 4 executed actions per chunk, 10 Euler steps), built by LeRobot's `make_policy` from a
few scripted demos; its weights are untrained, which does not change its cost.

- ours: `GroupedCollector` with `make_chunk_policy`, num_envs / K groups of K = `--group-size` (default 2), one
  vector env of K per initial state, all slots batched into ONE policy call per chunk, dynamic sampling off, one
  round per repeat. The training configs' layout (8 groups per round, K = 8) is `--num-envs 64 --group-size 8`.
  Also `ours_one_group`: one slot of K = num_envs, the same vector-env layout as LeRobot's.
- lerobot: `lerobot.scripts.lerobot_eval.rollout` on `make_env`'s vector env of num_envs, with the env and
  policy processors LeRobot's eval uses (`make_env_pre_post_processors`, `make_pre_post_processors`). Run at
  the process's torch thread count (what `lerobot-eval` gets) and at 1 thread (what our collector uses for
  inference), so the ratio is shown with and without the thread setting.
- random: the same vector env stepped with uniform random actions, no policy: the ceiling.
- ours_overlap: ours with `overlap_inference=True`: half of the groups step while the other half's next chunk is
  inferred on a worker thread.
- ours_no_inference (diagnostic): our collector (same layout as ours) with a zero-cost random chunk policy, i.e. the
  collector's own cost on top of the env; and `ours_inference_share`: the share of our wall time spent inside
  the batched policy call.

Repeats are interleaved (each repeat runs every variant once, in a rotated order) and medians reported. Target:
ours >= 0.95x random (re-set from 0.8x; the earlier ours >= 1.5x LeRobot is still printed: LeRobot's loop itself
runs at about 0.9x random at 64 envs, so 1.5x of it is above the ceiling).

    python benchmarks/rollout_throughput.py --task push-v3 --num-envs 8 --episode-length 150 --repeats 3 \\
        --output benchmarks/results/rollout_throughput.json

Multi-task collection (`--tasks mt3`, or a comma-separated list) runs only these two instead, on the same layout
(num_envs / K groups of K per round), and reports their ratio (target >= 0.95: at most 5% slower):
- ours_per_task: for each task, our single-task collector with an untrained single-task policy (no task input;
  the instruction sent as `task`, as the training loop does); env steps and seconds summed over the tasks.
- ours_multi_task: ONE collector over all the tasks (groups cycling through the tasks, so every round steps an
  equal mix, each group in an env of its task, each row's instruction in `obs["task"]`) with the same policy
  conditioned on the tasks (`task_names`, the task embedding looked up per row); as many collect() calls as tasks.
Every env both variants use is built before timing (an untimed one-step collect), so only collection is timed.

    python benchmarks/rollout_throughput.py --tasks mt3 --num-envs 12 --group-size 2 --repeats 5 \\
        --output benchmarks/results/rollout_throughput_multitask.json

`--profile` also writes a cProfile of one collect() call next to the output (`*_profile.txt`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("rollout_throughput")

TARGET_VS_LEROBOT = 1.5
TARGET_VS_RANDOM = 0.95
TARGET_MULTI_VS_PER_TASK = 0.95


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="push-v3", help="MetaWorld v3 task (default: push-v3).")
    parser.add_argument(
        "--num-envs", type=int, default=8, help="Sub-envs stepped together, even, >= 2 (default 8)."
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=2,
        help="K, rollouts per initial state in `ours` (default 2; training configs use 8).",
    )
    parser.add_argument(
        "--episode-length", type=int, default=150, help="Episode horizon in steps (default 150)."
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats of every variant (default 3).")
    parser.add_argument(
        "--demos", type=int, default=3, help="Scripted demos the policy is built from (default 3)."
    )
    parser.add_argument(
        "--output",
        default="benchmarks/results/rollout_throughput.json",
        help="JSON results; a .md goes beside it.",
    )
    parser.add_argument("--profile", action="store_true", help="Also cProfile one collect() call.")
    parser.add_argument(
        "--tasks",
        default=None,
        help="Compare multi-task collection over these tasks (a named set such as mt3, or a comma-separated "
        "list) against single-task collection of each; replaces the other variants.",
    )
    return parser


class Seeds:
    """The benchmarks' seed sampler: a fresh initial state per group (seeds 1, 2, ...). With several tasks a
    drawn state's task cycles through them (`split`), so every round of a multi-task collector steps an equal mix
    when its slots are a multiple of the tasks."""

    def __init__(self, num_tasks: int = 1) -> None:
        self.n, self.num_tasks = 0, num_tasks

    def __call__(self) -> int:
        self.n += 1
        return self.n

    def split(self, state: int) -> tuple[int, int]:
        return (state - 1) % self.num_tasks, state

    def record(self, state: int, successes: int, trials: int) -> None:
        """Outcomes are not used (no curriculum)."""


# ------------------------------------------------------------------------------------------------- setup
def build_policy(
    task: str | list[str], demos: int, episode_length: int, workdir: Path, task_names: list[str] | None = None
):
    """The small ript policy (hidden 256, chunk 8, 4 executed, 10 Euler steps) and its processors; `task_names`:
    conditioned on those tasks (seeded alike, so it has the same other weights as the policy without)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    from lerobot_ript.data.record_demos import demos_repo_id, record_demos
    from lerobot_ript.policy.configuration_ript import RiptConfig

    root = workdir / "demos"
    if not (root / "meta" / "info.json").exists():
        record_demos(task, demos, 0.3, root, episode_length=episode_length)
    meta = LeRobotDatasetMetadata(demos_repo_id(task), root=root)
    cfg = RiptConfig(
        device="cpu",
        hidden_dim=256,
        chunk_size=8,
        n_action_steps=4,
        num_inference_steps=10,
        task_names=task_names,
    )
    torch.manual_seed(0)
    policy = make_policy(cfg, ds_meta=meta)
    policy.eval()
    pre, post = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    return policy, pre, post


def alive_steps(done: torch.Tensor) -> int:
    """Env steps of live sub-envs from LeRobot's cumulative `done` (batch, T): each env steps until its first
    done, inclusive (rollout marks every env done at the last step)."""
    return int((~done).sum() + done.shape[0])


class Variants:
    """One callable per variant: run one episode of every sub-env, return (env steps, seconds)."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from lerobot.envs.factory import make_env, make_env_pre_post_processors

        from lerobot_ript.envs.metaworld import MetaWorldStateEnvConfig, make_vector_env
        from lerobot_ript.rollout.collector import GroupedCollector, make_chunk_policy

        self.n, self.length = args.num_envs, args.episode_length
        self.policy, self.pre, self.post = build_policy(args.task, args.demos, args.episode_length, workdir)
        self.env_cfg = MetaWorldStateEnvConfig(task=args.task, episode_length=args.episode_length)
        self.env = make_env(self.env_cfg, n_envs=self.n)[self.env_cfg.type][0]
        self.env_pre, self.env_post = make_env_pre_post_processors(self.env_cfg, self.policy.config)
        chunk_policy = make_chunk_policy(
            self.policy, self.pre, self.post, guidance_scale=1.0, n_action_steps=4
        )
        self._next_seed, self.policy_seconds = Seeds(), 0.0
        self.rng = np.random.default_rng(0)

        def timed_policy(obs: dict) -> np.ndarray:
            t0 = time.perf_counter()
            chunk = chunk_policy(obs)
            self.policy_seconds += time.perf_counter() - t0
            return chunk

        def no_inference(obs: dict) -> np.ndarray:
            return self.rng.uniform(-1, 1, (len(obs["agent_pos"]), 4, 4)).astype(np.float32)

        def collector(k: int, policy=timed_policy, overlap: bool = False) -> GroupedCollector:
            return GroupedCollector(
                lambda: make_vector_env(self.env_cfg, k),
                policy,
                task=args.task,
                group_size=k,
                num_slots=self.n // k,
                goal_rollouts=self.n,
                max_groups=self.n // k,
                seed_sampler=self._next_seed,
                dynamic_sampling=False,
                max_episode_steps=self.length,
                overlap_inference=overlap,
            )

        self.collectors = {
            "ours": collector(args.group_size),
            "ours_overlap": collector(args.group_size, overlap=True),
            "ours_one_group": collector(self.n),
            "ours_no_inference": collector(args.group_size, no_inference),
        }
        self.threads = torch.get_num_threads()

    def close(self) -> None:
        self.env.close()
        for c in self.collectors.values():
            c.close()

    def ours(self, name: str = "ours") -> tuple[int, float]:
        self.policy_seconds = 0.0
        stats = self.collectors[name].collect().stats
        return stats.env_steps, stats.wall_time_s

    def lerobot(self, threads: int) -> tuple[int, float]:
        from lerobot.scripts import lerobot_eval

        seeds = [self._next_seed() for _ in range(self.n)]
        previous, no_bar = torch.get_num_threads(), lerobot_eval.inside_slurm
        torch.set_num_threads(threads)
        # rollout() shows a progress bar unless inside_slurm(); turned off (which only makes LeRobot faster)
        lerobot_eval.inside_slurm = lambda: True
        try:
            t0 = time.perf_counter()
            out = lerobot_eval.rollout(
                self.env, self.policy, self.env_pre, self.env_post, self.pre, self.post, seeds=seeds
            )
            seconds = time.perf_counter() - t0
        finally:
            torch.set_num_threads(previous)
            lerobot_eval.inside_slurm = no_bar
        return alive_steps(out["done"]), seconds

    def warm_up(self) -> None:
        """First inference through both paths and first resets, untimed (lazy imports and allocations)."""
        from lerobot.envs.utils import preprocess_observation

        obs, _ = self.env.reset(seed=list(range(self.n)))
        self.collectors["ours"].policy(obs)
        self.policy.reset()
        with torch.inference_mode():
            self.policy.select_action(self.pre(preprocess_observation(obs)))
        for collector in self.collectors.values():
            for slot in collector.slots:
                slot.env.reset(seed=[0] * slot.env.num_envs)

    def random(self) -> tuple[int, float]:
        seeds = [self._next_seed() for _ in range(self.n)]
        t0 = time.perf_counter()
        self.env.reset(seed=seeds)
        done, steps = np.zeros(self.n, bool), 0
        for _ in range(self.length):
            actions = self.rng.uniform(-1, 1, (self.n, 4)).astype(np.float32)
            _, _, terminated, truncated, _ = self.env.step(actions)
            steps += int((~done).sum())
            done |= terminated | truncated
            if done.all():
                break
        return steps, time.perf_counter() - t0

    def table(self) -> dict[str, Callable[[], tuple[int, float]]]:
        return {
            "ours": lambda: self.ours("ours"),
            "ours_overlap": lambda: self.ours("ours_overlap"),
            "ours_one_group": lambda: self.ours("ours_one_group"),
            "ours_no_inference": lambda: self.ours("ours_no_inference"),
            "lerobot": lambda: self.lerobot(self.threads),
            "lerobot_1thread": lambda: self.lerobot(1),
            "random": self.random,
        }


class MultiTaskVariants:
    """ours_per_task and ours_multi_task (see the module docstring): one sample = (env steps, seconds) over one
    collect() per task, of each task's collector or of the multi-task one."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from lerobot_ript.envs.metaworld import MetaWorldStateEnvConfig, make_vector_env, task_instruction
        from lerobot_ript.rollout.collector import CollectTask, GroupedCollector, make_chunk_policy

        self.env_cfg = MetaWorldStateEnvConfig(task=args.tasks, episode_length=args.episode_length)
        self.tasks = self.env_cfg.tasks
        k, n = args.group_size, args.num_envs
        plain, pre, post = build_policy(self.tasks, args.demos, args.episode_length, workdir)
        tasked, _, _ = build_policy(
            self.tasks, args.demos, args.episode_length, workdir, task_names=self.tasks
        )

        def collector(policy, seeds: Seeds, **task_args) -> GroupedCollector:
            return GroupedCollector(
                policy=policy,
                group_size=k,
                num_slots=n // k,
                goal_rollouts=n,
                max_groups=n // k,
                seed_sampler=seeds,
                dynamic_sampling=False,
                max_episode_steps=args.episode_length,
                **task_args,
            )

        def env_of(task: str):
            return lambda: make_vector_env(self.env_cfg, k, task=task)

        self.per_task = [
            collector(
                make_chunk_policy(
                    plain, pre, post, guidance_scale=1.0, n_action_steps=4, task=task_instruction(task)
                ),
                Seeds(),
                make_group_env=env_of(task),
                task=task,
                instruction=task_instruction(task),
            )
            for task in self.tasks
        ]
        self.multi_task = collector(
            make_chunk_policy(tasked, pre, post, guidance_scale=1.0, n_action_steps=4),
            Seeds(len(self.tasks)),
            tasks=[CollectTask(t, task_instruction(t), env_of(t)) for t in self.tasks],
        )
        self.length = args.episode_length

    def warm_up(self) -> None:
        """One-step collects: first inference of both policies, and every env the multi-task collector swaps in."""
        for c in [*self.per_task, self.multi_task]:
            c.max_episode_steps = 1
            c.collect()
            c.max_episode_steps = self.length

    def _collect(self, collectors) -> tuple[int, float]:
        """Env steps and wall seconds of one collect() per collector; the process's CPU seconds go to `cpu_s`."""
        cpu = time.process_time()
        stats = [c.collect().stats for c in collectors]
        self.cpu_s = time.process_time() - cpu
        return sum(s.env_steps for s in stats), sum(s.wall_time_s for s in stats)

    def table(self) -> dict[str, Callable[[], tuple[int, float]]]:
        return {
            "ours_per_task": lambda: self._collect(self.per_task),
            "ours_multi_task": lambda: self._collect([self.multi_task] * len(self.tasks)),
        }

    def close(self) -> None:
        for c in [*self.per_task, self.multi_task]:
            c.close()


def run_multi_task(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        variants = MultiTaskVariants(args, Path(tmp))
        try:
            variants.warm_up()
            samples = interleaved_samples(variants.table(), args.repeats, cpu_seconds=lambda: variants.cpu_s)
        finally:
            variants.close()
    medians = {name: statistics.median(s["steps_per_s"] for s in runs) for name, runs in samples.items()}
    cpu_medians = {
        name: statistics.median(s["steps_per_cpu_s"] for s in runs) for name, runs in samples.items()
    }
    multi, per = samples["ours_multi_task"], samples["ours_per_task"]
    ratios = {
        "multi_task_vs_per_task": medians["ours_multi_task"] / medians["ours_per_task"],
        # each repeat's two runs are adjacent in time: the median of their ratios cancels slow load drift
        "multi_task_vs_per_task_paired": statistics.median(
            m["steps_per_s"] / p["steps_per_s"] for m, p in zip(multi, per, strict=True)
        ),
        # env steps per CPU second of this process: what other processes on a shared machine change least
        "multi_task_vs_per_task_cpu": cpu_medians["ours_multi_task"] / cpu_medians["ours_per_task"],
    }
    return {
        "config": {
            "tasks": variants.tasks,
            "num_envs": args.num_envs,
            "group_size": args.group_size,
            "episode_length": args.episode_length,
            "repeats": args.repeats,
            "policy": "ript small: hidden 256, 3 denoiser layers, chunk 8, n_action_steps 4, 10 Euler steps, "
            "untrained, guidance 1; ours_multi_task's is conditioned on the tasks (task_names)",
            "layout": f"{args.num_envs // args.group_size} groups x K={args.group_size} per round",
        },
        "machine": machine(),
        "median_steps_per_s": medians,
        "median_steps_per_cpu_s": cpu_medians,
        "ratios": ratios,
        "targets": {
            f"{k}>={TARGET_MULTI_VS_PER_TASK}": v >= TARGET_MULTI_VS_PER_TASK for k, v in ratios.items()
        },
        "samples": samples,
    }


def interleaved_samples(
    table: dict[str, Callable[[], tuple[int, float]]], repeats: int, cpu_seconds: Callable[[], float]
) -> dict[str, list[dict]]:
    """Each repeat runs every variant once, in a rotated order; one sample per run (`cpu_seconds()`: the CPU
    seconds of the run just made)."""
    samples: dict[str, list[dict]] = {name: [] for name in table}
    names = list(table)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            steps, seconds = table[name]()
            cpu = cpu_seconds()
            samples[name].append(
                {
                    "env_steps": steps,
                    "seconds": seconds,
                    "cpu_seconds": cpu,
                    "steps_per_s": steps / seconds,
                    "steps_per_cpu_s": steps / cpu,
                }
            )
            logger.info(
                "repeat %d %-16s %6d steps %6.2f s (%.2f s CPU) %7.0f steps/s",
                r,
                name,
                steps,
                seconds,
                cpu,
                steps / seconds,
            )
    return samples


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_markdown_multi_task(results: dict, path: Path) -> None:
    c, m, r = results["config"], results["median_steps_per_s"], results["ratios"]
    lines = [
        "# Rollout throughput: multi-task collection",
        "",
        f"{', '.join(c['tasks'])}; {c['layout']}; episode length {c['episode_length']}; {c['repeats']} interleaved "
        f"repeats (medians); {c['policy']}. Machine: {results['machine']['cpus']} CPUs, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in results['machine']['load_average_at_end'])}.",
        "",
        "| variant | env steps/s (median) | runs | env steps per CPU second (median) |",
        "| --- | ---: | --- | ---: |",
    ]
    for name, value in m.items():
        runs = ", ".join(f"{s['steps_per_s']:.0f}" for s in results["samples"][name])
        lines.append(f"| {name} | {value:.0f} | {runs} | {results['median_steps_per_cpu_s'][name]:.0f} |")
    lines += ["", "| ratio | value | target |", "| --- | ---: | --- |"]
    lines += [f"| {k} | {v:.3f} | >= {TARGET_MULTI_VS_PER_TASK} |" for k, v in r.items()]
    lines += [
        "",
        "Ratios: of the wall-clock medians; the median over repeats of the ratio of the two adjacent runs (`_paired`);"
        " of the medians of env steps per CPU second of this process (`_cpu`, least changed by other processes on a"
        " shared machine).",
        "",
        "`ours_per_task`: one single-task collector per task (its policy has no task input), one collect() each;"
        " `ours_multi_task`: one collector drawing groups across the tasks (each in an env of its task, each row's"
        " instruction in the batch, a task-conditioned policy), as many collect() calls. Both step the same number"
        " of episodes of each task per repeat. Env physics time varies by about 20% between identical runs on a"
        " loaded machine; compare ratios from the same run only.",
        "",
    ]
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------- running
def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        variants = Variants(args, Path(tmp))
        try:
            table = variants.table()
            variants.warm_up()
            samples: dict[str, list[dict]] = {name: [] for name in table}
            names = list(table)
            for r in range(args.repeats):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    steps, seconds = table[name]()
                    sample = {"env_steps": steps, "seconds": seconds, "steps_per_s": steps / seconds}
                    if name in ("ours", "ours_one_group"):
                        sample["policy_seconds"] = variants.policy_seconds
                    samples[name].append(sample)
                    logger.info(
                        "repeat %d %-16s %6d steps %6.2f s %7.0f steps/s",
                        r,
                        name,
                        steps,
                        seconds,
                        steps / seconds,
                    )
            profile = profile_collect(variants) if args.profile else None
        finally:
            variants.close()
    medians = {name: statistics.median(s["steps_per_s"] for s in runs) for name, runs in samples.items()}
    ratios = {
        "ours_vs_lerobot": medians["ours"] / medians["lerobot"],
        "ours_vs_lerobot_1thread": medians["ours"] / medians["lerobot_1thread"],
        "ours_vs_random": medians["ours"] / medians["random"],
        "ours_overlap_vs_lerobot": medians["ours_overlap"] / medians["lerobot"],
        "ours_overlap_vs_lerobot_1thread": medians["ours_overlap"] / medians["lerobot_1thread"],
        "ours_overlap_vs_random": medians["ours_overlap"] / medians["random"],
        "ours_one_group_vs_lerobot": medians["ours_one_group"] / medians["lerobot"],
        "ours_one_group_vs_random": medians["ours_one_group"] / medians["random"],
        "ours_no_inference_vs_random": medians["ours_no_inference"] / medians["random"],
        "ours_inference_share": statistics.median(
            s["policy_seconds"] / s["seconds"] for s in samples["ours"]
        ),
    }
    return {
        "config": {
            "task": args.task,
            "num_envs": args.num_envs,
            "episode_length": args.episode_length,
            "repeats": args.repeats,
            "policy": "ript small: hidden 256, 3 denoiser layers, chunk 8, n_action_steps 4, 10 Euler steps, "
            "untrained, guidance 1",
            "ours_layout": (
                f"{args.num_envs // args.group_size} groups x K={args.group_size} (ours), "
                f"1 group x K={args.num_envs} (ours_one_group)"
            ),
        },
        "machine": machine(),
        "median_steps_per_s": medians,
        "ratios": ratios,
        "targets": {
            f"ours_vs_lerobot>={TARGET_VS_LEROBOT}": ratios["ours_vs_lerobot"] >= TARGET_VS_LEROBOT,
            f"ours_vs_random>={TARGET_VS_RANDOM}": ratios["ours_vs_random"] >= TARGET_VS_RANDOM,
            f"ours_overlap_vs_lerobot>={TARGET_VS_LEROBOT}": ratios["ours_overlap_vs_lerobot"]
            >= TARGET_VS_LEROBOT,
            f"ours_overlap_vs_random>={TARGET_VS_RANDOM}": ratios["ours_overlap_vs_random"]
            >= TARGET_VS_RANDOM,
        },
        "samples": samples,
        "profile_top": profile,
    }


def profile_collect(variants: Variants) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    variants.ours("ours")
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(35)
    return out.getvalue()


def write_markdown(results: dict, path: Path) -> None:
    c, m, r = results["config"], results["median_steps_per_s"], results["ratios"]
    lines = [
        "# Rollout throughput",
        "",
        f"{c['task']}, {c['num_envs']} sub-envs, episode length {c['episode_length']}, {c['repeats']} interleaved "
        f"repeats (medians); {c['policy']}. Machine: {results['machine']['cpus']} CPUs, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in results['machine']['load_average_at_end'])}.",
        "",
        "| variant | env steps/s (median) | runs |",
        "| --- | ---: | --- |",
    ]
    for name, value in m.items():
        runs = ", ".join(f"{s['steps_per_s']:.0f}" for s in results["samples"][name])
        lines.append(f"| {name} | {value:.0f} | {runs} |")
    lines += ["", "| ratio | value | target |", "| --- | ---: | --- |"]
    targets = {
        f"{v}_vs_{base}": f">= {target}"
        for v in ("ours", "ours_overlap")
        for base, target in (("lerobot", TARGET_VS_LEROBOT), ("random", TARGET_VS_RANDOM))
    }
    for name, value in r.items():
        lines.append(f"| {name} | {value:.2f} | {targets.get(name, '')} |")
    lerobot = [x["steps_per_s"] for x in results["samples"]["lerobot"]]
    lines += [
        "",
        f"Layout: {c['ours_layout']}.",
        "",
        "Reading the numbers:",
        f"- `lerobot` runs torch at the process default ({results['machine']['torch_threads_default']} threads here),"
        " as `lerobot-eval` does; our collector runs inference on 1 thread. On a shared machine, multi-threaded"
        " inference stalls whenever another process holds a core, so this baseline swings with the load"
        f" (here {min(lerobot):.0f} to {max(lerobot):.0f} steps/s). `lerobot_1thread` compares the pipelines alone.",
        "- `ours_overlap` is `ours` with `overlap_inference=True` (`rollout.overlap_inference`): half of the"
        " groups step their envs while the policy infers the other half's next chunk on a worker thread.",
        "- `ours_inference_share` is the share of our wall time inside the batched policy call;"
        " `ours_no_inference` is the same collector with a zero-cost policy: the collector's own overhead on top"
        " of the env.",
        "- Env physics time varies by about 20% between identical runs on a loaded machine; compare ratios from"
        " the same run only.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.group_size < 2 or args.num_envs < args.group_size or args.num_envs % args.group_size:
        raise SystemExit(
            f"--num-envs={args.num_envs} must be a multiple of --group-size={args.group_size} (>= 2): "
            "the envs are split into groups of K."
        )
    if args.repeats < 1:
        raise SystemExit(f"--repeats={args.repeats} must be >= 1.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")  # MetaWorld's scripted expert
    if args.tasks is not None:
        return main_multi_task(args)
    results = run(args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    profile = results.pop("profile_top")
    out.write_text(json.dumps(results, indent=2))
    write_markdown(results, out.with_suffix(".md"))
    if profile:
        out.with_name(out.stem + "_profile.txt").write_text(profile)
    m, r = results["median_steps_per_s"], results["ratios"]
    print(
        f"ours {m['ours']:.0f} steps/s | LeRobot rollout {m['lerobot']:.0f} ({m['lerobot_1thread']:.0f} on 1 thread)"
        f" | random {m['random']:.0f} | ours/LeRobot {r['ours_vs_lerobot']:.2f}x (target >= {TARGET_VS_LEROBOT}) | "
        f"ours/random {r['ours_vs_random']:.2f}x (target >= {TARGET_VS_RANDOM}) | ours_overlap {m['ours_overlap']:.0f}"
        f" steps/s: /LeRobot {r['ours_overlap_vs_lerobot']:.2f}x, /random {r['ours_overlap_vs_random']:.2f}x"
        f" | results in {out}"
    )
    return 0


def main_multi_task(args: argparse.Namespace) -> int:
    results = run_multi_task(args)
    out = Path(args.output)
    if out == Path(build_parser().get_default("output")):
        out = out.with_name("rollout_throughput_multitask.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    write_markdown_multi_task(results, out.with_suffix(".md"))
    m, r = results["median_steps_per_s"], results["ratios"]
    print(
        f"multi-task {m['ours_multi_task']:.0f} steps/s | per task {m['ours_per_task']:.0f} steps/s | multi/per-task "
        f"{r['multi_task_vs_per_task']:.3f}x, paired {r['multi_task_vs_per_task_paired']:.3f}x, per CPU second "
        f"{r['multi_task_vs_per_task_cpu']:.3f}x (target >= {TARGET_MULTI_VS_PER_TASK}) | results in {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
