"""`python -m lerobot_ript <mode>`: info | demo | train | test | record-demos (the design notes' quick start)."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import logging
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("lerobot_ript")

EXTRAS = {
    "metaworld": (("metaworld", "mujoco"), 'pip install "lerobot_policy_ript[metaworld]"'),
    "vla": (("transformers", "scipy", "num2words"), 'pip install "lerobot_policy_ript[vla]"'),
    "dev": (("pytest", "hypothesis", "ruff"), 'pip install "lerobot_policy_ript[dev]"'),
}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def info() -> int:
    """Versions, device, registered types, installed extras and how to install what is missing."""
    import torch
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.envs.configs import EnvConfig

    import lerobot_ript  # noqa: F401  (registers ript and metaworld_state)

    lines = [f"python {sys.version.split()[0]}"]
    for dist in (
        "lerobot_policy_ript",
        "lerobot",
        "torch",
        "accelerate",
        "transformers",
        "datasets",
        "huggingface_hub",
        "wandb",
        "draccus",
        "gymnasium",
        "metaworld",
        "mujoco",
    ):
        lines.append(f"{dist:<20} {_version(dist) or 'not installed'}")
    cuda = torch.cuda.is_available()
    lines.append(
        f"device               {'cuda: ' + torch.cuda.get_device_name(0) if cuda else 'cpu'} "
        f"({torch.get_num_threads()} threads)"
    )
    policies, envs = PreTrainedConfig.get_known_choices(), EnvConfig.get_known_choices()
    lines.append(f"policy type 'ript'   {'registered' if 'ript' in policies else 'MISSING'}")
    lines.append(f"env type 'metaworld_state' {'registered' if 'metaworld_state' in envs else 'MISSING'}")
    for extra, (dists, cmd) in EXTRAS.items():
        missing = [d for d in dists if _version(d) is None]
        lines.append(
            f"extra [{extra}]".ljust(21) + (" installed" if not missing else f"missing {missing}: {cmd}")
        )
    from lerobot_ript.policy.backbones.vla import check_transformers

    try:
        check_transformers()
        lines.append("backbones            small, pi0, pi05, smolvla")
    except ImportError as err:
        lines.append(f"backbones            small (pi0 / pi05 / smolvla unavailable: {err})")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def demo() -> int:
    """Each component once on tiny inputs: advantages, the policy (loss, guided sampling), one rollout group."""
    import numpy as np
    import torch
    from lerobot.configs import FeatureType, PolicyFeature

    from lerobot_ript.advantages import AdvantageProcessor, rloo_advantages
    from lerobot_ript.envs.metaworld import MetaWorldStateEnvConfig, make_vector_env
    from lerobot_ript.policy.configuration_ript import RiptConfig
    from lerobot_ript.policy.modeling_ript import RiptPolicy
    from lerobot_ript.rollout.collector import GroupedCollector, SeedSampler

    t0 = time.perf_counter()
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv = rloo_advantages(rewards)
    out = AdvantageProcessor(normalization="standard")(torch.tensor([1.0, -2.0, float("nan"), 1e30]))
    logger.info("rloo_advantages(%s) = %s", rewards.tolist(), adv.tolist())
    logger.info(
        "AdvantageProcessor on [1, -2, nan, 1e30]: values %s, labels %s",
        out.values.tolist(),
        out.labels.tolist(),
    )

    cfg = RiptConfig(
        device="cpu",
        chunk_size=4,
        n_action_steps=4,
        hidden_dim=32,
        cond_dim=16,
        input_features={"observation.state": PolicyFeature(FeatureType.STATE, (39,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))},
    )
    policy = RiptPolicy(cfg)
    batch = {
        "observation.state": torch.randn(8, 39),
        "action": torch.randn(8, 4, 4),
        "advantages": torch.tensor([1.0, -1.0] * 4),
    }
    loss, metrics = policy(batch)
    chunk = policy.predict_action_chunk({"observation.state": batch["observation.state"]}, guidance_scale=2.0)
    logger.info("policy: loss %.3f (%s), guided chunk %s", float(loss), metrics, tuple(chunk.shape))

    env_cfg = MetaWorldStateEnvConfig(task="push-v3", episode_length=20)
    rng = np.random.default_rng(0)
    collector = GroupedCollector(
        lambda: make_vector_env(env_cfg, 4),
        lambda obs: rng.uniform(-1, 1, (len(obs["agent_pos"]), 4, 4)),
        task="push-v3",
        group_size=4,
        num_slots=1,
        goal_rollouts=4,
        max_groups=1,
        seed_sampler=SeedSampler(10),
        dynamic_sampling=False,
        max_episode_steps=20,
    )
    result = collector.collect()
    collector.close()
    logger.info(
        "collector: %d episodes, init_hash %d, stats %s",
        len(result.episodes),
        result.episodes[0].init_hash,
        result.stats,
    )
    logger.info("demo finished in %.1f s", time.perf_counter() - t0)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    parser = argparse.ArgumentParser(prog="python -m lerobot_ript", description=__doc__)
    parser.add_argument("mode", choices=["info", "demo", "train", "test", "record-demos"])
    args, rest = parser.parse_known_args(argv)
    if args.mode == "info":
        return info()
    if args.mode == "demo":
        return demo()
    if args.mode == "train":
        from lerobot_ript.train.cli import main as train_main

        has_config = any(a.startswith("--config_path") for a in rest)
        train_main(rest if has_config else ["--config_path", "quickstart", *rest])
        return 0
    if args.mode == "test":
        root = Path(__file__).resolve().parents[1]
        return subprocess.call([sys.executable, "-m", "pytest", *rest], cwd=root)
    from lerobot_ript.data.record_demos import main as record_main

    return record_main(rest)


if __name__ == "__main__":
    sys.exit(main())
