"""The pi0 / pi05 / SmolVLA backbones: tiny random LeRobot checkpoints (tests/vla_fixtures.py) wrapped exactly as
a user's, against LeRobot's own policies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import vla_fixtures as vf

from lerobot_ript.advantages import LABEL_BAD, LABEL_GOOD, LABEL_NULL

KINDS = ("pi0", "pi05", "smolvla")
TESTS = Path(__file__).parent
BATCH = 3


@pytest.fixture(scope="module", autouse=True)
def _tiny_sizes():
    vf.install_tiny_vla_sizes()  # only configs tagged as tiny test models are affected


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vla")
    return {kind: vf.make_tiny_vla_checkpoint(kind, root / kind) for kind in KINDS}


def raw_batch(b: int = BATCH, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "observation.images.corner2": torch.rand(b, 3, 32, 32, generator=g),
        "observation.state": torch.randn(b, 39, generator=g),
        "task": ["push the puck to the goal"] * b,
    }


def ript_config(kind: str, path: Path, **overrides):
    from lerobot.configs import PreTrainedConfig

    from lerobot_ript.policy.configuration_ript import RiptConfig

    vla = PreTrainedConfig.from_pretrained(path)
    kwargs = dict(
        backbone=kind,
        backbone_path=str(path),
        device="cpu",
        chunk_size=vla.chunk_size,
        n_action_steps=vla.chunk_size,
        num_inference_steps=vla.num_steps if kind == "smolvla" else vla.num_inference_steps,
        input_features=dict(vla.input_features),
        output_features=dict(vla.output_features),
        push_to_hub=False,
    )
    kwargs.update(overrides)
    return RiptConfig(**kwargs)


def wrap(kind: str, path: Path, **overrides):
    """(ript policy, its preprocessor, its postprocessor) for the checkpoint, as make_policy would build them."""
    from lerobot_ript.policy.modeling_ript import RiptPolicy
    from lerobot_ript.policy.processor_ript import make_ript_pre_post_processors

    cfg = ript_config(kind, path, **overrides)
    policy = RiptPolicy(cfg)
    pre, post = make_ript_pre_post_processors(cfg)
    return policy, pre, post


def label_path(policy) -> dict[str, torch.nn.Parameter]:
    """The parameters the wrapper added (the label path), by name."""
    return {n: p for n, p in policy.named_parameters() if "label" in n}


def perturb_label_path(policy, seed: int = 1, std: float = 0.3) -> None:
    """As if trained: the zero-initialised label layers get random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in label_path(policy).values():
            p.add_(std * torch.randn(p.shape, generator=g))


def train_batch(pre, b: int = BATCH) -> dict:
    batch = pre(raw_batch(b))
    batch["action"] = torch.randn(b, 8, 4, generator=torch.Generator().manual_seed(3))
    batch["action_is_pad"] = torch.zeros(b, 8, dtype=torch.bool)
    batch["action_is_pad"][0, -2:] = True
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.25])[:b]
    return batch


def flow_noise(policy, b: int = BATCH, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, policy.config.chunk_size, policy.backbone.flow_action_dim, generator=g)


# ----------------------------------------------------------------------------------------------------------
# the label path is zero-initialised: the wrapped policy samples what LeRobot's policy samples
# ----------------------------------------------------------------------------------------------------------
def _check_matches_lerobot_at_start(kind: str, path: Path) -> None:
    from lerobot.policies.factory import make_pre_post_processors

    lerobot_policy = vf.load_tiny_vla_policy(kind, path)
    lerobot_pre, _ = make_pre_post_processors(lerobot_policy.config, pretrained_path=str(path))
    policy, pre, _ = wrap(kind, path)
    policy.eval()
    raw = raw_batch()
    noise = flow_noise(policy)
    expected = lerobot_policy.predict_action_chunk(lerobot_pre(dict(raw)), noise=noise.clone())
    batch = pre(dict(raw))
    for precompute in (True, False):
        got = policy.predict_action_chunk(
            batch, noise=noise.clone(), guidance_scale=1.0, precompute=precompute
        )
        assert got.shape == expected.shape == (BATCH, 8, 4)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the label changes nothing yet: guided sampling (both branches in one pass) gives the same actions
    guided = policy.predict_action_chunk(batch, noise=noise.clone(), guidance_scale=3.0)
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)


