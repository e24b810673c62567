"""Metrics: reduced across processes, written to a JSONL file (always) and to Accelerate's trackers (wandb),
by the main process only; a success-rate plot (PNG) at each evaluation."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

# How each metric reduces across processes: timings take the max, counts the sum, the rest the mean.
_MAX_SUFFIXES = ("_s", "_time")
_SUM_SUFFIXES = (
    "env_steps",
    "groups_sampled",
    "groups_kept",
    "groups_dropped",
    "groups_faulted",
    "skipped_states",
    "rollouts_kept",
    "groups_probe_dropped",
    "rollout/episodes",
)


def reduce_metrics(metrics: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """All ranks call this with the same keys (sorted here); returns the reduced values on every rank."""
    if accelerator.num_processes == 1:
        return dict(metrics)
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(values[None]).view(accelerator.num_processes, len(keys))  # (W, M)
    out = {}
    for i, k in enumerate(keys):
        col = gathered[:, i]
        if k.endswith(_MAX_SUFFIXES):
            out[k] = float(col.max())
        elif k.endswith(_SUM_SUFFIXES):
            out[k] = float(col.sum())
        else:
            out[k] = float(col.nanmean())
    return out


class MetricsWriter:
    """JSONL + trackers on the main process; no-op elsewhere."""

    def __init__(self, accelerator: Accelerator, output_dir: Path) -> None:
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"
        self.main = accelerator.is_main_process

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.main:
            return
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        self.accelerator.log({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)


def plot_success(history: list[dict], path: Path, title: str) -> Path:
    """Success rate (with its 95% interval) against environment episodes used for training; with several tasks
    (history entries with `tasks`: name -> success rate) also one thin line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [h["episodes"] for h in history]
    y = [h["success_rate"] for h in history]
    lo = [h["ci_low"] for h in history]
    hi = [h["ci_high"] for h in history]
    ax.plot(x, y, marker="o", label="held-out success")
    ax.fill_between(x, lo, hi, alpha=0.2, label="95% Wilson interval")
    tasks = list(dict.fromkeys(t for h in history for t in h.get("tasks", {})))
    for task in tasks:
        points = [(h["episodes"], h["tasks"][task]) for h in history if task in h.get("tasks", {})]
        ax.plot(*zip(*points, strict=True), marker=".", linewidth=0.8, alpha=0.7, label=task)
    ax.set_xlabel("training episodes (rollouts)")
    ax.set_ylabel("success rate" if not tasks else "success rate (mean over tasks, and each task)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
