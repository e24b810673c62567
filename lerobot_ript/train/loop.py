"""RIPT post-training on Accelerate: the script only orchestrates the phases.

    setup (demos, policy, processors, optimizer, resume)
    [SFT on demos]  ->  eval
    for each iteration:
        collect groups  ->  RLOO advantages + advantage processor  ->  training batches
        ->  update steps  ->  log  ->  [eval]  ->  [checkpoint]
    final eval, checkpoint, plot, [push to the Hub]

Several tasks (`env.task` a list or a named set): demos of each task, a policy conditioned on the task
(`policy.task_names`), groups drawn across the tasks, per-task rollout and held-out success.

Launch: `accelerate launch -m lerobot_ript.train --config_path configs/debug.yaml [--a.b=c ...]`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from lerobot_ript.data.dataset import EpisodeBalancedSampler, EpisodeShares, RiptDataset
from lerobot_ript.data.writer import EpisodeRecord
from lerobot_ript.envs.metaworld import task_instruction
from lerobot_ript.rollout.collector import CollectTask, GroupedCollector, SeedSampler, make_chunk_policy
from lerobot_ript.rollout.evaluate import evaluate, wilson_interval
from lerobot_ript.rollout.sampling import SkipTracker, StateCurriculum
from lerobot_ript.train.checkpoint import (
    last_checkpoint,
    load_training_state,
    remove_interrupted_checkpoints,
    save_checkpoint,
)
from lerobot_ript.train.config import RiptTrainConfig, check_image_inputs
from lerobot_ript.train.tracking import MetricsWriter, plot_success, reduce_metrics
from lerobot_ript.train.update import update_step

logger = logging.getLogger(__name__)

# Training-time policy fields taken from the run's config even when the policy comes from a checkpoint.
RL_POLICY_FIELDS = (
    "objective",
    "cfg_dropout_prob",
    "cfg_alpha",
    "guidance_scale",
    "guidance_negative",
    "enable_cfg_safe_copy",
    "num_inference_steps",
    "n_action_steps",
)


@dataclass
class RunState:
    """Everything besides the Accelerate state needed to resume exactly (saved per rank)."""

    iteration: int = 0
    sft_done: bool = False
    episodes_seen: int = 0  # training rollouts, summed over ranks
    history: list[dict] = field(default_factory=list)  # evaluations
    skip_tracker: dict = field(default_factory=dict)
    fail_tracker: dict = field(default_factory=dict)
    curriculum: dict = field(default_factory=dict)  # StateCurriculum (rollout.state_sampling=signal)
    seed_hash: dict = field(default_factory=dict)
    replay: list[list[dict]] = field(default_factory=list)  # last iterations' episodes (serialised)


@dataclass
class Run:
    cfg: RiptTrainConfig
    accelerator: Accelerator
    policy: torch.nn.Module
    preprocessor: object
    postprocessor: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    demo_data: RiptDataset  # demonstration frames, labelled good
    state: RunState
    metrics: MetricsWriter

    @property
    def model(self):
        return self.accelerator.unwrap_model(self.policy)


def build_accelerator(cfg: RiptTrainConfig) -> Accelerator:
    """Arguments left to None let `accelerate launch` flags apply; a CPU policy forces a CPU run (gloo)."""
    from accelerate.utils import DistributedDataParallelKwargs

    torch.set_num_threads(cfg.cpu_threads)
    mp = cfg.mixed_precision
    accelerator = Accelerator(
        cpu=True if cfg.policy.device == "cpu" else None,
        mixed_precision=None if mp == "no" else mp,
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        log_with="wandb" if cfg.log.enable_wandb else None,
        project_dir=cfg.output_dir,
        step_scheduler_with_optimizer=False,
        # A wrapped VLA has parameters its flow loss never reaches (PaliGemma's LM head, a frozen part), which
        # DDP must be told about; the small backbone uses every parameter.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.policy.is_vla)],
    )
    used = accelerator.mixed_precision
    if accelerator.is_main_process:  # said once, not once per rank
        if accelerator.device.type == "cpu" and used == "fp16":
            logger.warning("mixed_precision=fp16 has no effect on a CPU: training runs in float32.")
        logger.info(
            "Accelerate: %d process(es), device %s, mixed precision %s.",
            accelerator.num_processes,
            accelerator.device,
            used,
        )
    return accelerator


# ----------------------------------------------------------------------------------------------------------
# setup
# ----------------------------------------------------------------------------------------------------------
def load_demos(cfg: RiptTrainConfig, accelerator: Accelerator):
    """The demonstration LeRobotDataset: the configured one, or scripted demos recorded once (main first), with
    the env's observations (obs_type="state_pixels": its cameras and image size, as the rollouts will have);
    several tasks: `data.num_demos` of each, in one dataset."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if cfg.data.dataset_id is not None:
        root = cfg.data.dataset_root
        if root is not None and not Path(root).exists():
            raise FileNotFoundError(f"data.dataset_root={root} does not exist. Point it at a LeRobotDataset.")
        return LeRobotDataset(cfg.data.dataset_id, root=root)
    from lerobot_ript.data.record_demos import demos_repo_id, record_demos

    root = Path(cfg.output_dir) / "demos"
    tasks = cfg.env.tasks
    with accelerator.main_process_first():
        if not (root / "meta" / "info.json").exists() and accelerator.is_main_process:
            env_kwargs = cfg.env.task_kwargs(tasks[0])
            result = record_demos(
                tasks[0] if len(tasks) == 1 else tasks,
                cfg.data.num_demos,
                cfg.data.demo_noise,
                root,
                seed=0,
                episode_length=cfg.env.episode_length,
                obs_type=env_kwargs["obs_type"],
                image_size=env_kwargs["image_size"],
                cameras=env_kwargs["cameras"],
            )
            logger.info(
                "Recorded %d scripted demos of %s (noise %.2f): %.0f%% successful.",
                result.num_episodes,
                cfg.env.task,
                cfg.data.demo_noise,
                100 * result.success_rate,
            )
    return LeRobotDataset(demos_repo_id(tasks), root=root)


