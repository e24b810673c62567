"""What the RIPT wrapper costs on LeRobot's pi0 / pi05 / SmolVLA, against LeRobot's own policy in the same run.

Per kind, one LeRobot checkpoint (random weights) is loaded as LeRobot's policy (`PI0Policy` / `PI05Policy` /
`SmolVLAPolicy`) and wrapped as the `ript` backbone (objective "cfg", label dropout 0.1: the defaults). Both get
the same preprocessed batch (LeRobot's preprocessor gives the same tensors as ript's) plus `action`,
`action_is_pad` and `advantages` of both signs. Update = `loss, _ = policy.forward(batch)`, backward, AdamW
step, zero_grad. Sampling = ript `predict_action_chunk` at w=1 and w=2 (both branches in ONE batched expert
pass over the shared prefix KV cache), LeRobot's own for reference, same noise. Times: medians over
`--repeats`, the variants interleaved in a rotating order; a ratio is the median of the per-repeat ratios
(a burst of load hits both sides of a pair; the JSON also has the ratios of the medians). "aten ops":
operators one call dispatches (TorchDispatchMode), free of machine noise. Targets: ript update <= 1.1x
LeRobot's (time and saved activations); guided sampling <= 1.3x unguided.

Memory: saved activations = bytes of the distinct storages autograd saves in one forward (`saved_tensors_hooks`;
parameters, buffers and the batch left out), exact on any device; peak extra = the allocator's peak during one
update above what was allocated before (CUDA `max_memory_allocated`; CPU torch.profiler(profile_memory=True),
as update_overhead.py); static = parameters + gradients + AdamW state, counted.

Sizes: `tiny` (default): tests/vla_fixtures.py's checkpoints (chunk 8, a 32x32 camera). `real` (GPU; pi0 / pi05
want an H200 for two 4B-parameter models and their AdamW states): LeRobot's defaults with random weights, saved
as a checkpoint the way the fixtures save theirs. pi0 / pi05: PaliGemma gemma_2b + expert gemma_300m,
SigLIP-So400m at 224x224, weights in `--dtype`. SmolVLA: a local SmolVLM2-500M-Video-Instruct config (the
sizes below, from its config.json; no Hub), its first 16 text layers, a 512x512 camera, bf16 by autocast
(SmolVLA has no dtype switch). Chunk 50, the fixtures' small tokenizer. `--dry-run` builds the real-size
models on the meta device (no weights) and prints their parameter counts.

    python benchmarks/vla_overhead.py                                      # CPU, tiny, all kinds
    python benchmarks/vla_overhead.py --device cuda --size real --dtype bfloat16 --kinds pi05 --repeats 10 \\
        --output benchmarks/results/vla_overhead_real_pi05.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _common import cpu_name, interleaved_times, write_results
from torch.utils._python_dispatch import TorchDispatchMode
from update_overhead import peak_extra_bytes, summarise

logger = logging.getLogger("vla_overhead")

KINDS = ("pi0", "pi05", "smolvla")
UPDATE_TARGET, SAMPLING_TARGET = 1.1, 1.3
CAMERA, STATE_DIM, ACTION_DIM, TASK = "observation.images.corner2", 39, 4, "push the puck to the goal"
CHUNK = {"tiny": 8, "real": 50}
IMAGE_SIDE = {"tiny": dict(pi0=32, pi05=32, smolvla=32), "real": dict(pi0=224, pi05=224, smolvla=512)}
# HuggingFaceTB/SmolVLM2-500M-Video-Instruct: SigLIP base-patch16-512 vision tower, SmolLM2-360M text model.
SMOLVLM2_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
SMOLVLM2_VISION.update(patch_size=16, image_size=512, model_type="smolvlm_vision")
SMOLVLM2_TEXT = dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15)
SMOLVLM2_TEXT.update(num_key_value_heads=5, head_dim=64, vocab_size=49280, rms_norm_eps=1e-5, rope_theta=1e5)
SMOLVLM2_TEXT.update(max_position_embeddings=8192, tie_word_embeddings=False, model_type="llama")
SMOLVLM2_SCALE_FACTOR = 4
PEAK_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated after reset, minus memory_allocated before the update",
    "cpu": "torch.profiler(profile_memory=True), running sum of the CPU allocator's records in one update",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="backbones to measure")
    p.add_argument("--size", choices=("tiny", "real"), default="tiny", help="model sizes (see above)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="VLA precision")
    p.add_argument("--batch-size", type=int, default=8, help="samples per update / per sampling call")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up repeats per variant")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="real-size models on the meta device, no run")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/vla_overhead.json"))
    args = p.parse_args(argv)
    if args.repeats < 3 or args.batch_size < 1 or args.warmup < 0:
        p.error("need --repeats >= 3, --batch-size >= 1 and --warmup >= 0")
    return args


@functools.cache
def fixtures():
    """tests/vla_fixtures.py (checkpoints, with the tiny-size patch) and tests/test_vla_backbones.py (`wrap`)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_vla_backbones
    import vla_fixtures

    vla_fixtures.install_tiny_vla_sizes()  # acts only on configs tagged tiny
    return vla_fixtures, test_vla_backbones


