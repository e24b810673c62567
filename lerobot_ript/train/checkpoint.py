"""Checkpoints in LeRobot's layout, written atomically, with the full training state for exact resume.

    <output_dir>/checkpoints/<iteration:06d>/pretrained_model/   config.json, model.safetensors, processors,
                                                                train_config.json (loadable by LeRobot)
    <output_dir>/checkpoints/<iteration:06d>/training_state/    Accelerate state (model, optimizer, scheduler,
                                                                RNG of every rank) + ript_state_<rank>.json
    <output_dir>/checkpoints/last -> <iteration:06d>

A checkpoint is first written to a hidden temporary directory and renamed into place; `last` is switched by
an atomic symlink replace. A process killed mid-checkpoint leaves the previous checkpoint and `last` intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import draccus
from accelerate import Accelerator
from accelerate.utils import DistributedType

logger = logging.getLogger(__name__)

PRETRAINED_DIR = "pretrained_model"
TRAINING_STATE_DIR = "training_state"
TRAIN_CONFIG_NAME = "train_config.json"
# Test-only fault injection: set to an iteration number N, every process dies (exit code 17) halfway through
# writing the checkpoint of iteration N (its files are in the temporary directory, not yet renamed into place).
CRASH_ENV_VAR = "LEROBOT_RIPT_TEST_CRASH_IN_CHECKPOINT"
TMP_PREFIX = ".tmp-"


def save_checkpoint(
    checkpoints_dir: Path,
    iteration: int,
    *,
    accelerator: Accelerator,
    policy,
    preprocessor,
    postprocessor,
    train_config,
    ript_state: dict[str, Any],
) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint directory."""
    final = checkpoints_dir / f"{iteration:06d}"
    tmp = checkpoints_dir / f"{TMP_PREFIX}{iteration:06d}"
    state_dict = None
    if accelerator.distributed_type == DistributedType.FSDP:
        # Collective: every rank holds a shard, gathered into the main process's full state dict. The gathered
        # tensors can be views of one flat buffer, which safetensors refuses to write: own them.
        state_dict = {k: v.clone() for k, v in accelerator.get_state_dict(policy).items()}
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / PRETRAINED_DIR).mkdir(parents=True)
        unwrapped = accelerator.unwrap_model(policy)
        unwrapped.save_pretrained(tmp / PRETRAINED_DIR, state_dict=state_dict)
        preprocessor.save_pretrained(tmp / PRETRAINED_DIR)
        postprocessor.save_pretrained(tmp / PRETRAINED_DIR)
        save_train_config(train_config, tmp / PRETRAINED_DIR / TRAIN_CONFIG_NAME, accelerator.num_processes)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / TRAINING_STATE_DIR))
    state_file = tmp / TRAINING_STATE_DIR / f"ript_state_{accelerator.process_index}.json"
    state_file.write_text(json.dumps(ript_state))
    if os.environ.get(CRASH_ENV_VAR) == str(iteration):
        logger.error(
            "%s=%d: dying in the middle of a checkpoint (test fault injection).", CRASH_ENV_VAR, iteration
        )
        os._exit(17)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        old = None
        if final.exists():  # re-saving an iteration: move the old copy aside, never leave `last` dangling
            old = checkpoints_dir / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            if (checkpoints_dir / "last").resolve().name == final.name:
                update_last_link(checkpoints_dir, old.name)
        os.replace(tmp, final)
        update_last_link(checkpoints_dir, final.name)
        if old is not None:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def remove_interrupted_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Delete the temporary directories of checkpoints whose writer was killed (`last` never points at one)."""
    leftovers = sorted(checkpoints_dir.glob(f"{TMP_PREFIX}*")) if checkpoints_dir.is_dir() else []
    for path in leftovers:
        logger.warning("Removing %s, left by a run killed while writing a checkpoint.", path)
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def update_last_link(checkpoints_dir: Path, target: str) -> None:
    """Point `last` at `target` atomically (a new symlink renamed over the old one)."""
    tmp_link = checkpoints_dir / ".last.tmp"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    tmp_link.symlink_to(target)
    os.replace(tmp_link, checkpoints_dir / "last")


def save_train_config(cfg, path: Path, world_size: int) -> None:
    """The training config as JSON, with the world size that ran it; secrets never appear in it."""
    from lerobot_ript.train.hub import redact_secrets

    data = json.loads(json.dumps(draccus.encode(cfg), default=str))
    data["world_size"] = world_size
    path.write_text(json.dumps(redact_secrets(data), indent=2))


def last_checkpoint(checkpoints_dir: Path) -> Path | None:
    last = checkpoints_dir / "last"
    return last.resolve() if last.exists() else None


def load_training_state(checkpoint: Path, accelerator: Accelerator) -> dict[str, Any]:
    """Restore the Accelerate state (model, optimizer, scheduler, RNGs) and return this rank's ript state."""
    state_dir = checkpoint / TRAINING_STATE_DIR
    accelerator.load_state(str(state_dir))
    state_file = state_dir / f"ript_state_{accelerator.process_index}.json"
    if not state_file.exists():
        raise FileNotFoundError(
            f"{state_file} is missing: the checkpoint was written by fewer processes than the "
            f"{accelerator.num_processes} now running. Resume with the same number of processes."
        )
    return json.loads(state_file.read_text())
