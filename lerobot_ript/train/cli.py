"""Command line of the training script: config resolution, validation, launch, summary, Hub push."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import draccus
import yaml

from lerobot_ript.train.config import RiptTrainConfig, check_unknown_keys

logger = logging.getLogger("lerobot_ript.train")

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def resolve_config_path(name: str) -> Path:
    """A YAML path, or the name of a shipped preset (`debug`, `quickstart`, ...)."""
    path = Path(name)
    if path.exists():
        return path
    for candidate in (REPO_CONFIGS / name, REPO_CONFIGS / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    presets = sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml")) if REPO_CONFIGS.exists() else []
    raise FileNotFoundError(f"config {name!r} is neither a file nor a preset; presets: {presets}.")


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("input_features", "output_features", "normalization_mapping"):
            keys += _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def parse_config(argv: list[str] | None = None) -> RiptTrainConfig:
    """draccus parse with a 'did you mean' for unknown keys, then every fail-fast check."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, rest = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config_path"):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            else:
                config_path, i = argv[i + 1], i + 1
        else:
            rest.append(arg)
        i += 1
    keys = [a[2:].split("=", 1)[0] for a in rest if a.startswith("--") and a not in ("--help", "-h")]
    if config_path is not None:
        config_path = str(resolve_config_path(config_path))
        keys += _flat_keys(yaml.safe_load(Path(config_path).read_text()) or {})
    check_unknown_keys(keys)
    try:
        cfg = draccus.parse(RiptTrainConfig, config_path=config_path, args=rest)
    except draccus.utils.ParsingError as err:
        # draccus hides a sub-config's own check (e.g. RiptConfig.__post_init__) behind "Couldn't instantiate
        # class ..."; surface that message, which names the value, the rule and the fix.
        if isinstance(err.__cause__, ValueError):
            raise ValueError(f"{_section_of(err)}{err.__cause__}") from err
        raise
    cfg.validate()
    return cfg


def _section_of(err: Exception) -> str:
    """'policy.' when draccus failed to build the RiptConfig of `policy`, etc.; '' when unknown."""
    for f in dataclasses.fields(RiptTrainConfig):
        if (
            f.default_factory is not dataclasses.MISSING
            and f"class {type(f.default_factory()).__name__} " in str(err)
        ):
            return f"{f.name}."
    return ""


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    cfg = parse_config(argv)  # before any process group starts
    from lerobot_ript.train.loop import build_accelerator, train

    accelerator = build_accelerator(cfg)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    run = train(cfg, accelerator)
    if accelerator.is_main_process:
        summarize(run)
        if cfg.hub.push_to_hub:
            push(run)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def summarize(run) -> None:
    hist = run.state.history
    first, last = hist[0], hist[-1]
    out = Path(run.cfg.output_dir)
    logger.info(
        "success before %.1f%% -> after %.1f%% (%d held-out episodes each); plot: %s; checkpoint: %s",
        100 * first["success_rate"],
        100 * last["success_rate"],
        last["n"],
        out / "success.png",
        out / "checkpoints" / "last" / "pretrained_model",
    )


def push(run) -> None:
    from lerobot_ript.train.checkpoint import PRETRAINED_DIR, TRAIN_CONFIG_NAME
    from lerobot_ript.train.hub import push_folder_with_retry, write_model_card

    cfg = run.cfg
    folder = (cfg.checkpoints_dir / "last").resolve() / PRETRAINED_DIR
    train_config = json.loads((folder / TRAIN_CONFIG_NAME).read_text())
    history = [(h["episodes"], h["success_rate"]) for h in run.state.history]
    write_model_card(
        folder,
        repo_id=cfg.hub.hub_repo_id,
        train_config=train_config,
        success_history=history,
        plot_path=Path(cfg.output_dir) / "success.png",
    )
    result = push_folder_with_retry(
        folder, cfg.hub.hub_repo_id, token=os.environ.get("HF_TOKEN"), private=cfg.hub.private
    )
    _report(result, folder)
    rollouts = sorted((Path(cfg.output_dir) / "rollouts").glob("iter_*"))
    if cfg.hub.push_rollout_dataset:
        if not rollouts:
            logger.warning(
                "hub.push_rollout_dataset=true but no rollouts were saved; set data.save_rollouts=true."
            )
        else:
            result = push_folder_with_retry(
                rollouts[-1],
                f"{cfg.hub.hub_repo_id}-rollouts",
                repo_type="dataset",
                token=os.environ.get("HF_TOKEN"),
                private=cfg.hub.private,
            )
            _report(result, rollouts[-1])


def _report(result, folder: Path) -> None:
    if result.ok:
        logger.info("Pushed %s to %s (%s).", folder, result.repo_id, result.commit_url)
    else:
        logger.error(
            "The Hub push failed; everything is kept in %s. Push it later with:\n  %s",
            folder,
            result.retry_command,
        )