def test_wrapped_pi0_matches_lerobot_at_start(checkpoints):
    _check_matches_lerobot_at_start("pi0", checkpoints["pi0"])


def test_wrapped_pi05_matches_lerobot_at_start(checkpoints):
    _check_matches_lerobot_at_start("pi05", checkpoints["pi05"])


def test_wrapped_smolvla_matches_lerobot_at_start(checkpoints):
    _check_matches_lerobot_at_start("smolvla", checkpoints["smolvla"])


# ----------------------------------------------------------------------------------------------------------
# the label reaches every layer of the action expert
# ----------------------------------------------------------------------------------------------------------
def expert_norms(policy, kind: str) -> list[tuple[str, torch.nn.Module]]:
    """Every norm of the action expert (per layer and final), by name."""
    vla_model = policy.backbone.vla.model
    expert = (
        vla_model.vlm_with_expert.lm_expert
        if kind == "smolvla"
        else vla_model.paligemma_with_expert.gemma_expert.model
    )
    norms = []
    for i, layer in enumerate(expert.layers):
        norms += [
            (f"layer{i}.input", layer.input_layernorm),
            (f"layer{i}.post", layer.post_attention_layernorm),
        ]
    return [*norms, ("final", expert.norm)]


def _recorder(seen: dict, name: str):
    """A forward hook keeping a module's first output under `name` (returns None: the output is unchanged)."""

    def hook(_module, _inputs, out) -> None:
        seen.setdefault(name, (out[0] if isinstance(out, tuple) else out).detach().clone())

    return hook


@pytest.mark.parametrize("kind", KINDS)
def test_label_reaches_every_expert_layer(checkpoints, kind):
    policy, pre, _ = wrap(kind, checkpoints[kind])
    perturb_label_path(policy)
    policy.eval()
    batch = pre(raw_batch())
    outputs: dict[int, dict[str, torch.Tensor]] = {}
    norms = expert_norms(policy, kind)
    assert len(norms) >= 3
    for label in (LABEL_GOOD, LABEL_BAD):
        seen = outputs.setdefault(label, {})
        hooks = [module.register_forward_hook(_recorder(seen, name)) for name, module in norms]
        try:
            with torch.no_grad():
                policy.velocity_field(batch, label)(flow_noise(policy), torch.full((BATCH,), 1.0))
        finally:
            for h in hooks:
                h.remove()
    for name, _ in norms:
        good, bad = outputs[LABEL_GOOD][name], outputs[LABEL_BAD][name]
        assert good.shape == bad.shape
        assert (good - bad).abs().max() > 1e-4, f"the label does not reach the expert's {name} norm"


