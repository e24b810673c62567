"""write_episodes: a genuine LeRobotDataset v3 with the RIPT columns; init_hash_of."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from lerobot_ript.data.writer import EpisodeRecord, dataset_features, init_hash_of, write_episodes

STATE_DIM, ACTION_DIM, FPS = 39, 4, 80


def make_episodes(
    n: int = 10, frames: int = 200, seed: int = 0, cameras: tuple[str, ...] = (), image_hw: int = 16
) -> list[EpisodeRecord]:
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(n):
        t = frames - 7 * i  # lengths differ, as successes end early
        states = rng.normal(size=(t, STATE_DIM)).astype(np.float32)
        success = i % 2 == 0
        images = None
        if cameras:
            images = {c: rng.integers(0, 256, (t, image_hw, image_hw, 3), dtype=np.uint8) for c in cameras}
        episodes.append(
            EpisodeRecord(
                task="push-v3" if i < n - 1 else "pick-place-v3",
                states=states,
                actions=rng.uniform(-1, 1, (t, ACTION_DIM)).astype(np.float32),
                rewards=rng.uniform(0, 10, t).astype(np.float32),
                success=success,
                init_hash=init_hash_of("push-v3", states[0]),
                advantage=float(rng.normal()),
                images=images,
            )
        )
    return episodes


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    episodes = make_episodes()
    root = tmp_path_factory.mktemp("rollouts") / "ds"
    dataset = write_episodes(episodes, root, "local/rollouts", FPS, with_advantages=True)
    return episodes, dataset


def test_dataset_opens_with_plain_lerobot_and_has_the_columns(written):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    episodes, dataset = written
    reopened = LeRobotDataset("local/rollouts", root=dataset.root)
    assert reopened.num_episodes == 10 and reopened.num_frames == sum(ep.num_frames for ep in episodes)
    assert reopened.fps == FPS
    expected = dataset_features(STATE_DIM, ACTION_DIM, {}, with_advantages=True)
    for key, ft in expected.items():
        assert reopened.features[key]["dtype"] == ft["dtype"]
        assert tuple(reopened.features[key]["shape"]) == ft["shape"]
    item = reopened[5]
    assert item["observation.state"].dtype == torch.float32 and item["observation.state"].shape == (39,)
    assert item["action"].dtype == torch.float32 and item["action"].shape == (4,)
    assert item["next.reward"].dtype == torch.float32
    assert item["next.success"].dtype == torch.bool and item["success"].dtype == torch.bool
    assert item["init_hash"].dtype == torch.int64 and item["advantages"].dtype == torch.float32
    assert set(reopened.meta.tasks.index) == {"push-v3", "pick-place-v3"}


def test_every_frame_carries_its_episode_values(written):
    episodes, dataset = written
    hf = dataset.hf_dataset.with_format("numpy")
    ep_index = np.asarray(hf["episode_index"])
    for i, ep in enumerate(episodes):
        rows = np.flatnonzero(ep_index == i)
        assert len(rows) == ep.num_frames
        np.testing.assert_array_equal(np.stack(hf[rows]["observation.state"]), ep.states)
        np.testing.assert_array_equal(np.stack(hf[rows]["action"]), ep.actions)
        np.testing.assert_array_equal(np.asarray(hf[rows]["next.reward"]).reshape(-1), ep.rewards)
        np.testing.assert_array_equal(np.asarray(hf[rows]["init_hash"]).reshape(-1), ep.init_hash)
        np.testing.assert_array_equal(
            np.asarray(hf[rows]["advantages"]).reshape(-1), np.float32(ep.advantage)
        )
        np.testing.assert_array_equal(np.asarray(hf[rows]["success"]).reshape(-1), ep.success)
        next_success = np.asarray(hf[rows]["next.success"]).reshape(-1)
        assert next_success[-1] == ep.success and not next_success[:-1].any()
    assert dataset[0]["task"] == "push-v3" and dataset[len(dataset) - 1]["task"] == "pick-place-v3"


def test_next_success_starts_at_success_step(tmp_path):
    ep = dataclasses.replace(make_episodes(1, 20)[0], success=True, success_step=12)
    dataset = write_episodes([ep], tmp_path / "ds", "local/x", FPS, with_advantages=False)
    flags = np.asarray(dataset.hf_dataset["next.success"]).reshape(-1)
    np.testing.assert_array_equal(flags, np.arange(20) >= 12)
    assert "advantages" not in dataset.features


def test_same_parquet_as_lerobot_default_path(tmp_path):
    """The write skips LeRobot's no-op image embedding; the data files must equal LeRobot's own output."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    episodes = make_episodes(3, 30)
    ours = write_episodes(episodes, tmp_path / "ours", "local/ours", FPS, with_advantages=True)
    features = dataset_features(STATE_DIM, ACTION_DIM, {}, with_advantages=True)
    ref = LeRobotDataset.create(
        "local/ref", fps=FPS, features=features, root=tmp_path / "ref", use_videos=False
    )
    for ep in episodes:
        for t in range(ep.num_frames):
            ref.add_frame(
                {
                    "observation.state": ep.states[t],
                    "action": ep.actions[t],
                    "next.reward": ep.rewards[t : t + 1],
                    "next.success": ep.next_success()[t : t + 1],
                    "success": np.array([ep.success]),
                    "init_hash": np.array([ep.init_hash], dtype=np.int64),
                    "advantages": np.array([ep.advantage], dtype=np.float32),
                    "task": ep.task,
                }
            )
        ref.save_episode()
    ref.finalize()
    data = "data/chunk-000/file-000.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(ours.root / data), pd.read_parquet(tmp_path / "ref" / data))


