"""RiptDataset and EpisodeBalancedSampler against real LeRobotDatasets (written by our writer and by LeRobot),
the ript policy's real preprocessor, and a Hub push with LeRobot's own `push_to_hub` to a local Hub server.

Episode e, frame t of the synthetic episodes below has state[0] = e, state[1] = t and action[0] = 1000 e + t,
so every chunk can be checked against the frames it must hold.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lerobot_ript.data.dataset import EpisodeBalancedSampler, EpisodeShares, RiptDataset
from lerobot_ript.data.writer import EpisodeRecord, init_hash_of, write_episodes

TASK = "push-v3"
STATE_DIM, ACTION_DIM, FPS = 39, 4, 80


def episode(e: int, length: int, advantage: float | None, *, success: bool | None = None) -> EpisodeRecord:
    rng = np.random.default_rng(e)
    states = rng.normal(size=(length, STATE_DIM)).astype(np.float32)
    states[:, 0], states[:, 1] = e, np.arange(length)
    actions = rng.uniform(-1, 1, (length, ACTION_DIM)).astype(np.float32)
    actions[:, 0] = 1000 * e + np.arange(length)
    return EpisodeRecord(
        task=TASK,
        states=states,
        actions=actions,
        rewards=rng.uniform(0, 1, length).astype(np.float32),
        success=bool(advantage is not None and advantage > 0) if success is None else success,
        init_hash=init_hash_of(TASK, states[0]),
        advantage=advantage,
    )


def all_frames(ds: RiptDataset) -> dict[str, torch.Tensor]:
    return ds.get_batch(torch.arange(len(ds)))


# ---------------------------------------------------------------------------------------- action chunks
def test_action_chunks_stay_in_their_episode_edge_padded_with_mask():
    lengths, chunk = [3, 7, 1, 5], 5
    ds = RiptDataset(chunk_size=chunk)
    episodes = [episode(e, n, advantage=None) for e, n in enumerate(lengths)]
    ds.add_episodes(episodes)
    batch = all_frames(ds)
    assert len(ds) == sum(lengths) and ds.num_episodes == 4
    assert (
        batch["action"].shape == (len(ds), chunk, ACTION_DIM) and batch["action_is_pad"].dtype == torch.bool
    )
    row = 0
    for e, (ep, n) in enumerate(zip(episodes, lengths, strict=True)):
        for t in range(n):
            assert batch["observation.state"][row, :2].tolist() == [e, t]
            # edge-padded with the last action of the episode
            expected = [1000 * e + min(t + j, n - 1) for j in range(chunk)]
            assert batch["action"][row, :, 0].tolist() == expected
            np.testing.assert_array_equal(batch["action"][row, -1], ep.actions[min(t + chunk - 1, n - 1)])
            assert batch["action_is_pad"][row].tolist() == [t + j >= n for j in range(chunk)]
            row += 1
    # a single frame reads the same as its row of a batch
    one = ds[8]
    assert batch["task"] == [TASK] * len(ds) and one["task"] == TASK  # EpisodeRecord.task, one per row
    for key, value in batch.items():
        if key != "task":
            assert torch.equal(one[key], value[8]), key


def test_demos_are_labelled_good_and_rollouts_keep_their_advantage():
    ds = RiptDataset(chunk_size=2)
    demo = episode(0, 4, advantage=None, success=True)
    rollouts = [episode(1, 3, 0.5), episode(2, 6, -1.5), episode(3, 2, 0.0)]
    ds.add_episodes([demo])
    ds.add_episodes(rollouts, weights=[0.7, 0.1, 0.3])
    ds.add_episodes([episode(4, 2, -0.25)])  # no weights: a failed rollout weighs 0, not 1
    assert [ds.episodes_of(c).tolist() for c in ("demo", "good", "bad", "neutral")] == [[0], [1], [2, 4], [3]]
    batch = all_frames(ds)
    per_frame = np.repeat([1.0, 0.5, -1.5, 0.0, -0.25], [4, 3, 6, 2, 2])
    np.testing.assert_array_equal(batch["advantages"].numpy(), per_frame.astype(np.float32))
    weights = np.repeat([1.0, 0.7, 0.1, 0.3, 0.0], [4, 3, 6, 2, 2])
    np.testing.assert_allclose(batch["advantage_weights"].numpy(), weights)
    hashes = np.repeat(
        [ep.init_hash for ep in [demo, *rollouts]] + [episode(4, 2, 0).init_hash], [4, 3, 6, 2, 2]
    )
    np.testing.assert_array_equal(batch["init_hash"].numpy(), hashes)
    with pytest.raises(ValueError, match="non-finite advantage"):
        ds.add_episodes([episode(5, 2, float("nan"))])
    with pytest.raises(ValueError, match="one per episode"):
        ds.add_episodes(rollouts, weights=[1.0])
    with pytest.raises(ValueError, match="empty"):
        RiptDataset(chunk_size=2).get_batch(torch.tensor([0]))


# ------------------------------------------------------------------------------------- LeRobotDatasets
def test_rollouts_written_with_advantages_load_with_per_frame_advantages(tmp_path):
    """write_episodes(with_advantages=True) -> LeRobotDataset -> add_lerobot_dataset gives exactly the batch
    that the same episodes give in memory: states, chunks, pads, advantages, init_hash, weights max(A, 0)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    rollouts = [episode(e, n, a) for e, (n, a) in enumerate([(6, 1.0), (9, -1.0), (4, 1 / 3), (5, 0.0)])]
    written = write_episodes(rollouts, tmp_path / "roll", "local/rollouts", FPS, with_advantages=True)
    assert written.num_episodes == 4 and "advantages" in written.features
    from_disk = RiptDataset(chunk_size=4)
    from_disk.add_lerobot_dataset(LeRobotDataset("local/rollouts", root=tmp_path / "roll"))
    in_memory = RiptDataset(chunk_size=4)
    in_memory.add_episodes(rollouts)
    a, b = all_frames(from_disk), all_frames(in_memory)
    assert a.keys() == b.keys()
    assert a.pop("task") == b.pop("task") == [TASK] * len(from_disk)  # the task column, per frame
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert [from_disk.episodes_of(c).tolist() for c in ("good", "bad", "neutral")] == [[0, 2], [1], [3]]
    assert a["advantages"][6:15].unique().tolist() == [-1.0]  # every frame of episode 1

    # The same file read as demos (as_demo=True): every frame good with weight 1.
    demos = RiptDataset(chunk_size=4)
    demos.add_lerobot_dataset(LeRobotDataset("local/rollouts", root=tmp_path / "roll"), as_demo=True)
    assert demos.episodes_of("demo").tolist() == [0, 1, 2, 3]
    assert all_frames(demos)["advantages"].unique().tolist() == [1.0]