# ----------------------------------------------------------------------------------------------------------
# training: one step per objective
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["cfg", "cfgrl", "weighted", "repel"])
@pytest.mark.parametrize("kind", KINDS)
def test_one_training_step_per_objective(checkpoints, kind, objective):
    policy, pre, _ = wrap(kind, checkpoints[kind], objective=objective, cfg_dropout_prob=0.0)
    if objective == "repel":
        policy.set_reference()
    batch = train_batch(pre)
    if objective == "weighted":
        batch["advantages"] = batch["advantages"].clamp(min=0.0)
    policy.train()
    opt = torch.optim.AdamW(policy.get_optim_params(), lr=1e-2)
    loss, metrics = policy(batch)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = {n: p.grad for n, p in label_path(policy).items()}
    assert grads and all(g is not None for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0, "no gradient reaches the label path"
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in policy.named_parameters()
        if "label" not in n
    )
    before = {n: p.detach().clone() for n, p in label_path(policy).items()}
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in label_path(policy).items())
    # after the step the label matters: good and null sample differently
    policy.eval()
    noise = flow_noise(policy)
    infer = pre(raw_batch())
    with torch.no_grad():
        fields = [
            policy.velocity_field(infer, lab)(noise, torch.ones(BATCH)) for lab in (LABEL_GOOD, LABEL_NULL)
        ]
    assert (fields[0] - fields[1]).abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_training_pass_equals_cached_pass(checkpoints, kind):
    """The training context (prefix and suffix in one pass) and the sampling context (the prefix's KV cache)
    give the same velocity."""
    policy, pre, _ = wrap(kind, checkpoints[kind])
    perturb_label_path(policy)
    policy.eval()
    batch = pre(raw_batch())
    x, t = flow_noise(policy), torch.full((BATCH,), 0.6)
    labels = torch.tensor([LABEL_GOOD, LABEL_BAD, LABEL_NULL])
    with torch.enable_grad():
        joint = policy._velocity(policy.backbone.encode_observation(batch), x, t, labels)
    with torch.no_grad():
        cached = policy._velocity(policy.backbone.encode_observation(batch), x, t, labels)
    torch.testing.assert_close(joint.detach(), cached, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# guidance: one batched expert pass over the shared prefix == two separate branches
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_guided_equals_separate_branches(checkpoints, kind):
    policy, pre, _ = wrap(kind, checkpoints[kind], enable_cfg_safe_copy=True)
    perturb_label_path(policy)
    policy.eval()
    batch = pre(raw_batch())
    noise = flow_noise(policy)
    batched = policy.predict_action_chunk(batch, noise=noise.clone(), guidance_scale=2.5)
    separate = policy.predict_action_chunk(
        batch, noise=noise.clone(), guidance_scale=2.5, batched_guidance=False
    )
    plain = policy.predict_action_chunk(batch, noise=noise.clone(), guidance_scale=1.0)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-4)
    assert (batched - plain).abs().max() > 1e-4  # guidance acts once the label path is trained


# ----------------------------------------------------------------------------------------------------------
# save, reload in a fresh process, LeRobot's loaders
# ----------------------------------------------------------------------------------------------------------
RELOAD = """
import sys, json, torch
sys.path.insert(0, {tests!r})
import vla_fixtures; vla_fixtures.install_tiny_vla_sizes()
from lerobot.utils.import_utils import register_third_party_plugins
register_third_party_plugins()  # as LeRobot's CLIs do: discovers lerobot_policy_ript
from lerobot.policies.factory import get_policy_class, make_pre_post_processors
policy = get_policy_class("ript").from_pretrained({ckpt!r})
pre, post = make_pre_post_processors(policy.config, pretrained_path={ckpt!r})
inputs = torch.load({inputs!r})
with torch.no_grad():
    actions = post(policy.predict_action_chunk(pre(inputs["raw"]), noise=inputs["noise"], guidance_scale=2.0))
torch.save({{"actions": actions, "backbone": type(policy.backbone).__name__}}, {out!r})
"""


@pytest.mark.parametrize("kind", KINDS)
def test_saved_checkpoint_reloads_in_a_fresh_process(checkpoints, kind, tmp_path):
    policy, pre, post = wrap(kind, checkpoints[kind])
    perturb_label_path(policy, seed=5)
    policy.eval()
    ckpt = tmp_path / "ript"
    policy.save_pretrained(ckpt)
    pre.save_pretrained(ckpt)
    post.save_pretrained(ckpt)
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["type"] == "ript" and saved["backbone"] == kind and saved["backbone_config"]["type"] == kind
    raw, noise = raw_batch(), flow_noise(policy)
    with torch.no_grad():
        expected = post(policy.predict_action_chunk(pre(dict(raw)), noise=noise.clone(), guidance_scale=2.0))
    torch.save({"raw": raw, "noise": noise}, tmp_path / "inputs.pt")
    # the reload must not read the wrapped checkpoint's weights: take them away
    weights = checkpoints[kind] / "model.safetensors"
    hidden = weights.rename(weights.with_suffix(".hidden"))
    try:
        code = RELOAD.format(
            tests=str(TESTS), ckpt=str(ckpt), inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path / "out.pt")
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    finally:
        hidden.rename(weights)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt")
    assert (
        out["backbone"] == {"pi0": "Pi0Backbone", "pi05": "Pi05Backbone", "smolvla": "SmolVLABackbone"}[kind]
    )
    torch.testing.assert_close(out["actions"], expected, atol=1e-5, rtol=1e-5)


