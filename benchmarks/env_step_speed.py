"""MetaWorldStateEnv steps per second with MetaWorld's scipy quaternions against the fast, exact ones.

For each task one `MetaWorldStateEnv` runs both variants: "scipy" with MetaWorld's own `_get_quat_objects`
(`Rotation.from_matrix(xmat).as_quat()`), "fast" with the bit-identical `quat_from_matrix`
(`lerobot_ript/envs/rotation.py`), which is the default. Each repeat runs one episode per variant from the
same seed with the same random actions, alternating which variant goes first, timed in CPU time of the
thread; steps/s are medians over repeats, the speed-up is the median of the per-repeat ratios. The
benchmark also checks that the two trajectories are bit-identical (observations, rewards, flags, infos)
and times `_get_quat_objects` alone. A task that does not use scipy (drawer-open-v3, run by default) is a
control: both variants are the same code there, so its ratio shows the noise of the measurement.

    python benchmarks/env_step_speed.py --tasks push-v3 pick-place-v3 door-open-v3 --steps 100 --repeats 15

Writes the JSON (default benchmarks/results/env_step_speed.json) and prints a short table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import timeit
from pathlib import Path

import numpy as np
from _common import cpu_name

from lerobot_ript.envs.metaworld import MetaWorldStateEnv

logger = logging.getLogger("env_step_speed")

VARIANTS = ("scipy", "fast")
# CPU time of this thread: unlike wall time it does not count the time other processes hold the cores. With
# wall time on a busy 2-core machine the control task's ratio (same code on both sides) ranged 0.83-1.20.
CLOCK = time.thread_time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["push-v3", "pick-place-v3", "door-open-v3", "stick-pull-v3", "drawer-open-v3"],
        help="MetaWorld v3 tasks to time; one that does not use scipy (drawer-open-v3) is a control whose "
        "ratio shows the noise of the measurement",
    )
    p.add_argument("--steps", type=int, default=100, help="env steps per repeat and variant, 1..499")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per task and variant (medians)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial states and of the random actions")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/env_step_speed.json"))
    args = p.parse_args(argv)
    if not 1 <= args.steps <= 499:
        p.error(f"--steps={args.steps} must be in 1..499 (MetaWorld raises at step 500)")
    if args.repeats < 1:
        p.error(f"--repeats={args.repeats} must be >= 1")
    return args


class QuaternionSwitch:
    """Switches ONE env between the variants, so that they differ in the quaternion code and nothing else.

    The fast variant is the method `_build_metaworld_env` put on the raw env; removing it exposes MetaWorld's.
    """

    def __init__(self, env: MetaWorldStateEnv) -> None:
        self._raw = env._env
        self._fast = vars(self._raw).get("_get_quat_objects")  # None where the task keeps MetaWorld's method

    def use(self, variant: str) -> None:
        if variant == "scipy" or self._fast is None:
            vars(self._raw).pop("_get_quat_objects", None)
        else:
            self._raw._get_quat_objects = self._fast


def run_episode(env: MetaWorldStateEnv, seed: int, actions: np.ndarray) -> tuple[float, bytes]:
    """(seconds for the steps, the bytes of every observation, reward, flag and info value)."""
    env.reset(seed=seed)
    steps = []
    start = CLOCK()
    for action in actions:
        steps.append(env.step(action))
    seconds = CLOCK() - start
    return seconds, b"".join(_as_bytes(step) for step in steps)


def _as_bytes(step: tuple) -> bytes:
    obs, reward, terminated, truncated, info = step
    values = [obs["agent_pos"], reward, terminated, truncated, *info.values()]
    return repr(list(info)).encode() + b"".join(np.asarray(v).tobytes() for v in values)


def time_task(task: str, args: argparse.Namespace) -> dict:
    env = MetaWorldStateEnv(task, episode_length=500, terminate_on_success=False)
    switch = QuaternionSwitch(env)
    rng = np.random.default_rng(args.seed)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    quat_us: dict[str, float] = {}
    identical = True
    try:
        for repeat in range(args.repeats + 1):  # repeat 0 warms up and is not timed
            actions = rng.uniform(-1, 1, (args.steps, 4)).astype(np.float32)
            trajectories = {}
            for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
                switch.use(variant)
                seconds, trajectories[variant] = run_episode(env, args.seed + repeat, actions)
                if repeat > 0:
                    times[variant].append(seconds)
            identical &= trajectories["scipy"] == trajectories["fast"]
        for variant in VARIANTS:
            switch.use(variant)
            get_quat = env._env._get_quat_objects
            quat_us[variant] = min(timeit.repeat(get_quat, number=200, repeat=5)) / 200 * 1e6
    finally:
        env.close()
    steps_per_s = {v: args.steps / statistics.median(times[v]) for v in VARIANTS}
    return {
        "patched": switch._fast is not None,
        "steps_per_s": steps_per_s,
        "ms_per_step": {v: 1e3 / steps_per_s[v] for v in VARIANTS},
        # Median over repeats of the paired ratio (both variants ran the same episode back to back).
        "fast_over_scipy": statistics.median(
            a / b for a, b in zip(times["scipy"], times["fast"], strict=True)
        ),
        "seconds_per_repeat": times,
        "get_quat_objects_us": quat_us,
        "bit_identical": identical,
    }


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    args = parse_args(argv)
    results = {task: time_task(task, args) for task in args.tasks}
    res = {
        "command": "python benchmarks/env_step_speed.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_name(),
        "load_average_1min": os.getloadavg()[0],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tasks": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2) + "\n")
    lines = [
        f"{args.steps} steps x {args.repeats} interleaved repeats, thread CPU time, {res['cpu']}, "
        f"1-min load average {res['load_average_1min']:.2f}",
        "| task | scipy steps/s | fast steps/s | fast / scipy | _get_quat_objects us (scipy -> fast) | "
        "bit-identical |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for task, r in results.items():
        name = task if r["patched"] else f"{task} (control)"
        lines.append(
            f"| {name} | {r['steps_per_s']['scipy']:.0f} | {r['steps_per_s']['fast']:.0f} | "
            f"{r['fast_over_scipy']:.3f}x | {r['get_quat_objects_us']['scipy']:.1f} -> "
            f"{r['get_quat_objects_us']['fast']:.1f} | {r['bit_identical']} |"
        )
    logger.info("%s", "\n".join(lines))
    logger.info("wrote %s", args.output)
    if not all(r["bit_identical"] for r in results.values()):
        raise SystemExit("The fast quaternions changed a trajectory: they must be bit-identical.")
    return res


if __name__ == "__main__":
    main()
