"""The `ript` policy against real LeRobot objects: registration, save/load in a fresh process, the three
objectives, classifier-free guidance, behavioural conditioning and fail-fast validation."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.policies.common.flow_matching import euler_integrate, sample_noise
from lerobot.policies.factory import get_policy_class, make_policy, make_pre_post_processors
from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_STATE

from lerobot_ript.advantages import LABEL_BAD, LABEL_GOOD, LABEL_NULL
from lerobot_ript.policy.backbones.base import RiptBackbone
from lerobot_ript.policy.configuration_ript import BACKBONES, OBJECTIVES, RiptConfig
from lerobot_ript.policy.modeling_ript import RiptPolicy, _check_no_shared_storage, euler_times
from lerobot_ript.policy.processor_ript import StateDimAdapterStep

STATE_DIM, ACTION_DIM, CHUNK = 5, 2, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ helpers
def tiny_config(**overrides) -> RiptConfig:
    """A CPU-sized config (no features yet: make_policy fills them from dataset metadata)."""
    kwargs = dict(
        device="cpu",
        chunk_size=CHUNK,
        n_action_steps=2,
        hidden_dim=32,
        cond_dim=16,
        num_denoiser_layers=2,
        image_size=(16, 16),
        image_channels=8,
        num_inference_steps=4,
    )
    kwargs.update(overrides)
    return RiptConfig(**kwargs)


def state_policy(seed: int = 0, perturb: bool = True, **overrides) -> RiptPolicy:
    """A state-only policy built from features directly. `perturb` replaces the adaLN-zero init (under which
    the label has no effect at all) with random weights, so the good and null branches really differ."""
    cfg = tiny_config(
        input_features={OBS_STATE: PolicyFeature(FeatureType.STATE, (STATE_DIM,))},
        output_features={ACTION: PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
        **overrides,
    )
    torch.manual_seed(seed)
    policy = RiptPolicy(cfg)
    if perturb:
        with torch.no_grad():
            for p in policy.parameters():
                p.normal_(0.0, 0.3)
    return policy


def state_batch(b: int = 6, seed: int = 1, advantages: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {
        OBS_STATE: torch.randn(b, STATE_DIM, generator=g),
        ACTION: torch.randn(b, CHUNK, ACTION_DIM, generator=g),
    }
    if advantages is not None:
        batch["advantages"] = advantages
    return batch


def fixed_noise(b: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, CHUNK, ACTION_DIM, generator=torch.Generator().manual_seed(seed))


def image_feature(h: int, w: int) -> dict:
    return {"dtype": "image", "shape": (h, w, 3), "names": ["height", "width", "channels"]}


def vector_feature(n: int) -> dict:
    return {"dtype": "float32", "shape": (n,), "names": None}


def chunk_dataset(root: Path, cfg: RiptConfig) -> LeRobotDataset:
    """Reopen a tiny dataset on disk with the policy's action chunk (delta timestamps)."""
    meta = LeRobotDatasetMetadata("local/tiny", root=root)
    return LeRobotDataset(
        "local/tiny", root=root, delta_timestamps=resolve_delta_timestamps(cfg, meta), video_backend="pyav"
    )


def processed_batches(ds: LeRobotDataset, preprocessor, batch_size: int = 16) -> list[dict]:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    return [preprocessor(b) for b in loader]


def snapshot(batch: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in batch.items()}