def build_policy(cfg: RiptTrainConfig, demo_ds):
    from lerobot.policies.factory import get_policy_class, make_policy, make_pre_post_processors

    from lerobot_ript.policy.processor_ript import attach_ript_converter, make_ript_pre_post_processors

    if cfg.checkpoint_path:
        policy = get_policy_class("ript").from_pretrained(cfg.checkpoint_path)
        for name in RL_POLICY_FIELDS:
            setattr(policy.config, name, getattr(cfg.policy, name))
        policy.config.validate_hyperparameters()
        check_policy_tasks(policy.config, cfg.env.tasks, where=f"checkpoint_path={cfg.checkpoint_path}")
        pre, post = make_pre_post_processors(policy.config, pretrained_path=cfg.checkpoint_path)
        return policy, attach_ript_converter(pre), post
    if cfg.env.is_multi_task and cfg.policy.task_names is None:
        cfg.policy.task_names = cfg.env.tasks  # the policy's task vocabulary, saved in its config.json
    policy = make_policy(cfg.policy, ds_meta=demo_ds.meta)
    pre, post = make_ript_pre_post_processors(policy.config, dataset_stats=demo_ds.meta.stats)
    return policy, pre, post


def check_policy_tasks(policy_config, tasks: list[str], where: str = "policy.task_names") -> None:
    """Fail when a task-conditioned policy (`task_names`) does not know every env task; warn when a small policy
    without task input is run on several tasks (it then acts alike on all of them, from the state alone)."""
    names = policy_config.task_names
    if names is None:
        if len(tasks) > 1 and not policy_config.is_vla:
            logger.warning(
                "env.task names %d tasks but the policy (%s) has no task input (task_names=None): it cannot tell "
                "the tasks apart. Train a multi-task policy from scratch (the loop sets policy.task_names).",
                len(tasks),
                where,
            )
        return
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise ValueError(
            f"env.task={','.join(tasks)!r} has {unknown}, which the policy ({where}) is not conditioned on: its "
            f"task_names are {list(names)}. Run on those tasks, or train a policy with these."
        )