def test_failed_demos_are_kept_dropped_or_labelled_bad_from_the_success_column(tmp_path):
    """A demo dataset as the scripted recorder writes it (no advantages, a per-episode `success` column):
    keep -> every episode a good demo; drop -> the failed one is gone; bad -> its frames carry A = -1 and
    weight 0 (the optimality label is bad), the successful ones stay +1 with weight 1."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    demos = [episode(e, n, None, success=ok) for e, (n, ok) in enumerate([(6, True), (9, False), (4, True)])]
    write_episodes(demos, tmp_path / "demos", "local/demos", FPS, with_advantages=False)
    source = LeRobotDataset("local/demos", root=tmp_path / "demos")

    kept = RiptDataset(chunk_size=4)
    kept.add_lerobot_dataset(source, as_demo=True)  # the default is "keep"
    assert kept.episodes_of("demo").tolist() == [0, 1, 2] and len(kept) == 19
    assert all_frames(kept)["advantages"].unique().tolist() == [1.0]

    dropped = RiptDataset(chunk_size=4)
    dropped.add_lerobot_dataset(source, as_demo=True, failed_demos="drop")
    assert dropped.num_episodes == 2 and len(dropped) == 10
    assert all_frames(dropped)["observation.state"][:, 0].unique().tolist() == [
        0.0,
        2.0,
    ]  # episodes 0 and 2 (state[0] = e)

    bad = RiptDataset(chunk_size=4)
    bad.add_lerobot_dataset(source, as_demo=True, failed_demos="bad")
    frames = all_frames(bad)
    assert bad.episodes_of("demo").tolist() == [0, 1, 2]  # still drawn by the demo sampler
    assert frames["advantages"][6:15].unique().tolist() == [-1.0]
    assert frames["advantage_weights"][6:15].unique().tolist() == [0.0]
    assert frames["advantages"][:6].unique().tolist() == frames["advantages"][15:].unique().tolist() == [1.0]

    with pytest.raises(ValueError, match="failed_demos='dorp': valid values are keep, drop, bad"):
        RiptDataset(chunk_size=4).add_lerobot_dataset(source, as_demo=True, failed_demos="dorp")


def test_training_fails_with_a_fix_when_dropping_failed_demos_leaves_none(tmp_path):
    """The training loop's demo set: drop with only failed demos names failed_demos; keep trains them."""
    from types import SimpleNamespace

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot_ript.train.loop import demo_set

    demos = [episode(e, 5, None, success=False) for e in range(2)]
    write_episodes(demos, tmp_path / "demos", "local/failed", FPS, with_advantages=False)
    source = LeRobotDataset("local/failed", root=tmp_path / "demos")
    policy_config = SimpleNamespace(chunk_size=4, target_state_dim=None)

    with pytest.raises(
        ValueError, match="failed_demos=drop left no demonstration: all 2 episodes of local/failed"
    ):
        demo_set(source, policy_config, "drop")
    kept = demo_set(source, policy_config, "keep")
    assert kept.episodes_of("demo").tolist() == [0, 1] and len(kept) == 10


