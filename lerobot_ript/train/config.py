"""The configuration tree of `lerobot_ript.train` (draccus; YAML files in `configs/` are thin overrides).

Where the design notes' names live:
  experiment_name, output_dir, seed, num_train_steps, checkpoint_path, save_interval, verbose -> top level
  dataset_id, demo_batch_size -> data.*         action_chunk_size -> policy.chunk_size
  image_size, target_state_dim, cfg_alpha, enable_cfg_safe_copy, objective -> policy.*
  rloo_batch_size, rollout_goal_per_step, rollout_skip_threshold, enable_dynamic_sampling -> rollout.*
  advantage_normalization/_clipping/_clip_value/_negative_handling -> advantage.{normalization, ...}
  learning_rate, weight_decay, gradient_clip_norm, gradient_accumulation_steps, enable_amp -> optim.*
  enable_wandb, log_interval -> log.*
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lerobot_ript.advantages import AdvantageProcessor
from lerobot_ript.data.dataset import FAILED_DEMOS
from lerobot_ript.envs import MetaWorldStateEnvConfig
from lerobot_ript.policy.configuration_ript import RiptConfig, _choice_error


def _default_policy() -> RiptConfig:
    return RiptConfig(device="cpu", chunk_size=8, n_action_steps=4, hidden_dim=256, push_to_hub=False)


@dataclass
class RolloutConfig:
    # Rollouts per initial state K (>= 2): RLOO's leave-one-out baseline needs at least two.
    rloo_batch_size: int = 8
    # Groups (initial states) stepped together in one collection round (>= 1); one vector env of K each.
    groups_per_round: int = 8
    # Rollouts with signal (from mixed groups) wanted per iteration, summed over all processes (>= 1).
    rollout_goal_per_step: int = 64
    # Cap on groups tried per iteration and process, so dynamic sampling never loops forever (>= 1).
    max_groups_per_step: int = 16
    # Drop groups whose K rewards are all equal and sample more (RIPT-VLA dynamic sampling).
    enable_dynamic_sampling: bool = True
    # Keep the rollouts of all-success groups as good data (advantage 1/(K-1)) instead of dropping them (dynamic
    # sampling) or labelling them neutral: they carry no RLOO signal but are optimal behaviour for the cfg
    # objective. They do not count toward rollout_goal_per_step. On by default: without them RIPT trailed
    # success-filtered fine-tuning (benchmarks/learning/RESULTS.md, 3,840 episodes: 33.5% -> 42.0% with them).
    keep_solved_groups: bool = True
    # Skip an initial state after this many all-success groups in a row (0 disables skipping).
    rollout_skip_threshold: int = 3
    # Skip an initial state after this many all-failure groups in a row (0 disables): like the rule above, it
    # is skipped that many times and then retried. Such groups carry no signal, and at an equal episode
    # budget every rollout spent on a state the policy cannot yet solve is lost to the states that teach.
    fail_skip_threshold: int = 0
    # Probe each initial state with this many of its K rollouts first (0 = off; 1 to K - 1, with dynamic
    # sampling): a state whose probe rollouts all fail is dropped after them instead of after K, and the others
    # run from the same state in a later round (the episode-saving variant of dynamic sampling). K / 2 keeps a
    # round's sub-env count; the skip trackers and the curriculum count a dropped probe as a failed group.
    probe_rollouts: int = 0
    # How training initial states are drawn from the pool: "uniform", or "signal" (a curriculum: each state in
    # proportion to the probability that a group of K from it has mixed outcomes, from its discounted history of
    # successes; states always failed or always solved are drawn less, so fewer episodes go to groups that
    # dynamic sampling drops). "signal" is the default since the eighth measurement of the learning benchmark
    # (benchmarks/learning/RESULTS.md: with data.episode_weighting=advantage, 60.5% held-out success against
    # 52.7% for uniform draws of both, 3 seeds each).
    state_sampling: str = "signal"
    # "signal" only: weight of a state's earlier groups when a new one finishes, in [0, 1] (0 = the last group only).
    curriculum_discount: float = 0.5
    # Classifier-free guidance scale w (>= 0) used while collecting rollouts.
    guidance_scale: float = 1.0
    # Training initial states are seeds in [0, train_seed_pool) (held-out evaluation uses eval.seed_start+); with
    # several tasks (env.task), each task has this pool, and groups are drawn over every (task, seed) state:
    # uniformly, or by the curriculum of state_sampling=signal across the tasks.
    train_seed_pool: int = 200
    # Stop training once this many rollouts (all processes) were collected; 0 = no limit (equal-budget runs).
    max_train_episodes: int = 0
    # Use gymnasium AsyncVectorEnv (processes) instead of SyncVectorEnv; sync is faster on 2 cores.
    use_async_envs: bool = False
    # Infer one half of the groups' next action chunk on a worker thread while the other half steps its envs
    # (needs groups_per_round >= 2). Meant for inference on a GPU; on a 2-core CPU it was SLOWER than in-line
    # inference (benchmarks/results/rollout_throughput.md: the Python env loop and the worker's small torch ops
    # contend for the GIL), so it is off by default. Not yet measured on a GPU.
    overlap_inference: bool = False


ESTIMATORS = ("rloo", "success")


@dataclass
class AdvantageConfig:
    # Per-rollout signal: "rloo" (R_i - mean of the other K-1 rewards in its group) or "success" (+1 for a
    # successful rollout, -1 for a failed one, no baseline: with data.bad_share=0 this is success-filtered
    # fine-tuning, a baseline).
    estimator: str = "rloo"
    # Advantage normalisation: standard | robust | none.
    normalization: str = "none"
    # Advantage clipping: symmetric | asymmetric | none.
    clipping: str = "symmetric"
    # Clip bound (> 0), in normalised advantage units.
    clip_value: float = 3.0
    # Negative handling for the "weighted" objective's weights: softplus | abs | clamp | none.
    negative_handling: str = "clamp"

    def processor(self) -> AdvantageProcessor:
        return AdvantageProcessor(
            normalization=self.normalization,
            clipping=self.clipping,
            clip_value=self.clip_value,
            negative_handling=self.negative_handling,
        )


@dataclass
class DataConfig:
    # Demonstration LeRobotDataset: repo id (with dataset_root for a local copy). None: record scripted demos.
    dataset_id: str | None = None
    # Local root of the demonstration dataset (the Hub is never contacted when it exists).
    dataset_root: str | None = None
    # Scripted demos recorded when dataset_id is None (>= 1), and their action noise std (>= 0).
    num_demos: int = 5
    # See num_demos.
    demo_noise: float = 0.3
    # Training batch size in frames per optimizer step and process, rollouts + demos (>= 1).
    batch_size: int = 256
    # Demonstration frames (labelled good) in each batch (0..batch_size).
    demo_batch_size: int = 64
    # Share of rollout frames drawn from good / bad / neutral episodes (balanced by episode, renormalised).
    # Failures are not trained by default: in the learning benchmark (RESULTS.md, sixth measurement, 3 seeds)
    # bad-labelled failure frames pulled the good-conditioned output down through the shared network (46.2%
    # held-out success against 52.7% without them). Set bad_share > 0 to train the failure branch, e.g. for
    # policy.guidance_negative=bad or the weighted objective's negative handling.
    good_share: float = 1.0
    # See good_share.
    bad_share: float = 0.0
    # See good_share (zero-advantage rollouts exist only without dynamic sampling).
    neutral_share: float = 0.0
    # How a rollout episode is drawn within its kind: "uniform", or "advantage" (in proportion to |RLOO
    # advantage|, so a rare success on a hard initial state outweighs a success on a state its group solved).
    # "advantage" is the default (see rollout.state_sampling). The "weighted" objective already weights each
    # frame by its advantage in the loss: it needs "uniform" (validate() says so), or each rollout would be
    # weighted twice.
    episode_weighting: str = "advantage"
    # Demonstration episodes whose `success` column says they failed (the scripted recorder keeps them):
    # "keep" (trained as good, like every demo), "drop" (not trained on), or "bad" (labelled bad: with the cfg
    # objective they train the failure branch that guidance steers away from). Datasets without a `success`
    # column count every episode as successful.
    failed_demos: str = "keep"
    # Rollouts of the last N iterations are trained on (>= 1; 1 = on-policy only).
    replay_iterations: int = 1
    # Write each iteration's rollouts as a LeRobotDataset under output_dir/rollouts/.
    save_rollouts: bool = False


@dataclass
class OptimConfig:
    # AdamW learning rate (> 0).
    learning_rate: float = 1e-4
    # AdamW weight decay (>= 0).
    weight_decay: float = 0.0
    # Max gradient norm (> 0), applied only when gradients are synchronised.
    gradient_clip_norm: float = 1.0
    # Micro-batches accumulated per optimizer step (>= 1).
    gradient_accumulation_steps: int = 1
    # Optimizer steps per RIPT iteration (>= 1).
    update_steps_per_iteration: int = 30
    # Count update_steps_per_iteration per collection round (rollout.groups_per_round x rloo_batch_size
    # episodes) instead of per iteration: an iteration that dynamic sampling stretched to two rounds then
    # makes twice the updates, so every collected episode buys the same number of optimizer steps (at an
    # equal episode budget, dynamic sampling otherwise halves the updates). Same count on every rank.
    scale_updates_with_rounds: bool = False
    # Mixed precision: no | bf16 | fp16 (fp16 needs CUDA; on a CPU it is reported and not used).
    mixed_precision: str = "no"
    # Shorthand from the design notes: true = bf16 when mixed_precision is "no".
    enable_amp: bool = False
    # Supervised steps on the demos before RIPT when no checkpoint_path is given (>= 0).
    sft_steps: int = 0
    # Learning rate of the SFT phase (> 0).
    sft_learning_rate: float = 3e-4


@dataclass
class EvalConfig:
    # Evaluate every N iterations (0: only before and after training).
    eval_interval: int = 5
    # Evaluate before the first RIPT iteration (the start point of the success curve).
    eval_at_start: bool = True
    # Held-out episodes per evaluation and task (>= 1); 200 gives about +-7 points. With several tasks (env.task),
    # each task runs this many (the same held-out seeds) and is logged as eval/success_rate/<task>;
    # eval/success_rate is the mean over the tasks.
    eval_episodes: int = 50
    # Guidance scale w (>= 0) at evaluation.
    guidance_scale: float = 1.0
    # Held-out initial states are seeds from here on; never used for training.
    seed_start: int = 1_000_000
    # Parallel envs during evaluation (>= 1).
    num_envs: int = 10


@dataclass
class LogConfig:
    # Log to Weights & Biases through Accelerate's tracker (offline mode works with no network).
    enable_wandb: bool = False
    # wandb project name.
    wandb_project: str = "lerobot-ript"
    # wandb mode: offline | online | disabled.
    wandb_mode: str = "offline"
    # Log every N iterations (>= 1).
    log_interval: int = 1


@dataclass
class HubConfig:
    # Push the final policy (with processors and a model card) to the Hub.
    push_to_hub: bool = False
    # Hub repo id, e.g. "user/ript-push-v3" (required with push_to_hub).
    hub_repo_id: str | None = None
    # Also push the last rollout dataset (as a dataset repo "<hub_repo_id>-rollouts").
    push_rollout_dataset: bool = False
    # Create the repo private.
    private: bool | None = None


@dataclass
class RiptTrainConfig:
    # Name of the run (used in logs and the model card).
    experiment_name: str = "ript"
    # Directory of checkpoints, logs and plots.
    output_dir: str = "outputs/ript"
    # Global seed (each process adds its rank).
    seed: int = 0
    # RIPT iterations (collect -> advantages -> updates) (>= 0).
    num_train_steps: int = 10
    # A `pretrained_model` directory (or Hub id) of a ript policy to post-train. None: SFT from scratch.
    checkpoint_path: str | None = None
    # Save a checkpoint every N iterations (>= 1); the last iteration is always saved.
    save_interval: int = 5
    # Resume from output_dir/checkpoints/last (optimizer, scheduler, RNGs, counters, skip tracker).
    resume: bool = False
    # More log lines (per-phase timings).
    verbose: bool = False
    # Torch CPU threads per process (>= 1). 1 is the fastest for small policies on a small, shared CPU: a
    # second thread costs more in synchronisation than it gains (up to 8x slower on a loaded 2-core machine).
    cpu_threads: int = 1
    policy: RiptConfig = field(default_factory=_default_policy)
    env: MetaWorldStateEnvConfig = field(default_factory=MetaWorldStateEnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def validate(self) -> None:
        """Every fail-fast check, before any process group starts."""
        r, d, o = self.rollout, self.data, self.optim
        _require(
            r.rloo_batch_size >= 2,
            "rollout.rloo_batch_size",
            r.rloo_batch_size,
            "must be >= 2: RLOO needs a leave-one-out baseline",
        )
        _require(
            r.probe_rollouts == 0 or (0 < r.probe_rollouts < r.rloo_batch_size and r.enable_dynamic_sampling),
            "rollout.probe_rollouts",
            r.probe_rollouts,
            f"must be 0 (off) or in [1, rloo_batch_size - 1] = [1, {r.rloo_batch_size - 1}] with "
            "rollout.enable_dynamic_sampling=true (a probe drops a group without signal early)",
        )
        for name, value in [
            ("rollout.groups_per_round", r.groups_per_round),
            ("rollout.rollout_goal_per_step", r.rollout_goal_per_step),
            ("rollout.max_groups_per_step", r.max_groups_per_step),
            ("rollout.train_seed_pool", r.train_seed_pool),
            ("data.batch_size", d.batch_size),
            ("data.replay_iterations", d.replay_iterations),
            ("data.num_demos", d.num_demos),
            ("optim.gradient_accumulation_steps", o.gradient_accumulation_steps),
            ("optim.update_steps_per_iteration", o.update_steps_per_iteration),
            ("save_interval", self.save_interval),
            ("eval.eval_episodes", self.eval.eval_episodes),
            ("eval.num_envs", self.eval.num_envs),
            ("log.log_interval", self.log.log_interval),
            ("cpu_threads", self.cpu_threads),
        ]:
            _require(value >= 1, name, value, "must be >= 1")
        for name, value in [
            ("num_train_steps", self.num_train_steps),
            ("rollout.rollout_skip_threshold", r.rollout_skip_threshold),
            ("rollout.fail_skip_threshold", r.fail_skip_threshold),
            ("rollout.guidance_scale", r.guidance_scale),
            ("eval.guidance_scale", self.eval.guidance_scale),
            ("eval.eval_interval", self.eval.eval_interval),
            ("data.demo_noise", d.demo_noise),
            ("data.good_share", d.good_share),
            ("data.bad_share", d.bad_share),
            ("data.neutral_share", d.neutral_share),
            ("optim.weight_decay", o.weight_decay),
            ("optim.sft_steps", o.sft_steps),
        ]:
            _require(
                value >= 0, name, value, "must be >= 0 (negative rates, counts and scales have no meaning)"
            )
        for name, value in [
            ("optim.learning_rate", o.learning_rate),
            ("optim.sft_learning_rate", o.sft_learning_rate),
            ("optim.gradient_clip_norm", o.gradient_clip_norm),
        ]:
            _require(value > 0, name, value, "must be > 0")
        _require(
            0 <= d.demo_batch_size <= d.batch_size,
            "data.demo_batch_size",
            d.demo_batch_size,
            f"must be in [0, data.batch_size={d.batch_size}]",
        )
        _require(
            d.good_share + d.bad_share + d.neutral_share > 0 or d.demo_batch_size == d.batch_size,
            "data.good_share+bad_share+neutral_share",
            0,
            "must be > 0 when rollout frames are trained on",
        )
        bad_frames = trains_bad_frames(d.bad_share, d.failed_demos)
        if self.policy.guidance_negative == "bad" and not bad_frames:
            raise ValueError(
                "policy.guidance_negative='bad' steers away from the failure-conditioned branch, but "
                "data.bad_share=0 and data.failed_demos!='bad' train no frame with the bad label. Set "
                "--data.bad_share=<value > 0> (or --data.failed_demos=bad), or --policy.guidance_negative=null."
            )
        if self.policy.objective == "repel" and not bad_frames:
            raise ValueError(
                "policy.objective='repel' pushes the policy away from failure frames, but data.bad_share=0 and "
                "data.failed_demos!='bad' put none in a batch, so it would train exactly like 'cfg'. Set "
                "--data.bad_share=<value > 0> (e.g. --data.batch_size=384 --data.good_share=0.6 "
                "--data.bad_share=0.4 keeps the default's 192 success frames), or --policy.objective=cfg."
            )
        if self.policy.objective == "weighted" and d.episode_weighting == "advantage":
            raise ValueError(
                "policy.objective='weighted' weights each frame by its processed advantage in the loss, and "
                "data.episode_weighting='advantage' (the default) also draws each rollout in proportion to "
                "|advantage|, so every rollout would be weighted twice. Set --data.episode_weighting=uniform "
                "with the weighted objective (as the learning benchmark's `weighted` arm does)."
            )
        _check_choice("optim.mixed_precision", o.mixed_precision, ("no", "bf16", "fp16"))
        _check_choice("log.wandb_mode", self.log.wandb_mode, ("offline", "online", "disabled"))
        _check_choice("advantage.estimator", self.advantage.estimator, ESTIMATORS)
        _check_choice("data.episode_weighting", d.episode_weighting, ("uniform", "advantage"))
        _check_choice("rollout.state_sampling", r.state_sampling, ("uniform", "signal"))
        _require(
            0 <= r.curriculum_discount <= 1,
            "rollout.curriculum_discount",
            r.curriculum_discount,
            "must be in [0, 1]",
        )
        _check_choice("data.failed_demos", d.failed_demos, FAILED_DEMOS)
        try:
            self.advantage.processor()  # validates the advantage choices (did-you-mean on a typo)
        except ValueError as err:  # name the config key the user sets, not the processor's field
            raise ValueError(str(err).replace("AdvantageProcessor.", "advantage.")) from err
        self.policy.validate_hyperparameters()
        if self.policy.is_vla and self.policy.backbone_path is None and not self.checkpoint_path:
            raise ValueError(
                f"policy.backbone={self.policy.backbone!r} wraps a LeRobot {self.policy.backbone} checkpoint: set "
                f"--policy.backbone_path=<a local directory or a Hub id of a {self.policy.backbone} policy "
                "fine-tuned on this robot>, or --checkpoint_path=<a ript checkpoint> to continue from one."
            )
        if self.hub.push_to_hub and not self.hub.hub_repo_id:
            raise ValueError(
                "hub.push_to_hub=true needs hub.hub_repo_id, e.g. --hub.hub_repo_id=user/ript-push."
            )
        if d.dataset_id is None and d.dataset_root is not None:
            raise ValueError(
                "data.dataset_root is set without data.dataset_id; set both (any id for a local copy)."
            )
        if d.dataset_id is None:
            # the loop records the demos with the env's cameras, so the policy will read all of them
            check_image_inputs(self, env_camera_keys(self.env))
        names = self.policy.task_names
        if names is not None:
            unknown = [t for t in self.env.tasks if t not in names]
            if unknown:
                raise ValueError(
                    f"policy.task_names={list(names)} lacks {unknown} of env.task={self.env.task!r}: the policy could "
                    "not be conditioned on them. Add them, or leave policy.task_names unset (the loop sets it from "
                    "env.task when that names several tasks)."
                )

    @property
    def mixed_precision(self) -> str:
        if self.optim.mixed_precision == "no" and self.optim.enable_amp:
            return "bf16"
        return self.optim.mixed_precision

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.output_dir) / "checkpoints"


def env_camera_keys(env: MetaWorldStateEnvConfig) -> list[str]:
    """The policy keys of the camera images the env renders (`observation.images.<camera>`; none for "state")."""
    return sorted(v for k, v in env.features_map.items() if k.startswith("pixels/"))


def check_image_inputs(cfg: RiptTrainConfig, image_keys: Sequence[str]) -> None:
    """Fail fast when a policy that reads the camera images `image_keys` (`observation.images.<camera>`) cannot
    train in this run: the env must render every one of them, and the replay buffer, which is saved as JSON in
    every checkpoint, keeps no camera frames, so such a policy trains on-policy only."""
    if not image_keys:
        return
    rendered = env_camera_keys(cfg.env)
    missing = sorted(set(image_keys) - set(rendered))
    if missing:
        raise ValueError(
            f"the policy reads the camera images {missing}, but the env (env.obs_type={cfg.env.obs_type!r}, "
            f"env.cameras={cfg.env.cameras!r}) renders {rendered or 'none'}. Set --env.obs_type=state_pixels "
            "and --env.cameras=<the policy's cameras, comma-separated> (and --env.image_size to the demos' size)."
        )
    if cfg.data.replay_iterations > 1:
        raise ValueError(
            f"data.replay_iterations={cfg.data.replay_iterations} replays earlier iterations' rollouts from the "
            "run state, which every checkpoint saves as JSON without camera frames, and this policy reads camera "
            f"images {list(image_keys)}. Use --data.replay_iterations=1 (on-policy), or a policy without image "
            "inputs."
        )


def trains_bad_frames(bad_share: float, failed_demos: str) -> bool:
    """Whether a batch can hold frames with the bad label: failed rollouts (data.bad_share > 0) or failed demos
    labelled bad (data.failed_demos="bad")."""
    return bad_share > 0 or failed_demos == "bad"


def _require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} {rule}. Fix it in the YAML file or with --{name}=<value>.")


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise _choice_error(name, value, valid)


def known_keys(cls=RiptTrainConfig, prefix: str = "") -> set[str]:
    """Every dotted key of the tree, e.g. 'rollout.rloo_batch_size'."""
    keys = set()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.add(key)
        ftype = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(ftype):
            keys |= known_keys(type(ftype), key + ".")
    return keys


def check_unknown_keys(keys: list[str]) -> None:
    """Raise a ValueError with a "did you mean" for each dotted key that the tree does not have."""
    valid = known_keys()
    problems = []
    for key in keys:
        if (
            key in valid
            or key.startswith("policy.input_features")
            or key.startswith("policy.output_features")
        ):
            continue
        close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
        problems.append(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if problems:
        raise ValueError("; ".join(problems) + ". See `python -m lerobot_ript.train --help` for every key.")
