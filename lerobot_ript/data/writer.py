"""Write demonstration and rollout episodes as a LeRobotDataset v3 (one writer for both).

Columns of every frame (LeRobot adds timestamp, frame_index, episode_index, index, task_index):

| column | dtype | shape | meaning |
| --- | --- | --- | --- |
| observation.state | float32 | (S,) | state before the action |
| action | float32 | (A,) | action taken |
| next.reward | float32 | (1,) | reward of this step |
| next.success | bool | (1,) | success reached at this step or earlier in the episode |
| success | bool | (1,) | episode outcome, the same on every frame |
| init_hash | int64 | (1,) | `init_hash_of(task name, initial state)`, the same on every frame |
| advantages | float32 | (1,) | per-episode RLOO advantage on every frame (`with_advantages=True` only) |
| observation.images.<cam> | image | (H, W, 3) | camera frames, stored as PNG in the parquet files |

LeRobot 0.6.1 stores and reads back dtype "bool" (torch.bool on read; its stats treat it as 0/1). Columns of
shape (1,) come back from `LeRobotDataset.__getitem__` as scalars.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

logger = logging.getLogger(__name__)

# init_hash values are masked to 62 bits, so they are non-negative and fit an int64 column.
INIT_HASH_BITS = 62
# Decimal places kept of each initial-state coordinate before hashing (rounding to 1e-6).
INIT_STATE_DECIMALS = 6

_STATE_KEY = "observation.state"
_ACTION_KEY = "action"
_IMAGE_PREFIX = "observation.images."


@dataclass
class EpisodeRecord:
    """One episode in memory. T frames; frame t holds the state before action t and that action's reward."""

    # The `task` column: the language instruction a policy is given (MetaWorld: `task_instruction(name)`).
    task: str
    states: np.ndarray  # (T, S) float32
    actions: np.ndarray  # (T, A) float32
    rewards: np.ndarray  # (T,) float32
    success: bool  # episode outcome
    init_hash: int  # init_hash_of(task NAME, states[0]), not of the instruction; in [0, 2**62)
    advantage: float | None = None  # per-episode RLOO advantage, broadcast to every frame
    images: dict[str, np.ndarray] | None = None  # camera -> (T, H, W, 3) uint8
    # Frame index at which success is first reached (next.success is True from there on). None: the last
    # frame when `success` is True (an episode that terminates on success), no frame otherwise.
    success_step: int | None = None

    @property
    def num_frames(self) -> int:
        return int(np.shape(self.states)[0])

    def validate(self, with_advantages: bool, index: int = 0) -> None:
        """Raise ValueError naming the episode, the field and the rule it breaks."""
        where = f"episode {index} (task {self.task!r})"
        states, actions, rewards = np.asarray(self.states), np.asarray(self.actions), np.asarray(self.rewards)
        if states.ndim != 2 or actions.ndim != 2:
            raise ValueError(
                f"{where}: states and actions must be 2-D (T, S) / (T, A); got shapes {states.shape} and "
                f"{actions.shape}."
            )
        t = states.shape[0]
        if t == 0:
            raise ValueError(f"{where}: an episode needs at least one frame.")
        if actions.shape[0] != t or rewards.shape != (t,):
            raise ValueError(
                f"{where}: states {states.shape}, actions {actions.shape} and rewards {rewards.shape} must "
                f"share T: expected (T, S), (T, A) and (T,)."
            )
        for name, arr in (("states", states), ("actions", actions), ("rewards", rewards)):
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{where}: {name} contain NaN or inf values.")
        if not 0 <= int(self.init_hash) < 2**INIT_HASH_BITS:
            raise ValueError(
                f"{where}: init_hash={self.init_hash} must be in [0, 2**{INIT_HASH_BITS}); use init_hash_of()."
            )
        if with_advantages:
            if self.advantage is None:
                raise ValueError(
                    f"{where}: advantage is None but with_advantages=True; set EpisodeRecord.advantage "
                    "(the RLOO advantage) or write with with_advantages=False."
                )
            if not math.isfinite(float(self.advantage)):
                raise ValueError(f"{where}: advantage={self.advantage} is not finite.")
        if self.success_step is not None and not (self.success and 0 <= self.success_step < t):
            raise ValueError(
                f"{where}: success_step={self.success_step} needs success=True and 0 <= success_step < T={t}."
            )
        for cam, frames in (self.images or {}).items():
            frames = np.asarray(frames)
            if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != t or frames.shape[3] != 3:
                raise ValueError(
                    f"{where}: images[{cam!r}] must be uint8 of shape (T={t}, H, W, 3); got {frames.dtype} "
                    f"{frames.shape}."
                )

    def next_success(self) -> np.ndarray:
        """(T,) bool: True from the frame where success is reached on."""
        flags = np.zeros(self.num_frames, dtype=bool)
        if self.success:
            flags[self.num_frames - 1 if self.success_step is None else self.success_step :] = True
        return flags