def assert_same_batch(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert after[k].dtype == v.dtype, k
            assert torch.equal(after[k], v), f"batch['{k}'] was mutated"
        else:
            assert after[k] == v, k


# ----------------------------------------------------------------------------------------- registration
def test_policy_type_is_registered() -> None:
    assert get_policy_class("ript") is RiptPolicy
    from lerobot.configs import PreTrainedConfig

    assert PreTrainedConfig.get_choice_class("ript") is RiptConfig


@pytest.mark.parametrize("cameras", [(), ("top",), ("top", "wrist")], ids=["state", "1cam", "2cam"])
def test_make_policy_from_dataset_trains_one_step(tmp_path: Path, cameras: tuple[str, ...]) -> None:
    """make_policy + the policy's own processors on a real dataset; images (24x40) differ from image_size."""
    make_tiny_dataset(tmp_path / "ds", state_dim=6, cameras=cameras, image_hw=(24, 40), episodes=2, frames=8)
    cfg = tiny_config()
    meta = LeRobotDatasetMetadata("local/tiny", root=tmp_path / "ds")
    policy = make_policy(cfg, ds_meta=meta)
    assert isinstance(policy, RiptPolicy)
    assert sorted(cfg.image_features) == sorted(f"observation.images.{c}" for c in cameras)
    pre, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    batch = processed_batches(chunk_dataset(tmp_path / "ds", cfg), pre, batch_size=8)[0]
    before = [p.detach().clone() for p in policy.parameters()]
    loss, _ = policy.forward(batch)
    loss.backward()
    torch.optim.AdamW(policy.parameters(), lr=1e-2).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    chunk = policy.predict_action_chunk(batch)
    assert chunk.shape == (8, CHUNK, 2)


def test_make_policy_two_cameras_of_different_sizes(tmp_path: Path) -> None:
    features = {
        "observation.images.left": image_feature(20, 30),
        "observation.images.right": image_feature(48, 36),
        OBS_STATE: vector_feature(3),
        ACTION: vector_feature(2),
    }
    meta = LeRobotDatasetMetadata.create("local/m", 10, features, root=tmp_path / "m", use_videos=False)
    cfg = tiny_config(image_size=(16, 16))
    policy = make_policy(cfg, ds_meta=meta)
    batch = {
        "observation.images.left": torch.rand(3, 3, 20, 30),
        "observation.images.right": torch.rand(3, 3, 48, 36),
        OBS_STATE: torch.randn(3, 3),
        ACTION: torch.randn(3, CHUNK, 2),
    }
    loss, _ = policy.forward(batch)
    assert torch.isfinite(loss)
    assert policy.predict_action_chunk(batch).shape == (3, CHUNK, 2)


def test_make_policy_env_state_only(tmp_path: Path) -> None:
    features = {OBS_ENV_STATE: vector_feature(5), ACTION: vector_feature(2)}
    meta = LeRobotDatasetMetadata.create("local/e", 10, features, root=tmp_path / "e", use_videos=False)
    cfg = tiny_config()
    policy = make_policy(cfg, ds_meta=meta)
    assert cfg.robot_state_feature is None and cfg.env_state_feature is not None
    batch = {OBS_ENV_STATE: torch.randn(3, 5), ACTION: torch.randn(3, CHUNK, 2)}
    assert torch.isfinite(policy.forward(batch)[0])
    assert policy.predict_action_chunk(batch).shape == (3, CHUNK, 2)


# ------------------------------------------------------------------------------------ save / load round trip
CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file

    assert "lerobot_ript" not in sys.modules
    from lerobot.utils.import_utils import register_third_party_plugins
    register_third_party_plugins()  # imports the `lerobot_policy_ript` distribution, nothing else of ours
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    d = Path(sys.argv[1])
    policy = get_policy_class("ript").from_pretrained(d)
    pre, post = make_pre_post_processors(policy.config, pretrained_path=str(d))
    io = load_file(d / "io.safetensors")
    obs = {k.removeprefix("obs/"): v for k, v in io.items() if k.startswith("obs/")}
    with torch.no_grad():
        actions = post(policy.predict_action_chunk(pre(obs), noise=io["noise"]))
    steps = {type(s).__name__: getattr(s, "target_state_dim", None) for s in pre.steps}
    print(json.dumps({
        "max_abs_diff": float((actions - io["actions"]).abs().max()),
        "policy_module": type(policy).__module__,
        "guidance_scale": policy.config.guidance_scale,
        "steps": steps,
        "discovered_via": sorted(m for m in sys.modules if m.startswith("lerobot_policy_")),
    }))
    """
)


def test_save_load_round_trip_in_fresh_process(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    make_tiny_dataset(tmp_path / "ds", state_dim=6, cameras=("top",), image_hw=(24, 40), episodes=2, frames=8)
    cfg = tiny_config(target_state_dim=8, guidance_scale=1.5)
    meta = LeRobotDatasetMetadata("local/tiny", root=tmp_path / "ds")
    policy = make_policy(cfg, ds_meta=meta)
    pre, post = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    batches = processed_batches(chunk_dataset(tmp_path / "ds", cfg), pre, batch_size=8)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for batch in batches * 3:  # a few steps, so the adaLN-zero modulations are no longer zero
        loss, _ = policy.forward(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()

    raw = next(iter(torch.utils.data.DataLoader(chunk_dataset(tmp_path / "ds", cfg), batch_size=4)))
    obs = {k: v for k, v in raw.items() if k.startswith("observation.")}
    noise = fixed_noise(4)
    with torch.no_grad():
        actions = post(policy.predict_action_chunk(pre(dict(obs)), noise=noise))
    out = tmp_path / "model"
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    save_file(
        {**{f"obs/{k}": v.contiguous() for k, v in obs.items()}, "noise": noise, "actions": actions},
        out / "io.safetensors",
    )

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["discovered_via"] == ["lerobot_policy_ript"]
    assert res["policy_module"] == "lerobot_ript.policy.modeling_ript"
    assert res["guidance_scale"] == 1.5
    assert res["steps"]["StateDimAdapterStep"] == 8
    assert res["max_abs_diff"] < 1e-5
    assert actions.abs().max() > 0  # the comparison is not between two zero tensors


# --------------------------------------------------------------------------------------------- objectives
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_is_finite_for_every_objective(objective: str) -> None:
    policy = state_policy(objective=objective)
    policy.train()
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0, -1.0, 0.3])
    if objective == "weighted":
        adv = adv.abs()
    if objective == "repel":
        policy.set_reference()
    loss, metrics = policy.forward(state_batch(advantages=adv))
    per_sample, _ = policy.forward(state_batch(advantages=adv), reduction="none")
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert per_sample.shape == (6,) and torch.isfinite(per_sample).all()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)


def _eval_loss(policy: RiptPolicy, batches: list[dict], draws: int = 4) -> float:
    """Mean loss over fixed noise/time draws, in eval mode (no label dropout)."""
    policy.eval()
    torch.manual_seed(1234)
    with torch.no_grad():
        total = sum(float(policy.forward(b)[0]) for _ in range(draws) for b in batches)
    policy.train()
    return total / (draws * len(batches))


@pytest.mark.parametrize(
    "objective,advantages",
    [("cfg", [1.0, -1.0, 0.5]), ("cfgrl", [1.0, -1.0, 0.5]), ("weighted", [1.0, 0.2, 2.0])],
)
def test_loss_falls_on_tiny_dataset(tmp_path: Path, objective: str, advantages: list[float]) -> None:
    make_tiny_dataset(tmp_path / "ds", state_dim=4, episodes=3, frames=16, advantages=advantages)
    cfg = tiny_config(objective=objective, hidden_dim=64)
    meta = LeRobotDatasetMetadata("local/tiny", root=tmp_path / "ds")
    torch.manual_seed(0)
    policy = make_policy(cfg, ds_meta=meta)
    pre, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    batches = processed_batches(chunk_dataset(tmp_path / "ds", cfg), pre, batch_size=16)
    assert all("advantages" in b for b in batches)
    start = _eval_loss(policy, batches)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for step in range(100):
        loss, _ = policy.forward(batches[step % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = _eval_loss(policy, batches)
    assert end < 0.75 * start, (start, end)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_nan_advantages_are_rejected(objective: str) -> None:
    policy = state_policy(objective=objective)
    adv = torch.tensor([1.0, float("nan"), 0.5, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="'advantages'.*non-finite"):
        policy.forward(state_batch(advantages=adv))


def test_weighted_objective_rejects_negative_weights() -> None:
    policy = state_policy(objective="weighted")
    adv = torch.tensor([1.0, -0.5, 0.5, 1.0, 1.0, -2.0])
    with pytest.raises(ValueError, match=r"2 negative.*negative_handling=softplus\|abs\|clamp"):
        policy.forward(state_batch(advantages=adv))
    # Processed weights take precedence over the raw (signed) advantages.
    batch = state_batch(advantages=adv)
    batch["advantage_weights"] = adv.abs()
    assert torch.isfinite(policy.forward(batch)[0])


def test_cfgrl_all_bad_trains_only_the_null_branch() -> None:
    alpha = 0.3
    policy = state_policy(objective="cfgrl", cfg_alpha=alpha)
    policy.train()
    batch = state_batch(advantages=-torch.ones(6))

    # 1) Per-sample loss equals cfg_alpha * L_null, with L_null recomputed from the same noise/time draw.
    torch.manual_seed(7)
    per_sample, metrics = policy.forward(batch, reduction="none")
    torch.manual_seed(7)
    actions = batch[ACTION]
    noise = sample_noise(actions.shape, "cpu")
    t = policy._sample_time(6, torch.device("cpu"))
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    context = policy.backbone.encode_observation(batch)
    v_null = policy._velocity(context, x_t, t, torch.full((6,), LABEL_NULL))
    l_null = ((v_null - (noise - actions)) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(per_sample, alpha * l_null)
    assert metrics["share_bad"] == 1.0

    # 2) Behaviourally: the GOOD (and BAD) label rows get no gradient, the NULL row does.
    policy.zero_grad()
    policy.forward(batch)[0].backward()
    grad = policy.label_embedding.weight.grad
    assert torch.count_nonzero(grad[LABEL_GOOD]) == 0
    assert torch.count_nonzero(grad[LABEL_BAD]) == 0
    assert grad[LABEL_NULL].abs().sum() > 0

    # 3) With all-good labels the good row is trained.
    policy.zero_grad()
    policy.forward(state_batch(advantages=torch.ones(6)))[0].backward()
    assert policy.label_embedding.weight.grad[LABEL_GOOD].abs().sum() > 0


def _flow_losses(policy: RiptPolicy, batch: dict, seed: int) -> torch.Tensor:
    """Per-sample good-conditioned flow losses (B,) on the draw `forward` makes after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    actions = batch[ACTION]
    noise = sample_noise(actions.shape, "cpu")
    t = policy._sample_time(actions.shape[0], torch.device("cpu"))
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    v = policy._velocity(
        policy.backbone.encode_observation(batch), x_t, t, torch.full((actions.shape[0],), LABEL_GOOD)
    )
    return ((v - (noise - actions)) ** 2).mean(dim=(1, 2))


def test_repel_loss_is_the_successes_flow_loss_plus_the_clipped_ratio_of_the_failures() -> None:
    weight, clip = 0.7, 0.2
    policy = state_policy(objective="repel", repel_weight=weight, repel_clip=clip, cfg_dropout_prob=0.0)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0, 1.0, -0.25])
    batch = state_batch(advantages=adv)
    neg = adv < 0
    with pytest.raises(RuntimeError, match=r"no reference policy.*set_reference\(\)"):
        policy.forward(batch)
    policy.set_reference()
    assert not any(k.startswith("_reference") for k in policy.state_dict())  # never saved or trained

    # Right after set_reference the ratio is exactly 1: per-sample = flow * B/n_pos, or w |A| * B/n_neg.
    flow = _flow_losses(policy, batch, seed=5).detach()
    torch.manual_seed(5)
    per_sample, metrics = policy.forward(batch, reduction="none")
    torch.testing.assert_close(per_sample[~neg], flow[~neg] * 6 / 3)
    # (the reference sees only the failure rows: a smaller matmul, so equal up to float rounding)
    torch.testing.assert_close(per_sample[neg], weight * adv[neg].abs() * 6 / 3, rtol=1e-3, atol=1e-5)
    assert metrics["repel_ratio"] == pytest.approx(1.0, rel=1e-3) and metrics["repel_clipped"] == 0.0
    torch.manual_seed(5)
    loss, _ = policy.forward(batch)
    torch.testing.assert_close(loss, flow[~neg].mean() + weight * adv[neg].abs().mean(), rtol=1e-3, atol=1e-5)

    # After the weights move, r = exp(L_ref - L) on the failure rows, against the frozen reference.
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moved = _flow_losses(policy, batch, seed=5).detach()
    torch.manual_seed(5)
    per_sample, _ = policy.forward(batch, reduction="none")
    ratio = torch.exp(flow[neg] - moved[neg])
    expected = weight * adv[neg].abs() * ratio.clamp(min=1 - clip, max=policy.config.repel_ratio_cap) * 2
    torch.testing.assert_close(per_sample[neg], expected, rtol=1e-3, atol=1e-5)
    # set_reference again (in place) makes the moved weights the reference: ratio 1 again
    policy.set_reference()
    torch.manual_seed(5)
    torch.testing.assert_close(
        policy.forward(batch, reduction="none")[0][neg], weight * adv[neg].abs() * 2, rtol=1e-3, atol=1e-5
    )


