"""The learning benchmark's `--quick` smoke run: the whole pipeline (demos -> SFT -> arms -> report) runs end
to end. Its success numbers are meaningless at this size and are not asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "learning" / "run.py"


def _run(tmp_path: Path, arms: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "all",
        "--quick",
        "--seeds",
        "0",
        "--arms",
        *arms,
        "--out",
        str(tmp_path),
        "--jobs",
        "2",  # two arms side by side, each its own process
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def _check(tmp_path: Path, arms: list[str], proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sft_ckpt = tmp_path / "sft" / "checkpoints" / "last" / "pretrained_model"
    assert (sft_ckpt / "model.safetensors").exists()
    for name in arms:
        result = json.loads((tmp_path / f"{name}_seed0" / "result.json").read_text())
        assert result["arm"] == name and result["history"], result
        last = result["history"][-1]
        assert 0.0 <= last["ci_low"] <= last["success_rate"] <= last["ci_high"] <= 1.0
        assert last["episodes"] >= 8  # the quick budget (rollout.max_train_episodes) was spent
    text = (tmp_path / "RESULTS.md").read_text()
    for name in arms:
        assert f"| {name} | 0 |" in text
    assert "RIPT's lead (points)" in text  # one seed per arm here: no interval over seeds, a "-"
    assert (tmp_path / "success.png").stat().st_size > 1000
    # every arm against optimizer steps and training wall-clock as well as episodes
    assert "Compute per arm" in text and all(f"| {name} | 1 |" in text for name in arms)
    assert (tmp_path / "success_compute.png").stat().st_size > 1000


def _run_module():
    spec = importlib.util.spec_from_file_location("learning_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_difference_bootstrap_interval():
    diff = _run_module()._seed_difference
    d, lo, hi = diff([0.60, 0.62, 0.64], [0.40, 0.42, 0.44])
    assert d == pytest.approx(0.20) and 0.15 < lo < d < hi < 0.25
    d, lo, hi = diff([0.55, 0.61, 0.65], [0.65, 0.55, 0.61])  # the same seeds in another order
    assert d == pytest.approx(0.0, abs=1e-12) and lo < 0 < hi
    # a wider spread between seeds gives a wider interval for the same mean difference
    wide = diff([0.40, 0.60, 0.80], [0.30, 0.40, 0.50])
    narrow = diff([0.58, 0.60, 0.62], [0.38, 0.40, 0.42])
    assert wide[2] - wide[1] > 2 * (narrow[2] - narrow[1])


def test_quick_smoke_two_arms(tmp_path):
    arms = ["ript", "filtered"]
    _check(tmp_path, arms, _run(tmp_path, arms))

    # the guidance sweep of a finished run: w = 1 once, every other w with each negative label, same states
    run_dir = tmp_path / "ript_seed0"
    cmd = [sys.executable, str(SCRIPT), "guidance", "--run", str(run_dir), "--scales", "1", "2"]
    cmd += ["--negatives", "null", "bad", "--episodes", "2"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = json.loads((run_dir / "guidance_2ep.json").read_text())
    assert sweep["episodes"] == 2
    assert [(r["guidance_scale"], r["negative"]) for r in sweep["results"]] == [
        (1.0, "null"),
        (2.0, "null"),
        (2.0, "bad"),
    ]
    assert {r["noise_scale"] for r in sweep["results"]} == {1.0}
    assert all(r["success_rate"] in (0.0, 0.5, 1.0) and r["ci_low"] <= r["ci_high"] for r in sweep["results"])

    # guidance away from another checkpoint's policy, at two noise scales; away from the run itself it is the
    # run's own policy (v_ref + w (v - v_ref) = v), so it matches w = 1 on the same states and noise
    cmd = [sys.executable, str(SCRIPT), "guidance", "--run", str(run_dir), "--scales", "1", "3"]
    cmd += ["--reference", str(run_dir), "--noise-scales", "1", "0", "--episodes", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((run_dir / "guidance_4ep.json").read_text())["results"]
    assert [(r["noise_scale"], r["guidance_scale"], r["negative"]) for r in rows] == [
        (1.0, 1.0, "null"),
        (1.0, 3.0, "reference:ript_seed0"),
        (0.0, 1.0, "null"),
        (0.0, 3.0, "reference:ript_seed0"),
    ]
    assert rows[0]["success_rate"] == rows[1]["success_rate"]
    assert rows[2]["success_rate"] == rows[3]["success_rate"]

    # how far guidance moves the sampled chunks, on demo states, against the policy's own sampling spread
    cmd = [sys.executable, str(SCRIPT), "branches", "--run", str(run_dir), "--frames", "8", "--scales", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((run_dir / "branches.json").read_text())
    assert out["frames"] == 8 and out["sampling_spread"] > 0
    assert set(out["distances"]) == {"good_vs_null", "w=2.0_vs_w=1"}  # ript trains no bad frame by default
    assert all(d > 0 for d in out["distances"].values()), out

    # where the run's policy fails: success per quartile of each initial puck / goal coordinate, 4 episodes
    cmd = [sys.executable, str(SCRIPT), "regions", "--run", str(run_dir), "--episodes", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads((run_dir / "regions.json").read_text())
    assert found["episodes"] == 4 and set(found["features"]) >= {"goal_x - puck_x", "puck_x", "goal_y"}
    for feature in found["features"].values():
        assert len(feature["quartile_edges"]) == 3 and feature["quartile_edges"] == sorted(
            feature["quartile_edges"]
        )
        assert len(feature["success_per_quartile"]) == 4  # one of 4 episodes per quartile: 0 or 1 each
        assert all(r in (0.0, 1.0) for r in feature["success_per_quartile"])
        assert sum(feature["success_per_quartile"]) == 4 * found["success_rate"]


@pytest.mark.slow
def test_quick_smoke_every_arm(tmp_path):
    arms = ["ript", "bc", "filtered", "no_dynamic", "no_guidance", "weighted"]
    _check(tmp_path, arms, _run(tmp_path, arms))


def test_quick_smoke_on_another_task_with_its_own_sft_settings(tmp_path):
    """`--task` and the SFT settings reach the SFT run and the arm; another task on the same --out is refused."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, str(SCRIPT), "arm", "--quick", "--arm", "ript", "--out", str(tmp_path)]
    args = ["--task", "reach-v3", "--num-demos", "3", "--demo-noise", "0.1", "--episode-length", "25"]
    proc = subprocess.run(base + args, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in ("sft", "ript_seed0"):
        cfg = json.loads(
            (tmp_path / run / "checkpoints" / "last" / "pretrained_model" / "train_config.json").read_text()
        )
        assert cfg["env"]["task"] == "reach-v3" and cfg["env"]["episode_length"] == 25, run
    sft_cfg = json.loads(
        (tmp_path / "sft" / "checkpoints" / "last" / "pretrained_model" / "train_config.json").read_text()
    )
    assert sft_cfg["data"]["num_demos"] == 3 and sft_cfg["data"]["demo_noise"] == 0.1
    assert "(reach-v3, held-out initial states)" in (tmp_path / "RESULTS.md").read_text()
    other = subprocess.run(base + ["--task", "push-v3"], env=env, capture_output=True, text=True, timeout=300)
    assert other.returncode != 0 and "use another --out" in other.stdout + other.stderr


@pytest.mark.slow  # about a minute: SFT, an arm and its extension over two tasks (the parts are tested fast elsewhere)
def test_quick_smoke_of_one_policy_on_two_tasks_with_the_probe_arm(tmp_path):
    """`--task` with two tasks: one SFT and one arm over both (here the episode-saving `ript_probe`, its probe of
    1 of K = 2 under --quick), each task's SFT start, final success and change in RESULTS.md, a plot per task."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(SCRIPT), "arm", "--quick", "--arm", "ript_probe", "--out", str(tmp_path)]
    cmd += ["--task", "push-v3,reach-v3", "--episode-length", "25"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "ript_probe_seed0" / "checkpoints" / "last" / "pretrained_model"
    cfg = json.loads((ckpt / "train_config.json").read_text())
    assert cfg["env"]["task"] == "push-v3,reach-v3" and cfg["rollout"]["probe_rollouts"] == 1
    assert json.loads((ckpt / "config.json").read_text())["task_names"] == ["push-v3", "reach-v3"]
    rows = [json.loads(line) for line in (ckpt.parents[2] / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rollout/episodes" in r]
    # probes that all fail cost 1 episode, not K = 2: the budget counts the episodes run
    assert sum(r["rollout/episodes"] for r in rows) >= 8
    assert all(r["rollout/episodes"] <= 2 * r["rollout/groups_sampled"] for r in rows)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Per task (one policy trained on all of them" in text
    for task in ("push-v3", "reach-v3", "mean"):
        assert any(ln.startswith(f"| {task} | ") and "| ript_probe |" in ln for ln in text.splitlines()), task
    for task in ("push-v3", "reach-v3"):
        assert (tmp_path / f"success_{task}.png").stat().st_size > 1000

    # `extend`: the finished run goes on to a larger budget in another --out, resumed from its last checkpoint
    ext = tmp_path / "ext"
    cmd = [sys.executable, str(SCRIPT), "extend", "--quick", "--from", str(tmp_path), "--out", str(ext)]
    cmd += ["--arms", "ript_probe", "--seeds", "0", "--task", "push-v3,reach-v3", "--episode-length", "25"]
    cmd += ["--set", "rollout.max_train_episodes=12"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = json.loads((tmp_path / "ript_probe_seed0" / "result.json").read_text())
    after = json.loads((ext / "ript_probe_seed0" / "result.json").read_text())
    assert after["history"][: len(before["history"])] == before["history"]  # the same run, gone on
    assert after["history"][-1]["episodes"] >= 12 > before["history"][-1]["episodes"]
    assert after["wall_time_s"] > before["wall_time_s"] and (ext / "sft").is_symlink()
