"""LeRobot's own command lines with a wrapped VLA: `lerobot-train --policy.type=ript --policy.backbone=<kind>
--policy.backbone_path=<a tiny LeRobot checkpoint>` on a LeRobotDataset with a camera, advantages and a task
string, then `lerobot-eval --policy.path=<the saved ript checkpoint>` on `metaworld_state` with camera images.

The subprocesses get the tiny-model size patch of tests/vla_fixtures.py through a `sitecustomize` module on
PYTHONPATH (pi0 / pi05 cannot be built tiny from their config alone; real checkpoints need nothing of this).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import vla_fixtures as vf
from conftest import make_tiny_dataset

BIN = Path(sys.executable).parent
TESTS = Path(__file__).parent


def tiny_vla_env(tmp: Path) -> dict[str, str]:
    """The environment of a subprocess that can rebuild the tiny test VLAs: offline, one thread, and a
    sitecustomize that installs vla_fixtures' size patch at interpreter start."""
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import vla_fixtures\nvla_fixtures.install_tiny_vla_sizes()\n")
    path = os.pathsep.join([str(site), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update(PYTHONPATH=path, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return env


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 400) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """metaworld_state's layout: state 39, action 4, camera corner2 at 32 px; advantages of both signs."""
    root = tmp_path_factory.mktemp("vla_cli") / "ds"
    make_tiny_dataset(
        root,
        state_dim=39,
        action_dim=4,
        cameras=("corner2",),
        image_hw=(32, 32),
        episodes=2,
        frames=12,
        advantages=[1.0, -1.0],
    )
    return root


# About 30 s each (two fresh interpreters import LeRobot); pi05 runs in the default suite, pi0 and SmolVLA (the
# same code path in LeRobot's CLIs; their wrappers are covered by the loop and reload tests) with `-m slow`.
@pytest.mark.parametrize(
    "kind",
    [pytest.param("pi0", marks=pytest.mark.slow), "pi05", pytest.param("smolvla", marks=pytest.mark.slow)],
)
def test_lerobot_train_then_lerobot_eval_with_a_wrapped_vla(kind, dataset, tmp_path):
    pytest.importorskip("metaworld")
    ckpt = vf.make_tiny_vla_checkpoint(kind, tmp_path / f"{kind}_base")
    env = tiny_vla_env(tmp_path)
    steps = 2
    log = run(
        [
            str(BIN / "lerobot-train"),
            "--policy.type=ript",
            f"--policy.backbone={kind}",
            f"--policy.backbone_path={ckpt}",
            "--policy.device=cpu",
            "--policy.push_to_hub=false",
            "--policy.chunk_size=8",
            "--policy.n_action_steps=4",
            "--policy.num_inference_steps=3",
            "--dataset.repo_id=local/x",
            f"--dataset.root={dataset}",
            "--dataset.video_backend=pyav",
            f"--steps={steps}",
            "--batch_size=2",
            f"--output_dir={tmp_path / 'train'}",
            f"--save_freq={steps}",
            "--log_freq=1",
            "--num_workers=0",
            "--wandb.enable=false",
        ],
        env,
        tmp_path,
    )
    saved = tmp_path / "train" / "checkpoints" / "last" / "pretrained_model"
    cfg = json.loads((saved / "config.json").read_text())
    assert cfg["type"] == "ript" and cfg["backbone"] == kind and cfg["backbone_config"]["type"] == kind
    # the advantages reached the policy (both labels trained), through the checkpoint's own processors
    shares = [(float(g), float(b)) for g, b in re.findall(r"share_good:([\d.]+) share_bad:([\d.]+)", log)]
    assert shares and all(g + b == pytest.approx(1.0) for g, b in shares), log[-2000:]
    assert sum(b for _, b in shares) > 0
    steps_logged = [int(s) for s in re.findall(r"step:(\d+) ", log)]
    assert steps_logged and steps_logged[-1] == steps
    pre = json.loads((saved / "policy_preprocessor.json").read_text())
    names = [s.get("registry_name") for s in pre["steps"]]
    assert "tokenizer_processor" in names and "ript_state_dim_adapter" in names

    run(
        [
            str(BIN / "lerobot-eval"),
            f"--policy.path={saved}",
            "--policy.device=cpu",
            "--policy.guidance_scale=2.0",
            "--env.type=metaworld_state",
            "--env.task=push-v3",
            "--env.obs_type=state_pixels",
            "--env.cameras=corner2",
            "--env.image_size=32",
            "--env.episode_length=8",
            "--eval.n_episodes=1",
            "--eval.batch_size=1",
            "--eval.use_async_envs=false",
            f"--output_dir={tmp_path / 'eval'}",
        ],
        env,
        tmp_path,
    )
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 1
    rewards = info["per_task"][0]["metrics"]["sum_rewards"]
    assert len(rewards) == 1 and rewards[0] == rewards[0]  # a finite return, not NaN