def test_images_round_trip(tmp_path):
    episodes = make_episodes(2, 12, cameras=("corner2",))
    dataset = write_episodes(episodes, tmp_path / "ds", "local/img", FPS, with_advantages=True)
    assert dataset.features["observation.images.corner2"]["dtype"] == "image"
    first = dataset[3]["observation.images.corner2"]  # (3, H, W) float in [0, 1]
    assert first.shape == (3, 16, 16)
    expected = torch.from_numpy(episodes[0].images["corner2"][3]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(first, expected)


def _broken(**changes) -> list[EpisodeRecord]:
    """Two valid episodes (10 and 3 frames), the second one changed."""
    episodes = make_episodes(2, 10)
    episodes[1] = dataclasses.replace(episodes[1], **changes)
    return episodes


@pytest.mark.parametrize(
    ("episodes", "message"),
    [
        (_broken(actions=np.zeros((2, ACTION_DIM), np.float32)), "must share T"),
        (_broken(rewards=np.zeros((4,), np.float32)), "must share T"),
        (_broken(rewards=np.zeros((3, 1), np.float32)), "must share T"),
        (_broken(states=np.zeros(3, np.float32)), "2-D"),
        (_broken(advantage=None), "advantage is None"),
        (_broken(advantage=float("nan")), "not finite"),
        (_broken(init_hash=-1), "init_hash"),
        (_broken(init_hash=2**62), "init_hash"),
        (_broken(success=False, success_step=1), "success_step"),
        (_broken(states=np.zeros((3, 7), np.float32)), "differ from episode 0"),
        (_broken(states=np.full((3, STATE_DIM), np.nan, np.float32)), "NaN"),
        ([], "at least one episode"),
    ],
)
def test_invalid_episodes_raise_before_writing(tmp_path, episodes, message):
    root = tmp_path / "ds"
    with pytest.raises(ValueError, match=message):
        write_episodes(episodes, root, "local/bad", FPS, with_advantages=True)
    assert not root.exists()


def test_existing_dataset_folder_is_refused(tmp_path):
    episodes = make_episodes(1, 5)
    write_episodes(episodes, tmp_path / "ds", "local/a", FPS, with_advantages=False)
    with pytest.raises(FileExistsError, match="already exists"):
        write_episodes(episodes, tmp_path / "ds", "local/a", FPS, with_advantages=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_episodes(episodes, empty, "local/b", FPS, with_advantages=False).num_episodes == 1


def test_init_hash_is_stable_and_discriminates():
    state = np.arange(39, dtype=np.float64) / 7
    value = init_hash_of("push-v3", state)
    assert value == 2541672844152943281  # pinned: the same in every process, platform and release
    assert 0 <= value < 2**62
    assert init_hash_of("push-v3", state + 1e-9) == value
    assert init_hash_of("push-v3", state + 1e-4) != value
    assert init_hash_of("pick-place-v3", state) != value
    zeros = np.zeros(3)
    assert init_hash_of("t", zeros) == init_hash_of("t", -zeros)
    with pytest.raises(ValueError, match="NaN"):
        init_hash_of("t", np.array([np.nan]))