def _scaled_backbone_step(policy: RiptPolicy, batch: dict, factor: float) -> tuple[torch.Tensor, dict]:
    """Scale every backbone weight by `factor` (the reference stays), then loss and gradients on draw seed 9."""
    with torch.no_grad():
        for p in policy.backbone.parameters():
            p.mul_(factor)
    policy.zero_grad()
    torch.manual_seed(9)
    loss, metrics = policy.forward(batch)
    loss.backward()
    return loss, metrics


def test_repel_pushes_failures_away_and_stops_at_the_trust_region() -> None:
    policy = state_policy(objective="repel", cfg_dropout_prob=0.0)
    batch = state_batch(advantages=-torch.ones(6))
    policy.set_reference()
    before = _flow_losses(policy, batch, seed=9).detach()
    opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
    torch.manual_seed(9)
    policy.forward(batch)[0].backward()
    assert policy.label_embedding.weight.grad[LABEL_GOOD].abs().sum() > 0  # the good branch is pushed
    assert policy.label_embedding.weight.grad[LABEL_BAD].abs().sum() == 0  # the bad label is not trained
    opt.step()
    after = _flow_losses(policy, batch, seed=9).detach()
    assert after.mean() > before.mean()  # the failures' actions became less likely under the good label

    # Far outside the trust region (every failure's flow loss far above the reference's): no gradient at all.
    loss, metrics = _scaled_backbone_step(policy, batch, 10.0)
    assert metrics["repel_clipped"] == 1.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in policy.parameters())

    # The other side (dual clip): a reference far worse than the policy puts every ratio above
    # repel_ratio_cap, where the term is constant and gives no gradient either.
    policy.set_reference()
    loss, metrics = _scaled_backbone_step(policy, batch, 0.1)
    assert metrics["repel_capped"] == 1.0 and metrics["repel_clipped"] == 0.0
    torch.testing.assert_close(loss, torch.tensor(policy.config.repel_ratio_cap))  # |A| = 1, weight 1
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in policy.parameters())