def test_plain_lerobot_dataset_loads_as_demos_with_camera_frames(tiny_dataset_factory):
    """A dataset made by LeRobot itself, without advantages, is all demos; camera frames come from the right
    source and frame, also for a second dataset added after the first."""
    first = tiny_dataset_factory(cameras=("top",), episodes=2, frames=5, image_hw=(8, 8))
    second = tiny_dataset_factory(cameras=("top",), episodes=2, frames=4, image_hw=(8, 8), seed=1)
    ds = RiptDataset(chunk_size=3)
    ds.add_lerobot_dataset(first)
    ds.add_lerobot_dataset(second)
    assert ds.episodes_of("demo").tolist() == [0, 1, 2, 3] and len(ds) == 18
    indices = torch.tensor([0, 9, 10, 17])  # first and last frames of both sources
    batch = ds.get_batch(indices)
    assert batch["advantages"].tolist() == [1.0] * 4 and batch["advantage_weights"].tolist() == [1.0] * 4
    assert batch["init_hash"].tolist() == [-1] * 4
    assert batch["observation.images.top"].dtype == torch.uint8  # as in memory; the policy makes it float
    assert batch["task"] == ["tiny task"] * 4  # the datasets' per-frame task
    for row, (source, i) in enumerate([(first, 0), (first, 9), (second, 0), (second, 7)]):
        item = source[i]  # LeRobot decodes the PNG frame to float in [0, 1]: exactly k / 255
        assert torch.equal(batch["observation.images.top"][row].float() / 255, item["observation.images.top"])
        torch.testing.assert_close(batch["observation.state"][row], item["observation.state"])
    assert batch["action_is_pad"].tolist() == [[False] * 3, [False, True, True]] * 2  # last frames: padded


def with_images(ep: EpisodeRecord, cameras=("corner2", "topview"), hw=(6, 8), task: str | None = None):
    """`ep` with random uint8 camera frames (T, H, W, 3) per camera (seeded by its first action) and `task`."""
    rng = np.random.default_rng(int(ep.actions[0, 0]))
    ep.images = {c: rng.integers(0, 256, (ep.num_frames, *hw, 3), dtype=np.uint8) for c in cameras}
    if task is not None:
        ep.task = task
    return ep


def test_camera_frames_and_tasks_of_episodes_in_memory_reach_the_batch_as_uint8_chw():
    """EpisodeRecord.images are kept (not copied) and each row gets its own frame as uint8 (3, H, W), the layout
    of a LeRobot dataset; `task` is each row's EpisodeRecord.task."""
    episodes = [with_images(episode(0, 4, 1.0), task="push it"), with_images(episode(1, 3, -1.0), task="b")]
    ds = RiptDataset(chunk_size=2)
    ds.add_episodes(episodes)
    indices = torch.tensor([6, 0, 3, 4])  # (episode, frame): (1, 2), (0, 0), (0, 3), (1, 0)
    batch = ds.get_batch(indices)
    assert batch["task"] == ["b", "push it", "push it", "b"]
    for cam in ("corner2", "topview"):
        images = batch[f"observation.images.{cam}"]
        assert images.dtype == torch.uint8 and images.shape == (4, 3, 6, 8)
        for row, (e, t) in enumerate([(1, 2), (0, 0), (0, 3), (1, 0)]):
            np.testing.assert_array_equal(images[row].permute(1, 2, 0).numpy(), episodes[e].images[cam][t])
    assert np.shares_memory(ds._images[0]["observation.images.corner2"], episodes[0].images["corner2"])
    one = ds[6]
    assert one["task"] == "b" and torch.equal(
        one["observation.images.topview"], batch["observation.images.topview"][0]
    )