def demo_set(demo_ds, policy_config, failed_demos: str) -> RiptDataset:
    """The demonstrations as a RiptDataset; fails with a fix when none is left to train on."""
    demo_data = RiptDataset(policy_config.chunk_size, policy_config.target_state_dim)
    demo_data.add_lerobot_dataset(demo_ds, as_demo=True, failed_demos=failed_demos)
    if demo_data.num_episodes > 0:
        return demo_data
    if demo_ds.num_episodes == 0:
        raise ValueError(
            f"the demonstration dataset {demo_ds.repo_id} has no episodes. Point data.dataset_id / "
            "data.dataset_root at a dataset with episodes, or leave data.dataset_id unset to record scripted demos."
        )
    raise ValueError(
        f"data.failed_demos=drop left no demonstration: all {demo_ds.num_episodes} episodes of "
        f"{demo_ds.repo_id} failed. Use data.failed_demos=keep or bad, or record demos with less noise."
    )


def setup(cfg: RiptTrainConfig, accelerator: Accelerator) -> Run:
    set_seed(cfg.seed)  # identical initial parameters on every rank
    if cfg.policy.is_vla and cfg.policy.backbone_path and not cfg.checkpoint_path:
        from lerobot.envs.utils import env_to_policy_features

        from lerobot_ript.policy.backbones.vla import preflight

        preflight(cfg.policy, env_to_policy_features(cfg.env))  # before the (rendered) demos are recorded
    demo_ds = load_demos(cfg, accelerator)
    policy, pre, post = build_policy(cfg, demo_ds)
    check_image_inputs(cfg, sorted(policy.config.image_features))
    demo_data = demo_set(demo_ds, policy.config, cfg.data.failed_demos)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=cfg.optim.learning_rate, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = RunState()
    if accelerator.is_main_process:
        remove_interrupted_checkpoints(cfg.checkpoints_dir)
    if cfg.resume:
        ckpt = last_checkpoint(cfg.checkpoints_dir)
        if ckpt is None:
            raise FileNotFoundError(f"resume=true but {cfg.checkpoints_dir}/last does not exist.")
        state = RunState(**load_training_state(ckpt, accelerator))
        logger.info("Resumed from %s at iteration %d.", ckpt, state.iteration)
    if cfg.log.enable_wandb:
        os.environ.setdefault("WANDB_MODE", cfg.log.wandb_mode)
        accelerator.init_trackers(
            cfg.log.wandb_project,
            config=_flat_config(cfg),
            init_kwargs={"wandb": {"name": cfg.experiment_name, "dir": str(out)}},
        )
    return Run(
        cfg,
        accelerator,
        policy,
        pre,
        post,
        optimizer,
        scheduler,
        demo_data,
        state,
        MetricsWriter(accelerator, out),
    )


# ----------------------------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------------------------
def seed_iteration(cfg: RiptTrainConfig, rank: int, iteration: int) -> None:
    """Reseed every RNG from (seed, rank, iteration): a resumed run replays an uninterrupted one exactly."""
    s = (cfg.seed * 1_000_003 + rank * 10_007 + iteration) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def collect(run: Run, collector: GroupedCollector):
    model = run.model
    model.eval()
    collector.policy = make_chunk_policy(
        model,
        run.preprocessor,
        run.postprocessor,
        guidance_scale=run.cfg.rollout.guidance_scale,
        n_action_steps=model.config.n_action_steps,
        # several tasks: the collector sends each row's instruction itself (obs["task"])
        task=None if collector.multi_task else collector.instruction,
    )
    return collector.collect()


