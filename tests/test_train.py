"""The training script (`python -m lerobot_ript.train`) end to end, through the real CLI in subprocesses.

- config validation, in-process and before any process group starts;
- a debug run: LeRobot-layout checkpoints that reload in a fresh process, metrics, plot, wandb offline run,
  push to a local Hub server (tests/hub_server.py), and a run whose Hub is down;
- `lerobot-eval` on a checkpoint (slow);
- exact resume after SIGKILL and atomic checkpoints under fault injection (slow);
- `update_step`: gradient accumulation equals one big batch, one optimizer step per call;
- a policy that reads camera images: one iteration of the loop in-process on state_pixels push-v3 (images and
  the instruction in every batch), and the rules around it (env cameras, replay without frames).

Each CLI run takes 20-45 s on a 2-core machine (mostly imports, demo recording, env builds and evaluation), so
one debug run is shared by several tests (`debug_run`, module scope), each checking one concern. The 2-process
`accelerate launch` run is in test_train_multiprocess.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import LocalHubServer
from safetensors.torch import load_file

from lerobot_ript.data.writer import EpisodeRecord

REPO_ROOT = Path(__file__).resolve().parents[1]
DEBUG_YAML = REPO_ROOT / "configs" / "debug.yaml"
TOKEN = "hf_FAKEtoken1234567890"
HUB_REPO = "user/ript-debug"
RUN_TIMEOUT_S = 600

# Overrides of configs/debug.yaml that keep a run small: 1 demo, 20-step episodes, one group of K=2 per
# iteration, 1 optimizer step per iteration on 8 frames, 1 held-out episode per evaluation. Dynamic sampling is
# off so that rollouts (all-failed, zero-advantage groups included) reach the advantage phase and its statistics.
TINY = (
    "--env.episode_length=20",
    "--data.num_demos=1",
    "--data.batch_size=8",
    "--data.demo_batch_size=4",
    "--optim.sft_steps=2",
    "--optim.update_steps_per_iteration=1",
    "--rollout.groups_per_round=1",
    "--rollout.max_groups_per_step=1",
    "--rollout.rollout_goal_per_step=2",
    "--rollout.enable_dynamic_sampling=false",
    "--eval.eval_episodes=1",
    "--eval.num_envs=1",
)


# ------------------------------------------------------------------------------------------------ helpers
def subprocess_env(tmp: Path, **extra: str | None) -> dict[str, str]:
    """A hermetic environment: a temporary HF_HOME (no default accelerate config is picked up), wandb offline
    in a temporary dir, the Hub offline, one OpenMP thread per process (the machine's cores are shared)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "HF_", "WANDB_", "LEROBOT_RIPT_"))
    }
    (tmp / "hf_home").mkdir(parents=True, exist_ok=True)
    env.update(
        HF_HOME=str(tmp / "hf_home"),
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def train_cmd(out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lerobot_ript.train",
        "--config_path",
        str(DEBUG_YAML),
        f"--output_dir={out}",
        *TINY,
        *overrides,
    ]


@dataclass
class LoopSpy:
    """What an in-process loop run handed its phases: update micro-batches, collectors and their results, the
    `task` given to every make_chunk_policy."""

    batches: list
    collectors: list
    results: list
    chunk_tasks: list


def spy_on_loop(monkeypatch) -> LoopSpy:
    """Wrap the loop's update_step, collect and make_chunk_policy to record what they get (behaviour unchanged)."""
    import lerobot_ript.train.loop as loop

    spy = LoopSpy([], [], [], [])
    real_update, real_collect, real_chunk_policy = loop.update_step, loop.collect, loop.make_chunk_policy

    def update_step(policy, micro_batches, *args, **kwargs):
        spy.batches.extend(micro_batches)
        return real_update(policy, micro_batches, *args, **kwargs)

    def collect(run, collector):
        spy.collectors.append(collector)
        spy.results.append(real_collect(run, collector))
        return spy.results[-1]

    def make_chunk_policy(*args, **kwargs):
        spy.chunk_tasks.append(kwargs.get("task"))
        return real_chunk_policy(*args, **kwargs)

    monkeypatch.setattr(loop, "update_step", update_step)
    monkeypatch.setattr(loop, "collect", collect)
    monkeypatch.setattr(loop, "make_chunk_policy", make_chunk_policy)
    return spy


def debug_config(out: Path, *overrides: str):
    """`train_cmd(out, *overrides)`'s configuration, parsed in this process (for `train_in_process`)."""
    from lerobot_ript.train.cli import parse_config

    return parse_config(train_cmd(out, *overrides)[3:])  # without `python -m lerobot_ript.train`


# two tasks, a group of each per iteration; every (failed) rollout labelled bad and trained with bad_share
TWO_TASKS = (
    "--env.task=push-v3,reach-v3",
    "--rollout.groups_per_round=2",
    "--rollout.max_groups_per_step=2",
    "--advantage.estimator=success",
    "--data.good_share=0.5",
    "--data.bad_share=0.5",
)


def train_in_process(cfg):
    """`loop.train` in this process, torch's thread count restored afterwards."""
    import lerobot_ript.train.loop as loop

    threads = torch.get_num_threads()
    try:
        return loop.train(cfg, loop.build_accelerator(cfg))
    finally:
        torch.set_num_threads(threads)


def two_rank_train_cmd(out: Path, *overrides: str) -> list[str]:
    """`train_cmd` under `accelerate launch --config_file accelerate_configs/cpu.yaml`: two real gloo ranks."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(REPO_ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", str(free_port())]
    return launch + train_cmd(out, *overrides)[1:]  # `-m lerobot_ript.train ...` without python


def run_ok(cmd: list[str], env: dict[str, str], log: Path) -> str:
    """Run to completion, keep the combined output in `log`, fail with its tail on a non-zero exit."""
    proc = subprocess.run(
        cmd,
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    log.write_text(proc.stdout)
    assert proc.returncode == 0, f"exit code {proc.returncode}; output tail:\n{proc.stdout[-4000:]}"
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ckpt(out: Path, name: str) -> Path:
    return out / "checkpoints" / name / "pretrained_model"


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-equal: same names, dtypes, shapes and values (tolerance 0)."""
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, (
        f"{len(different)}/{len(a)} tensors differ, e.g. {different[:3]}: max abs diff "
        + str(max(float((a[k].double() - b[k].double()).abs().max()) for k in different))
    )


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def files_containing(root: Path, needle: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


# ------------------------------------------------------------------------------- 1. validation (in-process)
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--rollout.rloo_batchsize=4"],
            ["unknown key 'rollout.rloo_batchsize'", "did you mean 'rollout.rloo_batch_size'"],
        ),
        (
            ["--rollout.rloo_batch_size=1"],
            [
                "rollout.rloo_batch_size=1",
                "must be >= 2",
                "leave-one-out",
                "--rollout.rloo_batch_size=<value>",
            ],
        ),
        (
            ["--optim.learning_rate=-1"],
            ["optim.learning_rate=-1.0", "must be > 0", "--optim.learning_rate=<value>"],
        ),
        (["--data.good_share=-0.1"], ["data.good_share=-0.1", "must be >= 0", "--data.good_share=<value>"]),
        (
            ["--rollout.probe_rollouts=2"],  # debug.yaml's K = 2: no rollout left to complete a probe
            ["rollout.probe_rollouts=2", "[1, 1]", "--rollout.probe_rollouts=<value>"],
        ),
        (
            ["--rollout.probe_rollouts=1", "--rollout.enable_dynamic_sampling=false"],
            ["rollout.probe_rollouts=1", "enable_dynamic_sampling=true"],
        ),
        (
            ["--policy.objective=cfgg"],
            ["policy.objective='cfgg'", "['cfg', 'cfgrl', 'weighted', 'repel']", "Did you mean 'cfg'?"],
        ),
        (
            ["--advantage.normalization=stdd"],
            ["advantage.normalization='stdd'", "'standard', 'robust', 'none'", "Did you mean 'standard'?"],
        ),
        (
            ["--optim.mixed_precision=bf61"],
            ["optim.mixed_precision='bf61'", "['no', 'bf16', 'fp16']", "Did you mean 'bf16'?"],
        ),
        (["--optim.mixed_precision=fp8"], ["optim.mixed_precision='fp8'", "['no', 'bf16', 'fp16']"]),
        (["--data.failed_demos=dorp"], ["data.failed_demos='dorp'", "Did you mean 'drop'?"]),
        (["--rollout.state_sampling=signl"], ["rollout.state_sampling='signl'", "Did you mean 'signal'?"]),
        (["--rollout.curriculum_discount=2"], ["rollout.curriculum_discount=2.0", "must be in [0, 1]"]),
        (
            ["--policy.guidance_negative=bad", "--data.bad_share=0"],
            [
                "guidance_negative='bad'",
                "data.bad_share=0",
                "--data.bad_share=",
                "--policy.guidance_negative=null",
            ],
        ),
        (
            ["--policy.objective=repel", "--data.bad_share=0"],
            ["objective='repel'", "data.bad_share=0", "--data.bad_share=", "--policy.objective=cfg"],
        ),
        (
            ["--policy.objective=weighted", "--data.episode_weighting=advantage"],
            [
                "objective='weighted'",
                "episode_weighting='advantage'",
                "twice",
                "--data.episode_weighting=uniform",
            ],
        ),
        (
            # state_pixels: the recorded demos, so the policy, have camera images, which the replay drops
            ["--env.obs_type=state_pixels", "--data.replay_iterations=2"],
            ["data.replay_iterations=2", "without camera frames", "--data.replay_iterations=1"],
        ),
        (
            ["--env.task=mt4"],
            ["env.task='mt4' is not a MetaWorld v3 task or task set", "Did you mean 'mt5' or"],
        ),
        (
            ["--env.task=push-v3,push-back-v3"],
            ["env.task='push-v3,push-back-v3'", "share the instruction", "separate runs"],
        ),
        (
            ["--env.task=mt3", "--policy.task_names=[push-v3]"],
            [
                "policy.task_names=['push-v3'] lacks ['reach-v3', 'drawer-open-v3']",
                "leave policy.task_names unset",
            ],
        ),
    ],
    ids=[
        "unknown-cli-key",
        "rloo-batch-1",
        "negative-lr",
        "negative-share",
        "probe-without-completion",
        "probe-without-dynamic-sampling",
        "objective",
        "normalization",
        "mixed-precision-typo",
        "mixed-precision-unknown",
        "failed-demos",
        "state-sampling",
        "curriculum-discount",
        "bad-guidance-without-bad-frames",
        "repel-without-bad-frames",
        "weighted-with-advantage-draws",
        "image-policy-replay",
        "unknown-task-set",
        "tasks-sharing-an-instruction",
        "task-names-without-an-env-task",
    ],
)
def test_invalid_config_fails_fast_with_value_rule_and_fix(args, expected):
    from lerobot_ript.train.cli import parse_config

    with pytest.raises(ValueError) as err:
        parse_config(["--config_path", str(DEBUG_YAML), *args])
    missing = [e for e in expected if e not in str(err.value)]
    assert not missing, f"message {str(err.value)!r} lacks {missing}"
    assert not torch.distributed.is_initialized()