def test_camera_frames_and_tasks_from_disk_equal_those_in_memory(tmp_path):
    """Demos come from a LeRobotDataset and rollouts from memory: written and read back, the same episodes give
    the same uint8 frames and the same `task` strings (the dataset's per-frame task column)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    episodes = [
        with_images(episode(e, n, None), task=t) for e, (n, t) in enumerate([(5, "a"), (4, "b"), (3, "a")])
    ]
    write_episodes(episodes, tmp_path / "demos", "local/demos", FPS, with_advantages=False)
    from_disk = RiptDataset(chunk_size=3)
    from_disk.add_lerobot_dataset(LeRobotDataset("local/demos", root=tmp_path / "demos"))
    in_memory = RiptDataset(chunk_size=3)
    in_memory.add_episodes(episodes)
    a, b = all_frames(from_disk), all_frames(in_memory)
    assert (
        a.keys() == b.keys()
        and {"observation.images.corner2", "observation.images.topview", "task"} <= a.keys()
    )
    assert a["task"] == b["task"] == ["a"] * 5 + ["b"] * 4 + ["a"] * 3
    for key in ("observation.images.corner2", "observation.images.topview"):
        assert a[key].dtype == b[key].dtype == torch.uint8
        assert torch.equal(a[key], b[key])


def test_multi_task_demos_and_rollouts_keep_each_tasks_init_hash_and_instruction(tmp_path):
    """Scripted demos of two tasks in one dataset (record_demos with a list, 2 each, as the loop records them)
    and rollouts of both tasks from the same seeds: every episode's init_hash is init_hash_of(its task NAME, its
    initial state), the same seed of the two tasks gives two hashes, and RiptDataset batches carry each row's
    instruction (what a task-conditioned policy reads)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot_ript.data.record_demos import demos_repo_id, record_demos
    from lerobot_ript.envs.metaworld import MetaWorldStateEnv, task_instruction

    tasks = ["push-v3", "reach-v3"]
    result = record_demos(tasks, 2, 0.3, tmp_path / "demos", episode_length=6)
    assert result.num_episodes == 4 and set(result.task_success_rate) == set(tasks)
    demos = LeRobotDataset(demos_repo_id(tasks), root=tmp_path / "demos")
    assert (
        demos_repo_id(tasks) == "local/push-v3_reach-v3-demos"
        and demos_repo_id("push-v3") == "local/push-v3-demos"
    )
    assert sorted(demos.meta.tasks.index) == sorted(task_instruction(t) for t in tasks)
    expected = {}  # (task, seed) -> init_hash of a fresh env
    for task in tasks:
        env = MetaWorldStateEnv(task=task, episode_length=6)
        try:
            for seed in (0, 1):
                env.reset(seed=seed)
                expected[task, seed] = init_hash_of(task, env.init_state_key())
        finally:
            env.close()
    assert len(set(expected.values())) == 4  # seeds 0 and 1 of two tasks: four states
    data = RiptDataset(chunk_size=2)
    data.add_lerobot_dataset(demos, as_demo=True)
    batch = all_frames(data)
    starts = data.ep_start.tolist()
    assert [batch["task"][i] for i in starts] == [task_instruction(t) for t in tasks for _ in (0, 1)]
    assert data.episode_hash.tolist() == [expected[t, s] for t in tasks for s in (0, 1)]

    rollouts = []
    for e, (task, seed) in enumerate(expected):
        ep = episode(e, 3, 1.0 if e % 2 else -1.0)
        ep.task, ep.init_hash = task_instruction(task), expected[task, seed]
        rollouts.append(ep)
    write_episodes(rollouts, tmp_path / "roll", "local/rollouts", FPS, with_advantages=True)
    data.add_lerobot_dataset(LeRobotDataset("local/rollouts", root=tmp_path / "roll"))
    batch = all_frames(data)
    assert data.episode_hash.tolist()[4:] == list(expected.values())
    rows = data.ep_start[4:].tolist()
    assert [batch["task"][i] for i in rows] == [task_instruction(t) for t, _ in expected]
    assert batch["init_hash"][rows].tolist() == list(expected.values())