def init_hash_of(task: str, init_obs: np.ndarray) -> int:
    """A stable id of (task, initial state): equal for equal states, the same in every process and platform.

    blake2b over the task name and the observation rounded to 1e-6 (as little-endian float64), first 8 bytes
    masked to 62 bits. -0.0 and 0.0 hash alike.
    """
    obs = np.asarray(init_obs, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(obs)):
        raise ValueError(f"init_hash_of: the initial state of task {task!r} contains NaN or inf values.")
    obs = np.round(obs, INIT_STATE_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(task).encode("utf-8"))
    digest.update(b"\x00")
    digest.update(obs.astype("<f8").tobytes())
    return int.from_bytes(digest.digest(), "little") & ((1 << INIT_HASH_BITS) - 1)


def dataset_features(
    state_dim: int, action_dim: int, image_shapes: dict[str, tuple[int, int, int]], with_advantages: bool
) -> dict[str, dict]:
    """The LeRobot `features` dict written by `write_episodes`."""
    features = {
        _STATE_KEY: {"dtype": "float32", "shape": (state_dim,), "names": None},
        _ACTION_KEY: {"dtype": "float32", "shape": (action_dim,), "names": None},
        "next.reward": {"dtype": "float32", "shape": (1,), "names": None},
        "next.success": {"dtype": "bool", "shape": (1,), "names": None},
        "success": {"dtype": "bool", "shape": (1,), "names": None},
        "init_hash": {"dtype": "int64", "shape": (1,), "names": None},
    }
    if with_advantages:
        features["advantages"] = {"dtype": "float32", "shape": (1,), "names": None}
    for cam, shape in image_shapes.items():
        features[f"{_IMAGE_PREFIX}{cam}"] = {
            "dtype": "image",
            "shape": tuple(shape),
            "names": ["height", "width", "channels"],
        }
    return features


