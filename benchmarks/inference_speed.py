"""Sampling speed of `RiptPolicy.predict_action_chunk`: the precomputed fast path against the plain one.

Same policy (identical weights), same observations and noise. The two variants:
- fast (`precompute=True`, the default): the label and time embeddings, the context's conditioning and the
  context half of the input projection are computed once per call (`SmallBackbone.prepare_denoise`);
- plain (`precompute=False`): everything is recomputed at every Euler step, as before the fast path.
Each (batch size, guidance scale) case times both variants interleaved in a rotating order, so drift and
other load on the machine hit both alike, and reports medians and the ratio plain / fast (and the ratio of
the minima, the least affected by other processes on a shared machine). It also records the largest
difference between the two sampled chunks (from the same noise), which should be float rounding.

    python benchmarks/inference_speed.py --batch-sizes 8 64 --guidance-scales 1 2 --repeats 30

Writes the JSON to --output (default benchmarks/results/inference_speed.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path

import torch
from _common import add_network_arguments, cpu_name, interleaved_times
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_STATE

from lerobot_ript.policy.configuration_ript import RiptConfig
from lerobot_ript.policy.modeling_ript import RiptPolicy

logger = logging.getLogger("inference_speed")

VARIANTS = ("fast", "plain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("measurement")
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64], help="observations per call")
    g.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 2.0], help="w (1: one branch)")
    g.add_argument("--repeats", type=int, default=30, help="timed repeats per variant (median reported)")
    g.add_argument("--warmup", type=int, default=3, help="untimed warm-up calls per variant")
    g.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("network")
    add_network_arguments(g, chunk_size=8)
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/inference_speed.json"))
    args = p.parse_args(argv)
    if args.repeats < 3 or args.warmup < 0 or min(args.batch_sizes) < 1 or args.threads < 1:
        p.error("need --repeats >= 3, --warmup >= 0, --threads >= 1 and every batch size >= 1")
    return args


def build_policy(args: argparse.Namespace) -> RiptPolicy:
    cfg = RiptConfig(
        device="cpu",
        chunk_size=args.chunk_size,
        n_action_steps=args.chunk_size,
        hidden_dim=args.hidden_dim,
        cond_dim=args.cond_dim,
        num_denoiser_layers=args.num_layers,
        num_inference_steps=args.num_inference_steps,
        input_features={OBS_STATE: PolicyFeature(FeatureType.STATE, (args.state_dim,))},
        output_features={ACTION: PolicyFeature(FeatureType.ACTION, (args.action_dim,))},
    )
    torch.manual_seed(args.seed)
    policy = RiptPolicy(cfg).eval()
    with torch.no_grad():  # replace adaLN-zero's zeros, so the label and time really modulate every layer
        for p in policy.parameters():
            p.normal_(0.0, 0.05)
    return policy


def measure(policy: RiptPolicy, b: int, w: float, args: argparse.Namespace) -> dict:
    """Both variants at batch size b and guidance scale w: medians, quartiles, ratio, largest difference."""
    g = torch.Generator().manual_seed(args.seed + b)
    obs = {OBS_STATE: torch.randn(b, args.state_dim, generator=g)}
    noise = torch.randn(b, args.chunk_size, args.action_dim, generator=g)
    fns = {
        name: (
            lambda pre=(name == "fast"): policy.predict_action_chunk(
                obs, noise=noise, guidance_scale=w, precompute=pre
            )
        )
        for name in VARIANTS
    }
    max_abs_diff = float((fns["fast"]() - fns["plain"]()).abs().max())
    times = interleaved_times(fns, args.repeats, args.warmup)
    res: dict = {"batch_size": b, "guidance_scale": w, "max_abs_diff": max_abs_diff}
    for name in VARIANTS:
        q = statistics.quantiles(times[name], n=4)
        res[name] = {
            "median_s": statistics.median(times[name]),
            "p25_s": q[0],
            "p75_s": q[2],
            "min_s": min(times[name]),
        }
    res["plain_over_fast"] = res["plain"]["median_s"] / res["fast"]["median_s"]
    res["plain_over_fast_min"] = res["plain"]["min_s"] / res["fast"]["min_s"]  # least hit by other load
    return res


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = build_policy(args)
    cases = [measure(policy, b, w, args) for b in args.batch_sizes for w in args.guidance_scales]
    logger.info("| batch | w | fast ms | plain ms | plain / fast | (of the minima) | max abs diff |")
    for c in cases:
        logger.info(
            "| %d | %g | %.2f | %.2f | %.2fx | %.2fx | %.1e |",
            c["batch_size"],
            c["guidance_scale"],
            1e3 * c["fast"]["median_s"],
            1e3 * c["plain"]["median_s"],
            c["plain_over_fast"],
            c["plain_over_fast_min"],
            c["max_abs_diff"],
        )
    res = {
        "command": "python benchmarks/inference_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": f"cpu ({cpu_name()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cases": cases,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2) + "\n")
    logger.info("1-min load average %.2f; wrote %s", res["load_average_1min"], args.output)
    return res


if __name__ == "__main__":
    main()
