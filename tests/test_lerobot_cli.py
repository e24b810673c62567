"""LeRobot's own command lines with `--policy.type=ript`, in subprocesses, with no plugin flag.

`lerobot-train` and `lerobot-eval` find the policy only through LeRobot's plugin discovery (the installed
distribution `lerobot_policy_ript`); no `--policy.discover_packages_path` is passed anywhere here.
The train test uses another camera count (2) and state size (7) than the unit tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import make_tiny_dataset

BIN = Path(sys.executable).parent
TRAIN_STEPS = 20


def run_cli(args: list[str], cwd: Path, timeout: int = 300, ok: bool = True) -> subprocess.CompletedProcess:
    """Run a command offline; it must succeed (ok=True) or fail (ok=False)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    expected = "succeed" if ok else "fail"
    assert (proc.returncode == 0) == ok, (
        f"{args[0]} should {expected}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return proc


def lerobot_train(ds_root: Path, out: Path, steps: int, *extra: str) -> str:
    proc = run_cli(
        [
            str(BIN / "lerobot-train"),
            "--policy.type=ript",
            "--policy.device=cpu",
            "--policy.push_to_hub=false",
            "--dataset.repo_id=local/x",
            f"--dataset.root={ds_root}",
            "--dataset.video_backend=pyav",  # torchcodec cannot load without system FFmpeg
            f"--steps={steps}",
            "--batch_size=4",
            f"--output_dir={out}",
            f"--save_freq={steps}",
            f"--log_freq={steps // 2}",
            "--num_workers=0",
            "--wandb.enable=false",
            "--policy.chunk_size=4",
            "--policy.n_action_steps=2",
            "--policy.hidden_dim=32",
            *extra,
        ],
        cwd=out.parent,
    )
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def trained_two_cameras(tmp_path_factory) -> tuple[Path, Path, str]:
    """lerobot-train on a dataset with 2 cameras (24x40, resized to 32x32), state 7, action 3 and advantages
    of both signs. Returns (dataset root, checkpoint dir, log)."""
    tmp = tmp_path_factory.mktemp("cli")
    ds_root = tmp / "ds"
    make_tiny_dataset(
        ds_root,
        state_dim=7,
        action_dim=3,
        cameras=("front", "wrist"),
        image_hw=(24, 40),
        episodes=2,
        frames=12,
        advantages=[1.0, -1.0],
    )
    log = lerobot_train(
        ds_root, tmp / "out", TRAIN_STEPS, "--policy.image_size=[32,32]", "--policy.image_channels=8"
    )
    return ds_root, tmp / "out" / "checkpoints" / "last" / "pretrained_model", log


def test_lerobot_train_trains_ript_with_advantage_labels(trained_two_cameras) -> None:
    _, ckpt, log = trained_two_cameras
    for name in ("config.json", "model.safetensors", "train_config.json", "policy_preprocessor.json"):
        assert (ckpt / name).is_file(), name
    assert (ckpt.parent / "training_state" / "training_step.json").is_file()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["type"] == "ript"
    assert cfg["image_size"] == [32, 32] and cfg["chunk_size"] == 4 and cfg["hidden_dim"] == 32
    assert sorted(cfg["input_features"]) == [
        "observation.images.front",
        "observation.images.wrist",
        "observation.state",
    ]
    assert cfg["input_features"]["observation.state"]["shape"] == [7]
    # The ript processors carry `advantages` past LeRobot's preprocessor: forward logged both label shares.
    shares = [(float(g), float(b)) for g, b in re.findall(r"share_good:([\d.]+) share_bad:([\d.]+)", log)]
    assert shares, log[-2000:]
    assert all(g > 0 and b > 0 for g, b in shares), shares
    steps = [int(s) for s in re.findall(r"step:(\d+) ", log)]
    assert steps[-1] == TRAIN_STEPS


def test_lerobot_train_from_a_checkpoint_refuses_to_drop_the_advantages(
    trained_two_cameras, tmp_path
) -> None:
    """`lerobot-train --policy.path=<checkpoint>` reloads the preprocessor with LeRobot's own batch converter,
    which drops `advantages`: the policy stops with how to fix it instead of training every frame as good."""
    ds_root, ckpt, _ = trained_two_cameras
    args = [
        str(BIN / "lerobot-train"),
        f"--policy.path={ckpt}",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
    ]
    args += ["--dataset.repo_id=local/x", f"--dataset.root={ds_root}", "--dataset.video_backend=pyav"]
    args += ["--steps=2", "--batch_size=4", f"--output_dir={tmp_path / 'out'}", "--num_workers=0"]
    args += ["--wandb.enable=false"]
    proc = run_cli(args, cwd=tmp_path, ok=False)
    assert "labels its frames with 'advantages'" in proc.stderr and "attach_ript_converter" in proc.stderr, (
        proc.stderr[-4000:]
    )
    assert not list((tmp_path / "out").rglob("model.safetensors"))  # nothing was trained or saved


ACT_IN_FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import torch
    assert "lerobot_ript" not in sys.modules
    from lerobot.utils.import_utils import register_third_party_plugins
    register_third_party_plugins()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    ckpt, ds_root = sys.argv[1], sys.argv[2]
    policy = get_policy_class("ript").from_pretrained(ckpt)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=ckpt)
    ds = LeRobotDataset("local/x", root=ds_root, video_backend="pyav")
    frames = [ds[i] for i in (0, 5, 17)]
    obs = {k: torch.stack([f[k] for f in frames]) for k in frames[0] if k.startswith("observation.")}
    policy.reset()
    actions = [post(policy.select_action(pre(dict(obs)))) for _ in range(3)]
    print(json.dumps({
        "shapes": [list(a.shape) for a in actions],
        "finite": all(bool(torch.isfinite(a).all()) for a in actions),
        "distinct_steps": not torch.equal(actions[0], actions[1]),
        "obs_shapes": {k: list(v.shape) for k, v in obs.items()},
    }))
    """
)


# About 12 s of CPU on its own (a fresh interpreter imports LeRobot); the policy-level fresh-process round trip
# in test_policy.py stays in the fast set.
@pytest.mark.slow
def test_checkpoint_acts_in_a_fresh_process(trained_two_cameras, tmp_path: Path) -> None:
    ds_root, ckpt, _ = trained_two_cameras
    proc = run_cli([sys.executable, "-c", ACT_IN_FRESH_PROCESS, str(ckpt), str(ds_root)], cwd=tmp_path)
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["obs_shapes"]["observation.images.front"] == [3, 3, 24, 40]
    assert res["obs_shapes"]["observation.state"] == [3, 7]
    assert res["shapes"] == [[3, 3]] * 3
    assert res["finite"] and res["distinct_steps"]


@pytest.mark.slow
def test_lerobot_eval_on_metaworld_state(tmp_path: Path) -> None:
    """lerobot-train on a 39-dim state / 4-dim action dataset, then lerobot-eval of that checkpoint on the
    project's `metaworld_state` env (real MetaWorld simulator, 2 episodes of 20 steps, guidance w=2)."""
    pytest.importorskip("metaworld")
    pytest.importorskip("lerobot_ript.envs.metaworld")
    make_tiny_dataset(
        tmp_path / "ds", state_dim=39, action_dim=4, episodes=2, frames=12, advantages=[1.0, -1.0]
    )
    lerobot_train(tmp_path / "ds", tmp_path / "train", 10)
    ckpt = tmp_path / "train" / "checkpoints" / "last" / "pretrained_model"
    run_cli(
        [
            str(BIN / "lerobot-eval"),
            f"--policy.path={ckpt}",
            "--policy.device=cpu",
            "--policy.guidance_scale=2.0",
            "--env.type=metaworld_state",
            "--env.task=push-v3",
            "--env.episode_length=20",
            "--eval.n_episodes=2",
            "--eval.batch_size=2",
            "--eval.use_async_envs=false",
            f"--output_dir={tmp_path / 'eval'}",
        ],
        cwd=tmp_path,
    )
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    overall = info["overall"]
    assert overall["n_episodes"] == 2
    assert 0.0 <= overall["pc_success"] <= 100.0
    per_task = info["per_task"][0]["metrics"]
    assert len(per_task["sum_rewards"]) == 2 and all(r == r for r in per_task["sum_rewards"])  # not NaN
    assert len(list((tmp_path / "eval" / "videos").rglob("*.mp4"))) == 2