def _check_consistent(episodes: Sequence[EpisodeRecord], with_advantages: bool) -> tuple[int, int, dict]:
    """Validate every episode; return (S, A, {camera: (H, W, 3)}) shared by all of them."""
    if len(episodes) == 0:
        raise ValueError("write_episodes needs at least one episode.")
    first = episodes[0]
    first.validate(with_advantages, 0)
    state_dim, action_dim = first.states.shape[1], first.actions.shape[1]
    image_shapes = {cam: tuple(np.shape(v)[1:]) for cam, v in (first.images or {}).items()}
    for i, ep in enumerate(episodes[1:], start=1):
        ep.validate(with_advantages, i)
        shapes = {cam: tuple(np.shape(v)[1:]) for cam, v in (ep.images or {}).items()}
        if (ep.states.shape[1], ep.actions.shape[1]) != (state_dim, action_dim) or shapes != image_shapes:
            raise ValueError(
                f"episode {i}: state dim {ep.states.shape[1]}, action dim {ep.actions.shape[1]} and images "
                f"{shapes} differ from episode 0 ({state_dim}, {action_dim}, {image_shapes}); one dataset "
                "holds one layout."
            )
    return state_dim, action_dim, image_shapes


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def _skip_image_embedding(has_images: bool) -> Iterator[None]:
    """Skip LeRobot's per-row image embedding when the dataset has no image column.

    `DatasetWriter._save_episode_data` always runs `embed_images`, a per-row `datasets.map` that costs about
    1.5 ms a frame (3 of the 3.5 s for 10 x 200 state frames) and returns the table unchanged when no column
    is an image. Without images it is replaced for the duration of the write; with images it runs as usual.
    """
    from lerobot.datasets import dataset_writer

    if has_images or not hasattr(dataset_writer, "embed_images"):
        yield
        return
    with _PATCH_LOCK:
        original = dataset_writer.embed_images
        dataset_writer.embed_images = lambda dataset: dataset
        try:
            yield
        finally:
            dataset_writer.embed_images = original


def _prepare_root(root: Path) -> None:
    if root.exists():
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()  # LeRobot creates the folder itself and refuses an existing one
        else:
            raise FileExistsError(
                f"Dataset folder {root} already exists and is not empty; LeRobot never overwrites a dataset. "
                "Choose a new folder or delete this one."
            )


def write_episodes(
    episodes: Sequence[EpisodeRecord],
    root: str | Path,
    repo_id: str,
    fps: int,
    *,
    with_advantages: bool,
) -> LeRobotDataset:
    """Write `episodes` as a new LeRobotDataset v3 at `root` (no videos) and return it opened for reading.

    Everything is validated before anything is written. `root` must not exist (or be an empty folder).
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if int(fps) <= 0:
        raise ValueError(f"fps={fps} must be a positive number of frames per second.")
    episodes = list(episodes)
    state_dim, action_dim, image_shapes = _check_consistent(episodes, with_advantages)
    root = Path(root)
    _prepare_root(root)
    features = dataset_features(state_dim, action_dim, image_shapes, with_advantages)

    dataset = LeRobotDataset.create(repo_id, fps=int(fps), features=features, root=root, use_videos=False)
    try:
        with _skip_image_embedding(has_images=bool(image_shapes)):
            for ep in episodes:
                _add_episode(dataset, ep, with_advantages)
                dataset.save_episode()
    finally:
        dataset.finalize()
    num_frames = sum(ep.num_frames for ep in episodes)
    logger.info("Wrote %d episodes (%d frames) to %s", len(episodes), num_frames, root)
    return LeRobotDataset(repo_id, root=root)


def _add_episode(dataset: LeRobotDataset, ep: EpisodeRecord, with_advantages: bool) -> None:
    states = np.asarray(ep.states, dtype=np.float32)  # (T, S)
    actions = np.asarray(ep.actions, dtype=np.float32)  # (T, A)
    rewards = np.asarray(ep.rewards, dtype=np.float32).reshape(-1, 1)  # (T, 1)
    next_success = ep.next_success().reshape(-1, 1)  # (T, 1)
    success = np.array([bool(ep.success)])
    init_hash = np.array([int(ep.init_hash)], dtype=np.int64)
    advantage = np.array([float(ep.advantage)], dtype=np.float32) if with_advantages else None
    images = {f"{_IMAGE_PREFIX}{cam}": np.asarray(v) for cam, v in (ep.images or {}).items()}
    for t in range(ep.num_frames):
        frame = {
            _STATE_KEY: states[t],
            _ACTION_KEY: actions[t],
            "next.reward": rewards[t],
            "next.success": next_success[t],
            "success": success,
            "init_hash": init_hash,
            "task": ep.task,
        }
        if advantage is not None:
            frame["advantages"] = advantage
        for key, frames in images.items():
            frame[key] = frames[t]
        dataset.add_frame(frame)