def process_advantages(run: Run, episodes: list[EpisodeRecord]) -> tuple[list[float], dict[str, float]]:
    """Processed (non-negative for the weighted objective) per-episode weights and advantage statistics."""
    if not episodes:
        return [], {}
    if run.cfg.advantage.estimator == "success":
        for ep in episodes:
            ep.advantage = 1.0 if ep.success else -1.0
    raw = torch.tensor([ep.advantage for ep in episodes], dtype=torch.float32)
    out = run.cfg.advantage.processor()(raw)
    hist = torch.histc(raw, bins=5, min=-1.0, max=1.0).tolist()
    stats = {f"advantage/{k}": v for k, v in out.stats.items()}
    stats.update({f"advantage/hist_{i}": h for i, h in enumerate(hist)})
    return out.values.tolist(), stats


def training_batches(run: Run, rollouts: RiptDataset | None, generator: torch.Generator):
    """Samplers for one iteration: rollout frames balanced by episode, plus demo frames labelled good."""
    d = run.cfg.data
    shares = EpisodeShares(good=d.good_share, bad=d.bad_share, neutral=d.neutral_share, demo=0)
    if rollouts is not None and not any(
        getattr(shares, c) > 0 and len(rollouts.episodes_of(c)) for c in ("good", "bad", "neutral")
    ):
        # e.g. dynamic sampling off and every group all-failed (only neutral rollouts, neutral_share=0):
        # like an iteration whose groups were all dropped, train on the demos alone instead of crashing.
        if run.accelerator.is_main_process:
            logger.warning(
                "No rollout of a kind with a positive share (%s); this iteration trains on demos only.",
                shares,
            )
        rollouts = None
    demo_n = d.demo_batch_size if rollouts is not None else d.batch_size
    demo_sampler = EpisodeBalancedSampler(
        run.demo_data, EpisodeShares(good=0, bad=0, neutral=0, demo=1), generator
    )
    roll_sampler = None
    if rollouts is not None and d.batch_size > demo_n:
        roll_sampler = EpisodeBalancedSampler(
            rollouts, shares, generator, by_advantage=d.episode_weighting == "advantage"
        )

    def next_batch() -> dict[str, torch.Tensor]:
        parts = []
        if demo_n:
            parts.append(run.demo_data.get_batch(demo_sampler.sample(demo_n)))
        if roll_sampler is not None:
            parts.append(rollouts.get_batch(roll_sampler.sample(d.batch_size - demo_n)))
        return run.preprocessor(concat_batches(parts))

    return next_batch


def concat_batches(parts: list[dict]) -> dict:
    """One batch from the demo and rollout parts: tensors concatenated along rows, lists (`task`) joined.
    Fails with a fix when the parts carry different keys (e.g. demos with camera images, rollouts without)."""
    keys = set(parts[0])
    for part in parts[1:]:
        if set(part) != keys:
            raise ValueError(
                f"demo and rollout frames carry different keys (only in demos: {sorted(keys - set(part))}; only "
                f"in rollouts: {sorted(set(part) - keys)}). Record the demos with the env's cameras and image "
                "size (env.obs_type=state_pixels records both alike), or train a policy without image inputs."
            )
    return {
        k: sum((p[k] for p in parts), []) if isinstance(v, list) else torch.cat([p[k] for p in parts])
        for k, v in parts[0].items()
    }


def update_steps(run: Run, result) -> int:
    """Optimizer steps for this iteration: `update_steps_per_iteration`, times the collection rounds run when
    `optim.scale_updates_with_rounds` (the mean over ranks, so every rank steps the same number of times)."""
    cfg = run.cfg
    steps = cfg.optim.update_steps_per_iteration
    if not cfg.optim.scale_updates_with_rounds:
        return steps
    episodes = reduce_metrics({"episodes": float(result.stats.episodes)}, run.accelerator)["episodes"]
    return max(1, round(steps * episodes / (cfg.rollout.groups_per_round * cfg.rollout.rloo_batch_size)))