def test_mixing_episodes_with_and_without_camera_frames_fails_with_a_message(tiny_dataset_factory):
    mixed = RiptDataset(chunk_size=2)
    mixed.add_episodes([with_images(episode(0, 3, 1.0)), episode(1, 3, -1.0)])
    with pytest.raises(ValueError, match="mixing episodes with and without camera frames.*same cameras"):
        mixed.get_batch(torch.tensor([0]))  # even a batch of image rows only: the dataset is refused
    other_cameras = RiptDataset(chunk_size=2)
    other_cameras.add_lerobot_dataset(
        tiny_dataset_factory(
            cameras=("top",),
            state_dim=STATE_DIM,
            action_dim=ACTION_DIM,
            episodes=1,
            frames=3,
            image_hw=(6, 8),
        )
    )
    other_cameras.add_episodes([with_images(episode(1, 3, 1.0), cameras=("corner2",))])
    with pytest.raises(ValueError, match=r"observation\.images\.corner2.*observation\.images\.top"):
        EpisodeBalancedSampler(other_cameras, EpisodeShares(), torch.Generator())
    sizes = RiptDataset(chunk_size=2)
    sizes.add_episodes([with_images(episode(0, 3, 1.0)), with_images(episode(1, 3, 1.0), hw=(8, 8))])
    with pytest.raises(ValueError, match="same image size"):
        sizes.get_batch(torch.tensor([0, 3]))
    untasked = episode(1, 3, 1.0)
    untasked.task = None
    no_task = RiptDataset(chunk_size=2)
    no_task.add_episodes([episode(0, 3, 1.0), untasked])
    with pytest.raises(ValueError, match="1 of 2 episodes have no task"):
        no_task.get_batch(torch.tensor([0]))


def test_advantages_column_written_by_lerobot_is_read_per_episode(tiny_dataset_factory):
    tiny = tiny_dataset_factory(episodes=3, frames=4, advantages=[0.5, -2.0, 0.0])
    ds = RiptDataset(chunk_size=2)
    ds.add_lerobot_dataset(tiny)
    assert [ds.episodes_of(c).tolist() for c in ("good", "bad", "neutral")] == [[0], [1], [2]]
    batch = all_frames(ds)
    assert batch["advantages"].tolist() == [0.5] * 4 + [-2.0] * 4 + [0.0] * 4
    assert batch["init_hash"].tolist() == [1000] * 4 + [1001] * 4 + [1002] * 4


def test_target_state_dim_pads_and_truncates(tiny_dataset_factory):
    long = episode(0, 3, 1.0)
    padded = RiptDataset(chunk_size=2, target_state_dim=42)
    padded.add_episodes([long])
    state = all_frames(padded)["observation.state"]
    assert state.shape == (3, 42)
    np.testing.assert_array_equal(state[:, :STATE_DIM].numpy(), long.states)
    assert not state[:, STATE_DIM:].any()

    cut = RiptDataset(chunk_size=2, target_state_dim=10)
    cut.add_episodes([long])
    np.testing.assert_array_equal(all_frames(cut)["observation.state"].numpy(), long.states[:, :10])

    # Robots with different state sizes mix only with a target size.
    six = tiny_dataset_factory(state_dim=6, action_dim=ACTION_DIM, episodes=1, frames=3)
    mixed = RiptDataset(chunk_size=2)
    mixed.add_episodes([long])
    mixed.add_lerobot_dataset(six)
    with pytest.raises(ValueError, match="target_state_dim"):
        all_frames(mixed)
    fixed = RiptDataset(chunk_size=2, target_state_dim=8)
    fixed.add_episodes([long])
    fixed.add_lerobot_dataset(six)
    state = all_frames(fixed)["observation.state"]
    assert state.shape == (6, 8) and not state[3:, 6:].any()


# ----------------------------------------------------------------------------------- balanced sampling
def balanced_dataset() -> RiptDataset:
    """4 good rollouts of 20 frames, 4 bad ones 5x longer (100 frames, as failures run to the horizon),
    2 demos of 30 frames: uniform frame sampling would draw 400 / 540 = 74% bad frames."""
    ds = RiptDataset(chunk_size=4)
    ds.add_episodes([episode(e, 20, 1.0) for e in range(4)])
    ds.add_episodes([episode(e, 100, -1.0) for e in range(4, 8)])
    ds.add_episodes([episode(e, 30, None) for e in range(8, 10)])
    return ds


