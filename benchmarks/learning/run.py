"""Learning benchmark: SFT -> RIPT against five baselines at an equal budget of environment episodes.

    python benchmarks/learning/run.py sft                 # demos + the shared SFT checkpoint (+ held-out eval)
    python benchmarks/learning/run.py arm --arm ript --seed 0
    python benchmarks/learning/run.py report              # RESULTS.md + success.png from every finished run
    python benchmarks/learning/run.py guidance --run <run dir> --scales 1 2 3   # eval guidance sweep
        [--negatives null bad] [--noise-scales 1 0.5 0] [--reference <SFT run dir>]
    python benchmarks/learning/run.py regions --run <run dir>   # held-out success by puck / goal position
    python benchmarks/learning/run.py branches --run <run dir>  # how far guidance moves the sampled actions
    python benchmarks/learning/run.py all [--quick] [--seeds 0 1 2] [--arms ript bc ...] [--jobs 2]
    python benchmarks/learning/run.py all --arms ript filtered --seeds 0 --out benchmarks/learning/runs_3840 \
        --set rollout.max_train_episodes=3840 eval.eval_interval=10   # a larger budget (link runs/sft there)
    python benchmarks/learning/run.py extend --from benchmarks/learning/runs --out benchmarks/learning/runs_2560 \
        --arms ript --seeds 0 --set rollout.max_train_episodes=2560   # finished runs go on to a larger budget
    python benchmarks/learning/run.py all --task drawer-open-v3 --num-demos 10 --demo-noise 0.5 \
        --episode-length 200 --arms ript filtered --out benchmarks/learning/runs_drawer   # another task

Every arm starts from the same SFT checkpoint and stops after `rollout.max_train_episodes` training rollouts;
success is measured on held-out initial states (seeds >= 1,000,000, never trained on) with 200 episodes per
point and a 95% Wilson interval. `--quick` shrinks everything to a seconds-long smoke run (used by the tests;
its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASE = HERE / "base.yaml"

# Where rollouts are spent and how successes are drawn, as in every run before the eighth measurement (the library
# defaults were uniform / uniform then). Baselines and diagnostics measured that way keep these settings.
UNIFORM = ["--rollout.state_sampling=uniform", "--data.episode_weighting=uniform"]

ARMS: dict[str, tuple[str, list[str]]] = {
    "ript": (
        "RIPT (defaults: RLOO, dynamic sampling, all-success groups kept as good, successes and demos trained, "
        "cfg objective, label dropout, the curriculum over initial states, successes drawn by |RLOO advantage|)",
        [],
    ),
    # the batch size is set too, so that --quick's smaller batch cannot fall below the demo batch
    "bc": (
        "continued behaviour cloning on the demos",
        ["--data.batch_size=256", "--data.demo_batch_size=256", *UNIFORM],
    ),
    "filtered": (
        "success-filtered fine-tuning on own successful rollouts (initial states drawn uniformly)",
        [
            "--advantage.estimator=success",
            "--data.bad_share=0",
            "--rollout.enable_dynamic_sampling=false",
            *UNIFORM,
        ],
    ),
    "no_dynamic": ("RIPT without dynamic sampling", ["--rollout.enable_dynamic_sampling=false"]),
    "ript_probe": (
        "RIPT with the episode-saving dynamic sampling: each state probed with 4 of its 8 rollouts first, a state "
        "whose 4 all fail dropped after them (rollout.probe_rollouts=4)",
        ["--rollout.probe_rollouts=4"],
    ),
    "no_guidance": (
        "RIPT without guidance (w = 1, no label dropout)",
        ["--policy.cfg_dropout_prob=0", "--rollout.guidance_scale=1", "--eval.guidance_scale=1"],
    ),
    "ript_uniform": (
        "diagnostic: RIPT with initial states drawn uniformly and successes drawn uniformly (the defaults up to "
        "the seventh measurement)",
        UNIFORM,
    ),
    "ript_u100": (
        "diagnostic: RIPT with 100 update steps per iteration (instead of 30), uniform draws",
        ["--optim.update_steps_per_iteration=100", *UNIFORM],
    ),
    "ript_half_bad": (
        "diagnostic: RIPT with the failure frames trained under the bad label, half of the rollout share (the "
        "defaults up to the sixth measurement), uniform draws",
        ["--data.good_share=0.5", "--data.bad_share=0.5", *UNIFORM],
    ),
    "ript_bad_extra": (
        "diagnostic: RIPT with the failure frames added on top of a filtered-sized good share (batch 384: "
        "192 good, 128 bad, 64 demo frames), uniform draws",
        ["--data.batch_size=384", "--data.good_share=0.6", "--data.bad_share=0.4", *UNIFORM],
    ),
    "ript_good_adv": (
        "diagnostic: RIPT with initial states drawn uniformly, each success drawn in proportion to its RLOO "
        "advantage (a group's only success 7 times as often as one of 7)",
        ["--rollout.state_sampling=uniform", "--data.episode_weighting=advantage"],
    ),
    "ript_curriculum": (
        "diagnostic: RIPT with the curriculum over initial states, successes drawn uniformly",
        ["--rollout.state_sampling=signal", "--data.episode_weighting=uniform"],
    ),
    "ript_cfgrl": (
        "diagnostic: RIPT with the cfgrl objective (failure frames train only the null branch, weight "
        "cfg_alpha), uniform draws",
        ["--policy.objective=cfgrl", "--data.good_share=0.5", "--data.bad_share=0.5", *UNIFORM],
    ),
    "ript_repel": (
        "diagnostic: RIPT whose failure frames push the good-conditioned velocity away from their actions, "
        "|A|-weighted, inside a PPO-style trust region against the iteration's collecting policy "
        "(policy.objective=repel), added on top of a filtered-sized batch (192 good, 128 bad, 64 demo frames), "
        "uniform draws",
        [
            "--policy.objective=repel",
            "--data.batch_size=384",
            "--data.good_share=0.6",
            "--data.bad_share=0.4",
            *UNIFORM,
        ],
    ),
    "weighted": (
        "advantage-weighted flow matching (standard normalisation, softplus negatives)",
        [
            "--policy.objective=weighted",
            "--advantage.normalization=standard",
            "--advantage.negative_handling=softplus",
            # its own batch: successes and failures half and half, drawn uniformly (the loss does the weighting)
            "--data.good_share=0.5",
            "--data.bad_share=0.5",
            *UNIFORM,
        ],
    ),
}

# The six arms; `all` runs these (every other arm is a diagnostic, run on request with --arms).
MAIN_ARMS = ["ript", "bc", "filtered", "no_dynamic", "no_guidance", "weighted"]

QUICK = [
    "--env.episode_length=30",
    "--rollout.rloo_batch_size=2",
    "--rollout.groups_per_round=2",
    "--rollout.rollout_goal_per_step=4",
    "--rollout.max_groups_per_step=2",
    "--rollout.max_train_episodes=8",
    "--data.num_demos=2",
    "--data.batch_size=16",
    "--data.demo_batch_size=4",
    "--optim.sft_steps=3",
    "--optim.update_steps_per_iteration=2",
    "--eval.eval_episodes=2",
    "--eval.num_envs=2",
    "--eval.eval_interval=1",
    "--policy.hidden_dim=32",
    "--policy.cond_dim=16",
    "--policy.num_denoiser_layers=1",
]


# --quick runs K = 2: an arm's probe of 4 becomes a probe of 1
QUICK_ARM_FIXES = {"--rollout.probe_rollouts=4": "--rollout.probe_rollouts=1"}


def _train(args: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "lerobot_ript.train", "--config_path", str(BASE), *args]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"training failed ({code}); see {log}. Command: {' '.join(cmd)}")
    return time.perf_counter() - t0


def task_overrides(task: str | None, demos: int | None, noise: float | None, length: int | None) -> list[str]:
    """The task and SFT settings given on the command line (None: base.yaml's push-v3 settings), for the SFT run
    and every arm alike: an arm's env must be the one its SFT demos came from."""
    pairs = [
        ("env.task", task),
        ("data.num_demos", demos),
        ("data.demo_noise", noise),
        ("env.episode_length", length),
    ]
    return [f"--{key}={value}" for key, value in pairs if value is not None]


def sft(out: Path, quick: bool, task_args: tuple[str, ...] = ()) -> Path:
    """Record demos and SFT once; the checkpoint every arm starts from. The task settings it ran with are kept
    in `sft/task_args.json`, and a later call with other settings (the same --out) fails instead of mixing."""
    run_dir = out / "sft"
    ckpt = run_dir / "checkpoints" / "last" / "pretrained_model"
    record = run_dir / "task_args.json"
    if ckpt.exists():
        done = json.loads(record.read_text()) if record.exists() else []
        if done != list(task_args):
            raise SystemExit(
                f"{run_dir} was trained with task settings {done or 'of base.yaml'}, not {list(task_args)}: use "
                "another --out for another task or other SFT settings."
            )
        return run_dir
    args = [
        f"--output_dir={run_dir}",
        "--num_train_steps=0",
        "--experiment_name=sft",
        "--eval.eval_at_start=true",
    ]
    wall = _train(args + (QUICK if quick else []) + list(task_args), out / "sft.log")
    (run_dir / "wall_time_s.txt").write_text(f"{wall:.1f}\n")
    record.write_text(json.dumps(list(task_args)))
    return run_dir


def arm(
    out: Path, name: str, seed: int, quick: bool, extra: tuple[str, ...] = (), task_args: tuple[str, ...] = ()
) -> Path:
    sft_dir = sft(out, quick, task_args)
    run_dir = out / f"{name}_seed{seed}"
    if (run_dir / "result.json").exists():
        return run_dir
    wall = _train(
        _arm_args(sft_dir, run_dir, name, seed, quick, extra, task_args), out / f"{name}_seed{seed}.log"
    )
    _write_result(run_dir, name, seed, wall)
    return run_dir


def extend(
    src: Path,
    out: Path,
    name: str,
    seed: int,
    quick: bool,
    extra: tuple[str, ...],
    task_args: tuple[str, ...],
) -> Path:
    """A finished run of `src` continued in `out` under `extra` (a larger rollout.max_train_episodes): copied,
    then resumed from its last checkpoint (`--resume=true`, exact: the run goes on as one run with the larger
    budget would), its history and wall time kept. `out/sft` links to `src/sft`."""
    run_dir, source = out / f"{name}_seed{seed}", src / f"{name}_seed{seed}"
    if (run_dir / "result.json").exists():
        return run_dir
    before = json.loads((source / "result.json").read_text())
    if not (out / "sft").exists():
        (out / "sft").symlink_to((src / "sft").resolve())
    if not run_dir.exists():
        shutil.copytree(source, run_dir, symlinks=True)  # checkpoints/last is a relative link
        (run_dir / "result.json").unlink()
    args = _arm_args(out / "sft", run_dir, name, seed, quick, extra, task_args) + ["--resume=true"]
    wall = _train(args, out / f"{name}_seed{seed}.log")
    _write_result(run_dir, name, seed, before["wall_time_s"] + wall, extended_from=str(source))
    return run_dir


def _arm_args(sft_dir: Path, run_dir: Path, name: str, seed: int, quick: bool, extra, task_args) -> list[str]:
    _, overrides = ARMS[name]
    if quick:
        overrides = [QUICK_ARM_FIXES.get(o, o) for o in overrides]
    args = [
        f"--output_dir={run_dir}",
        f"--seed={seed}",
        f"--experiment_name={name}",
        f"--checkpoint_path={sft_dir / 'checkpoints' / 'last' / 'pretrained_model'}",
        "--data.dataset_id=local/demos",
        f"--data.dataset_root={sft_dir / 'demos'}",
    ]
    return args + (QUICK if quick else []) + list(task_args) + overrides + list(extra)


def _write_result(run_dir: Path, name: str, seed: int, wall: float, **more) -> None:
    history = json.loads(
        sorted((run_dir / "checkpoints").glob("0*/training_state/ript_state_0.json"))[-1].read_text()
    )["history"]
    result = {"arm": name, "seed": seed, "wall_time_s": wall, "history": history, **more}
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))