def test_reload_is_strict(checkpoints, tmp_path):
    """A ript checkpoint missing a label-path tensor fails to load instead of keeping a zero layer."""
    from safetensors.torch import load_file, save_file

    from lerobot_ript.policy.modeling_ript import RiptPolicy

    policy, _, _ = wrap("pi05", checkpoints["pi05"])
    policy.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["backbone.label_gate.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(RuntimeError, match="label_gate"):
        RiptPolicy.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# what the backbone cannot take fails before training, naming the fix
# ----------------------------------------------------------------------------------------------------------
def test_mismatches_fail_with_the_fix(checkpoints, tmp_path):
    from lerobot.configs import FeatureType, PolicyFeature

    from lerobot_ript.policy.modeling_ript import RiptPolicy

    path = checkpoints["pi05"]
    base = ript_config("pi05", path)
    state12 = {**base.input_features, "observation.state": PolicyFeature(FeatureType.STATE, (12,))}
    with pytest.raises(ValueError, match=r"--policy.target_state_dim=39"):
        RiptPolicy(ript_config("pi05", path, input_features=state12))
    RiptPolicy(ript_config("pi05", path, input_features=state12, target_state_dim=39))  # the fix works
    with pytest.raises(ValueError, match=r"7-dim actions.*4-dim actions|4-dim actions.*7-dim"):
        RiptPolicy(
            ript_config("pi05", path, output_features={"action": PolicyFeature(FeatureType.ACTION, (7,))})
        )
    with pytest.raises(ValueError, match=r"--policy.chunk_size=8"):
        RiptPolicy(ript_config("pi05", path, chunk_size=16, n_action_steps=4))
    other_cam = {
        "observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 32, 32)),
        "observation.state": base.input_features["observation.state"],
    }
    with pytest.raises(ValueError, match=r"cameras.*corner2"):
        RiptPolicy(ript_config("pi05", path, input_features=other_cam))
    with pytest.raises(ValueError, match=r"holds a 'pi05' policy"):
        RiptPolicy(ript_config("pi0", path))
    with pytest.raises(ValueError, match=r"--policy.backbone_path="):
        RiptPolicy(ript_config("smolvla", checkpoints["smolvla"], backbone_path=None))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())  # a config, no weights
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        RiptPolicy(ript_config("pi05", path, backbone_path=str(tmp_path)))


def test_training_switches_are_honoured(checkpoints):
    policy, pre, _ = wrap("pi05", checkpoints["pi05"], train_expert_only=True, gradient_checkpointing=True)
    paligemma = policy.backbone.vla.model.paligemma_with_expert.paligemma
    trainable = {id(p) for p in policy.get_optim_params()}
    assert not any(id(p) in trainable for p in paligemma.parameters())
    expert = policy.backbone.vla.model.paligemma_with_expert.gemma_expert
    assert all(id(p) in trainable for p in expert.parameters())
    assert policy.backbone.vla.model.gradient_checkpointing_enabled
    policy.train()
    torch.manual_seed(0)
    loss, _ = policy(train_batch(pre))
    loss.backward()
    assert all(p.grad is None for p in paligemma.parameters())
    # gradient checkpointing changes memory, not the loss
    plain, pre2, _ = wrap("pi05", checkpoints["pi05"], train_expert_only=True)
    plain.train()
    torch.manual_seed(0)
    loss2, _ = plain(train_batch(pre2))
    torch.testing.assert_close(loss, loss2)
    frozen, _, _ = wrap(
        "smolvla", checkpoints["smolvla"], freeze_vision_encoder=True, train_expert_only=False
    )
    vision = frozen.backbone.vla.model.vlm_with_expert.get_vlm_model().vision_model
    assert not any(p.requires_grad for p in vision.parameters())


