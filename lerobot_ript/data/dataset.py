"""`RiptDataset`: demonstration and rollout frames with action chunks, and an episode-balanced sampler.

Frames come from LeRobotDatasets (demos, rollouts written by `write_episodes`, or any dataset that already
has an `advantages` column) or straight from in-memory `EpisodeRecord`s. State and action columns are held
in memory, so a training batch is built by index arithmetic (the action chunk of frame i is
actions[i : i + chunk_size] inside its episode, edge-padded, with an `action_is_pad` mask). Camera frames are
read from the source LeRobotDataset on demand, or taken from the `EpisodeRecord.images` kept in memory (by
reference, for as long as the episode is in the dataset); either way a batch holds them as uint8 (B, 3, H, W),
as LeRobot datasets store them (the policy converts them to float). Every episode of a dataset has the same
cameras, or none. A batch also carries `task` (list[str], the language instruction of each row) when the
episodes have one (`EpisodeRecord.task`, a LeRobotDataset's per-frame `task`).

Every frame carries `advantages` (the raw signal whose sign is the optimality label: demos are +1) and
`advantage_weights` (non-negative weights for the "weighted" objective: demos are 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lerobot_ript.data.writer import EpisodeRecord
from lerobot_ript.shapes import pad_or_truncate

IMAGE_PREFIX = "observation.images."

CATEGORIES = ("good", "bad", "neutral", "demo")
FAILED_DEMOS = ("keep", "drop", "bad")  # what a demo episode whose `success` column is False becomes


@dataclass(frozen=True)
class EpisodeShares:
    """Share of each training batch drawn from each kind of episode (renormalised over the kinds present)."""

    # Rollouts with a positive advantage (labelled good).
    good: float = 0.375
    # Rollouts with a negative advantage (labelled bad).
    bad: float = 0.375
    # Rollouts with a zero advantage (null label; only without dynamic sampling).
    neutral: float = 0.0
    # Demonstration frames (labelled good).
    demo: float = 0.25

    def __post_init__(self) -> None:
        for name in CATEGORIES:
            if getattr(self, name) < 0:
                raise ValueError(f"share {name}={getattr(self, name)} must be >= 0.")


@dataclass
class _Source:
    dataset: object  # a LeRobotDataset holding the camera frames
    offset: int  # its frame 0 is our frame `offset`


class RiptDataset(torch.utils.data.Dataset):
    """Frames of several episodes, each tagged demo / good / bad / neutral. See the module docstring."""

    def __init__(self, chunk_size: int, target_state_dim: int | None = None) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
        self.chunk_size, self.target_state_dim = chunk_size, target_state_dim
        self._states: list[np.ndarray] = []
        self._actions: list[np.ndarray] = []
        self._adv: list[float] = []  # per episode
        self._weight: list[float] = []  # per episode
        self._hash: list[int] = []  # per episode
        self._category: list[str] = []  # per episode
        self._sources: list[tuple[_Source, int] | None] = []  # per episode: (source, first frame in source)
        self._images: list[dict[str, np.ndarray] | None] = []  # per episode: key -> (T, H, W, 3) uint8
        self._tasks: list[np.ndarray | None] = []  # per episode: (T,) indices into _task_names
        self._task_names: list[str] = []
        self._task_ids: dict[str, int] = {}
        self._built = False

    # ----- adding data -----
    def add_episodes(self, episodes: list[EpisodeRecord], weights: list[float] | None = None) -> None:
        """Add rollout episodes (with `advantage` set) or demos (advantage None -> labelled good).

        `weights`: one non-negative weight per episode for the "weighted" objective (the processed advantages).
        Without them a demo weighs 1 and a rollout max(advantage, 0), as in `add_lerobot_dataset`."""
        if weights is not None and len(weights) != len(episodes):
            raise ValueError(
                f"got {len(weights)} weights for {len(episodes)} episodes; pass one per episode."
            )
        for i, ep in enumerate(episodes):
            if ep.advantage is not None and not np.isfinite(ep.advantage):
                raise ValueError(f"episode {i} has a non-finite advantage {ep.advantage}.")
            demo = ep.advantage is None
            adv = 1.0 if demo else float(ep.advantage)
            w = (1.0 if demo else max(adv, 0.0)) if weights is None else float(weights[i])
            images = None
            if ep.images:
                images = {
                    f"{IMAGE_PREFIX}{cam}": _check_frames(v, len(ep.states), cam, i)
                    for cam, v in ep.images.items()
                }
            tasks = None if ep.task is None else np.full(len(ep.states), self._task_id(ep.task), np.int64)
            cat = "demo" if demo else _category(adv)
            self._add(ep.states, ep.actions, adv, w, ep.init_hash, cat, None, images=images, tasks=tasks)

    def add_lerobot_dataset(
        self, dataset, *, as_demo: bool | None = None, failed_demos: str = "keep"
    ) -> None:
        """Add every episode of a LeRobotDataset. With an `advantages` column, its frames are rollouts
        (per-frame values, first frame of each episode used for the episode's kind); without, demos.

        `failed_demos` decides what a demo episode whose `success` column is False becomes: "keep" (a demo
        labelled good, like the others), "drop" (left out) or "bad" (a demo labelled bad: advantage -1, weight
        0). A dataset without a `success` column counts every demo as successful."""
        if failed_demos not in FAILED_DEMOS:
            raise ValueError(f"failed_demos={failed_demos!r}: valid values are {', '.join(FAILED_DEMOS)}.")
        hf = dataset.hf_dataset.with_format("numpy")
        ep_index = np.asarray(hf["episode_index"]).reshape(-1)
        states = _column(hf, "observation.state", len(ep_index))
        actions = np.asarray(hf["action"], dtype=np.float32).reshape(len(ep_index), -1)
        has_adv = "advantages" in hf.column_names and not as_demo
        adv = np.asarray(hf["advantages"], np.float32).reshape(-1) if has_adv else None
        if adv is not None and not np.isfinite(adv).all():
            raise ValueError(
                f"dataset {dataset.repo_id}: column 'advantages' has {int((~np.isfinite(adv)).sum())} non-finite "
                "values. Clean the column (AdvantageProcessor) before training."
            )
        hashes = np.asarray(hf["init_hash"]).reshape(-1) if "init_hash" in hf.column_names else None
        weights = (
            np.asarray(hf["advantage_weights"]).reshape(-1)
            if "advantage_weights" in hf.column_names
            else None
        )
        source = _Source(dataset=dataset, offset=0) if dataset.meta.camera_keys else None
        tasks = self._dataset_tasks(dataset, hf)  # (N,) indices into _task_names, or None
        bounds = np.flatnonzero(np.diff(ep_index)) + 1
        failed = (
            ~np.asarray(hf["success"], bool).reshape(-1)
            if adv is None and "success" in hf.column_names
            else np.zeros(len(ep_index), bool)
        )
        for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(ep_index)], strict=True):
            if failed[start] and failed_demos == "drop":
                continue
            a = 1.0 if adv is None else float(adv[start])
            w = float(weights[start]) if weights is not None else (1.0 if adv is None else max(a, 0.0))
            if failed[start] and failed_demos == "bad":
                a, w = -1.0, 0.0
            h = int(hashes[start]) if hashes is not None else -1
            cat = "demo" if adv is None else _category(a)
            self._add(
                states[start:end],
                actions[start:end],
                a,
                w,
                h,
                cat,
                (source, int(start)) if source else None,
                tasks=None if tasks is None else tasks[start:end],
            )

    def _task_id(self, task: str) -> int:
        if task not in self._task_ids:
            self._task_ids[task] = len(self._task_names)
            self._task_names.append(task)
        return self._task_ids[task]

    def _dataset_tasks(self, dataset, hf) -> np.ndarray | None:
        """Per-frame task indices (N,) into _task_names from a LeRobotDataset's `task_index`; None without."""
        if "task_index" not in hf.column_names or dataset.meta.tasks is None:
            return None
        table = dataset.meta.tasks  # index: the task strings; column task_index
        theirs = np.asarray(table["task_index"], dtype=np.int64)
        ours = np.full(int(theirs.max()) + 1 if len(theirs) else 0, -1, dtype=np.int64)
        ours[theirs] = [self._task_id(str(name)) for name in table.index]
        return ours[np.asarray(hf["task_index"], dtype=np.int64).reshape(-1)]

    def _add(
        self, states, actions, adv, weight, init_hash, category, source, *, images=None, tasks=None
    ) -> None:
        states = np.asarray(states, np.float32)
        actions = np.asarray(actions, np.float32)
        if len(states) != len(actions) or len(states) == 0:
            raise ValueError(
                f"an episode has {len(states)} states and {len(actions)} actions; need equal, > 0."
            )
        if self.target_state_dim is not None:
            states = pad_or_truncate(states, self.target_state_dim)
        self._states.append(states)
        self._actions.append(actions)
        self._adv.append(adv)
        self._weight.append(weight)
        self._hash.append(init_hash)
        self._category.append(category)
        self._sources.append(source)
        self._images.append(images)
        self._tasks.append(tasks)
        self._built = False

    # ----- indexing -----
    def _build(self) -> None:
        if self._built:
            return
        if not self._states:
            raise ValueError("RiptDataset is empty: add demos or rollouts first.")
        dims = {s.shape[1] for s in self._states}
        if len(dims) > 1:
            raise ValueError(f"episodes have state sizes {sorted(dims)}; set target_state_dim to mix robots.")
        layouts = {self._camera_keys(e) for e in range(self.num_episodes)}
        if len(layouts) > 1:
            raise ValueError(
                "mixing episodes with and without camera frames (or with different cameras) is not supported: "
                f"the episodes have camera keys {sorted(sorted(k) for k in layouts)}. Record every demo and "
                "rollout with the same cameras (MetaWorld: the same obs_type, cameras and image_size)."
            )
        with_task = {t is not None for t in self._tasks}
        if len(with_task) > 1:
            raise ValueError(
                f"{sum(t is None for t in self._tasks)} of {self.num_episodes} episodes have no task string "
                "(EpisodeRecord.task=None) and the others have one; give every episode its instruction or none."
            )
        lengths = np.array([len(s) for s in self._states])
        self.ep_start = np.r_[0, np.cumsum(lengths)[:-1]]
        self.ep_end = self.ep_start + lengths
        self.states = torch.from_numpy(np.concatenate(self._states))  # (N, S)
        self.actions = torch.from_numpy(np.concatenate(self._actions))  # (N, A)
        self.frame_episode = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))  # (N,)
        self.episode_adv = torch.tensor(self._adv, dtype=torch.float32)
        self.episode_weight = torch.tensor(self._weight, dtype=torch.float32)
        self.episode_hash = torch.tensor(self._hash, dtype=torch.int64)
        self.frame_task = (
            torch.from_numpy(np.concatenate(self._tasks)) if self._tasks[0] is not None else None
        )  # (N,) indices into _task_names
        self._built = True

    def __len__(self) -> int:
        return sum(len(s) for s in self._states)

    @property
    def num_episodes(self) -> int:
        return len(self._states)

    def episodes_of(self, category: str) -> np.ndarray:
        return np.array([i for i, c in enumerate(self._category) if c == category], dtype=np.int64)

    def get_batch(self, indices: Tensor) -> dict[str, Tensor | list[str]]:
        """Collated batch for frame indices (B,): state (B, S), action (B, chunk, A), action_is_pad (B, chunk),
        advantages (B,), advantage_weights (B,), init_hash (B,), camera images `observation.images.<cam>` uint8
        (B, 3, H, W) when the episodes have them, and `task` (B strings) when they carry one."""
        self._build()
        indices = torch.as_tensor(indices, dtype=torch.long)
        ep = self.frame_episode[indices]  # (B,)
        end = torch.from_numpy(self.ep_end)[ep]  # (B,)
        steps = indices[:, None] + torch.arange(self.chunk_size)[None]  # (B, chunk)
        pad = steps >= end[:, None]
        steps = torch.minimum(steps, end[:, None] - 1)
        batch = {
            "observation.state": self.states[indices],
            "action": self.actions[steps],
            "action_is_pad": pad,
            "advantages": self.episode_adv[ep],
            "advantage_weights": self.episode_weight[ep],
            "init_hash": self.episode_hash[ep],
        }
        batch.update(self._frames(indices, ep))
        if self.frame_task is not None:
            batch["task"] = [self._task_names[t] for t in self.frame_task[indices].tolist()]
        return batch

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        return {k: v[0] for k, v in self.get_batch(torch.tensor([index])).items()}

    def _camera_keys(self, e: int) -> frozenset[str]:
        if self._images[e] is not None:
            return frozenset(self._images[e])
        src = self._sources[e]
        return frozenset(src[0].dataset.meta.camera_keys) if src is not None else frozenset()

    def _frames(self, indices: Tensor, ep: Tensor) -> dict[str, Tensor]:
        """Camera frames of the rows, uint8 (B, 3, H, W) per camera key ({} for episodes without cameras)."""
        if not self._camera_keys(0):
            return {}
        frames = []
        for i, e in zip(indices.tolist(), ep.tolist(), strict=True):
            t = i - int(self.ep_start[e])
            if self._images[e] is not None:  # in memory, (T, H, W, 3) uint8
                frames.append(
                    {k: torch.from_numpy(v[t]).permute(2, 0, 1) for k, v in self._images[e].items()}
                )
                continue
            source, first = self._sources[e]
            item = source.dataset[first + t]  # LeRobot gives float (3, H, W) in [0, 1]
            frames.append({k: _to_uint8(item[k]) for k in source.dataset.meta.camera_keys})
        out = {}
        for k in frames[0]:
            shapes = {tuple(f[k].shape) for f in frames}
            if len(shapes) > 1:
                raise ValueError(
                    f"camera {k!r} has frames of shapes {sorted(shapes)} in one batch; record every episode "
                    "with the same image size."
                )
            out[k] = torch.stack([f[k] for f in frames])
        return out