def updates(
    run: Run, next_batch, steps: int, *, step_scheduler: bool = True, desc: str | None = None
) -> dict[str, float]:
    """`steps` optimizer steps; a progress bar on the main process when `desc` is given."""
    acc = run.accelerator.gradient_accumulation_steps
    scheduler = run.scheduler if step_scheduler else None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps, desc=desc, disable=desc is None or not run.accelerator.is_main_process, leave=False
    )
    logs = []
    for _ in range(steps):
        logs.append(
            update_step(
                run.policy,
                [next_batch() for _ in range(acc)],
                run.optimizer,
                scheduler,
                run.accelerator,
                run.cfg.optim.gradient_clip_norm,
            )
        )
        bar.update(1)
    bar.close()
    return {f"train/{k}": _finite_mean([m[k] for m in logs]) for k in logs[-1]}


def _finite_mean(values: list[float]) -> float:
    """Mean of the finite values (a metric a step could not measure is NaN there); NaN if there are none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def eval_counts(run: Run) -> torch.Tensor:
    """(num_tasks, 2) held-out (successes, episodes) per task of env.task, summed over ranks: each task runs
    `eval.eval_episodes` episodes from the held-out seeds, split across ranks."""
    from lerobot_ript.envs.metaworld import make_vector_env

    cfg, acc, model = run.cfg, run.accelerator, run.model
    seeds = [cfg.eval.seed_start + i for i in range(cfg.eval.eval_episodes)][
        acc.process_index :: acc.num_processes
    ]
    counts = []
    for task in cfg.env.tasks:
        policy = make_chunk_policy(
            model,
            run.preprocessor,
            run.postprocessor,
            guidance_scale=cfg.eval.guidance_scale,
            n_action_steps=model.config.n_action_steps,
            task=task_instruction(task),
        )
        result = evaluate(
            lambda n, task=task: make_vector_env(cfg.env, n, task=task),
            policy,
            seeds,
            num_envs=max(1, min(cfg.eval.num_envs, len(seeds))),
            max_episode_steps=cfg.env.episode_length,
        )
        counts.append([float(result.successes.sum()), float(len(result.successes))])
    counts = torch.tensor(counts, dtype=torch.float64, device=acc.device)  # (num_tasks, 2)
    return acc.reduce(counts, reduction="sum") if acc.num_processes > 1 else counts


def run_eval(run: Run, iteration: int) -> dict[str, float]:
    """Held-out success (per task with several: `eval/success_rate/<task>`, and their mean as
    `eval/success_rate`), episodes split across ranks and gathered; history and plot on the main process."""
    cfg, acc = run.cfg, run.accelerator
    run.model.eval()
    t0 = time.perf_counter()
    counts = eval_counts(run)
    wins, n = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    lo, hi = wilson_interval(wins, n)
    entry = {
        "iteration": iteration,
        "episodes": run.state.episodes_seen,
        "success_rate": wins / max(n, 1),
        "ci_low": lo,
        "ci_high": hi,
        "n": n,
    }
    tasks = cfg.env.tasks
    per_task = {t: float(c[0] / max(c[1], 1)) for t, c in zip(tasks, counts.tolist(), strict=True)}
    if len(tasks) > 1:  # equal episodes per task: the pooled rate is the mean over tasks
        entry["tasks"] = per_task
    run.state.history.append(entry)
    if acc.is_main_process:
        plot_success(
            run.state.history, Path(cfg.output_dir) / "success.png", f"{cfg.experiment_name}: {cfg.env.task}"
        )
    logger.info(
        "eval @ iteration %d: success %.1f%% (95%% CI %.1f-%.1f, %d episodes)%s",
        iteration,
        100 * entry["success_rate"],
        100 * lo,
        100 * hi,
        n,
        "".join(f"; {t} {100 * r:.1f}%" for t, r in per_task.items()) if len(tasks) > 1 else "",
    )
    metrics = {
        "eval/success_rate": entry["success_rate"],
        "eval/ci_low": lo,
        "eval/ci_high": hi,
        "time/eval_s": time.perf_counter() - t0,
    }
    if len(tasks) > 1:
        metrics.update({f"eval/success_rate/{t}": r for t, r in per_task.items()})
    return metrics


def checkpoint(run: Run, collector: GroupedCollector) -> Path:
    run.state.skip_tracker = collector.skip_tracker.state_dict()
    run.state.fail_tracker = collector.fail_tracker.state_dict()
    if collector.seed_sampler.curriculum is not None:
        run.state.curriculum = collector.seed_sampler.curriculum.state_dict()
    run.state.seed_hash = {str(k): v for k, v in collector._seed_hash.items()}
    return save_checkpoint(
        run.cfg.checkpoints_dir,
        run.state.iteration,
        accelerator=run.accelerator,
        policy=run.policy,
        preprocessor=run.preprocessor,
        postprocessor=run.postprocessor,
        train_config=run.cfg,
        ript_state=dataclasses.asdict(run.state),
    )


# ----------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------
def make_collector(run: Run, *, record_images: bool = False) -> GroupedCollector:
    """The run's collector; `record_images` keeps the rollouts' camera frames (for a policy that reads images)."""
    from lerobot_ript.envs.metaworld import make_vector_env

    cfg, rank, world = run.cfg, run.accelerator.process_index, run.accelerator.num_processes
    r = cfg.rollout
    tracker, fail_tracker = SkipTracker(r.rollout_skip_threshold), SkipTracker(r.fail_skip_threshold)
    if run.state.skip_tracker:
        tracker.load_state_dict(run.state.skip_tracker)
    if run.state.fail_tracker:
        fail_tracker.load_state_dict(run.state.fail_tracker)
    curriculum = None
    if r.state_sampling == "signal":
        curriculum = StateCurriculum(r.rloo_batch_size, discount=r.curriculum_discount)
        if run.state.curriculum:
            curriculum.load_state_dict(run.state.curriculum)
    tasks = [
        CollectTask(
            task,
            task_instruction(task),
            lambda task=task, num_envs=r.rloo_batch_size: make_vector_env(
                cfg.env, num_envs, use_async=r.use_async_envs, task=task
            ),
        )
        for task in cfg.env.tasks
    ]
    # probing: slots of P or K - P sub-envs, as many as keep a round at groups_per_round x K sub-envs
    largest = max(r.probe_rollouts, r.rloo_batch_size - r.probe_rollouts)
    num_slots = r.groups_per_round * r.rloo_batch_size // largest if r.probe_rollouts else r.groups_per_round
    collector = GroupedCollector(
        policy=None,
        tasks=tasks,
        group_size=r.rloo_batch_size,
        num_slots=num_slots,
        goal_rollouts=max(1, -(-r.rollout_goal_per_step // world)),
        max_groups=r.max_groups_per_step,
        seed_sampler=SeedSampler(
            r.train_seed_pool, 0, seed=cfg.seed + rank, curriculum=curriculum, num_tasks=len(tasks)
        ),
        skip_tracker=tracker,
        fail_tracker=fail_tracker,
        dynamic_sampling=r.enable_dynamic_sampling,
        max_episode_steps=cfg.env.episode_length,
        overlap_inference=r.overlap_inference,
        keep_solved=r.keep_solved_groups,
        probe_rollouts=r.probe_rollouts,
        record_images=record_images,
    )
    collector._seed_hash.update({int(k): v for k, v in run.state.seed_hash.items()})
    return collector


def train(cfg: RiptTrainConfig, accelerator: Accelerator) -> Run:
    run = setup(cfg, accelerator)
    rank, main = accelerator.process_index, accelerator.is_main_process
    if not run.state.sft_done and not cfg.checkpoint_path and cfg.optim.sft_steps > 0:
        sft(run)
    if not run.state.history and cfg.eval.eval_at_start:
        run.metrics.log(run_eval(run, 0), step=0)
    collector = make_collector(run, record_images=bool(run.model.config.image_features))
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.num_train_steps, initial=run.state.iteration, disable=not main, desc="RIPT")
    try:
        while run.state.iteration < cfg.num_train_steps:
            it = run.state.iteration + 1
            seed_iteration(cfg, rank, it)
            collector.seed_sampler.rng = np.random.default_rng([cfg.seed, rank, it])
            timings = {}
            t0 = time.perf_counter()
            result = collect(run, collector)  # 1. rollouts
            timings["time/collect_s"] = time.perf_counter() - t0
            episodes = result.all_episodes
            weights, adv_stats = process_advantages(run, episodes)  # 2. advantages
            if cfg.data.save_rollouts and episodes:
                save_rollouts(run, episodes, it)
            run.state.replay = (
                run.state.replay + [[_ep_to_dict(e, w) for e, w in zip(episodes, weights, strict=True)]]
            )[-cfg.data.replay_iterations :]
            rollouts = _replay_dataset(run, episodes, weights)  # 3. training batches
            t1 = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank * 104_729 + it)
            n_updates = update_steps(run, result)
            if run.model.config.objective == "repel":
                run.model.set_reference()  # the trust region's policy: the one that collected these rollouts
            train_metrics = {
                **updates(run, training_batches(run, rollouts, gen), n_updates),
                "train/update_steps": float(n_updates),
            }
            timings["time/update_s"] = time.perf_counter() - t1  # 4. updates
            local = {**result.stats.as_dict(), **adv_stats, **train_metrics, **timings}
            del result, episodes, rollouts  # their camera frames go before the next collection
            metrics = reduce_metrics(_complete(local), accelerator)  # 5. log
            run.state.episodes_seen += int(metrics["rollout/episodes"])  # every rollout run, probes included
            run.state.iteration = it
            if cfg.eval.eval_interval and it % cfg.eval.eval_interval == 0 and it != cfg.num_train_steps:
                metrics.update(run_eval(run, it))  # 6. eval
            metrics["memory/max_rss_mb"] = _max_rss_mb()
            if it % cfg.log.log_interval == 0 or it == cfg.num_train_steps:
                run.metrics.log(metrics, step=it)
                bar.set_postfix(
                    loss=f"{metrics['train/loss']:.3f}", success=f"{metrics['rollout/success_rate']:.2f}"
                )
            budget_spent = 0 < cfg.rollout.max_train_episodes <= run.state.episodes_seen
            last_iteration = (
                it == cfg.num_train_steps or budget_spent
            )  # saved once below, after the final eval
            if it % cfg.save_interval == 0 and not last_iteration:
                checkpoint(run, collector)  # 7. checkpoint
            bar.update(1)
            if budget_spent:
                logger.info("rollout.max_train_episodes reached after %d iterations.", it)
                break
    finally:
        bar.close()
        collector.close()
    final_eval = not run.state.history or run.state.history[-1]["iteration"] != run.state.iteration
    if final_eval:
        run.metrics.log(run_eval(run, run.state.iteration), step=run.state.iteration)
    saved = last_checkpoint(cfg.checkpoints_dir)
    if final_eval or saved is None or saved.name != f"{run.state.iteration:06d}":
        checkpoint(run, collector)
    if os.environ.get(CHECKSUM_ENV_VAR) == "1":
        write_param_checksum(run)
    return run


# Test-only: when "1", each rank writes the checksum of the parameters it holds at the end of training to
# output_dir/param_checksum_rank<r>.txt, so a test can check that every rank ends with the saved model.
CHECKSUM_ENV_VAR = "LEROBOT_RIPT_TEST_WRITE_CHECKSUMS"


def param_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and raw bytes of every tensor, in sorted name order."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_param_checksum(run: Run) -> Path:
    path = Path(run.cfg.output_dir) / f"param_checksum_rank{run.accelerator.process_index}.txt"
    path.write_text(param_checksum(run.model.state_dict()) + "\n")
    return path


def sft(run: Run) -> None:
    """Supervised flow matching on the demos (every frame labelled good) before RIPT."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.optim.sft_learning_rate
    seed_iteration(cfg, run.accelerator.process_index, 0)
    gen = torch.Generator().manual_seed(cfg.seed + run.accelerator.process_index)
    # The RIPT scheduler does not step here: it would reset the lr to its own base (optim.learning_rate).
    metrics = updates(
        run, training_batches(run, None, gen), cfg.optim.sft_steps, step_scheduler=False, desc="SFT on demos"
    )
    for group in run.optimizer.param_groups:
        group["lr"] = cfg.optim.learning_rate
    run.state.sft_done = True
    run.metrics.log(
        {f"sft/{k.split('/', 1)[1]}": v for k, v in reduce_metrics(metrics, run.accelerator).items()}, 0
    )