def test_repel_without_failures_is_the_cfg_flow_loss_and_needs_no_reference() -> None:
    adv = torch.tensor([1.0, 0.5, 1.0, 0.25, 1.0, 1.0])
    repel = state_policy(objective="repel", cfg_dropout_prob=0.0)
    cfg = state_policy(objective="cfg", cfg_dropout_prob=0.0)
    torch.manual_seed(3)
    a = repel.forward(state_batch(advantages=adv))[0]
    torch.manual_seed(3)
    b = cfg.forward(state_batch(advantages=adv))[0]
    torch.testing.assert_close(a, b)


def test_no_advantages_key_means_every_frame_is_good() -> None:
    policy = state_policy(cfg_dropout_prob=0.0)
    _, metrics = policy.forward(state_batch())
    assert metrics["share_good"] == 1.0 and metrics["share_bad"] == 0.0


# ---------------------------------------------------------------------------------------------- guidance
def test_batched_guidance_equals_two_separate_passes() -> None:
    policy = state_policy().eval()
    batch = state_batch()
    noise = fixed_noise(6)
    batched = policy.predict_action_chunk(batch, noise=noise, guidance_scale=2.0, batched_guidance=True)
    separate = policy.predict_action_chunk(batch, noise=noise, guidance_scale=2.0, batched_guidance=False)
    torch.testing.assert_close(batched, separate, atol=1e-5, rtol=1e-5)
    w1 = policy.predict_action_chunk(batch, noise=noise, guidance_scale=1.0)
    # Guidance changes the actions, so the equality above is not vacuous.
    assert (batched - w1).abs().max() > 1e-3


@pytest.mark.parametrize("w,label", [(1.0, LABEL_GOOD), (0.0, LABEL_NULL)])
def test_guidance_endpoints_equal_single_branch_sampling(w: float, label: int) -> None:
    """w=1 is the conditional policy (one pass); w=0 is the unconditional one."""
    policy = state_policy().eval()
    batch = state_batch()
    noise = fixed_noise(6)
    context = policy.backbone.encode_observation(batch)
    labels = torch.full((6,), label)
    with torch.no_grad():
        expected = euler_integrate(
            lambda x, t: policy._velocity(context, x, t, labels), noise, policy.config.num_inference_steps
        )
    for batched in (True, False):
        got = policy.predict_action_chunk(batch, noise=noise, guidance_scale=w, batched_guidance=batched)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("negative,label", [("null", LABEL_NULL), ("bad", LABEL_BAD)])
def test_guidance_negative_picks_the_branch_guidance_moves_away_from(negative: str, label: int) -> None:
    """v_neg + w (v_good - v_neg) with v_neg from the null or the bad label: w=0 samples that branch alone,
    and the two negatives give different actions at w=2."""
    policy = state_policy(guidance_negative=negative).eval()
    batch, noise = state_batch(), fixed_noise(6)
    context = policy.backbone.encode_observation(batch)
    with torch.no_grad():
        expected = euler_integrate(
            lambda x, t: policy._velocity(context, x, t, torch.full((6,), label)),
            noise,
            policy.config.num_inference_steps,
        )
    for batched in (True, False):
        got = policy.predict_action_chunk(batch, noise=noise, guidance_scale=0.0, batched_guidance=batched)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    policy.config.guidance_negative = "bad" if negative == "null" else "null"
    other = policy.predict_action_chunk(batch, noise=noise, guidance_scale=2.0)
    policy.config.guidance_negative = negative
    assert (policy.predict_action_chunk(batch, noise=noise, guidance_scale=2.0) - other).abs().max() > 1e-3