def _load_run(run_dir: Path):
    """The last checkpoint of a finished run: (env config, policy, preprocessor, postprocessor, train config)."""
    import torch
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    from lerobot_ript.envs.metaworld import MetaWorldStateEnvConfig
    from lerobot_ript.policy.processor_ript import attach_ript_converter

    torch.set_num_threads(1)
    ckpt = run_dir / "checkpoints" / "last" / "pretrained_model"
    cfg = json.loads((ckpt / "train_config.json").read_text())
    keys = ("task", "episode_length", "obs_type", "image_size", "cameras", "terminate_on_success")
    env_cfg = MetaWorldStateEnvConfig(**{k: cfg["env"][k] for k in keys if k in cfg["env"]})
    policy = get_policy_class("ript").from_pretrained(ckpt)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(ckpt))
    return env_cfg, policy, attach_ript_converter(pre), post, cfg


def _held_out(
    env_cfg, policy, pre, post, seeds: list[int], guidance_scale: float, noise_scale: float = 1.0, ref=None
):
    """Success per held-out seed (numpy bool array, in seed order) of the policy at one guidance scale.

    noise_scale multiplies the initial flow noise (1 = the policy as trained, 0 = its deterministic mean path).
    ref = (policy, preprocessor) of another checkpoint: guidance then moves away from that policy's
    good-conditioned velocity instead of a label, v_ref + w (v - v_ref) (w = 1 is the policy alone)."""
    import torch
    from lerobot.envs.utils import preprocess_observation
    from lerobot.policies.common.flow_matching import euler_integrate, sample_noise
    from lerobot.utils.constants import OBS_STATE

    from lerobot_ript.envs.metaworld import make_vector_env
    from lerobot_ript.rollout.collector import make_chunk_policy
    from lerobot_ript.rollout.evaluate import evaluate

    c, device = policy.config, next(policy.parameters()).device

    def act_away_from_ref(obs: dict):  # one thread, as every call here (_load_run): the same floats as w = 1
        o = preprocess_observation(obs)
        with torch.inference_mode():
            v, v_ref = policy.velocity_field(pre(dict(o))), ref[0].velocity_field(ref[1](dict(o)))
            fn = lambda x, t: v_ref(x, t) + guidance_scale * (v(x, t) - v_ref(x, t))  # noqa: E731
            noise = noise_scale * sample_noise((len(o[OBS_STATE]), c.chunk_size, c.action_dim), device)
            chunk = euler_integrate(fn, noise, c.num_inference_steps)[:, : c.n_action_steps]
        return post(chunk).numpy()

    if ref is None:
        act = make_chunk_policy(
            policy,
            pre,
            post,
            guidance_scale=guidance_scale,
            n_action_steps=c.n_action_steps,
            noise_scale=noise_scale,
        )
    else:
        act = act_away_from_ref
    torch.manual_seed(0)
    return evaluate(
        lambda n: make_vector_env(env_cfg, n),
        act,
        seeds,
        num_envs=min(25, len(seeds)),
        max_episode_steps=env_cfg.episode_length,
    ).successes


