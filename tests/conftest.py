"""Shared fixtures: tiny LeRobot datasets built on disk, and an isolated environment for every test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# No test may reach the network: fail fast instead of hanging on the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


def make_tiny_dataset(
    root: Path,
    *,
    state_dim: int = 6,
    action_dim: int = 2,
    cameras: tuple[str, ...] = (),
    image_hw: tuple[int, int] = (32, 32),
    episodes: int = 3,
    frames: int = 20,
    advantages: list[float] | None = None,
    fps: int = 10,
    seed: int = 0,
):
    """A LeRobotDataset v3 on disk with `episodes` x `frames` frames; images stored as PNG frames."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    rng = np.random.default_rng(seed)
    features = {
        "observation.state": {"dtype": "float32", "shape": (state_dim,), "names": None},
        "action": {"dtype": "float32", "shape": (action_dim,), "names": None},
    }
    for cam in cameras:
        features[f"observation.images.{cam}"] = {
            "dtype": "image",
            "shape": (*image_hw, 3),
            "names": ["height", "width", "channels"],
        }
    if advantages is not None:
        features["advantages"] = {"dtype": "float32", "shape": (1,), "names": None}
        features["init_hash"] = {"dtype": "int64", "shape": (1,), "names": None}
    ds = LeRobotDataset.create(repo_id="local/tiny", fps=fps, features=features, root=root, use_videos=False)
    for ep in range(episodes):
        for _ in range(frames):
            frame = {
                "observation.state": rng.normal(size=state_dim).astype(np.float32),
                "action": rng.uniform(-1, 1, size=action_dim).astype(np.float32),
                "task": "tiny task",
            }
            for cam in cameras:
                frame[f"observation.images.{cam}"] = rng.integers(0, 255, (*image_hw, 3), dtype=np.uint8)
            if advantages is not None:
                frame["advantages"] = np.array([advantages[ep]], dtype=np.float32)
                frame["init_hash"] = np.array([1000 + ep], dtype=np.int64)
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    return LeRobotDataset("local/tiny", root=root)


@pytest.fixture
def tiny_dataset_factory(tmp_path):
    counter = {"n": 0}

    def _make(**kwargs):
        counter["n"] += 1
        return make_tiny_dataset(tmp_path / f"ds{counter['n']}", **kwargs)

    return _make


@pytest.fixture
def one_torch_thread():
    """Tiny models: one intra-op thread is faster, and two OpenMP threads spin-wait badly (10x slower
    measured) when the machine's two cores are shared with other processes. Restores the count after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide state reset before and after a test that builds an Accelerator in process
    (a test building several calls `reset_accelerate_state()` between them)."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