@pytest.mark.parametrize("label", [LABEL_GOOD, LABEL_NULL, LABEL_BAD])
def test_velocity_field_is_the_one_predict_action_chunk_integrates(label: int) -> None:
    """The public field of one label, integrated with lerobot's Euler steps, is what sampling at w = 1 (good)
    or w = 0 (the negative branch) returns; with and without precomputed conditioning."""
    negative = "bad" if label == LABEL_BAD else "null"
    policy = state_policy(guidance_negative=negative).eval()
    batch, noise = state_batch(), fixed_noise(6)
    steps = policy.config.num_inference_steps
    with torch.no_grad():
        expected = policy.predict_action_chunk(batch, noise=noise, guidance_scale=float(label == LABEL_GOOD))
        for precompute in (True, False):
            got = euler_integrate(policy.velocity_field(batch, label, precompute=precompute), noise, steps)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_noise_scale_scales_the_initial_flow_noise() -> None:
    """noise_scale s samples from s times a standard draw: the same chunk as passing that noise; s = 0 is the
    deterministic mean path, the same for every draw."""
    policy = state_policy().eval()
    batch = state_batch()
    torch.manual_seed(5)
    draw = sample_noise((6, CHUNK, policy.config.action_dim), "cpu")
    for scale in (0.5, 0.0):
        torch.manual_seed(5)
        got = policy.predict_action_chunk(batch, noise_scale=scale)
        torch.testing.assert_close(got, policy.predict_action_chunk(batch, noise=scale * draw))
    torch.manual_seed(6)
    torch.testing.assert_close(policy.predict_action_chunk(batch, noise_scale=0.0), got)
    assert (policy.predict_action_chunk(batch, noise_scale=1.0) - got).abs().max() > 1e-3


def test_guidance_negative_is_validated() -> None:
    with pytest.raises(ValueError, match=r"guidance_negative"):
        tiny_config(guidance_negative="good")
    with pytest.raises(ValueError, match=r"needs objective='cfg'"):
        tiny_config(guidance_negative="bad", objective="cfgrl")


def test_guidance_branches_share_no_mutable_tensor() -> None:
    policy = state_policy().eval()
    batch = state_batch()
    with torch.no_grad():
        context = policy.backbone.encode_observation(batch)
        ctx2 = policy.backbone.repeat_context(context, 2)
        assert ctx2.untyped_storage().data_ptr() != context.untyped_storage().data_ptr()
        x_good, x_null, t = fixed_noise(6, 3), fixed_noise(6, 4), torch.full((6,), 0.5)
        x_good_0, x_null_0 = x_good.clone(), x_null.clone()
        v_good, v_null = policy.branch_velocities(ctx2, x_good, x_null, t)
        assert torch.equal(x_good, x_good_0) and torch.equal(x_null, x_null_0)  # inputs untouched
        assert not torch.allclose(v_good, v_null)

        # Perturbing one branch's input leaves the other branch's output bit-equal.
        v_good_b, v_null_b = policy.branch_velocities(ctx2, x_good + 1.0, x_null, t)
        assert torch.equal(v_null_b, v_null) and not torch.allclose(v_good_b, v_good)
        v_good_c, v_null_c = policy.branch_velocities(ctx2, x_good, x_null - 1.0, t)
        assert torch.equal(v_good_c, v_good) and not torch.allclose(v_null_c, v_null)

        # Outputs do not alias inputs, and writing into one output leaves the other unchanged.
        for v in (v_good, v_null):
            for x in (x_good, x_null, ctx2):
                assert v.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        v_null_0 = v_null.clone()
        v_good.add_(100.0)
        assert torch.equal(v_null, v_null_0)


def test_input_batch_is_not_mutated() -> None:
    policy = state_policy(cfg_dropout_prob=0.5)
    cfg = policy.config
    cfg.input_features["observation.images.cam"] = PolicyFeature(FeatureType.VISUAL, (3, 12, 12))
    torch.manual_seed(0)
    policy = RiptPolicy(cfg)  # rebuilt with a camera; uint8 images exercise the float conversion path
    g = torch.Generator().manual_seed(5)
    batch = {
        **state_batch(advantages=torch.tensor([1.0, -1.0, 0.0, 0.5, -0.2, 1.0])),
        "observation.images.cam": torch.randint(0, 255, (6, 3, 12, 12), dtype=torch.uint8, generator=g),
        f"{ACTION}_is_pad": torch.zeros(6, CHUNK, dtype=torch.bool),
        "init_hash": torch.arange(6),
        "task": ["t"] * 6,
    }
    before = snapshot(batch)
    for w in (1.0, 2.0):
        for batched in (True, False):
            policy.predict_action_chunk(batch, guidance_scale=w, batched_guidance=batched)
    assert_same_batch(before, batch)
    for objective in OBJECTIVES:
        policy.config.objective = objective
        if objective == "weighted":
            batch["advantages"] = batch["advantages"].abs()
            before = snapshot(batch)
        policy.train()
        policy.forward(batch)[0].backward()
        assert_same_batch(before, batch)
    policy.reset()
    policy.select_action(batch)
    assert_same_batch(before, batch)