@contextlib.contextmanager
def quiet():
    """LeRobot's VLA loaders print their progress and log key warnings: keep them out of the report."""
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------------------------------------- set-up
def real_config(kind: str, root: Path, args: argparse.Namespace):
    """LeRobot's config of a real-size `kind`; its tokenizer (and SmolVLM folder) are written under root."""
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi05.configuration_pi05 import PI05Config
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from transformers import AutoTokenizer, SmolVLMConfig, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    vf, _ = fixtures()
    tok_dir = vf.build_tokenizer(root / "tokenizer")
    inputs, outputs = vf._features(STATE_DIM, ACTION_DIM, (CAMERA,), IMAGE_SIDE["real"][kind])
    common = dict(input_features=inputs, output_features=outputs, chunk_size=CHUNK["real"], push_to_hub=False)
    common.update(n_action_steps=CHUNK["real"], max_state_dim=max(32, STATE_DIM), device=args.device)
    if kind != "smolvla":
        return (PI0Config if kind == "pi0" else PI05Config)(dtype=args.dtype, **common)  # gemma_2b + _300m
    tok, vlm_dir = AutoTokenizer.from_pretrained(str(tok_dir)), root / "vlm"
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    SmolVLMConfig(
        vision_config=SMOLVLM2_VISION, text_config=dict(SMOLVLM2_TEXT, **ids), scale_factor=SMOLVLM2_SCALE_FACTOR,
        image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    ).save_pretrained(str(vlm_dir))  # fmt: skip
    side = SMOLVLM2_VISION["image_size"]
    size = {"longest_edge": side}
    seq_len = (side // SMOLVLM2_VISION["patch_size"] // SMOLVLM2_SCALE_FACTOR) ** 2  # 64 image tokens
    images = SmolVLMImageProcessor(do_image_splitting=False, size=size, max_image_size=size)
    video = SmolVLMVideoProcessor(size=size, max_image_size=size)
    SmolVLMProcessor(images, tok, video, image_seq_len=seq_len).save_pretrained(str(vlm_dir))
    return SmolVLAConfig(vlm_model_name=str(vlm_dir), load_vlm_weights=False, **common)


def write_checkpoint(kind: str, root: Path, args: argparse.Namespace) -> Path:
    """A LeRobot checkpoint directory of `kind`, its weights stored in --dtype (SmolVLA: float32)."""
    from lerobot.configs import PreTrainedConfig
    from lerobot.policies.factory import make_pre_post_processors

    vf, _ = fixtures()
    if args.size == "tiny":
        vf.make_tiny_vla_checkpoint(kind, root, seed=args.seed)
        if kind != "smolvla" and args.dtype != "float32":  # stored in bf16, like a real bf16 checkpoint
            config = PreTrainedConfig.from_pretrained(str(root))
            config.dtype = args.dtype
            vf.policy_class(kind).from_pretrained(str(root), config=config).save_pretrained(root)
        return root
    config = real_config(kind, root, args)
    torch.manual_seed(args.seed)
    vf.policy_class(kind)(config).save_pretrained(root)
    stats = vf.synthetic_dataset_stats(STATE_DIM, ACTION_DIM, (CAMERA,), seed=args.seed)
    with vf._local_paligemma_tokenizer(root / "tokenizer"):  # the pi factories name a gated Hub tokenizer
        pre, post = make_pre_post_processors(config, dataset_stats=stats)
    pre.save_pretrained(root)
    post.save_pretrained(root)
    return root


def build(kind: str, path: Path, args: argparse.Namespace, device: torch.device):
    """(ript policy, LeRobot policy, update batch, observation batch, flow noise) for one checkpoint."""
    from lerobot.configs import PreTrainedConfig

    vf, tv = fixtures()
    ript, pre, _ = tv.wrap(kind, path, device=device.type)
    vla_config = PreTrainedConfig.from_pretrained(str(path))
    vla_config.device = device.type
    lerobot = vf.policy_class(kind).from_pretrained(str(path), config=vla_config)
    if args.size == "tiny":  # LeRobot's pi loaders return a random model when loading fails
        vf.assert_same_weights(lerobot, path)
    b, chunk, side = args.batch_size, CHUNK[args.size], IMAGE_SIDE[args.size][kind]
    g = torch.Generator().manual_seed(args.seed + 1)
    image, state = torch.rand(b, 3, side, side, generator=g), torch.randn(b, STATE_DIM, generator=g)
    obs = pre({CAMERA: image, "observation.state": state, "task": [TASK] * b})
    pad = torch.zeros(b, chunk, dtype=torch.bool)
    pad[0, -2:] = True
    extra = dict(action=torch.randn(b, chunk, ACTION_DIM, generator=g), action_is_pad=pad)
    extra["advantages"] = (torch.arange(b) % 4 - 1.5) / 1.5  # RLOO-like, both signs
    batch = {**obs, **{k: v.to(device) for k, v in extra.items()}}
    noise = torch.randn(b, chunk, ript.backbone.flow_action_dim, generator=g).to(device)
    return ript.to(device), lerobot.to(device), batch, obs, noise


# --------------------------------------------------------------------------------------------- measure
class OpCounter(TorchDispatchMode):
    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def aten_ops(fn) -> int:
    """aten operators one call of fn dispatches."""
    with OpCounter() as counter:
        fn()
    return counter.count


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-repeat ratios a_i / b_i: the two ran back to back, so a burst of load hits both."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def make_update(policy, batch: dict, amp):
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)

    def update() -> None:
        with amp():
            loss, _ = policy.forward(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return update, opt


def saved_activation_bytes(policy, batch: dict, amp) -> int:
    """Bytes of the distinct storages saved for backward in one forward (module docstring)."""
    known = [*policy.parameters(), *policy.buffers(), *(v for v in batch.values() if torch.is_tensor(v))]
    exclude, sizes = {t.untyped_storage().data_ptr() for t in known}, {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp():
        loss, _ = policy.forward(batch)
    del loss
    return sum(sizes.values())


def measure(kind: str, args: argparse.Namespace, device: torch.device, root: Path) -> dict:
    gc.collect()  # the previous kind's models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    logger.info("measuring %s ...", kind)
    with quiet():
        ript, lerobot, batch, obs, noise = build(kind, write_checkpoint(kind, root, args), args, device)
    amp_on = kind == "smolvla" and args.dtype == "bfloat16"  # pi0 / pi05 keep their weights in --dtype

    def amp():
        return torch.autocast(device.type, torch.bfloat16, enabled=amp_on)

    policies = {"ript": ript.train(), "lerobot": lerobot.train()}
    steps = {name: make_update(p, batch, amp) for name, p in policies.items()}
    ut = interleaved_times({n: s[0] for n, s in steps.items()}, args.repeats, args.warmup, sync)
    counts = {n: sum(p.numel() for p in m.parameters()) for n, m in policies.items()}
    res: dict = {"params": counts, "update": {}}
    for name, policy in policies.items():
        (step, opt), ps = steps[name], list(policy.parameters())
        state = (t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        res["update"][name] = {
            **summarise(ut[name]),
            "aten_ops": aten_ops(step),
            "saved_activation_bytes": saved_activation_bytes(policy, batch, amp),
            "peak_extra_bytes": statistics.median(peak_extra_bytes(step, device) for _ in range(3)),
            "static_bytes": nbytes(ps) + nbytes(p for p in ps if p.requires_grad) + nbytes(state),
        }
    del steps
    ript.eval()
    lerobot.eval()
    samplers = {
        "ript_w1": lambda: ript.predict_action_chunk(obs, noise=noise.clone(), guidance_scale=1.0),
        "ript_w2": lambda: ript.predict_action_chunk(obs, noise=noise.clone(), guidance_scale=2.0),
        "lerobot": lambda: lerobot.predict_action_chunk(obs, noise=noise.clone()),
    }
    with torch.no_grad(), amp():
        st = interleaved_times(samplers, args.repeats, args.warmup, sync)
        res["sampling"] = {n: {**summarise(st[n]), "aten_ops": aten_ops(f)} for n, f in samplers.items()}
    (ur, ul), s = res["update"].values(), res["sampling"]
    r = res["ratios"] = {
        "update_time": paired_ratio(ut["ript"], ut["lerobot"]),
        "update_aten_ops": ur["aten_ops"] / ul["aten_ops"],
        "saved_activations": ur["saved_activation_bytes"] / max(1, ul["saved_activation_bytes"]),
        "peak_extra": ur["peak_extra_bytes"] / max(1, ul["peak_extra_bytes"]),
        "sampling_w2_over_w1": paired_ratio(st["ript_w2"], st["ript_w1"]),
        "sampling_w1_over_lerobot": paired_ratio(st["ript_w1"], st["lerobot"]),
        "of_medians": {
            "update_time": ur["median_s"] / ul["median_s"],
            "sampling_w2_over_w1": s["ript_w2"]["median_s"] / s["ript_w1"]["median_s"],
            "sampling_w1_over_lerobot": s["ript_w1"]["median_s"] / s["lerobot"]["median_s"],
        },
    }
    res["targets_met"] = {
        "update_time": r["update_time"] <= UPDATE_TARGET,
        "saved_activations": r["saved_activations"] <= UPDATE_TARGET,
        "sampling": r["sampling_w2_over_w1"] <= SAMPLING_TARGET,
    }
    return res


def dry_run(args: argparse.Namespace) -> None:
    """Each real-size config and its LeRobot model on the meta device (no weights, no memory)."""
    vf, _ = fixtures()
    for kind in args.kinds:
        with tempfile.TemporaryDirectory() as tmp, quiet():
            config = real_config(kind, Path(tmp), args)
            config.device = "meta"  # LeRobot's policies move themselves to config.device
            with torch.device("meta"):
                policy = vf.policy_class(kind)(config)
        n = sum(p.numel() for p in policy.parameters())
        logger.info("%s: %s built on the meta device, %.3fB parameters", kind, type(policy).__name__, n / 1e9)


# ---------------------------------------------------------------------------------------------- report
def render_markdown(res: dict) -> str:
    a, mib = res["args"], 1024**2
    lines = [
        "# Overhead of the RIPT wrapper on LeRobot's VLA policies",
        "",
        f"{res['device']}, torch intra-op threads {res['threads']}, torch {res['torch']}, lerobot "
        f"{res['lerobot']}; {a['size']} models, dtype {a['dtype']}, batch {a['batch_size']}, {a['repeats']} "
        f"interleaved repeats (medians); 1-min load average {res['load_average_1min']:.2f} at the end.",
        "",
        "| kind | params ript / lerobot | update ms ript | lerobot | ratio | aten ops ript / lerobot | saved act. "
        "MiB ript | lerobot | ratio | peak extra MiB ript | lerobot | ratio | static MiB ript / lerobot |",
        "| --- " * 13 + "|",
    ]
    for kind, k in res["kinds"].items():
        r, (ur, ul) = k["ratios"], k["update"].values()
        lines.append(
            f"| {kind} | {k['params']['ript']:,} / {k['params']['lerobot']:,} | {1e3 * ur['median_s']:.1f} | "
            f"{1e3 * ul['median_s']:.1f} | {r['update_time']:.3f}x | {ur['aten_ops']} / {ul['aten_ops']} | "
            f"{ur['saved_activation_bytes'] / mib:.2f} | {ul['saved_activation_bytes'] / mib:.2f} | "
            f"{r['saved_activations']:.3f}x | {ur['peak_extra_bytes'] / mib:.2f} | "
            f"{ul['peak_extra_bytes'] / mib:.2f} | {r['peak_extra']:.3f}x | {ur['static_bytes'] / mib:.1f} / "
            f"{ul['static_bytes'] / mib:.1f} |"
        )
    lines += [
        "",
        "| kind | sample ms ript w=1 | ript w=2 | w=2 / w=1 | lerobot | ript w=1 / lerobot | aten ops w=1 / w=2 "
        "/ lerobot |",
        "| --- " * 7 + "|",
    ]
    for kind, k in res["kinds"].items():
        r, (w1, w2, lr) = k["ratios"], k["sampling"].values()
        lines.append(
            f"| {kind} | {1e3 * w1['median_s']:.1f} | {1e3 * w2['median_s']:.1f} | "
            f"{r['sampling_w2_over_w1']:.3f}x | {1e3 * lr['median_s']:.1f} | {r['sampling_w1_over_lerobot']:.3f}x "
            f"| {w1['aten_ops']} / {w2['aten_ops']} / {lr['aten_ops']} |"
        )
    lines.append("")
    for kind, k in res["kinds"].items():
        t = {n: "met" if ok else "NOT MET" for n, ok in k["targets_met"].items()}
        lines.append(
            f"- {kind}: update time <= {UPDATE_TARGET}x: {t['update_time']}; saved activations <= "
            f"{UPDATE_TARGET}x: {t['saved_activations']}; guided w=2 / w=1 <= {SAMPLING_TARGET}x: {t['sampling']}"
        )
    lines += ["", f"Memory: {res['memory_method']}", "", f"Command: `{res['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)  # lerobot installs a handler
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        return dry_run(args)
    import lerobot

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="vla_overhead_") as tmp:
        kinds = {kind: measure(kind, args, device, Path(tmp) / kind) for kind in args.kinds}
    res = {
        "command": " ".join(["python benchmarks/vla_overhead.py", *(sys.argv[1:] if argv is None else argv)]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_name()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lerobot": lerobot.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_average_1min": os.getloadavg()[0],
        "memory_method": "saved activations: distinct storages packed by torch.autograd.graph.saved_tensors_hooks "
        f"in one forward, parameters / buffers / batch excluded; peak extra: {PEAK_METHOD[device.type]}; "
        "static: parameters + gradients + AdamW state, counted",
        "kinds": kinds,
    }
    write_results(res, args.output, render_markdown(res), logger)
    return res


if __name__ == "__main__":
    main()