def guidance(
    run_dir: Path,
    scales: list[float],
    negatives: list[str],
    episodes: int,
    noise_scales: list[float] = (1.0,),
    reference: Path | None = None,
) -> Path:
    """Held-out success of a finished run's last checkpoint at several evaluation guidance scales, negative
    labels (`policy.guidance_negative`) and initial-noise scales, on the same held-out initial states (the run's
    eval seeds) for every setting; written to `run_dir/guidance_<episodes>ep.json`. With `reference` (another
    run directory, e.g. the SFT run) guidance moves away from that checkpoint's policy instead of a label."""
    from lerobot_ript.rollout.evaluate import wilson_interval

    env_cfg, policy, pre, post, cfg = _load_run(run_dir)
    ref = None
    if reference is not None:
        _, ref_policy, ref_pre, _, _ = _load_run(reference)
        ref, negatives = (ref_policy, ref_pre), [f"reference:{reference.name}"]
    seeds = [cfg["eval"]["seed_start"] + i for i in range(episodes)]
    rows = []
    settings = [(1.0, "null")] if 1.0 in scales else []  # w = 1 does not depend on the negative
    settings += [(w, neg) for w in scales if w != 1.0 for neg in negatives]
    for tau in noise_scales:
        for w, neg in settings:
            if ref is None:
                policy.config.guidance_negative = neg
            wins = int(_held_out(env_cfg, policy, pre, post, seeds, w, tau, ref if w != 1.0 else None).sum())
            lo, hi = wilson_interval(wins, episodes)
            rows.append(
                {
                    "guidance_scale": w,
                    "negative": neg,
                    "noise_scale": tau,
                    "success_rate": wins / episodes,
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
            sys.stdout.write(
                f"w={w} negative={neg} noise_scale={tau}: {100 * wins / episodes:.1f}% "
                f"({100 * lo:.1f}-{100 * hi:.1f}), {episodes} ep\n"
            )
    path = run_dir / f"guidance_{episodes}ep.json"
    path.write_text(json.dumps({"episodes": episodes, "results": rows}, indent=1))
    return path


def branches(run_dir: Path, frames: int, scales: list[float]) -> Path:
    """How much guidance can change a finished run's actions: on `frames` states along the scripted demos, the
    mean distance (normalised action space, whole chunk) between the chunk the good branch samples and the one
    the null branch samples from the same noise, and between guided (w) and unguided (w = 1) chunks, each
    against the policy's own sampling spread (two noise draws at w = 1). Written to `run_dir/branches.json`."""
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.utils.constants import OBS_STATE

    from lerobot_ript.train.config import trains_bad_frames

    _, policy, pre, _, cfg = _load_run(run_dir)
    # the demos the run trained on; an SFT run keeps them in its own directory, an arm in its SFT's
    candidates = [run_dir / "demos", run_dir.parent / "sft" / "demos"]
    if cfg["data"]["dataset_root"]:
        candidates.insert(0, HERE / cfg["data"]["dataset_root"])
    root = next((c for c in candidates if (c / "meta" / "info.json").exists()), None)
    if root is None:
        raise SystemExit(
            f"no demo dataset found for {run_dir} (looked in {', '.join(map(str, candidates))})."
        )
    demos = LeRobotDataset(cfg["data"]["dataset_id"] or "local/demos", root=root)
    step = max(1, demos.num_frames // frames)
    states = torch.stack([demos.hf_dataset[i][OBS_STATE] for i in range(0, demos.num_frames, step)])
    batch = pre({OBS_STATE: states[:frames]})
    gen = torch.Generator().manual_seed(0)
    shape = (batch[OBS_STATE].shape[0], policy.config.chunk_size, policy.config.action_dim)
    noise, noise2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)

    def chunk(w: float, x1: torch.Tensor) -> torch.Tensor:
        return policy.predict_action_chunk(batch, noise=x1, guidance_scale=w)

    def dist(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).flatten(1).norm(dim=1).mean())

    base = chunk(1.0, noise)
    spread = dist(base, chunk(1.0, noise2))
    rows = {"good_vs_null": dist(base, chunk(0.0, noise))}  # w = 0 is the null branch alone
    if trains_bad_frames(cfg["data"]["bad_share"], cfg["data"]["failed_demos"]):  # the bad label was trained
        negative, policy.config.guidance_negative = policy.config.guidance_negative, "bad"
        rows["good_vs_bad"] = dist(base, chunk(0.0, noise))
        policy.config.guidance_negative = negative  # the run's own negative for the guided rows below
    rows.update({f"w={w}_vs_w=1": dist(base, chunk(w, noise)) for w in scales if w != 1.0})
    out = {"frames": int(shape[0]), "sampling_spread": spread, "distances": rows}
    sys.stdout.write(
        f"{run_dir}: {shape[0]} demo states, sampling spread (two noise draws, w = 1) {spread:.3f}\n"
    )
    for name, d in rows.items():
        sys.stdout.write(f"  {name:16s} {d:.3f} ({100 * d / spread:.0f}% of the spread)\n")
    path = run_dir / "branches.json"
    path.write_text(json.dumps(out, indent=1))
    return path


# push-v3's raw state: hand xyz 0:3, gripper 3, puck xyz 4:7, ..., goal xyz 36:39
REGION_FEATURES = {
    "goal_x - puck_x": lambda s: s[36] - s[4],
    "goal_y - puck_y": lambda s: s[37] - s[5],
    "puck_x": lambda s: s[4],
    "puck_y": lambda s: s[5],
    "goal_x": lambda s: s[36],
    "goal_y": lambda s: s[37],
}


def regions(run_dir: Path, episodes: int) -> Path:
    """Where a finished run's policy fails: held-out success by quartile of the initial puck and goal positions
    (push-v3 state layout), at the run's evaluation guidance scale; written to `run_dir/regions.json`."""
    import numpy as np

    from lerobot_ript.envs.metaworld import make_vector_env

    env_cfg, policy, pre, post, cfg = _load_run(run_dir)
    if env_cfg.task != "push-v3":
        raise SystemExit(f"regions reads push-v3's state layout; this run's task is {env_cfg.task}.")
    seeds = [cfg["eval"]["seed_start"] + i for i in range(episodes)]
    success = _held_out(env_cfg, policy, pre, post, seeds, cfg["eval"]["guidance_scale"])
    env = make_vector_env(env_cfg, 1)
    try:  # the initial state of each seed, as the evaluation reset it
        starts = np.stack([env.reset(seed=[seed])[0]["agent_pos"][0] for seed in seeds])
    finally:
        env.close()
    report = {"episodes": episodes, "success_rate": float(success.mean()), "features": {}}
    sys.stdout.write(f"{run_dir}: {100 * success.mean():.1f}% of {episodes} held-out episodes\n")
    for name, feature in REGION_FEATURES.items():
        values = np.array([feature(s) for s in starts])
        edges = np.quantile(values, [0.25, 0.5, 0.75])
        bins = np.digitize(values, edges)
        rates = [float(success[bins == b].mean()) for b in range(4)]
        report["features"][name] = {"quartile_edges": edges.tolist(), "success_per_quartile": rates}
        sys.stdout.write(
            f"  {name:16s} quartiles split at {np.round(edges, 3).tolist()}: success "
            + " / ".join(f"{100 * r:.0f}%" for r in rates)
            + "\n"
        )
    path = run_dir / "regions.json"
    path.write_text(json.dumps(report, indent=1))
    return path


def report(out: Path) -> Path:
    """RESULTS.md (table) and success.png (success against training episodes, every arm) from the runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in sorted(out.glob("*_seed*/result.json"))]
    sft_state = sorted((out / "sft" / "checkpoints").glob("0*/training_state/ript_state_0.json"))
    sft_hist = json.loads(sft_state[-1].read_text())["history"] if sft_state else []
    sft_config = out / "sft" / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
    task = json.loads(sft_config.read_text())["env"]["task"] if sft_config.exists() else "push-v3"
    lines = [
        f"# Learning benchmark: SFT -> RIPT against baselines ({task}, held-out initial states)",
        "",
        "Command: `python benchmarks/learning/run.py all` (settings: `benchmarks/learning/base.yaml`, arms in "
        "`run.py`). Success on held-out seeds (>= 1,000,000), 95% Wilson interval.",
        "",
    ]
    if sft_hist:
        h = sft_hist[-1]
        lines.append(
            f"SFT start: {100 * h['success_rate']:.1f}% ({100 * h['ci_low']:.1f}-{100 * h['ci_high']:.1f}), "
            f"{h['n']} episodes.\n"
        )
    lines += [
        "| arm | seed | final success % (95% CI) | training episodes | eval episodes | wall time (min) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        h = r["history"][-1]
        lines.append(
            f"| {r['arm']} | {r['seed']} | {100 * h['success_rate']:.1f} ({100 * h['ci_low']:.1f}-"
            f"{100 * h['ci_high']:.1f}) | {h['episodes']} | {h['n']} | {r['wall_time_s'] / 60:.1f} |"
        )
    fig, ax = _plot(plt, results, sft_hist)
    fig.tight_layout()
    fig.savefig(out / "success.png", dpi=100)
    plt.close(fig)
    fig = _plot_compute(plt, out, results, sft_hist)
    fig.savefig(out / "success_compute.png", dpi=100)
    plt.close(fig)
    lines += _summary(results, sft_hist)
    tasks = list(sft_hist[-1].get("tasks", {})) if sft_hist else []
    if tasks:  # one multi-task policy: each task's table and plot
        lines += _task_table(results, sft_hist, tasks)
        for t in tasks:
            fig, ax = _plot(plt, *_task_view(results, sft_hist, t))
            ax.set_title(f"{t} (one policy trained on {len(tasks)} tasks)")
            fig.tight_layout()
            fig.savefig(out / f"success_{t}.png", dpi=100)
            plt.close(fig)
    lines += _compute_table(out, results)
    lines += _rollout_table(out, results)
    path = out / "RESULTS.md"
    path.write_text(
        "\n".join(lines) + "\n\nArms:\n" + "\n".join(f"- `{k}`: {v[0]}" for k, v in ARMS.items()) + "\n"
    )
    return path


def _plot(plt, results: list[dict], sft_hist: list[dict]):
    """Success against training episodes: per arm, the mean over seeds (thick, from the SFT point at 0 episodes)
    and each seed (thin)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    start = [(0, sft_hist[-1]["success_rate"])] if sft_hist else []
    top = max([y for _, y in start] + [p["success_rate"] for r in results for p in r["history"]] + [0.0])
    for i, name in enumerate(a for a in ARMS if any(r["arm"] == a for r in results)):
        color = plt.get_cmap("tab20")(i % 20)  # 20 distinct colours: the default cycle repeats after 10 arms
        runs = [r for r in results if r["arm"] == name]
        # the k-th evaluation of every seed of an arm, averaged (seeds may reach it at slightly different
        # episodes), and last the seeds' final evaluations: a seed with an extra evaluation past the budget
        # (an iteration that crossed it) then moves the final mean as in the tables, not a point of its own
        curves = [start + [(p["episodes"], p["success_rate"]) for p in r["history"]] for r in runs]
        for xy in curves:
            ax.plot(*zip(*xy, strict=True), color=color, alpha=0.3, linewidth=0.8)
        n = min(len(xy) for xy in curves)
        columns = [[xy[k] for xy in curves] for k in range(n - 1)] + [[xy[-1] for xy in curves]]
        means = [[sum(c) / len(c) for c in zip(*col, strict=True)] for col in columns]
        ax.plot(
            *zip(*means, strict=True),
            color=color,
            marker="o",
            linewidth=2,
            label=f"{name} (mean of {len(runs)} seed{'s' if len(runs) > 1 else ''})",
        )
    n = (sft_hist or results[0]["history"])[-1]["n"] if (sft_hist or results) else 0
    ax.set_xlabel("training episodes (all tasks)")
    ax.set_ylabel(f"held-out success rate ({n} episodes per point)")
    ax.set_ylim(0, min(1.0, top + 0.2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, ax


def _task_view(results: list[dict], sft_hist: list[dict], task: str) -> tuple[list[dict], list[dict]]:
    """The runs and the SFT history with every evaluation's success rate (and episode count) those of `task`
    (a multi-task run logs each task's rate in `tasks`, on eval.eval_episodes episodes)."""

    def view(h: dict) -> dict:
        return {**h, "success_rate": h["tasks"][task], "n": h["n"] // len(h["tasks"])}

    runs = [{**r, "history": [view(h) for h in r["history"]]} for r in results]
    return runs, [view(h) for h in sft_hist]


def _task_table(results: list[dict], sft_hist: list[dict], tasks: list[str]) -> list[str]:
    """Per task and arm of a multi-task run: the SFT start, the seeds' final success, their mean and its change,
    and RIPT's lead over the arm (bootstrap over seeds), then the mean over tasks."""
    lines = [
        "",
        "Per task (one policy trained on all of them; final evaluation, each task on its own held-out episodes):",
        "",
        "| task | SFT % | arm | seeds' final success % | mean % | change vs SFT | RIPT's lead (95% bootstrap over seeds) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def rate(h: dict, t: str) -> float:  # one evaluation's success on task t, or its mean over the tasks
        return sum(h["tasks"].values()) / len(tasks) if t == "mean" else h["tasks"][t]

    for t in [*tasks, "mean"]:
        start = rate(sft_hist[-1], t)
        finals = {}
        for name in ARMS:
            runs = [r for r in results if r["arm"] == name]
            if runs:
                finals[name] = [rate(r["history"][-1], t) for r in runs]
        for name, rates in finals.items():
            mean, seeds = sum(rates) / len(rates), " / ".join(f"{100 * x:.1f}" for x in rates)
            lines.append(
                f"| {t} | {100 * start:.1f} | {name} | {seeds} | {100 * mean:.1f} | {100 * (mean - start):+.1f} "
                f"| {_ript_lead(name, finals.get('ript', []), rates)} |"
            )
    return lines


def _compute_axes(out: Path, r: dict) -> list[tuple[float, float]]:
    """Per evaluation of a run: (optimizer steps, training minutes: collection + updates, evaluations left out)
    summed over the iterations up to it, from the run's metrics.jsonl."""
    metrics = out / f"{r['arm']}_seed{r['seed']}" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    steps, seconds, by_iteration = 0.0, 0.0, {0: (0.0, 0.0)}
    for row in rows:
        if "train/update_steps" in row:
            steps += row["train/update_steps"] or 0.0
            seconds += (row.get("time/collect_s") or 0.0) + (row.get("time/update_s") or 0.0)
            by_iteration[row["step"]] = (steps, seconds / 60)
    return [by_iteration.get(p["iteration"], (float("nan"), float("nan"))) for p in r["history"]]


def _plot_compute(plt, out: Path, results: list[dict], sft_hist: list[dict]):
    """Success against optimizer steps and against training wall-clock (collection + updates): the compute
    dynamic sampling and the curriculum exist to save. Each seed of each arm (thin) and the arm's final mean."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    start = sft_hist[-1]["success_rate"] if sft_hist else None
    for i, name in enumerate(a for a in ARMS if any(r["arm"] == a for r in results)):
        color = plt.get_cmap("tab20")(i % 20)
        runs = [r for r in results if r["arm"] == name]
        finals = []
        for r in runs:
            axes_xy = _compute_axes(out, r)
            ys = [p["success_rate"] for p in r["history"]]
            for ax, k in zip(axes, (0, 1), strict=True):
                xs = [xy[k] for xy in axes_xy]
                if start is not None:
                    xs, ys_k = [0.0, *xs], [start, *ys]
                else:
                    ys_k = ys
                ax.plot(xs, ys_k, color=color, alpha=0.35, linewidth=0.8)
            finals.append((*axes_xy[-1], ys[-1]))
        for ax, k in zip(axes, (0, 1), strict=True):
            x = sum(f[k] for f in finals) / len(finals)
            y = sum(f[2] for f in finals) / len(finals)
            ax.plot(
                [x], [y], color=color, marker="o", markersize=8, label=f"{name} (final mean, {len(runs)})"
            )
    axes[0].set_xlabel("optimizer steps")
    axes[1].set_xlabel("training wall-clock, collection + updates (min)")
    axes[0].set_ylabel("held-out success rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _compute_table(out: Path, results: list[dict]) -> list[str]:
    """Per arm: mean final success, optimizer steps and training minutes at the end (means over seeds)."""
    lines = [
        "",
        "Compute per arm (means over seeds, at the final evaluation; training minutes = collection + updates on "
        "one CPU core, evaluations left out; plot: `success_compute.png`):",
        "",
        "| arm | seeds | mean success % | optimizer steps | training minutes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in ARMS:
        runs = [r for r in results if r["arm"] == name]
        if not runs:
            continue
        finals = [(*_compute_axes(out, r)[-1], r["history"][-1]["success_rate"]) for r in runs]
        steps, minutes, rate = (sum(f[k] for f in finals) / len(finals) for k in range(3))
        lines.append(f"| {name} | {len(runs)} | {100 * rate:.1f} | {steps:.0f} | {minutes:.1f} |")
    return lines


def _rollout_table(out: Path, results: list[dict]) -> list[str]:
    """Per run, from its metrics.jsonl: iterations, optimizer steps, rollout success and the share of groups
    without signal (all K rollouts equal), against that share if every initial state had the same success
    rate p (p^K + (1-p)^K): a larger measured share means per-state success is spread (many states never or
    always solved), which is what limits the RLOO signal per episode."""
    lines = [
        "",
        "Rollouts and updates per run (means over iterations):",
        "",
        "| arm | seed | iterations | optimizer steps | rollout success % | groups without signal % | "
        "same, if every state had the mean success rate % |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        run_dir = out / f"{r['arm']}_seed{r['seed']}"
        metrics = run_dir / "metrics.jsonl"
        if not metrics.exists():
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"rollout/' in line]
        if not rows:
            continue
        train_cfg = json.loads(
            (run_dir / "checkpoints" / "last" / "pretrained_model" / "train_config.json").read_text()
        )
        per_iteration = train_cfg["optim"]["update_steps_per_iteration"]
        steps = sum(row.get("train/update_steps", per_iteration) for row in rows)
        success = [row["rollout/success_rate"] for row in rows]
        k = train_cfg["rollout"]["rloo_batch_size"]
        binomial = sum(p**k + (1 - p) ** k for p in success) / len(success)
        sampled = sum(row["rollout/groups_sampled"] for row in rows)
        dropped = sum(row["rollout/groups_dropped"] for row in rows)
        measured = f"{100 * dropped / sampled:.0f}" if dropped else "- (kept)"
        lines.append(
            f"| {r['arm']} | {r['seed']} | {len(rows)} | {steps:.0f} | {100 * sum(success) / len(success):.1f} | "
            f"{measured} | {100 * binomial:.0f} |"
        )
    return lines


def _ript_lead(name: str, ript: list[float], rates: list[float]) -> str:
    """RIPT's lead over arm `name` in points with its bootstrap interval over seeds ("-" for RIPT itself or with
    fewer than 2 seeds a side)."""
    if name == "ript" or len(ript) < 2 or len(rates) < 2:
        return "-"
    d, lo, hi = _seed_difference(ript, rates)
    return f"{100 * d:+.1f} ({100 * lo:+.1f} to {100 * hi:+.1f})"


def _seed_difference(a: list[float], b: list[float], draws: int = 20_000) -> tuple[float, float, float]:
    """Mean of `a` minus mean of `b` (one final success rate per seed) and its 95% percentile-bootstrap
    interval, seeds resampled with replacement within each arm: it carries the seed-to-seed spread that the
    pooled Wilson interval leaves out (with 3 to 5 seeds a rough interval, narrower than it should be)."""
    import numpy as np

    rng = np.random.default_rng(0)
    xa, xb = np.asarray(a), np.asarray(b)
    diffs = rng.choice(xa, (draws, xa.size)).mean(1) - rng.choice(xb, (draws, xb.size)).mean(1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(xa.mean() - xb.mean()), float(lo), float(hi)


def _summary(results: list[dict], sft_hist: list[dict]) -> list[str]:
    """Per arm: seeds, mean final success, pooled 95% Wilson interval over all seeds' final evaluations, and
    RIPT's lead over the arm with a bootstrap interval over seeds."""
    from lerobot_ript.rollout.evaluate import wilson_interval

    start = sft_hist[-1]["success_rate"] if sft_hist else float("nan")
    finals = {name: [r["history"][-1] for r in results if r["arm"] == name] for name in ARMS}
    ript = [h["success_rate"] for h in finals["ript"]]
    out = [
        "",
        "Per arm (final evaluation, pooled over seeds; RIPT's lead: mean of RIPT's seeds minus the arm's, 95% "
        "bootstrap interval over seeds):",
        "",
        "| arm | seeds | mean success % | pooled 95% CI | change vs SFT (points) | RIPT's lead (points) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, hist in finals.items():
        if not hist:
            continue
        wins = sum(round(h["success_rate"] * h["n"]) for h in hist)
        n = sum(h["n"] for h in hist)
        lo, hi = wilson_interval(wins, n)
        rates = [h["success_rate"] for h in hist]
        mean = sum(rates) / len(rates)
        out.append(
            f"| {name} | {len(hist)} | {100 * mean:.1f} | {100 * lo:.1f}-{100 * hi:.1f} | "
            f"{100 * (mean - start):+.1f} | {_ript_lead(name, ript, rates)} |"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "command", choices=["sft", "arm", "report", "all", "extend", "guidance", "regions", "branches"]
    )
    p.add_argument("--arm", choices=sorted(ARMS), default="ript")
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=MAIN_ARMS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", type=Path, default=HERE / "runs")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run (numbers mean nothing)")
    p.add_argument(
        "--jobs", type=int, default=1, help="arms run side by side by `all` (one CPU core each; default 1)"
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="extra overrides for every arm (not the SFT run), e.g. rollout.max_train_episodes=3840; use a "
        "separate --out (the SFT checkpoint can be linked there: it is reused when present)",
    )
    p.add_argument("--task", help="sft / arm / all: the MetaWorld task (default: base.yaml's push-v3)")
    p.add_argument(
        "--num-demos", type=int, help="sft / arm / all: scripted demos for the SFT start (default 5)"
    )
    p.add_argument(
        "--demo-noise", type=float, help="sft / arm / all: the demos' action noise std (default 0.3)"
    )
    p.add_argument("--episode-length", type=int, help="sft / arm / all: the episode horizon (default 150)")
    p.add_argument(
        "--from",
        dest="src",
        type=Path,
        help="extend: the --out whose finished runs (--arms x --seeds) go on in --out under --set (e.g. a larger "
        "rollout.max_train_episodes), resumed from their last checkpoints",
    )
    p.add_argument("--run", type=Path, help="guidance / regions: the finished run directory to evaluate")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="guidance: scales w")
    p.add_argument(
        "--negatives", nargs="+", choices=["null", "bad"], default=["null"], help="guidance: negative labels"
    )
    p.add_argument(
        "--episodes", type=int, default=200, help="guidance / regions: held-out episodes (per scale)"
    )
    p.add_argument(
        "--noise-scales", type=float, nargs="+", default=[1.0], help="guidance: initial flow-noise scales"
    )
    p.add_argument(
        "--reference", type=Path, help="guidance: a run directory whose policy guidance moves away from"
    )
    p.add_argument("--frames", type=int, default=500, help="branches: demo states to sample actions on")
    a = p.parse_args(argv)
    if a.command == "guidance":
        guidance(a.run, a.scales, a.negatives, a.episodes, a.noise_scales, a.reference)
        return 0
    if a.command == "regions":
        regions(a.run, a.episodes)
        return 0
    if a.command == "branches":
        branches(a.run, a.frames, a.scales)
        return 0
    extra = tuple(f"--{kv.removeprefix('--')}" for kv in a.set)
    task_args = tuple(task_overrides(a.task, a.num_demos, a.demo_noise, a.episode_length))
    a.out.mkdir(parents=True, exist_ok=True)
    if a.command == "sft":
        sft(a.out, a.quick, task_args)
    elif a.command == "arm":
        arm(a.out, a.arm, a.seed, a.quick, extra, task_args)
    elif a.command == "extend":
        if a.src is None or a.src.resolve() == a.out.resolve():
            p.error("extend needs --from <an --out with finished runs>, other than --out")
        runs = [(name, seed) for seed in a.seeds for name in a.arms]
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
            jobs = [pool.submit(extend, a.src, a.out, n, s, a.quick, extra, task_args) for n, s in runs]
            for future in jobs:
                future.result()
    elif a.command == "all":
        sft(a.out, a.quick, task_args)
        runs = [(name, seed) for seed in a.seeds for name in a.arms]
        with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:  # each arm is its own process
            jobs = [pool.submit(arm, a.out, name, seed, a.quick, extra, task_args) for name, seed in runs]
            for future in jobs:
                future.result()
    path = report(a.out)
    sys.stdout.write(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