def test_cfg_safe_copy_check() -> None:
    plain = state_policy(seed=3).eval()
    checked = state_policy(seed=3, enable_cfg_safe_copy=True).eval()
    batch, noise = state_batch(), fixed_noise(6)
    a = plain.predict_action_chunk(batch, noise=noise, guidance_scale=2.0)
    b = checked.predict_action_chunk(batch, noise=noise, guidance_scale=2.0)
    assert torch.equal(a, b)
    # The check itself refuses aliasing storage and accepts a copy.
    x = torch.randn(4, CHUNK, ACTION_DIM)
    with pytest.raises(RuntimeError, match="share storage"):
        _check_no_shared_storage(x[:2], x[2:])
    _check_no_shared_storage(x, x.clone())


# ------------------------------------------------------------------------------------ sampling fast path
def camera_policy(seed: int = 0) -> RiptPolicy:
    """state_policy plus one 12x12 camera (resized to image_size), weights perturbed like state_policy's."""
    cfg = tiny_config(
        input_features={
            OBS_STATE: PolicyFeature(FeatureType.STATE, (STATE_DIM,)),
            "observation.images.cam": PolicyFeature(FeatureType.VISUAL, (3, 12, 12)),
        },
        output_features={ACTION: PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
    )
    torch.manual_seed(seed)
    policy = RiptPolicy(cfg)
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0.0, 0.3)
    return policy


def observation(b: int, camera: bool) -> dict[str, torch.Tensor]:
    obs = {OBS_STATE: state_batch(b)[OBS_STATE]}
    if camera:
        obs["observation.images.cam"] = torch.rand(b, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    return obs


@pytest.mark.parametrize("camera", [False, True], ids=["state", "camera"])
@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize(
    "w,batched", [(1.0, True), (1.5, True), (1.5, False)], ids=["w1", "w1.5", "w1.5-2pass"]
)
def test_precomputed_sampling_equals_the_plain_per_step_computation(
    camera: bool, b: int, w: float, batched: bool
) -> None:
    """precompute=True (conditioning and context terms computed once per call) samples the same chunk as
    recomputing everything every Euler step, from the same noise."""
    policy = (camera_policy() if camera else state_policy()).eval()
    obs, noise = observation(b, camera), fixed_noise(b)
    kwargs = dict(noise=noise, guidance_scale=w, batched_guidance=batched)
    fast = policy.predict_action_chunk(obs, precompute=True, **kwargs)
    plain = policy.predict_action_chunk(obs, precompute=False, **kwargs)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    assert plain.abs().max() > 0.1  # not a vacuous comparison of two near-zero chunks


def test_prepared_denoiser_equals_denoise_at_every_step() -> None:
    """SmallBackbone's prepared denoiser against `denoise` with the summed condition, for the 2B rows of
    batched guidance (good and null labels); the base class default is `denoise` itself."""
    policy = state_policy().eval()
    bb = policy.backbone
    with torch.no_grad():
        context = bb.repeat_context(bb.encode_observation(state_batch(3)), 2)
        row_cond = policy.label_embedding(torch.tensor([LABEL_GOOD] * 3 + [LABEL_NULL] * 3))  # (6, cond)
        step_conds = policy.time_embedding(euler_times(policy.config.num_inference_steps))  # (S, cond)
        fast = bb.prepare_denoise(context, row_cond, step_conds)
        default = RiptBackbone.prepare_denoise(bb, context, row_cond, step_conds)
        for step in range(len(step_conds)):
            x = fixed_noise(6, seed=10 + step)
            expected = bb.denoise(context, x, row_cond + step_conds[step])
            assert torch.equal(default(x, step), expected)
            torch.testing.assert_close(fast(x, step), expected, atol=1e-5, rtol=1e-5)


def test_backbone_without_a_fast_path_samples_through_the_default() -> None:
    policy = state_policy().eval()
    batch, noise = state_batch(), fixed_noise(6)
    plain = policy.predict_action_chunk(batch, noise=noise, guidance_scale=1.5, precompute=False)
    policy.backbone.prepare_denoise = lambda *a: RiptBackbone.prepare_denoise(policy.backbone, *a)
    got = policy.predict_action_chunk(batch, noise=noise, guidance_scale=1.5)
    torch.testing.assert_close(got, plain, atol=1e-5, rtol=1e-5)


def test_euler_times_are_the_grid_of_lerobots_euler_integrate() -> None:
    """The precomputed time conditioning is looked up by flow time; off the grid it refuses with the fix."""
    seen: list[torch.Tensor] = []
    euler_integrate(lambda x, t: seen.append(t.clone()) or torch.zeros_like(x), torch.zeros(2, 1), 7)
    assert torch.equal(torch.stack([t[0] for t in seen]), euler_times(7))
    policy = state_policy().eval()
    context = policy.backbone.encode_observation(state_batch())
    fn = policy._velocity_fn(context, torch.full((6,), LABEL_GOOD), precompute=True)
    with pytest.raises(ValueError, match=r"Flow time 0\.33.*not one of the Euler grid.*precompute=False"):
        fn(fixed_noise(6), torch.full((6,), 0.33))


def test_precomputed_sampling_under_inference_mode() -> None:
    policy = state_policy().eval()
    batch, noise = state_batch(), fixed_noise(6)
    expected = policy.predict_action_chunk(batch, noise=noise, guidance_scale=1.5)
    with torch.inference_mode():
        got = policy.predict_action_chunk(batch, noise=noise, guidance_scale=1.5)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------ conditioning is behavioural
def test_label_conditioning_changes_the_sampled_actions() -> None:
    """Same observations, opposite actions: +1 on good frames, -1 on bad frames. Only the label tells them
    apart, so a policy that ignores it cannot get good > 0.5 and bad < -0.5 at once."""
    n, t_chunk = 32, 2
    cfg = RiptConfig(
        device="cpu",
        chunk_size=t_chunk,
        n_action_steps=t_chunk,
        hidden_dim=64,
        cond_dim=32,
        num_denoiser_layers=2,
        num_inference_steps=10,
        cfg_dropout_prob=0.2,
        objective="cfg",
        input_features={OBS_STATE: PolicyFeature(FeatureType.STATE, (4,))},
        output_features={ACTION: PolicyFeature(FeatureType.ACTION, (ACTION_DIM,))},
    )
    torch.manual_seed(0)
    policy = RiptPolicy(cfg).train()
    obs = torch.randn(n, 4)
    batch = {
        OBS_STATE: torch.cat([obs, obs]),
        ACTION: torch.cat([torch.ones(n, t_chunk, ACTION_DIM), -torch.ones(n, t_chunk, ACTION_DIM)]),
        "advantages": torch.cat([torch.ones(n), -torch.ones(n)]),
    }
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for _ in range(400):
        loss, _ = policy.forward(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()

    obs_batch = {OBS_STATE: obs}
    noise = torch.randn(n, t_chunk, ACTION_DIM, generator=torch.Generator().manual_seed(1))
    good_w1 = policy.predict_action_chunk(obs_batch, noise=noise, guidance_scale=1.0)
    good_w2 = policy.predict_action_chunk(obs_batch, noise=noise, guidance_scale=2.0)
    context = policy.backbone.encode_observation(obs_batch)
    bad_labels = torch.full((n,), LABEL_BAD)
    with torch.no_grad():
        bad = euler_integrate(lambda x, t: policy._velocity(context, x, t, bad_labels), noise, 10)
    assert good_w1.mean() > 0.5, float(good_w1.mean())
    assert bad.mean() < -0.5, float(bad.mean())
    assert good_w2.mean() >= good_w1.mean() - 0.05, (float(good_w2.mean()), float(good_w1.mean()))


# ------------------------------------------------------------------------------------------- validation
def test_unknown_objective_lists_valid_ones_and_suggests() -> None:
    with pytest.raises(
        ValueError, match=r"objective='cfgr' is not one of \['cfg', 'cfgrl', 'weighted', 'repel'\]"
    ) as e:
        tiny_config(objective="cfgr")
    assert "Did you mean 'cfg" in str(e.value)


def test_unknown_backbone_lists_valid_ones() -> None:
    expected = re.escape(f"backbone='smal' is not one of {list(BACKBONES)}.") + " Did you mean 'small'"
    with pytest.raises(ValueError, match=expected):
        tiny_config(backbone="smal")


def test_target_state_dim_zero_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"target_state_dim=0 must be >= 1, or None"):
        tiny_config(target_state_dim=0)
    with pytest.raises(ValueError, match=r"target_state_dim=0 must be >= 1"):
        StateDimAdapterStep(target_state_dim=0)


def test_negative_guidance_scale_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"guidance_scale=-0.5 must be >= 0"):
        tiny_config(guidance_scale=-0.5)
    policy = state_policy()
    with pytest.raises(ValueError, match=r"guidance_scale=-1.0 must be >= 0"):
        policy.predict_action_chunk(state_batch(), guidance_scale=-1.0)