def test_unknown_yaml_key_gets_did_you_mean(tmp_path):
    from lerobot_ript.train.cli import parse_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("num_train_steps: 2\nrollout:\n  rloo_batchsize: 4\n")
    with pytest.raises(
        ValueError, match=r"unknown key 'rollout\.rloo_batchsize' \(did you mean 'rollout\.rloo_batch_size'"
    ):
        parse_config(["--config_path", str(bad)])


def test_main_validates_before_building_the_accelerator(monkeypatch):
    """No process group (and no Accelerator) is started for a config that cannot run."""
    import lerobot_ript.train.loop as loop
    from lerobot_ript.train.cli import main

    def must_not_run(cfg):
        raise AssertionError("build_accelerator was reached with an invalid config")

    monkeypatch.setattr(loop, "build_accelerator", must_not_run)
    with pytest.raises(ValueError, match="rollout.rloo_batch_size=1"):
        main(["--config_path", str(DEBUG_YAML), "--rollout.rloo_batch_size=1"])
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    from lerobot_ript.train.cli import parse_config

    # the VLA presets need the user's checkpoint (validate() asks for it before any process starts)
    extra = ["--policy.backbone_path=user/checkpoint"] if "backbone:" in path.read_text() else []
    cfg = parse_config(["--config_path", str(path), *extra])
    assert cfg.rollout.rloo_batch_size >= 2
    # the preset name resolves to the same file
    assert parse_config(["--config_path", path.stem, *extra]) == cfg
    if extra:
        with pytest.raises(ValueError, match="--policy.backbone_path="):
            parse_config(["--config_path", str(path)])


# --------------------------------------------------------------------- 2 + 7. a debug run pushed to a Hub
@dataclass
class Run:
    out: Path
    log: str
    hub: LocalHubServer | None = None


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    """One single-process debug run with wandb (WANDB_MODE unset: log.wandb_mode=offline applies) and a push to
    a local Hub server; shared by the tests below, each checking one concern."""
    tmp = tmp_path_factory.mktemp("debug_run")
    out = tmp / "out"
    with LocalHubServer() as hub:
        env = subprocess_env(
            tmp,
            WANDB_MODE=None,
            HF_ENDPOINT=hub.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_TOKEN=TOKEN,
        )
        cmd = train_cmd(
            out,
            "--log.enable_wandb=true",
            "--log.wandb_mode=offline",
            "--hub.push_to_hub=true",
            f"--hub.hub_repo_id={HUB_REPO}",
        )
        log = run_ok(cmd, env, tmp / "train.log")
        yield Run(out, log, hub)