class EpisodeBalancedSampler:
    """Draws frame indices: a kind by `shares`, then an episode of that kind, then a frame of it uniformly.
    Failed rollouts run to the horizon while successes stop early, so uniform frame sampling would make most
    frames "bad"; this keeps the good / bad / demo shares at their configured values.

    `by_advantage=False` draws the episode of a kind uniformly. `by_advantage=True` draws a rollout episode in
    proportion to |advantage| (demos and a kind whose advantages are all zero stay uniform): the RLOO weight
    of each rollout, so a rare success on a hard initial state (A = (K-1)/(K-1) = 1 when it is the group's only
    one) weighs K-1 times a success on a state its group solved 7 times out of 8 (A = 1/(K-1))."""

    def __init__(
        self,
        dataset: RiptDataset,
        shares: EpisodeShares,
        generator: torch.Generator | None = None,
        *,
        by_advantage: bool = False,
    ):
        dataset._build()
        self.dataset, self.generator = dataset, generator
        self.kinds = [c for c in CATEGORIES if getattr(shares, c) > 0 and len(dataset.episodes_of(c))]
        if not self.kinds:
            raise ValueError(
                f"no episodes of any kind with a positive share ({shares}); present kinds: "
                f"{sorted(set(dataset._category))}."
            )
        probs = torch.tensor([getattr(shares, c) for c in self.kinds], dtype=torch.float64)
        self.probs = probs / probs.sum()
        self.episodes = [torch.from_numpy(dataset.episodes_of(c)) for c in self.kinds]
        # per kind: probabilities over its episodes (N_kind,), or None for uniform
        self.episode_probs: list[Tensor | None] = [None] * len(self.kinds)
        if by_advantage:
            for k, (kind, eps) in enumerate(zip(self.kinds, self.episodes, strict=True)):
                w = dataset.episode_adv[eps].abs().double()  # (N_kind,)
                if kind != "demo" and w.sum() > 0:
                    self.episode_probs[k] = w / w.sum()

    def sample(self, batch_size: int) -> Tensor:
        g = self.generator
        kind = torch.multinomial(self.probs, batch_size, replacement=True, generator=g)  # (B,)
        out = torch.empty(batch_size, dtype=torch.long)
        for k, eps in enumerate(self.episodes):
            sel = (kind == k).nonzero().flatten()
            if len(sel) == 0:
                continue
            probs = self.episode_probs[k]
            if probs is None:
                ep = eps[torch.randint(len(eps), (len(sel),), generator=g)]
            else:
                ep = eps[torch.multinomial(probs, len(sel), replacement=True, generator=g)]
            start = torch.from_numpy(self.dataset.ep_start)[ep]
            length = torch.from_numpy(self.dataset.ep_end)[ep] - start
            out[sel] = start + (torch.rand(len(sel), generator=g, dtype=torch.float64) * length).long()
        return out


def _category(adv: float) -> str:
    return "good" if adv > 0 else "bad" if adv < 0 else "neutral"


def _to_uint8(image: Tensor) -> Tensor:
    """A camera frame as uint8: float frames (LeRobot's [0, 1]) are scaled and rounded, exact for PNG frames."""
    if image.dtype == torch.uint8:
        return image
    return (image.float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def _check_frames(frames, num_frames: int, cam: str, index: int) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[0] != num_frames or frames.shape[3] != 3:
        raise ValueError(
            f"episode {index}: images[{cam!r}] must be uint8 of shape (T={num_frames}, H, W, 3); got "
            f"{frames.dtype} {frames.shape}."
        )
    return frames


def _column(hf, key: str, n: int) -> np.ndarray:
    if key not in hf.column_names:
        return np.zeros((n, 0), np.float32)
    return np.asarray(hf[key], dtype=np.float32).reshape(n, -1)