def test_pushed_checkpoint_loads_from_a_hub(checkpoints, tmp_path):
    """A wrapped pi05 pushed to a (local) Hub loads by repo id in a fresh process, as lerobot-eval would."""
    import os

    from hub_server import LocalHubServer

    from lerobot_ript.train.hub import push_folder_with_retry

    policy, pre, post = wrap("pi05", checkpoints["pi05"])
    perturb_label_path(policy, seed=7)
    policy.eval()
    folder = tmp_path / "ript"
    for part in (policy, pre, post):
        part.save_pretrained(folder)
    raw, noise = raw_batch(), flow_noise(policy)
    with torch.no_grad():
        expected = post(policy.predict_action_chunk(pre(dict(raw)), noise=noise.clone(), guidance_scale=2.0))
    torch.save({"raw": raw, "noise": noise}, tmp_path / "inputs.pt")
    token, repo = "hf_FAKEtoken1234567890", "ript-user/ript-pi05"
    with LocalHubServer() as hub:
        from huggingface_hub import constants

        xet, offline = constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE
        constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE = True, False
        try:
            result = push_folder_with_retry(folder, repo, endpoint=hub.endpoint, token=token, backoff_s=0.01)
        finally:
            constants.HF_HUB_DISABLE_XET, constants.HF_HUB_OFFLINE = xet, offline
        assert result.ok, result.error
        env = dict(
            os.environ,
            HF_ENDPOINT=hub.endpoint,
            HF_HUB_DISABLE_XET="1",
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_TOKEN=token,
            HF_HOME=str(tmp_path / "hf_home"),
        )
        code = RELOAD.format(
            tests=str(TESTS), ckpt=repo, inputs=str(tmp_path / "inputs.pt"), out=str(tmp_path / "out.pt")
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
        )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["backbone"] == "Pi05Backbone"
    torch.testing.assert_close(out["actions"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_float32_checkpoint_wraps_in_bfloat16(checkpoints, kind):
    """vla_dtype=bfloat16 rounds the float32 checkpoint's weights: the loaded-weights check compares in the
    model's dtype, so it neither fails on the rounding nor lets a random model through; a step trains."""
    policy, pre, _ = wrap(kind, checkpoints[kind], vla_dtype="bfloat16")
    expert = policy.backbone.vla.model.paligemma_with_expert.gemma_expert
    assert {p.dtype for p in expert.parameters()} >= {torch.bfloat16}
    policy.train()
    loss, _ = policy(train_batch(pre))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in label_path(policy).values())


def test_update_step_in_bf16_through_accelerate(checkpoints):
    """One optimizer step of the loop's update_step with Accelerate's bf16 autocast (on a CPU here)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from lerobot_ript.train.update import update_step

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        policy, pre, _ = wrap("pi05", checkpoints["pi05"])
        opt = torch.optim.AdamW(policy.get_optim_params(), lr=1e-3)
        policy, opt = accelerator.prepare(policy, opt)
        before = {n: p.detach().clone() for n, p in label_path(policy).items()}
        out = update_step(policy, [train_batch(pre)], opt, None, accelerator, grad_clip_norm=1.0)
        assert accelerator.mixed_precision == "bf16"
        assert out["loss"] == out["loss"] and out["grad_norm"] > 0  # finite, and a real gradient
        assert any(not torch.equal(before[n], p) for n, p in label_path(policy).items())
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
