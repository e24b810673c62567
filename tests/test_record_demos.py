"""record_demos: noisy scripted-expert episodes of push-v3 written as a LeRobotDataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("metaworld")

from lerobot_ript.data.record_demos import main, record_demos  # noqa: E402
from lerobot_ript.data.writer import init_hash_of  # noqa: E402


def _episode_columns(dataset, column: str) -> list[np.ndarray]:
    hf = dataset.hf_dataset.with_format("numpy")
    ep_index = np.asarray(hf["episode_index"])
    values = np.asarray(hf[column])
    return [values[ep_index == i] for i in range(dataset.num_episodes)]


def test_record_three_noisy_push_demos(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    result = record_demos("push-v3", 3, 0.3, tmp_path / "demos", seed=0)
    assert result.num_episodes == 3 and result.dataset_root == tmp_path / "demos"
    dataset = LeRobotDataset("local/push-v3-demos", root=result.dataset_root)
    assert dataset.num_episodes == 3 and dataset.fps == 80
    assert "advantages" not in dataset.features
    successes = [bool(col.reshape(-1)[0]) for col in _episode_columns(dataset, "success")]
    assert result.success_rate == pytest.approx(np.mean(successes))
    assert any(successes), "the noisy expert solves some of seeds 0..2"
    for success, flags, col in zip(
        successes,
        _episode_columns(dataset, "next.success"),
        _episode_columns(dataset, "success"),
        strict=True,
    ):
        flags = flags.reshape(-1)
        assert (col.reshape(-1) == success).all()
        assert flags[-1] == success  # episodes end on their first success (terminate_on_success)
        assert not flags[:-1].any()
        assert len(flags) < 200 if success else len(flags) == 200
    states = _episode_columns(dataset, "observation.state")
    hashes = [int(h.reshape(-1)[0]) for h in _episode_columns(dataset, "init_hash")]
    assert hashes == [init_hash_of("push-v3", np.stack(s)[0]) for s in states]
    assert len(set(hashes)) == 3  # seeds 0, 1, 2: three initial states
    actions = np.concatenate([np.stack(a) for a in _episode_columns(dataset, "action")])
    assert np.abs(actions).max() <= 1.0
    assert (
        dataset[0]["task"] == "Push the puck to a goal"
    )  # the instruction; init_hash above keys on the name


def test_cli_records_and_is_reproducible(tmp_path):
    args = ["--task", "push-v3", "--episodes", "1", "--noise", "0.3", "--episode-length", "15"]
    assert main([*args, "--output", str(tmp_path / "a"), "--repo-id", "local/a"]) == 0
    assert main([*args, "--output", str(tmp_path / "b"), "--repo-id", "local/b"]) == 0
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    a = LeRobotDataset("local/a", root=tmp_path / "a")
    b = LeRobotDataset("local/b", root=tmp_path / "b")
    assert a.num_frames == 15
    np.testing.assert_array_equal(np.stack(a.hf_dataset["action"]), np.stack(b.hf_dataset["action"]))


def test_invalid_arguments_fail_fast(tmp_path):
    with pytest.raises(ValueError, match="episodes"):
        record_demos("push-v3", 0, 0.3, tmp_path / "x")
    with pytest.raises(ValueError, match="noise"):
        record_demos("push-v3", 1, -0.1, tmp_path / "x")
    with pytest.raises(ValueError, match="Did you mean 'push-v3'"):
        record_demos("push-v4", 1, 0.3, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_state_pixels_demos_record_the_envs_cameras_and_image_size(tmp_path):
    """--obs-type state_pixels with --cameras and --image-size: the dataset has one image column per camera, at
    that size, and frame t holds the image a fresh env renders before action t (what the rollouts record)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot_ript.envs.metaworld import MetaWorldStateEnv

    cameras = ("corner2", "topview")
    root = tmp_path / "demos"
    args = ["--episodes", "1", "--episode-length", "5", "--obs-type", "state_pixels", "--image-size", "16"]
    assert main([*args, "--cameras", "corner2, topview", "--output", str(root)]) == 0
    dataset = LeRobotDataset("local/push-v3-demos", root=root)
    assert dataset.meta.camera_keys == [f"observation.images.{c}" for c in cameras]
    assert all(tuple(dataset.features[k]["shape"]) == (16, 16, 3) for k in dataset.meta.camera_keys)
    env = MetaWorldStateEnv("push-v3", obs_type="state_pixels", image_size=16, cameras=cameras)
    try:
        obs, _ = env.reset(seed=0)
        for t in range(dataset.num_frames):
            item = dataset[t]
            for cam in cameras:
                stored = (item[f"observation.images.{cam}"] * 255).round().to(torch.uint8).permute(1, 2, 0)
                np.testing.assert_array_equal(stored.numpy(), obs["pixels"][cam])
            obs, *_ = env.step(item["action"].numpy())
    finally:
        env.close()
    assert dataset[0]["task"] == "Push the puck to a goal"


def test_cli_records_several_tasks_into_one_dataset(tmp_path):
    """--task with a list (or a named set): `--episodes` episodes of each task, task after task, in one dataset
    whose task column holds each episode's instruction; an unknown name fails before anything is recorded."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    args = ["--task", "push-v3, reach-v3", "--episodes", "2", "--noise", "0", "--episode-length", "4"]
    assert main([*args, "--output", str(tmp_path / "demos")]) == 0
    dataset = LeRobotDataset("local/push-v3_reach-v3-demos", root=tmp_path / "demos")
    assert dataset.num_episodes == 4 and dataset.num_frames == 16
    instructions = [dataset[4 * e]["task"] for e in range(4)]
    assert instructions == ["Push the puck to a goal"] * 2 + ["Reach a goal position"] * 2
    hashes = [int(h.reshape(-1)[0]) for h in _episode_columns(dataset, "init_hash")]
    states = _episode_columns(dataset, "observation.state")
    names = ["push-v3", "push-v3", "reach-v3", "reach-v3"]
    assert hashes == [init_hash_of(n, np.stack(s)[0]) for n, s in zip(names, states, strict=True)]
    with pytest.raises(ValueError, match="Did you mean 'reach-v3'"):
        record_demos(["push-v3", "rech-v3"], 1, 0.3, tmp_path / "x")
    assert not (tmp_path / "x").exists()