def save_rollouts(run: Run, episodes: list[EpisodeRecord], iteration: int) -> Path:
    """This rank's rollouts of one iteration as a LeRobotDataset v3 with per-frame advantages and init_hash."""
    from lerobot_ript.data.writer import write_episodes

    rank = run.accelerator.process_index
    root = Path(run.cfg.output_dir) / "rollouts" / f"iter_{iteration:06d}_rank{rank}"
    if root.exists():  # a resumed run rewrites the iteration it replays
        import shutil

        shutil.rmtree(root)
    write_episodes(
        episodes, root, f"local/{run.cfg.experiment_name}-rollouts", run.cfg.env.fps, with_advantages=True
    )
    return root


def _replay_dataset(run: Run, current: list[EpisodeRecord], weights: list[float]) -> RiptDataset | None:
    """The rollouts trained on: the replay buffer's earlier iterations (serialised, without camera frames) and
    this iteration's episodes as collected (with their camera frames, if any), in that order."""
    earlier = [e for it in run.state.replay[:-1] for e in it]
    if not earlier and not current:
        return None
    data = RiptDataset(run.model.config.chunk_size, run.model.config.target_state_dim)
    if earlier:
        data.add_episodes([_ep_from_dict(e) for e in earlier], weights=[e["weight"] for e in earlier])
    if current:
        data.add_episodes(current, weights=[float(w) for w in weights])
    return data