def test_debug_run_writes_lerobot_checkpoints(debug_run):
    ckpts = debug_run.out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["000001", "000002", "last"]  # no .tmp-* left
    assert (ckpts / "last").is_symlink() and os.readlink(ckpts / "last") == "000002"
    for it in ("000001", "000002"):
        pretrained = ckpt(debug_run.out, it)
        names = {p.name for p in pretrained.iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "train_config.json",
            "policy_preprocessor.json",
            "policy_postprocessor.json",
        } <= names
        assert any(n.startswith("policy_preprocessor_step_") and n.endswith(".safetensors") for n in names)
        assert json.loads((pretrained / "config.json").read_text())["type"] == "ript"
        train_config = json.loads((pretrained / "train_config.json").read_text())
        assert train_config["world_size"] == 1 and train_config["num_train_steps"] == 2
        state = ckpts / it / "training_state"
        assert {"optimizer.bin", "scheduler.bin", "ript_state_0.json"} <= {p.name for p in state.iterdir()}
        assert json.loads((state / "ript_state_0.json").read_text())["iteration"] == int(it)
    # each iteration trained: the two checkpoints hold different parameters
    a = load_file(ckpt(debug_run.out, "000001") / "model.safetensors")
    b = load_file(ckpt(debug_run.out, "000002") / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_reloads_in_a_fresh_process(debug_run, tmp_path):
    """LeRobot's own loading path, in a process that never imported lerobot_ript: the plugin registers through
    `register_third_party_plugins()`, and the processors (normalisation) come back with the model."""
    pretrained = ckpt(debug_run.out, "last")
    script = textwrap.dedent(
        f"""
        import json, sys
        import torch
        from safetensors.torch import load_file
        from lerobot.utils.import_utils import register_third_party_plugins
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
        assert "lerobot_ript" not in sys.modules
        register_third_party_plugins()
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors

        path = {str(pretrained)!r}
        policy = get_policy_class("ript").from_pretrained(path)
        pre, post = make_pre_post_processors(policy.config, pretrained_path=path)
        saved = load_file(path + "/model.safetensors")
        same = all(torch.equal(policy.state_dict()[k], v) for k, v in saved.items())
        ds = LeRobotDataset("local/push-v3-demos", root={str(debug_run.out / "demos")!r})
        frame = ds[0]
        obs = {{"observation.state": frame["observation.state"][None], "task": ["push"]}}
        torch.manual_seed(0)
        action = post(policy.select_action(pre(obs)))
        print(json.dumps({{"class": type(policy).__module__, "same": same, "n": len(saved),
                           "shape": list(action.shape), "finite": bool(torch.isfinite(action).all()),
                           "steps": [type(s).__name__ for s in pre.steps]}}))
        """
    )
    env = subprocess_env(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["class"].startswith("lerobot_ript.policy")
    assert result["same"] and result["n"] > 0
    assert result["shape"] == [1, 4] and result["finite"]  # MetaWorld: 4-D action
    assert "NormalizerProcessorStep" in result["steps"]


def test_debug_run_metrics_plot_and_learning_rates(debug_run):
    rows = read_metrics(debug_run.out)
    sft = [r for r in rows if "sft/loss" in r]
    iters = [r for r in rows if "train/loss" in r]
    assert len(sft) == 1 and [r["step"] for r in iters] == [1, 2]
    wanted = [
        "train/loss",
        "train/grad_norm",
        "train/lr",
        "advantage/mean",
        "advantage/std",
        "advantage/share_positive",
        "advantage/hist_0",
        "rollout/success_rate",
        "rollout/env_steps",
        "rollout/groups_sampled",
        "rollout/share_dropped",
        "memory/max_rss_mb",
        "time/collect_s",
        "time/update_s",
        "train/update_steps",
    ]
    for row in iters:
        missing = [k for k in wanted if not isinstance(row.get(k), float | int)]
        assert not missing, f"step {row['step']} lacks finite {missing}"
        assert 0 < row["rollout/env_steps"] <= 2 * 20  # one group of K=2 rollouts of at most 20 steps
    evals = [r for r in rows if "eval/success_rate" in r]
    assert [r["step"] for r in evals] == [0, 1, 2] and all("time/eval_s" in r for r in evals)
    # SFT runs at optim.sft_learning_rate, RIPT at optim.learning_rate (defaults 3e-4 and 1e-4)
    assert sft[0]["sft/lr"] == pytest.approx(3e-4) and all(
        r["train/lr"] == pytest.approx(1e-4) for r in iters
    )
    png = debug_run.out / "success.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_offline_run_without_wandb_mode_env(debug_run):
    runs = list((debug_run.out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "log.enable_wandb=true with log.wandb_mode=offline should write one offline run"
    (run_file,) = runs[0].glob("run-*.wandb")
    data = run_file.read_bytes()
    assert b"train/loss" in data and b"eval/success_rate" in data  # the metrics reached the tracker


def test_repel_objective_trains_through_the_loop_with_a_reference_per_iteration(tmp_path):
    """objective=repel in a real run: every rollout fails (success estimator, no dynamic sampling), so every
    rollout frame is a failure that repels, against the reference the loop sets before each round of updates."""
    out = tmp_path / "out"
    cmd = train_cmd(
        out,
        "--num_train_steps=2",
        "--eval.eval_interval=0",
        "--policy.objective=repel",
        "--data.good_share=0.5",
        "--data.bad_share=0.5",
        "--advantage.estimator=success",
    )
    run_ok(cmd, subprocess_env(tmp_path), tmp_path / "train.log")
    iters = [r for r in read_metrics(out) if "train/loss" in r]
    assert [r["step"] for r in iters] == [1, 2]
    for row in iters:
        assert row["train/share_bad"] > 0  # failure frames were in the batch
        # one optimizer step per iteration, right after set_reference: the ratio is 1 up to float rounding
        assert row["train/repel_ratio"] == pytest.approx(1.0, rel=1e-3)
        assert row["train/repel_clipped"] == 0.0 and np.isfinite(row["train/loss_pos"])


def test_push_to_local_hub_holds_policy_and_model_card(debug_run, tmp_path, monkeypatch):
    from huggingface_hub import constants, snapshot_download

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    local = Path(
        snapshot_download(
            HUB_REPO, endpoint=debug_run.hub.endpoint, cache_dir=tmp_path / "cache", token=TOKEN
        )
    )
    names = {p.name for p in local.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "README.md",
        "train_config.json",
        "policy_preprocessor.json",
        "success.png",
    } <= names
    pretrained = ckpt(debug_run.out, "last")
    assert (local / "model.safetensors").read_bytes() == (pretrained / "model.safetensors").read_bytes()
    card = (local / "README.md").read_text()
    assert "| Step | Success rate |" in card and "library_name: lerobot" in card
    assert "Pushed" in debug_run.log and HUB_REPO in debug_run.log
    # the token went only into Authorization headers: not in logs, saved config, card or any local file
    assert debug_run.hub.token_leaks(TOKEN) == []
    assert TOKEN not in debug_run.log and TOKEN not in card
    assert files_containing(debug_run.out, TOKEN) == []


def test_push_to_a_failing_hub_keeps_the_run_and_logs_the_retry_command(tmp_path):
    out = tmp_path / "out"
    with LocalHubServer(fail_first_n=10**9, fail_status=503) as hub:  # the Hub is down for good
        env = subprocess_env(
            tmp_path,
            HF_ENDPOINT=hub.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_TOKEN=TOKEN,
        )
        log = run_ok(
            train_cmd(out, "--num_train_steps=1", "--hub.push_to_hub=true", f"--hub.hub_repo_id={HUB_REPO}"),
            env,
            tmp_path / "train.log",
        )
        assert hub.counts["create"] == 5 and hub.counts["commit"] == 0  # 1 try + 4 retries with backoff
        assert hub.token_leaks(TOKEN) == []
    assert re.search(rf"Push it later with:\n\s+.*hf upload {HUB_REPO} \S+pretrained_model", log), log[-3000:]
    pretrained = ckpt(out, "last")
    card = (pretrained / "README.md").read_text()  # the card is written locally before the push
    assert "| Step | Success rate |" in card
    assert TOKEN not in log and TOKEN not in card
    assert TOKEN not in (pretrained / "train_config.json").read_text()
    assert files_containing(out, TOKEN) == []


# ------------------------------------------------------------------------------------- 3. lerobot-eval
def lerobot_eval(policy_path: Path, tmp_path: Path, task: str, episode_length: int) -> dict:
    """`lerobot-eval` of a checkpoint on metaworld_state, 2 episodes per task; its eval_info.json."""
    eval_out = tmp_path / "eval"
    cmd = [
        str(Path(sys.executable).parent / "lerobot-eval"),
        f"--policy.path={policy_path}",
        "--env.type=metaworld_state",
        f"--env.task={task}",
        f"--env.episode_length={episode_length}",
        "--eval.n_episodes=2",
        "--eval.batch_size=2",
        "--eval.use_async_envs=false",
        "--policy.device=cpu",
        f"--output_dir={eval_out}",
    ]
    run_ok(cmd, subprocess_env(tmp_path), tmp_path / "eval.log")
    return json.loads((eval_out / "eval_info.json").read_text())


@pytest.mark.slow  # about 50 s: LeRobot's eval renders a video of every episode
def test_lerobot_eval_runs_on_a_checkpoint(debug_run, tmp_path):
    overall = lerobot_eval(ckpt(debug_run.out, "last"), tmp_path, "push-v3", 30)["overall"]
    assert overall["n_episodes"] == 2 and 0.0 <= overall["pc_success"] <= 100.0


# ----------------------------------------------------------------- 4 + 5. exact resume, atomic checkpoints
# Three iterations, a checkpoint after each. The "success" estimator labels every (failed) rollout bad, so the
# rollouts are trained on, and replay_iterations=2 makes iteration 3 train on iteration 2's rollouts: the replay
# buffer must come back from the checkpoint too.
RESUME_ARGS = (
    "--num_train_steps=3",
    "--save_interval=1",
    "--eval.eval_interval=1",
    "--advantage.estimator=success",
    "--data.replay_iterations=2",
)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """Run A: three iterations, uninterrupted."""
    tmp = tmp_path_factory.mktemp("reference_run")
    out = tmp / "out"
    log = run_ok(train_cmd(out, *RESUME_ARGS), subprocess_env(tmp), tmp / "train.log")
    return Run(out, log)


def _sigkill_at_checkpoint_2_and_resume(tmp_path: Path, args: tuple[str, ...], reference: Path) -> None:
    """Run B with `args` is SIGKILLed once checkpoint 2 is complete, then resumed; its checkpoint 3 and step-3
    metrics must equal those of the uninterrupted `reference` run with the same args."""
    out, env = tmp_path / "out", subprocess_env(tmp_path)
    last = out / "checkpoints" / "last"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            train_cmd(out, *args), env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # `last` moves to 000002 only after checkpoint 2 is complete (renamed into place)
        while not (last.is_symlink() and os.readlink(last) == "000002"):
            assert proc.poll() is None, f"run B ended (rc {proc.returncode}) before checkpoint 2"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "checkpoints" / "000003").exists(), "killed too late: iteration 3 was already saved"

    resumed = run_ok(train_cmd(out, *args, "--resume=true"), env, tmp_path / "resumed.log")
    assert re.search(r"Resumed from \S+000002 at iteration 2", resumed)
    # Bit-equal on a CPU (tolerance 0): every RNG is reseeded from (seed, rank, iteration) and the optimizer,
    # scheduler, replay buffer, skip tracker and counters come back from the checkpoint.
    assert_same_tensors(
        load_file(ckpt(out, "000003") / "model.safetensors"),
        load_file(ckpt(reference, "000003") / "model.safetensors"),
    )
    assert_same_tensors(
        torch.load(out / "checkpoints/000003/training_state/optimizer.bin")["state"][0],
        torch.load(reference / "checkpoints/000003/training_state/optimizer.bin")["state"][0],
    )
    step3 = [r for r in read_metrics(out) if r["step"] == 3 and "train/loss" in r]
    ref3 = [r for r in read_metrics(reference) if r["step"] == 3 and "train/loss" in r]
    assert step3[-1]["train/loss"] == ref3[0]["train/loss"]
    assert step3[-1]["rollout/success_rate"] == ref3[0]["rollout/success_rate"]


@pytest.mark.slow  # a reference run, a killed run and its resumption: about 2 minutes
def test_resume_after_sigkill_equals_uninterrupted_run(reference_run, tmp_path):
    _sigkill_at_checkpoint_2_and_resume(tmp_path, RESUME_ARGS, reference_run.out)


@pytest.mark.slow  # as above, with its own reference run: about 2 minutes
def test_resume_is_exact_with_the_curriculum_and_the_repel_objective(tmp_path):
    """The curriculum's success history comes back from the run state, and repel's reference is rebuilt from
    the resumed weights at the start of iteration 3, as it was from the same weights in the uninterrupted run."""
    args = (
        *RESUME_ARGS,
        "--rollout.state_sampling=signal",
        "--policy.objective=repel",
        "--data.good_share=0.5",
        "--data.bad_share=0.5",
    )
    reference, resumed = tmp_path / "reference", tmp_path / "b"
    reference.mkdir()
    resumed.mkdir()
    run_ok(train_cmd(reference / "out", *args), subprocess_env(reference), tmp_path / "reference.log")
    rows = [r for r in read_metrics(reference / "out") if "train/loss" in r]
    assert all(np.isfinite(r["train/repel_ratio"]) for r in rows)  # failure frames repelled every iteration
    _sigkill_at_checkpoint_2_and_resume(resumed, args, reference / "out")


@pytest.mark.slow  # a crashed run and its resumption, plus the reference run: about 2 minutes
def test_crash_mid_checkpoint_keeps_last_loadable_and_next_run_cleans_up(reference_run, tmp_path):
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    import lerobot_ript  # noqa: F401  (registers the ript policy type)
    from lerobot_ript.train.checkpoint import CRASH_ENV_VAR

    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    crash_env = subprocess_env(tmp_path, **{CRASH_ENV_VAR: "2"})  # die while writing checkpoint 2
    proc = subprocess.run(
        train_cmd(out, *RESUME_ARGS),
        env=crash_env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 17, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert os.readlink(ckpts / "last") == "000001" and not (ckpts / "000002").exists()
    assert (ckpts / ".tmp-000002" / "pretrained_model" / "model.safetensors").exists()  # the half-written one

    pretrained = ckpts / "last" / "pretrained_model"
    policy = get_policy_class("ript").from_pretrained(pretrained)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(pretrained))
    assert len(pre.steps) > 0 and len(post.steps) > 0
    assert_same_tensors(
        policy.state_dict(), load_file(ckpt(reference_run.out, "000001") / "model.safetensors")
    )

    log = run_ok(
        train_cmd(out, *RESUME_ARGS, "--resume=true"), subprocess_env(tmp_path), tmp_path / "resumed.log"
    )
    assert "Removing" in log and ".tmp-000002" in log
    assert sorted(p.name for p in ckpts.iterdir()) == ["000001", "000002", "000003", "last"]
    assert os.readlink(ckpts / "last") == "000003"
    # resuming from checkpoint 1 also replays the uninterrupted run exactly
    assert_same_tensors(
        load_file(ckpt(out, "000003") / "model.safetensors"),
        load_file(ckpt(reference_run.out, "000003") / "model.safetensors"),
    )


# ----------------------------------------------------------------------- 8. update_step: accumulation
STATE_DIM, ACTION_DIM, CHUNK = 5, 2, 4


class FixedDraws:
    """Flow noise and times handed out in order, so a batch of 8 and two micro-batches of 4 see the same
    draws (the policy's own RNG calls differ in size and interleaving between the two)."""

    def __init__(self, n: int, seed: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(n, CHUNK, ACTION_DIM, generator=g)
        self.time = torch.rand(n, generator=g) * 0.9 + 0.05
        self.i_noise = self.i_time = 0

    def sample_noise(self, shape, device):
        out = self.noise[self.i_noise : self.i_noise + shape[0]]
        self.i_noise += shape[0]
        return out.to(device)

    def sample_time(self, b, device):
        out = self.time[self.i_time : self.i_time + b]
        self.i_time += b
        return out.to(device)


def tiny_policy():
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.utils.constants import ACTION, OBS_STATE

    from lerobot_ript.policy.configuration_ript import RiptConfig
    from lerobot_ript.policy.modeling_ript import RiptPolicy

    cfg = RiptConfig(
        device="cpu",
        chunk_size=CHUNK,
        n_action_steps=2,
        hidden_dim=32,
        cond_dim=16,
        num_denoiser_layers=2,
        cfg_dropout_prob=0.0,
        input_features={OBS_STATE: PolicyFeature(FeatureType.STATE, (STATE_DIM,))},
        output_features={ACTION: PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
    )
    torch.manual_seed(0)
    policy = RiptPolicy(cfg)
    with torch.no_grad():  # leave the adaLN-zero init, so that the label and every layer get gradients
        for p in policy.parameters():
            p.normal_(0.0, 0.3)
    return policy


def tiny_batch(b: int = 8) -> dict[str, torch.Tensor]:
    from lerobot.utils.constants import ACTION, OBS_STATE

    g = torch.Generator().manual_seed(1)
    return {
        OBS_STATE: torch.randn(b, STATE_DIM, generator=g),
        ACTION: torch.randn(b, CHUNK, ACTION_DIM, generator=g),
        "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, 1.0, -1.0, 0.0])[:b],
    }


def one_update(policy, micro_batches, accumulation: int, monkeypatch):
    """`update_step` with SGD (its update is linear in the gradient, so equal gradients give equal parameters;
    AdamW's g / sqrt(v) would magnify rounding noise in near-zero gradients). Returns (params, logs, info)."""
    from accelerate import Accelerator

    from lerobot_ript.policy import modeling_ript
    from lerobot_ript.train.update import update_step

    draws = FixedDraws(64)
    monkeypatch.setattr(modeling_ript, "sample_noise", draws.sample_noise)
    monkeypatch.setattr(
        modeling_ript.RiptPolicy, "_sample_time", lambda _policy, b, device: draws.sample_time(b, device)
    )
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    steps, syncs = [], []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    backward = accelerator.backward
    monkeypatch.setattr(
        accelerator, "backward", lambda loss: (syncs.append(accelerator.sync_gradients), backward(loss))
    )
    logs = update_step(policy, micro_batches, optimizer, scheduler, accelerator, grad_clip_norm=0.5)
    params = {k: v.detach().clone() for k, v in accelerator.unwrap_model(policy).state_dict().items()}
    return (
        params,
        logs,
        {
            "steps": steps,
            "syncs": syncs,
            "scheduler_steps": scheduler.scheduler.last_epoch,
            "accelerator": accelerator,
            "policy": policy,
            "optimizer": optimizer,
            "scheduler": scheduler,
        },
    )


def test_gradient_accumulation_equals_one_big_batch(fresh_accelerate_state, monkeypatch):
    start = tiny_policy()
    batch = tiny_batch(8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]

    big, big_logs, big_info = one_update(copy.deepcopy(start), [batch], 1, monkeypatch)
    acc, acc_logs, acc_info = one_update(copy.deepcopy(start), halves, 2, monkeypatch)

    # exactly one optimizer step per update_step call
    assert len(big_info["steps"]) == len(acc_info["steps"]) == 1
    assert acc_info["syncs"] == [False, True]  # gradients sync (and are clipped) on the last micro-batch only
    assert acc_info["scheduler_steps"] == 1
    assert big_logs["grad_norm"] > 0.5  # clipping was active in both
    assert acc_logs["grad_norm"] == pytest.approx(big_logs["grad_norm"], rel=1e-5)
    assert acc_logs["loss"] == pytest.approx(big_logs["loss"], rel=1e-6)
    changed = [k for k in big if not torch.equal(big[k], start.state_dict()[k])]
    assert len(changed) == len(big)  # every parameter moved
    for k in big:  # float32 summation order differs; measured max abs diff 3e-8 (steps of up to 0.035)
        torch.testing.assert_close(acc[k], big[k], rtol=1e-5, atol=1e-6)


def test_update_step_takes_one_step_per_call_and_rejects_a_wrong_micro_batch_count(
    fresh_accelerate_state, monkeypatch
):
    from lerobot_ript.train.update import update_step

    batch = tiny_batch(8)
    halves = [{k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()}]
    _, _, info = one_update(tiny_policy(), halves, 2, monkeypatch)
    acc, policy, optimizer, scheduler = (info[k] for k in ("accelerator", "policy", "optimizer", "scheduler"))
    with pytest.raises(ValueError, match="got 1 micro-batches for gradient_accumulation_steps=2"):
        update_step(policy, halves[:1], optimizer, scheduler, acc, 0.5)
    for call in range(2, 5):
        update_step(policy, halves, optimizer, scheduler, acc, 0.5)
        assert len(info["steps"]) == scheduler.scheduler.last_epoch == call
    assert info["syncs"] == [False, True] * 4


@pytest.mark.parametrize(
    ("scale", "episodes", "expected"),
    [(False, 128, 30), (True, 64, 30), (True, 128, 60), (True, 96, 45), (True, 0, 1)],
)
def test_update_steps_scale_with_collection_rounds(fresh_accelerate_state, scale, episodes, expected):
    """With optim.scale_updates_with_rounds, an iteration that dynamic sampling stretched to two rounds of
    groups_per_round x K episodes makes twice the updates (equal optimizer steps per collected episode; 96: e.g.
    8 groups of 8 and 8 probes of 4 dropped)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from lerobot_ript.rollout.collector import CollectionStats
    from lerobot_ript.train.config import RiptTrainConfig
    from lerobot_ript.train.loop import update_steps

    cfg = RiptTrainConfig()
    cfg.rollout.groups_per_round = 8
    cfg.optim.update_steps_per_iteration = 30
    cfg.optim.scale_updates_with_rounds = scale
    run = SimpleNamespace(cfg=cfg, accelerator=Accelerator(cpu=True))
    result = SimpleNamespace(stats=CollectionStats(episodes=episodes))
    assert update_steps(run, result) == expected


@pytest.mark.parametrize("keep", [False, True])
def test_keep_solved_groups_reaches_the_collector(fresh_accelerate_state, keep):
    """rollout.keep_solved_groups is handed to the GroupedCollector the loop builds (tested there)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from lerobot_ript.train.config import RiptTrainConfig
    from lerobot_ript.train.loop import RunState, make_collector

    cfg = RiptTrainConfig()
    cfg.rollout.keep_solved_groups = keep
    cfg.rollout.groups_per_round, cfg.rollout.rloo_batch_size = 1, 2
    run = SimpleNamespace(cfg=cfg, accelerator=Accelerator(cpu=True), state=RunState())
    collector = make_collector(run)
    try:
        assert collector.keep_solved is keep and collector.dynamic_sampling
    finally:
        collector.close()


def test_probe_rollouts_reach_the_collector_with_slots_for_a_rounds_sub_envs(fresh_accelerate_state):
    """rollout.probe_rollouts is handed to the collector (tested there), whose slots of P or K - P sub-envs keep a
    round at groups_per_round x K sub-envs: 2 groups of K = 4 probed with 2 -> 4 slots of 2."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from lerobot_ript.train.config import RiptTrainConfig
    from lerobot_ript.train.loop import RunState, make_collector

    cfg = RiptTrainConfig()
    cfg.rollout.groups_per_round, cfg.rollout.rloo_batch_size, cfg.rollout.probe_rollouts = 2, 4, 2
    run = SimpleNamespace(cfg=cfg, accelerator=Accelerator(cpu=True), state=RunState())
    collector = make_collector(run)
    try:
        assert collector.probe == 2 and [s.env.num_envs for s in collector.slots] == [2] * 4
    finally:
        collector.close()
    assert RiptTrainConfig().rollout.probe_rollouts == 0  # off unless asked for


def test_fail_skip_threshold_reaches_the_collector_and_its_history_is_restored(fresh_accelerate_state):
    """rollout.fail_skip_threshold builds the collector's fail tracker, restored from the run state on resume
    (the tracker's rule is tested in test_collector.py / test_sampling.py)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from lerobot_ript.rollout.sampling import SkipTracker
    from lerobot_ript.train.config import RiptTrainConfig
    from lerobot_ript.train.loop import RunState, make_collector

    saved = SkipTracker(2)
    saved.update(123, all_succeeded=True)
    saved.update(123, all_succeeded=True)
    cfg = RiptTrainConfig()
    cfg.rollout.fail_skip_threshold = 2
    cfg.rollout.groups_per_round, cfg.rollout.rloo_batch_size = 1, 2
    run = SimpleNamespace(
        cfg=cfg, accelerator=Accelerator(cpu=True), state=RunState(fail_tracker=saved.state_dict())
    )
    collector = make_collector(run)
    try:
        assert collector.fail_tracker.threshold == 2 and collector.skip_tracker.threshold == 3
        assert collector.fail_tracker.num_skipping == 1 and collector.skip_tracker.num_tracked == 0
        assert collector.fail_tracker.state_dict() == saved.state_dict()
    finally:
        collector.close()
    assert RiptTrainConfig().rollout.fail_skip_threshold == 0  # off unless asked for


def test_state_sampling_signal_builds_a_curriculum_restored_from_the_run_state(fresh_accelerate_state):
    """rollout.state_sampling=signal gives the seed sampler a StateCurriculum (discount from the config), restored
    from the run state on resume; "uniform" gives none (the rule is tested in test_sampling.py)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from lerobot_ript.rollout.sampling import StateCurriculum
    from lerobot_ript.train.config import RiptTrainConfig
    from lerobot_ript.train.loop import RunState, make_collector

    saved = StateCurriculum(group_size=2, discount=0.25)
    saved.record(5, 0, 2)
    saved.record(9, 1, 2)
    cfg = RiptTrainConfig()
    cfg.rollout.state_sampling, cfg.rollout.curriculum_discount = "signal", 0.25
    cfg.rollout.groups_per_round, cfg.rollout.rloo_batch_size = 1, 2
    run = SimpleNamespace(
        cfg=cfg, accelerator=Accelerator(cpu=True), state=RunState(curriculum=saved.state_dict())
    )
    collector = make_collector(run)
    try:
        cur = collector.seed_sampler.curriculum
        assert cur.discount == 0.25 and cur.group_size == 2
        assert cur.state_dict() == saved.state_dict()
        assert cur.weights(range(10)).tolist() == saved.weights(range(10)).tolist()
    finally:
        collector.close()
    cfg.rollout.state_sampling = "uniform"
    collector = make_collector(SimpleNamespace(cfg=cfg, accelerator=Accelerator(cpu=True), state=RunState()))
    try:
        assert collector.seed_sampler.curriculum is None
    finally:
        collector.close()
    # the defaults since the eighth learning measurement: the curriculum and RLOO-weighted draws of successes
    assert RiptTrainConfig().rollout.state_sampling == "signal"
    assert RiptTrainConfig().data.episode_weighting == "advantage"


# ------------------------------------------------------------------ 9. policies that read camera images
def test_image_inputs_need_an_env_that_renders_them():
    from lerobot_ript.envs.metaworld import MetaWorldStateEnvConfig
    from lerobot_ript.train.config import RiptTrainConfig, check_image_inputs

    cfg = RiptTrainConfig()
    check_image_inputs(cfg, [])  # a state-only policy needs nothing
    with pytest.raises(ValueError, match=r"renders none\. Set --env\.obs_type=state_pixels"):
        check_image_inputs(cfg, ["observation.images.corner2"])
    cfg.env = MetaWorldStateEnvConfig(obs_type="state_pixels", cameras="corner2")
    check_image_inputs(cfg, ["observation.images.corner2"])
    with pytest.raises(ValueError, match=r"\['observation\.images\.topview'\].*--env\.cameras="):
        check_image_inputs(cfg, ["observation.images.corner2", "observation.images.topview"])


def test_concat_batches_joins_task_lists_and_refuses_parts_with_different_keys():
    from lerobot_ript.train.loop import concat_batches

    demo = {"observation.state": torch.zeros(2, 3), "task": ["a", "a"]}
    rollout = {"observation.state": torch.ones(1, 3), "task": ["b"]}
    batch = concat_batches([demo, rollout])
    assert batch["task"] == ["a", "a", "b"] and batch["observation.state"][:, 0].tolist() == [0, 0, 1]
    with_images = {**demo, "observation.images.corner2": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)}
    with pytest.raises(
        ValueError, match=r"only in demos: \['observation\.images\.corner2'\].*obs_type=state_pixels"
    ):
        concat_batches([with_images, rollout])


def _rollout(e: int, length: int, images: bool) -> EpisodeRecord:
    rng = np.random.default_rng(e)
    return EpisodeRecord(
        task="Push the puck to a goal",
        states=rng.normal(size=(length, 39)).astype(np.float32),
        actions=rng.uniform(-1, 1, (length, 4)).astype(np.float32),
        rewards=np.zeros(length, np.float32),
        success=e % 2 == 0,
        init_hash=100 + e,
        advantage=1.0 if e % 2 == 0 else -1.0,
        images={"corner2": rng.integers(0, 256, (length, 4, 4, 3), dtype=np.uint8)} if images else None,
    )


def test_replay_trains_this_iterations_camera_frames_and_serialises_none():
    """The replay buffer saved in checkpoints is JSON without camera frames; the rollouts trained on are the
    earlier iterations' (from it) followed by this iteration's episodes as collected, with their frames. For
    state-only rollouts that is the same dataset as one rebuilt entirely from the buffer (resume stays exact)."""
    from types import SimpleNamespace

    from lerobot_ript.train.loop import RunState, _ep_from_dict, _ep_to_dict, _replay_dataset

    run = SimpleNamespace(
        model=SimpleNamespace(config=SimpleNamespace(chunk_size=2, target_state_dim=None)), state=RunState()
    )
    current, weights = [_rollout(0, 3, True), _rollout(1, 4, True)], [1.0, 0.0]
    run.state.replay = [[_ep_to_dict(e, w) for e, w in zip(current, weights, strict=True)]]
    saved = json.loads(json.dumps(run.state.replay))  # what a checkpoint holds
    assert saved == run.state.replay and "images" not in saved[0][0]
    assert saved[0][0]["task"] == "Push the puck to a goal" and saved[0][0]["init_hash"] == 100
    batch = _replay_dataset(run, current, weights).get_batch(torch.arange(7))
    frames = np.concatenate([e.images["corner2"] for e in current])  # (7, 4, 4, 3)
    np.testing.assert_array_equal(batch["observation.images.corner2"].permute(0, 2, 3, 1).numpy(), frames)
    assert (
        batch["task"] == ["Push the puck to a goal"] * 7
        and batch["advantage_weights"].tolist() == [1.0] * 3 + [0.0] * 4
    )

    earlier = [_rollout(2, 2, False)]
    current = [_rollout(3, 3, False)]
    run.state.replay = [[_ep_to_dict(earlier[0], 0.5)], [_ep_to_dict(current[0], 0.0)]]
    ours = _replay_dataset(run, current, [0.0]).get_batch(torch.arange(5))
    from lerobot_ript.data.dataset import RiptDataset

    rebuilt = RiptDataset(2)
    entries = [e for it in run.state.replay for e in it]
    rebuilt.add_episodes([_ep_from_dict(e) for e in entries], weights=[e["weight"] for e in entries])
    theirs = rebuilt.get_batch(torch.arange(5))
    assert ours.keys() == theirs.keys() and ours.pop("task") == theirs.pop("task")
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_loop_trains_an_image_policy_on_rendered_demos_and_rollouts(
    fresh_accelerate_state, tmp_path, monkeypatch
):
    """One real iteration on state_pixels push-v3 (16 px): the loop records 2 demos with the env's camera, the
    small backbone reads it, the collector records the rollouts' frames, every training batch holds uint8 camera
    frames and the instruction, rollout rows hold frames the collector recorded, every rollout and evaluation
    call sends the instruction, and the checkpoint is an image policy."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    instruction, key = "Push the puck to a goal", "observation.images.corner2"
    out = tmp_path / "out"
    cfg = debug_config(
        out,
        "--num_train_steps=1",
        "--data.num_demos=2",
        "--env.obs_type=state_pixels",
        "--env.image_size=16",
        "--policy.image_size=[16,16]",
        "--advantage.estimator=success",  # every rollout fails: labelled bad, so trained with bad_share
        "--data.good_share=0.5",
        "--data.bad_share=0.5",
        "--data.save_rollouts=true",
    )
    spy = spy_on_loop(monkeypatch)
    run = train_in_process(cfg)
    batches, results, chunk_tasks = spy.batches, spy.results, spy.chunk_tasks
    assert spy.collectors and all(c.record_images for c in spy.collectors)

    assert list(run.model.config.image_features) == [key]
    assert chunk_tasks == [instruction] * 3  # eval at start, the rollouts, the final eval
    (result,) = results
    episodes = result.all_episodes
    assert len(episodes) == 2 and all(not ep.success for ep in episodes)
    recorded = set()
    for ep in episodes:
        assert ep.task == instruction and ep.images[key.split(".")[-1]].shape == (ep.num_frames, 16, 16, 3)
        recorded |= {frame.tobytes() for frame in ep.images["corner2"]}
    assert len(batches) == 3  # 2 SFT steps, 1 RIPT step, 8 frames each
    for batch in batches:
        assert batch[key].dtype == torch.uint8 and batch[key].shape == (8, 3, 16, 16)
        assert batch["task"] == [instruction] * 8
    rollout_rows = batches[-1]["advantages"] < 0  # demos are +1, the failed rollouts -1
    assert rollout_rows.sum() == 4
    for image in batches[-1][key][rollout_rows]:
        assert image.permute(1, 2, 0).contiguous().numpy().tobytes() in recorded

    demos = LeRobotDataset("local/push-v3-demos", root=out / "demos")
    assert demos.meta.camera_keys == [key] and demos[0]["task"] == instruction
    (saved,) = (out / "rollouts").iterdir()
    rollouts = LeRobotDataset("local/debug-rollouts", root=saved)
    assert rollouts.meta.camera_keys == [key] and rollouts[0]["task"] == instruction
    config = json.loads((ckpt(out, "last") / "config.json").read_text())
    assert config["input_features"][key] == {"type": "VISUAL", "shape": [3, 16, 16]}
    state = json.loads((out / "checkpoints" / "last" / "training_state" / "ript_state_0.json").read_text())
    assert state["iteration"] == 1 and state["replay"][0][0]["task"] == instruction


# ------------------------------------------------------------------------------------- 10. several tasks
def test_eval_runs_each_task_and_logs_its_success_and_the_mean(fresh_accelerate_state, tmp_path, monkeypatch):
    """env.task=mt3, 4 held-out episodes per task: each task is evaluated in its own env with its instruction,
    and logged as eval/success_rate/<task>, with the mean over tasks (the pooled rate) as eval/success_rate and its
    interval; the history entry keeps the per-task rates (the plot draws them). One task logs what it always did."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    import lerobot_ript.train.loop as loop
    from lerobot_ript.envs.metaworld import MetaWorldStateEnvConfig, task_instruction
    from lerobot_ript.rollout.evaluate import EvalResult, wilson_interval
    from lerobot_ript.train.config import RiptTrainConfig

    wins = {"push-v3": [1, 1, 0, 0], "reach-v3": [1, 1, 1, 1], "drawer-open-v3": [0, 0, 0, 0]}
    calls = []

    def evaluate(make_env, policy, seeds, *, num_envs, max_episode_steps):
        env = make_env(1)
        try:
            (described,) = env.call("task_description")
        finally:
            env.close()
        calls.append((policy, described, list(seeds)))
        name = next(t for t in wins if task_instruction(t) == policy)
        return EvalResult(successes=np.array(wins[name], bool)[: len(seeds)], env_steps=0)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    monkeypatch.setattr(loop, "make_chunk_policy", lambda *args, task, **kwargs: task)
    cfg = RiptTrainConfig(output_dir=str(tmp_path))
    cfg.env = MetaWorldStateEnvConfig(task="mt3", episode_length=10)
    cfg.eval.eval_episodes = 4
    run = SimpleNamespace(
        cfg=cfg,
        accelerator=Accelerator(cpu=True),
        model=SimpleNamespace(eval=lambda: None, config=SimpleNamespace(n_action_steps=4)),
        preprocessor=None,
        postprocessor=None,
        state=loop.RunState(),
    )
    metrics = loop.run_eval(run, 0)
    instructions = [task_instruction(t) for t in wins]
    seeds = [1_000_000 + i for i in range(4)]
    assert calls == [(i, i, seeds) for i in instructions]  # each task in its own env, the same held-out seeds
    assert {k: metrics[k] for k in metrics if k.startswith("eval/success_rate")} == {
        "eval/success_rate": 0.5,
        "eval/success_rate/push-v3": 0.5,
        "eval/success_rate/reach-v3": 1.0,
        "eval/success_rate/drawer-open-v3": 0.0,
    }
    assert (metrics["eval/ci_low"], metrics["eval/ci_high"]) == wilson_interval(6, 12)
    (entry,) = run.state.history
    assert entry["n"] == 12 and entry["tasks"] == {"push-v3": 0.5, "reach-v3": 1.0, "drawer-open-v3": 0.0}
    assert (tmp_path / "success.png").stat().st_size > 0

    cfg.env = MetaWorldStateEnvConfig(task="push-v3", episode_length=10)
    metrics = loop.run_eval(run, 1)
    assert sorted(metrics) == ["eval/ci_high", "eval/ci_low", "eval/success_rate", "time/eval_s"]
    assert metrics["eval/success_rate"] == 0.5 and "tasks" not in run.state.history[-1]


def test_loop_trains_one_policy_on_two_tasks(fresh_accelerate_state, tmp_path, monkeypatch):
    """One real iteration with --env.task=push-v3,reach-v3 (seed 1 draws a group of each): demos of both tasks
    in one dataset, the policy conditioned on both (task_names in its config.json, the embedding trained and
    reloaded), every batch carrying each row's instruction, rollouts of both tasks with init_hash of their task,
    the collector sending each row's instruction itself, each task evaluated with its own, and per-task rollout
    and eval success in metrics.jsonl."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import get_policy_class

    from lerobot_ript.data.writer import init_hash_of

    tasks = ["push-v3", "reach-v3"]
    push, reach = "Push the puck to a goal", "Reach a goal position"
    out = tmp_path / "out"
    cfg = debug_config(
        out, "--num_train_steps=1", "--seed=1", *TWO_TASKS, "--rollout.rollout_goal_per_step=4"
    )
    spy = spy_on_loop(monkeypatch)
    run = train_in_process(cfg)
    batches, results, chunk_tasks = spy.batches, spy.results, spy.chunk_tasks

    assert run.model.config.task_names == tasks
    # eval at start per task, the rollouts (the collector sends each row's instruction), the final eval per task
    assert chunk_tasks == [push, reach, None, push, reach]
    demos = LeRobotDataset("local/push-v3_reach-v3-demos", root=out / "demos")
    assert demos.num_episodes == 2 and sorted(demos.meta.tasks.index) == [push, reach]
    (result,) = results
    episodes = result.all_episodes
    assert {ep.task for ep in episodes} == {push, reach} and len(episodes) == 4
    for ep in episodes:
        name = tasks[[push, reach].index(ep.task)]
        assert ep.init_hash == init_hash_of(name, ep.states[0])
    assert len(batches) == 3 and {t for b in batches for t in b["task"]} == {push, reach}
    for batch in batches:
        assert len(batch["task"]) == 8 and set(batch["task"]) <= {push, reach}

    lines = read_metrics(out)
    start, iteration, final = lines[1], lines[2], lines[3]  # lines[0]: SFT
    for line in (start, final):
        assert {"eval/success_rate/push-v3", "eval/success_rate/reach-v3"} <= line.keys()
        mean = (line["eval/success_rate/push-v3"] + line["eval/success_rate/reach-v3"]) / 2
        assert line["eval/success_rate"] == pytest.approx(mean)
    assert {"rollout/success_rate/push-v3", "rollout/success_rate/reach-v3"} <= iteration.keys()
    history = json.loads((out / "checkpoints" / "last" / "training_state" / "ript_state_0.json").read_text())
    assert [set(h["tasks"]) for h in history["history"]] == [set(tasks)] * 2
    # the curriculum and the state -> init_hash table key states of both tasks: ids [0, 200) and [200, 400)
    states = sorted(int(k) for k in history["curriculum"]["counts"])
    assert sorted(int(k) for k in history["seed_hash"]) == states and [s // 200 for s in states] == [0, 1]

    saved = ckpt(out, "last")
    assert json.loads((saved / "config.json").read_text())["task_names"] == tasks
    reloaded = get_policy_class("ript").from_pretrained(saved)  # strict: the embedding must be in the file
    embedding = run.model.backbone.task_embedding.detach()
    assert torch.equal(reloaded.backbone.task_embedding, embedding) and embedding.abs().sum() > 0


def test_a_multi_task_run_resumes_exactly_and_lerobot_eval_scores_each_task(fresh_accelerate_state, tmp_path):
    """Two tasks: a run stopped after iteration 1 and resumed to 2 ends with the weights and optimizer state of
    an uninterrupted 2-iteration run (the task embedding, the curriculum over (task, seed) states and the
    state -> init_hash table come back from the checkpoint); `lerobot-eval` on its checkpoint with the same
    two-task env scores each task under its instruction."""
    from conftest import reset_accelerate_state

    def config(out: Path, *extra: str):
        return debug_config(out, "--seed=1", *TWO_TASKS, *extra)

    uninterrupted, resumed = tmp_path / "a", tmp_path / "b"
    train_in_process(config(uninterrupted, "--num_train_steps=2"))
    reset_accelerate_state()
    train_in_process(config(resumed, "--num_train_steps=1"))
    reset_accelerate_state()
    run = train_in_process(config(resumed, "--num_train_steps=2", "--resume=true"))
    assert run.state.iteration == 2 and run.model.config.task_names == ["push-v3", "reach-v3"]
    assert_same_tensors(
        load_file(ckpt(resumed, "000002") / "model.safetensors"),
        load_file(ckpt(uninterrupted, "000002") / "model.safetensors"),
    )
    assert_same_tensors(
        torch.load(resumed / "checkpoints/000002/training_state/optimizer.bin")["state"][0],
        torch.load(uninterrupted / "checkpoints/000002/training_state/optimizer.bin")["state"][0],
    )
    states = [
        json.loads((out / "checkpoints/000002/training_state/ript_state_0.json").read_text())
        for out in (resumed, uninterrupted)
    ]
    for key in ("curriculum", "seed_hash", "episodes_seen"):
        assert states[0][key] == states[1][key], key

    info = lerobot_eval(ckpt(resumed, "last"), tmp_path, "push-v3,reach-v3", 20)
    assert info["overall"]["n_episodes"] == 4
    # one entry per task (LeRobot's task ids follow env.task); the policy refuses a row without a task string
    # of its task_names, so each task's episodes ran under its own instruction
    assert sorted(e["task_id"] for e in info["per_task"]) == [0, 1]
    assert all(len(e["metrics"]["successes"]) == 2 for e in info["per_task"])
