"""What advantage conditioning and guidance cost, against plain flow matching measured in the same run.

Same network (identical weights), same batch:
- update: one optimizer step (forward, backward, gradient clipping, AdamW step) of
  * plain flow matching: no `advantages` key, `cfg_dropout_prob=0` (the baseline),
  * objective "cfg" with advantage labels (signs of RLOO-like advantages) and label dropout,
  * objective "cfgrl" (informational: its denoiser runs on 2B rows by design);
- sampling: `predict_action_chunk` with w=1 (one pass), w=2 batched (both branches in one pass of 2B rows),
  and w=2 as two separate passes (`batched_guidance=False`).

Timings are medians over `--repeats`, with the variants interleaved in a rotating order so that drift and
other load on the machine hit every variant alike.

Peak memory is the peak of bytes held by torch's allocator during one update, above what was allocated
before the step (parameters, optimizer state and batch are excluded; activations, gradients and
temporaries are included):
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus
  `memory_allocated()` before the step;
- CPU: torch's profiler with `profile_memory=True` records every allocation and free of the CPU allocator
  with a timestamp; the peak of their running sum is exact for tensor memory. (tracemalloc does not see
  torch's allocator, and the process RSS cannot be reset between variants.)

    python benchmarks/update_overhead.py --batch-size 64 --repeats 30 \
        --output benchmarks/results/update_overhead.json

Writes the JSON and a short Markdown summary next to it (same name, `.md`).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import add_network_arguments, cpu_name, interleaved_times, write_results
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.utils.constants import ACTION, OBS_STATE

from lerobot_ript.policy.configuration_ript import RiptConfig
from lerobot_ript.policy.modeling_ript import RiptPolicy

logger = logging.getLogger("update_overhead")

UPDATE_TARGET = 1.05  # the cfg update may cost at most 5% more time than plain flow matching
UPDATE_VARIANTS = ("plain", "cfg", "cfgrl")
SAMPLE_VARIANTS = ("w1", "w2_batched", "w2_separate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("measurement")
    g.add_argument("--batch-size", type=int, default=64, help="samples per update / per sampling call")
    g.add_argument("--repeats", type=int, default=30, help="timed repeats per variant (median reported)")
    g.add_argument("--warmup", type=int, default=5, help="untimed warm-up repeats per variant")
    g.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu' or 'cuda'")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("network (the policy's defaults unless set)")
    add_network_arguments(g, chunk_size=50)
    g.add_argument("--cameras", type=int, default=0, help="number of cameras (0: state only)")
    g.add_argument("--image-size", type=int, default=96, help="square camera image side, pixels")
    g.add_argument("--cfg-dropout-prob", type=float, default=0.1, help="label dropout of the cfg variant")
    g = p.add_argument_group("output")
    g.add_argument("--output", type=Path, default=Path("benchmarks/results/update_overhead.json"))
    args = p.parse_args(argv)
    if args.repeats < 3 or args.batch_size < 1 or args.warmup < 0:
        p.error("need --repeats >= 3, --batch-size >= 1 and --warmup >= 0")
    return args


# ---------------------------------------------------------------------------------------------- set-up
def build(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, RiptPolicy], dict, dict]:
    """Policies with identical weights per variant, the update batches and the observation batch."""
    input_features = {OBS_STATE: PolicyFeature(FeatureType.STATE, (args.state_dim,))}
    for i in range(args.cameras):
        input_features[f"observation.images.cam{i}"] = PolicyFeature(
            FeatureType.VISUAL, (3, args.image_size, args.image_size)
        )
    cfg = RiptConfig(
        device=device.type,
        chunk_size=args.chunk_size,
        n_action_steps=args.chunk_size,
        hidden_dim=args.hidden_dim,
        num_denoiser_layers=args.num_layers,
        cond_dim=args.cond_dim,
        num_inference_steps=args.num_inference_steps,
        image_size=(args.image_size, args.image_size),
        cfg_dropout_prob=0.0,
        input_features=input_features,
        output_features={ACTION: PolicyFeature(FeatureType.ACTION, (args.action_dim,))},
    )
    torch.manual_seed(args.seed)
    base = RiptPolicy(cfg).to(device)
    policies = {}
    for name in UPDATE_VARIANTS:
        policy = copy.deepcopy(base)
        policy.config = copy.deepcopy(cfg)
        policy.config.objective = "cfgrl" if name == "cfgrl" else "cfg"
        policy.config.cfg_dropout_prob = args.cfg_dropout_prob if name == "cfg" else 0.0
        policies[name] = policy.train()

    g = torch.Generator().manual_seed(args.seed + 1)
    b = args.batch_size
    obs = {OBS_STATE: torch.randn(b, args.state_dim, generator=g)}
    for key in input_features:
        if key != OBS_STATE:
            obs[key] = torch.rand(b, 3, args.image_size, args.image_size, generator=g)
    plain = {
        **obs,
        ACTION: torch.randn(b, args.chunk_size, args.action_dim, generator=g),
        f"{ACTION}_is_pad": torch.zeros(b, args.chunk_size, dtype=torch.bool),
    }
    # RLOO-like advantages of 0/1 rewards in groups of 4: values in {-1, -2/3, ..., 1}, both signs.
    advantages = (torch.randint(0, 7, (b,), generator=g).float() - 3.0) / 3.0
    labelled = {**plain, "advantages": advantages}
    to = {k: v.to(device) for k, v in labelled.items()}
    batches = {"plain": {k: v for k, v in to.items() if k != "advantages"}, "cfg": to, "cfgrl": to}
    return policies, batches, {k: v.to(device) for k, v in obs.items()}


def make_update(policy: RiptPolicy, batch: dict) -> Callable[[], None]:
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def update() -> None:  # exactly what lerobot's update_policy does, minus autocast
        loss, _ = policy.forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return update


def make_samplers(policy: RiptPolicy, obs: dict, device: torch.device) -> dict[str, Callable[[], None]]:
    policy = policy.eval()
    c = policy.config
    noise = torch.randn(obs[OBS_STATE].shape[0], c.chunk_size, c.action_dim, device=device)
    return {
        "w1": lambda: policy.predict_action_chunk(obs, noise=noise, guidance_scale=1.0),
        "w2_batched": lambda: policy.predict_action_chunk(obs, noise=noise, guidance_scale=2.0),
        "w2_separate": lambda: policy.predict_action_chunk(
            obs, noise=noise, guidance_scale=2.0, batched_guidance=False
        ),
    }


# --------------------------------------------------------------------------------------------- measure
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during fn() above the bytes allocated before it (see the module docstring)."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not records:
        raise RuntimeError("torch's profiler recorded no CPU allocations; cannot measure peak memory.")
    records.sort(key=lambda e: e.start_ns())
    return int(max(0, *itertools.accumulate(e.nbytes() for e in records)))


def summarise(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4)
    return {"median_s": statistics.median(times), "p25_s": q[0], "p75_s": q[2], "n": len(times)}


# ---------------------------------------------------------------------------------------------- report
def render_markdown(res: dict) -> str:
    u, s, r = res["update"], res["sampling"], res["ratios"]
    mib = 1024**2
    lines = [
        "# Update and sampling overhead of advantage conditioning",
        "",
        f"{res['device']}, torch intra-op threads: {res['threads']}, torch {res['torch']}, batch {res['args']['batch_size']}, "
        f"{res['args']['repeats']} interleaved repeats (medians), {res['num_params']:,} parameters "
        f"({4 * res['num_params'] / mib:.2f} MiB of float32 gradients, counted in the peak), "
        f"1-min load average {res['load_average_1min']:.2f} at the end.",
        "",
        "| update (fwd+bwd+clip+AdamW) | median ms | peak extra MiB | vs plain |",
        "| --- | --- | --- | --- |",
    ]
    for name in UPDATE_VARIANTS:
        ratio = u[name]["median_s"] / u["plain"]["median_s"]
        lines.append(
            f"| {name} | {1e3 * u[name]['median_s']:.2f} | {u[name]['peak_extra_bytes'] / mib:.2f} | {ratio:.3f}x |"
        )
    lines += ["", "| sampling (predict_action_chunk) | median ms | vs w=1 |", "| --- | --- | --- |"]
    for name in SAMPLE_VARIANTS:
        ratio = s[name]["median_s"] / s["w1"]["median_s"]
        lines.append(f"| {name} | {1e3 * s[name]['median_s']:.2f} | {ratio:.3f}x |")
    lines += [
        "",
        f"- cfg update / plain: {r['update_cfg_over_plain']:.3f}x "
        f"(target <= {UPDATE_TARGET}: {'met' if res['targets']['update_within_target'] else 'MISSED'})",
        f"- cfg peak memory / plain: {r['memory_cfg_over_plain']:.3f}x",
        f"- guided w=2 batched / two separate passes: {r['sampling_batched_over_separate']:.3f}x "
        f"(target < 1: {'met' if res['targets']['batched_faster_than_separate'] else 'MISSED'})",
        f"- guided w=2 batched / w=1: {r['sampling_batched_over_w1']:.3f}x",
        "",
        f"Memory method: {res['memory_method']}",
        "",
        f"Command: `{res['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    policies, batches, obs = build(args, device)

    updates = {name: make_update(policies[name], batches[name]) for name in UPDATE_VARIANTS}
    update_times = interleaved_times(updates, args.repeats, args.warmup, lambda: _sync(device))
    update = {name: summarise(update_times[name]) for name in UPDATE_VARIANTS}
    for name in UPDATE_VARIANTS:
        update[name]["peak_extra_bytes"] = statistics.median(
            peak_extra_bytes(updates[name], device) for _ in range(3)
        )

    with torch.no_grad():
        samplers = make_samplers(policies["plain"], obs, device)
        sample_times = interleaved_times(samplers, args.repeats, args.warmup, lambda: _sync(device))
    sampling = {name: summarise(sample_times[name]) for name in SAMPLE_VARIANTS}

    ratios = {
        "update_cfg_over_plain": update["cfg"]["median_s"] / update["plain"]["median_s"],
        "update_cfgrl_over_plain": update["cfgrl"]["median_s"] / update["plain"]["median_s"],
        "memory_cfg_over_plain": update["cfg"]["peak_extra_bytes"]
        / max(1, update["plain"]["peak_extra_bytes"]),
        "sampling_batched_over_separate": sampling["w2_batched"]["median_s"]
        / sampling["w2_separate"]["median_s"],
        "sampling_batched_over_w1": sampling["w2_batched"]["median_s"] / sampling["w1"]["median_s"],
    }
    res = {
        "command": "python benchmarks/update_overhead.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "num_params": sum(p.numel() for p in policies["plain"].parameters()),
        "load_average_1min": os.getloadavg()[0],
        "memory_method": (
            "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before the step"
            if device.type == "cuda"
            else "torch.profiler(profile_memory=True): running sum of the CPU allocator's [memory] "
            "alloc/free records during one step; peak above the bytes allocated before the step"
        ),
        "update": update,
        "sampling": sampling,
        "ratios": ratios,
        "targets": {
            "update_cfg_over_plain_max": UPDATE_TARGET,
            "update_within_target": ratios["update_cfg_over_plain"] <= UPDATE_TARGET,
            "batched_faster_than_separate": ratios["sampling_batched_over_separate"] < 1.0,
        },
    }
    write_results(res, args.output, render_markdown(res), logger)
    return res


if __name__ == "__main__":
    main()