def test_n_action_steps_above_chunk_size_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"n_action_steps=5 must be in \[1, chunk_size=4\]"):
        tiny_config(chunk_size=4, n_action_steps=5)


def test_dataset_without_action_is_rejected(tmp_path: Path) -> None:
    meta = LeRobotDatasetMetadata.create(
        "local/noact", 10, {OBS_STATE: vector_feature(3)}, root=tmp_path / "m", use_videos=False
    )
    with pytest.raises(ValueError, match=r"needs an 'action' output feature.*with an 'action' column"):
        make_policy(tiny_config(), ds_meta=meta)


def test_wrong_state_size_and_chunk_length_name_the_fix() -> None:
    policy = state_policy()
    batch = state_batch()
    with pytest.raises(ValueError, match=r"observation.state has 7 dims.*target_state_dim"):
        policy.forward({**batch, OBS_STATE: torch.randn(6, 7)})
    with pytest.raises(ValueError, match=r"chunk of 3 steps.*chunk_size=4.*action_delta_indices"):
        policy.forward({**batch, ACTION: torch.randn(6, 3, ACTION_DIM)})


def test_safe_copy_refuses_a_backbone_whose_repeat_context_returns_a_view() -> None:
    """`enable_cfg_safe_copy` catches a backbone whose repeat_context hands back the context's own storage
    (a view), which would let the two guidance branches alias; the check fires before any sampling."""
    policy = state_policy(seed=3, enable_cfg_safe_copy=True).eval()
    obs = {"observation.state": torch.randn(3, STATE_DIM)}
    policy.backbone.repeat_context = lambda ctx, n: ctx[:]  # a view of the same storage
    with pytest.raises(RuntimeError, match="share storage"):
        policy.predict_action_chunk(obs, guidance_scale=2.0)
    policy.backbone.repeat_context = lambda ctx, n: ctx.repeat(n, 1)  # new storage: accepted
    assert policy.predict_action_chunk(obs, guidance_scale=2.0).shape[0] == 3


# ------------------------------------------------------------------------------------ task conditioning
TASKS = ["push-v3", "reach-v3"]
PUSH, REACH = "Push the puck to a goal", "Reach a goal position"  # their MetaWorld instructions