def _ep_to_dict(ep: EpisodeRecord, weight: float) -> dict:
    """A JSON-able replay entry (saved in every checkpoint). Camera frames are left out: a policy that reads
    images trains on-policy only (`check_image_inputs` refuses data.replay_iterations > 1)."""
    return {
        "task": ep.task,
        "states": ep.states.tolist(),
        "actions": ep.actions.tolist(),
        "rewards": ep.rewards.tolist(),
        "success": bool(ep.success),
        "init_hash": int(ep.init_hash),
        "advantage": float(ep.advantage),
        "weight": float(weight),
    }


def _ep_from_dict(d: dict) -> EpisodeRecord:
    return EpisodeRecord(
        task=d["task"],
        states=np.asarray(d["states"], np.float32),
        actions=np.asarray(d["actions"], np.float32),
        rewards=np.asarray(d["rewards"], np.float32),
        success=d["success"],
        init_hash=d["init_hash"],
        advantage=d["advantage"],
    )


_TRAIN_KEYS = (
    "train/loss",
    "train/grad_norm",
    "train/lr",
    "train/update_s",
    "train/share_good",
    "train/share_bad",
)


def _complete(metrics: dict[str, float]) -> dict[str, float]:
    """Same keys on every rank (a rank with no rollouts has no advantage stats): fill gaps with NaN."""
    keys = [
        f"advantage/{k}"
        for k in (
            "mean",
            "std",
            "min",
            "max",
            "share_clipped",
            "share_nonfinite",
            "share_positive",
            "share_negative",
        )
    ]
    keys += [f"advantage/hist_{i}" for i in range(5)]
    return {**{k: float("nan") for k in keys}, **metrics}


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _flat_config(cfg: RiptTrainConfig) -> dict:
    from lerobot_ript.train.hub import redact_secrets

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = (
                    v if isinstance(v, int | float | str | bool | type(None)) else json.dumps(v, default=str)
                )
        return out

    return redact_secrets(flat(json.loads(json.dumps(dataclasses.asdict(cfg), default=str))))