def test_sampler_keeps_configured_shares_when_bad_episodes_are_5x_longer():
    ds = balanced_dataset()
    n = 20_000
    sampler = EpisodeBalancedSampler(
        ds, EpisodeShares(good=0.375, bad=0.375, demo=0.25), torch.Generator().manual_seed(0)
    )
    idx = sampler.sample(n)
    assert idx.shape == (n,) and idx.dtype == torch.long and 0 <= int(idx.min()) and int(idx.max()) < len(ds)
    ep = ds.frame_episode[idx]
    kind_of = {int(e): c for c in ("good", "bad", "demo") for e in ds.episodes_of(c)}
    kinds = np.array([kind_of[int(e)] for e in ep])
    for kind, share in (("good", 0.375), ("bad", 0.375), ("demo", 0.25)):
        assert abs((kinds == kind).mean() - share) < 0.02, kind
    assert abs(400 / 540 - 0.375) > 0.3  # what uniform frame sampling would have given for "bad"

    # Within a kind, episodes uniformly; within an episode, frames uniformly (every frame reachable).
    position = (idx - torch.from_numpy(ds.ep_start)[ep]).numpy()
    length = (torch.from_numpy(ds.ep_end - ds.ep_start)[ep]).numpy()
    for kind in ("good", "bad", "demo"):
        sel = kinds == kind
        eps = ds.episodes_of(kind)
        counts = np.array([(ep.numpy()[sel] == e).sum() for e in eps]) / sel.sum()
        assert np.abs(counts - 1 / len(eps)).max() < 0.02, kind
        bins = np.bincount((5 * position[sel] / length[sel]).astype(int), minlength=5) / sel.sum()
        assert np.abs(bins - 0.2).max() < 0.02, kind  # relative position in the episode: flat
    assert len(np.unique(idx.numpy())) == len(ds)

    # The same generator seed draws the same frames.
    again = EpisodeBalancedSampler(
        ds, EpisodeShares(good=0.375, bad=0.375, demo=0.25), torch.Generator().manual_seed(0)
    )
    assert torch.equal(again.sample(n), idx)


def test_sampler_renormalises_over_the_kinds_present():
    ds = balanced_dataset()  # no neutral episodes
    sampler = EpisodeBalancedSampler(
        ds, EpisodeShares(good=0.2, bad=0.2, neutral=0.5, demo=0.1), torch.Generator().manual_seed(1)
    )
    assert sampler.kinds == ["good", "bad", "demo"]
    torch.testing.assert_close(sampler.probs, torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64))
    only_demos = EpisodeBalancedSampler(ds, EpisodeShares(good=0, bad=0, neutral=0, demo=1))
    assert set(ds.frame_episode[only_demos.sample(500)].tolist()) <= {8, 9}
    with pytest.raises(ValueError, match="no episodes of any kind"):
        EpisodeBalancedSampler(ds, EpisodeShares(good=0, bad=0, neutral=1, demo=0))
    with pytest.raises(ValueError, match=">= 0"):
        EpisodeShares(good=-0.1)


def test_sampler_by_advantage_draws_rollouts_in_proportion_to_their_advantage():
    """RLOO weights: a group of K=8 with one success gives it A=1, a group with 7 successes gives each A=1/7;
    with by_advantage the rare success is drawn 7x as often as each common one, failures likewise by |A|,
    demos uniformly, and the kind shares are unchanged."""
    ds = RiptDataset(chunk_size=4)
    ds.add_episodes([episode(0, 10, 1.0)] + [episode(e, 10, 1 / 7) for e in range(1, 8)])  # good
    ds.add_episodes([episode(8, 50, -1.0), episode(9, 50, -0.5)])  # bad
    ds.add_episodes([episode(10, 30, None), episode(11, 30, None)])  # demos
    shares = EpisodeShares(good=0.5, bad=0.3, demo=0.2)
    n = 40_000
    idx = EpisodeBalancedSampler(ds, shares, torch.Generator().manual_seed(0), by_advantage=True).sample(n)
    counts = np.bincount(ds.frame_episode[idx].numpy(), minlength=12) / n
    good_w = np.array([1.0] + [1 / 7] * 7)
    np.testing.assert_allclose(counts[:8], 0.5 * good_w / good_w.sum(), atol=0.01)
    np.testing.assert_allclose(counts[8:10], 0.3 * np.array([2, 1]) / 3, atol=0.01)
    np.testing.assert_allclose(counts[10:], [0.1, 0.1], atol=0.01)
    assert counts[0] / counts[1:8].mean() == pytest.approx(7, rel=0.15)

    uniform = EpisodeBalancedSampler(ds, shares, torch.Generator().manual_seed(0)).sample(n)
    np.testing.assert_allclose(
        np.bincount(ds.frame_episode[uniform].numpy(), minlength=12)[:8] / n, [0.5 / 8] * 8, atol=0.01
    )