TASK_CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file
    from lerobot.utils.import_utils import register_third_party_plugins
    register_third_party_plugins()
    from lerobot.policies.factory import get_policy_class

    d = Path(sys.argv[1])
    policy = get_policy_class("ript").from_pretrained(d).eval()
    io = load_file(d / "io.safetensors")
    tasks = json.loads((d / "tasks.json").read_text())
    with torch.no_grad():
        actions = policy.predict_action_chunk({"observation.state": io["obs"], "task": tasks}, noise=io["noise"])
    print(json.dumps({
        "max_abs_diff": float((actions - io["actions"]).abs().max()),
        "task_names": policy.config.task_names,
        "embedding": policy.backbone.task_embedding.tolist(),
    }))
    """
)


def test_a_single_task_policy_has_no_task_input_and_a_multi_task_one_starts_equal_to_it() -> None:
    """task_names=None adds no parameter; with task_names the only new tensor is the task embedding, zero at
    start and drawn from no RNG, so every other weight equals the single-task policy's of the same seed and so
    do the actions, for any task. A training step's gradient reaches the rows of the tasks in the batch only."""
    single = state_policy(seed=0, perturb=False)
    multi = state_policy(seed=0, perturb=False, task_names=TASKS + ["drawer-open-v3"])
    a, b = single.state_dict(), multi.state_dict()
    assert set(b) - set(a) == {"backbone.task_embedding"} and set(a) <= set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any("task" in k for k in a)
    assert torch.equal(b["backbone.task_embedding"], torch.zeros(3, 32))
    obs, noise = torch.randn(4, STATE_DIM), fixed_noise(4)
    with torch.no_grad():
        plain = single.predict_action_chunk({OBS_STATE: obs}, noise=noise)
        tasked = multi.predict_action_chunk(
            {OBS_STATE: obs, "task": [PUSH, REACH, "push-v3", REACH]}, noise=noise
        )
    assert torch.equal(plain, tasked)

    batch = {**state_batch(b=4), "task": [PUSH, "push-v3", REACH, PUSH]}
    loss, _ = multi.forward(batch)
    loss.backward()
    grad = multi.backbone.task_embedding.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0 and torch.equal(grad[2], torch.zeros(32))


def test_task_conditioning_gives_each_task_its_actions_and_reloads_in_a_fresh_process(tmp_path: Path) -> None:
    """Same observations, opposite actions for push-v3 (+1) and reach-v3 (-1): only the task tells them apart,
    and the trained policy samples push > 0.5, reach < -0.5. Saved, its config.json holds the task names, and
    LeRobot's loader in a fresh process rebuilds the embedding and samples the same actions."""
    n = 24
    policy = state_policy(seed=0, perturb=False, task_names=TASKS, cfg_dropout_prob=0.0).train()
    obs = torch.randn(n, STATE_DIM)
    batch = {
        OBS_STATE: torch.cat([obs, obs]),
        ACTION: torch.cat([torch.ones(n, CHUNK, ACTION_DIM), -torch.ones(n, CHUNK, ACTION_DIM)]),
        "task": [PUSH] * n + [REACH] * n,
    }
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = policy.forward(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    noise = fixed_noise(2 * n)
    tasks = [PUSH] * n + ["reach-v3"] * n  # a task's name and its instruction name the same row
    with torch.no_grad():
        actions = policy.predict_action_chunk({OBS_STATE: torch.cat([obs, obs]), "task": tasks}, noise=noise)
    assert actions[:n].mean() > 0.5 and actions[n:].mean() < -0.5, (
        float(actions[:n].mean()),
        float(actions[n:].mean()),
    )

    from safetensors.torch import save_file

    out = tmp_path / "model"
    policy.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["task_names"] == TASKS
    save_file({"obs": torch.cat([obs, obs]), "noise": noise, "actions": actions}, out / "io.safetensors")
    (out / "tasks.json").write_text(json.dumps(tasks))
    proc = subprocess.run(
        [sys.executable, "-c", TASK_CHILD, str(out)],
        cwd=tmp_path,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["task_names"] == TASKS and res["max_abs_diff"] < 1e-5
    assert torch.equal(torch.tensor(res["embedding"]), policy.backbone.task_embedding.detach())
    assert policy.backbone.task_embedding.abs().sum() > 0


def test_task_names_and_task_strings_are_checked_with_a_fix() -> None:
    from lerobot_ript.policy.configuration_ript import task_vocabulary

    assert task_vocabulary(["push-v3", "my task"]) == {"push-v3": 0, PUSH: 0, "my task": 1}
    with pytest.raises(ValueError, match=r"'push-v3' and 'push-back-v3' are both named by 'Push the puck"):
        tiny_config(task_names=["push-v3", "push-back-v3"])
    with pytest.raises(ValueError, match="more than once|both named by"):
        tiny_config(task_names=["push-v3", "push-v3"])
    with pytest.raises(ValueError, match=r"task_names=\[\] names no task"):
        tiny_config(task_names=[])
    policy = state_policy(task_names=TASKS).eval()
    obs = {OBS_STATE: torch.randn(2, STATE_DIM)}
    with pytest.raises(
        ValueError, match=r"conditioned on the tasks \['push-v3', 'reach-v3'\].*no 'task' key"
    ):
        policy.predict_action_chunk(obs)
    with pytest.raises(ValueError, match=r"'Open a drawer', which is none of this policy's tasks.*env.task"):
        policy.predict_action_chunk({**obs, "task": [PUSH, "Open a drawer"]})
    with pytest.raises(ValueError, match="3 strings for 2 rows"):
        policy.predict_action_chunk({**obs, "task": [PUSH] * 3})
    noise = fixed_noise(2)
    one = policy.predict_action_chunk({**obs, "task": REACH}, noise=noise)  # one string: every row
    assert torch.equal(one, policy.predict_action_chunk({**obs, "task": ["reach-v3"] * 2}, noise=noise))
