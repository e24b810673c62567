"""MetaWorldStateEnv steps per second with MetaWorld's scipy quaternions against the fast, exact ones.

For each task two `MetaWorldStateEnv`s are built: "scipy" runs MetaWorld's own `_get_quat_objects`
(`Rotation.from_matrix(xmat).as_quat()`), "fast" the bit-identical `quat_from_matrix`
(`lerobot_ript/envs/rotation.py`), which is the default. Each repeat resets both to the same seed and steps
them through the same random actions, the two variants in alternating order so that other load on the
machine hits both alike; the reported numbers are medians over repeats. The benchmark also checks that the
two trajectories are bit-identical (observations, rewards, infos) and records `_get_quat_objects` alone.

    python benchmarks/env_step_speed.py --tasks push-v3 pick-place-v3 door-open-v3 --steps 200 --repeats 9

Writes the JSON (default benchmarks/results/env_step_speed.json) and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
import timeit
from pathlib import Path

import numpy as np

from lerobot_ript.envs.metaworld import MetaWorldStateEnv, _build_metaworld_env

logger = logging.getLogger("env_step_speed")

VARIANTS = ("scipy", "fast")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["push-v3", "pick-place-v3", "door-open-v3", "stick-pull-v3"],
        help="MetaWorld v3 tasks to time (tasks that do not use scipy give a ratio of about 1)",
    )
    p.add_argument("--steps", type=int, default=200, help="env steps per repeat and variant, 1..499")
    p.add_argument("--repeats", type=int, default=9, help="timed repeats per task and variant (medians)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial states and of the random actions")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/env_step_speed.json"))
    args = p.parse_args(argv)
    if not 1 <= args.steps <= 499:
        p.error(f"--steps={args.steps} must be in 1..499 (MetaWorld raises at step 500)")
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} must be >= 1")
    return args


def build(task: str) -> dict[str, MetaWorldStateEnv]:
    envs = {}
    for variant in VARIANTS:
        env = MetaWorldStateEnv(task, episode_length=500, terminate_on_success=False)
        if variant == "scipy":  # the same wrapper around a raw env that keeps MetaWorld's method
            env._env.close()
            env._env = _build_metaworld_env(task, fast_quaternions=False)
        envs[variant] = env
    return envs


def run_episode(env: MetaWorldStateEnv, seed: int, actions: np.ndarray) -> tuple[float, bytes]:
    """(seconds for the steps, the bytes of every observation, reward and info value)."""
    env.reset(seed=seed)
    record = []
    start = time.perf_counter()
    for action in actions:
        record.append(env.step(action))
    seconds = time.perf_counter() - start
    flat = b"".join(
        np.asarray(obs["agent_pos"]).tobytes()
        + np.float64(reward).tobytes()
        + b"".join(np.asarray(v).tobytes() for v in info.values())
        for obs, reward, _, _, info in record
    )
    return seconds, flat


def time_task(task: str, args: argparse.Namespace) -> dict:
    envs = build(task)
    rng = np.random.default_rng(args.seed)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    identical = True
    try:
        for repeat in range(args.repeats + 1):  # repeat 0 warms up and is not timed
            actions = rng.uniform(-1, 1, (args.steps, 4)).astype(np.float32)
            order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]
            trajectories = {}
            for variant in order:
                seconds, trajectories[variant] = run_episode(envs[variant], args.seed + repeat, actions)
                if repeat > 0:
                    times[variant].append(seconds)
            identical &= trajectories["scipy"] == trajectories["fast"]
        quat_us = {}
        for variant, env in envs.items():
            get_quat = env._env._get_quat_objects
            quat_us[variant] = min(timeit.repeat(get_quat, number=200, repeat=5)) / 200 * 1e6
    finally:
        for env in envs.values():
            env.close()
    steps_per_s = {v: args.steps / statistics.median(times[v]) for v in VARIANTS}
    return {
        "steps_per_s": steps_per_s,
        "ms_per_step": {v: 1e3 / steps_per_s[v] for v in VARIANTS},
        "fast_over_scipy": steps_per_s["fast"] / steps_per_s["scipy"],
        "get_quat_objects_us": quat_us,
        "bit_identical": identical,
    }


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    args = parse_args(argv)
    results = {task: time_task(task, args) for task in args.tasks}
    res = {
        "command": "python benchmarks/env_step_speed.py " + " ".join(argv if argv is not None else _argv()),
        "cpu": _cpu_name(),
        "load_average_1min": os.getloadavg()[0],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tasks": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        f"{args.steps} steps x {args.repeats} interleaved repeats (medians), {res['cpu']}, "
        f"1-min load average {res['load_average_1min']:.2f}",
        "| task | scipy steps/s | fast steps/s | fast / scipy | _get_quat_objects us (scipy -> fast) | "
        "bit-identical |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task, r in results.items():
        lines.append(
            f"| {task} | {r['steps_per_s']['scipy']:.0f} | {r['steps_per_s']['fast']:.0f} | "
            f"{r['fast_over_scipy']:.3f}x | {r['get_quat_objects_us']['scipy']:.1f} -> "
            f"{r['get_quat_objects_us']['fast']:.1f} | {r['bit_identical']} |"
        )
    logger.info("%s", "\n".join(lines))
    logger.info("wrote %s", args.output)
    if not all(r["bit_identical"] for r in results.values()):
        raise SystemExit("The fast quaternions changed a trajectory: they must be bit-identical.")
    return res


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