def test_sampler_by_advantage_keeps_a_zero_advantage_kind_uniform():
    ds = RiptDataset(chunk_size=2)
    ds.add_episodes([episode(e, 5, 0.0) for e in range(4)])  # neutral: all |A| = 0
    sampler = EpisodeBalancedSampler(
        ds,
        EpisodeShares(good=0, bad=0, neutral=1, demo=0),
        torch.Generator().manual_seed(0),
        by_advantage=True,
    )
    counts = np.bincount(ds.frame_episode[sampler.sample(8000)].numpy(), minlength=4) / 8000
    np.testing.assert_allclose(counts, [0.25] * 4, atol=0.03)


# ------------------------------------------------------------------------------- training on a batch
def test_ript_policy_trains_on_a_batch_through_its_real_preprocessor(tmp_path):
    """make_policy on the written rollouts' metadata, the policy's own preprocessor, one optimizer step: the
    advantages survive the processor pipeline and reach forward (its good / bad shares are theirs)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    from lerobot_ript.policy.configuration_ript import RiptConfig

    rollouts = [episode(e, 12, a) for e, a in enumerate([1.0, -1.0, 1.0, -1.0])]
    lerobot_ds = write_episodes(rollouts, tmp_path / "roll", "local/rollouts", FPS, with_advantages=True)
    cfg = RiptConfig(
        device="cpu",
        chunk_size=4,
        n_action_steps=2,
        hidden_dim=32,
        cond_dim=16,
        num_denoiser_layers=1,
        num_inference_steps=2,
        cfg_dropout_prob=0.0,
    )
    policy = make_policy(cfg, ds_meta=LeRobotDataset("local/rollouts", root=tmp_path / "roll").meta)
    pre, _ = make_pre_post_processors(cfg, dataset_stats=lerobot_ds.meta.stats)
    data = RiptDataset(chunk_size=cfg.chunk_size)
    data.add_lerobot_dataset(lerobot_ds)
    sampler = EpisodeBalancedSampler(
        data, EpisodeShares(good=0.5, bad=0.5, demo=0.0), torch.Generator().manual_seed(0)
    )
    raw = data.get_batch(sampler.sample(32))
    batch = pre(raw)
    torch.testing.assert_close(batch["advantages"], raw["advantages"])
    assert torch.equal(batch["action_is_pad"], raw["action_is_pad"])
    assert not torch.allclose(batch["observation.state"], raw["observation.state"])  # normalised

    policy.train()
    before = [p.detach().clone() for p in policy.parameters()]
    loss, metrics = policy.forward(batch)
    assert metrics["share_bad"] == pytest.approx(float((raw["advantages"] < 0).float().mean()))
    assert 0 < metrics["share_bad"] < 1 and metrics["share_good"] == pytest.approx(1 - metrics["share_bad"])
    loss.backward()
    torch.optim.AdamW(policy.parameters(), lr=1e-2).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_writing_and_reading_ten_rollouts_of_150_frames_takes_seconds(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    rollouts = [episode(e, 150, 1.0 if e % 2 else -1.0) for e in range(10)]
    t0 = time.perf_counter()
    write_episodes(rollouts, tmp_path / "roll", "local/rollouts", FPS, with_advantages=True)
    ds = RiptDataset(chunk_size=8)
    ds.add_lerobot_dataset(LeRobotDataset("local/rollouts", root=tmp_path / "roll"))
    batch = ds.get_batch(torch.arange(len(ds)))
    elapsed = time.perf_counter() - t0
    assert len(ds) == 1500 and batch["advantages"].abs().eq(1).all()
    assert elapsed < 20, f"writing and reading 1500 frames took {elapsed:.1f} s"


# ------------------------------------------------------------------------------------------ Hub push
@pytest.mark.filterwarnings("ignore:Constant\\(s\\) may be too high:UserWarning")
def test_collector_rollouts_push_with_lerobot_push_to_hub_and_load_back(tmp_path, monkeypatch):
    """Rollouts of the real collector, written as a LeRobotDataset, pushed with LeRobot's own
    `LeRobotDataset.push_to_hub` to tests/hub_server.py's server, downloaded and loaded as a RiptDataset.

    `push_to_hub` takes no endpoint: its `HfApi()` reads `constants.ENDPOINT` and the dataset card goes through
    the module-level `upload_file` (an `HfApi` made at import), so both are pointed at the local server. The
    card's `validate()` posts to a hard-coded https://huggingface.co/api/validate-yaml whatever the endpoint
    (huggingface_hub 1.x), so it is sent to the local server's validate-yaml route instead. The server has no
    tag-deletion route, so `tag_version=False`.
    """
    from hub_server import LocalHubServer
    from huggingface_hub import constants, hf_api, snapshot_download
    from huggingface_hub.repocard import RepoCard
    from huggingface_hub.utils import get_session, hf_raise_for_status
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from lerobot_ript.envs.metaworld import MetaWorldStateEnvConfig, make_vector_env, scripted_expert
    from lerobot_ript.rollout.collector import GroupedCollector, SeedSampler

    expert = scripted_expert(TASK)
    rng = np.random.default_rng(0)

    def expert_on_first(obs):  # sub-env 0 of the group: expert; sub-env 1: random -> rewards [1, 0]
        chunk = rng.uniform(-1, 1, (len(obs["agent_pos"]), 1, ACTION_DIM)).astype(np.float32)
        chunk[0::2, 0] = [expert(s) for s in obs["agent_pos"][0::2]]
        return chunk

    env_cfg = MetaWorldStateEnvConfig(task=TASK, episode_length=60)
    collector = GroupedCollector(
        lambda: make_vector_env(env_cfg, 2),
        expert_on_first,
        task=TASK,
        group_size=2,
        num_slots=1,
        goal_rollouts=2,
        max_groups=1,
        seed_sampler=SeedSampler(1, start=3),
        max_episode_steps=60,
    )
    try:
        episodes = collector.collect().episodes
    finally:
        collector.close()
    assert [ep.advantage for ep in episodes] == [1.0, -1.0]
    repo = "ript-user/push-rollouts"
    local = write_episodes(episodes, tmp_path / "roll", repo, FPS, with_advantages=True)

    with LocalHubServer() as hub:

        def validate_locally(card, repo_type=None):
            body = {"repoType": repo_type or card.repo_type, "content": str(card)}
            hf_raise_for_status(get_session().post(f"{hub.endpoint}/api/validate-yaml", json=body))

        # tests/conftest.py sets HF_HUB_OFFLINE=1; this test reaches only the server on 127.0.0.1
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        with monkeypatch.context() as m:  # only for the push: hf_hub_url rewrites URLs relative to ENDPOINT
            m.setattr(constants, "ENDPOINT", hub.endpoint)
            m.setattr(hf_api.api, "endpoint", hub.endpoint)
            m.setattr(RepoCard, "validate", validate_locally)
            local.push_to_hub(tag_version=False)
        assert hub.counts["commit"] == 2 and hub.counts["validate_yaml"] >= 1  # data, then the card
        folder = snapshot_download(repo, repo_type="dataset", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    assert (Path(folder) / "README.md").exists()
    pulled = LeRobotDataset(repo, root=folder)
    data = RiptDataset(chunk_size=4)
    data.add_lerobot_dataset(pulled)
    batch = all_frames(data)
    n0, n1 = episodes[0].num_frames, episodes[1].num_frames
    assert len(data) == n0 + n1 and n0 < n1 == 60  # the success ended early, the failure ran to the horizon
    assert batch["advantages"].tolist() == [1.0] * n0 + [-1.0] * n1
    assert batch["init_hash"].unique().tolist() == [episodes[0].init_hash]
    np.testing.assert_array_equal(
        batch["action"][:, 0].numpy(), np.concatenate([ep.actions for ep in episodes])
    )
