"""The ript processors against LeRobot's real pipelines: the RIPT batch keys survive the preprocessor (fresh,
saved and reloaded), and the state-dimension adapter pads / truncates and is saved with the pipeline.

The trap these tests document: LeRobot's default `batch_to_transition` keeps only the batch keys it knows.
`advantages` and `init_hash` vanish silently, and the policy then reads every frame as "good" (plain flow
matching). Our pipelines use `ript_batch_to_transition`; a converter is not serialised, so a reloaded
pipeline (including `make_pre_post_processors(cfg, pretrained_path=...)`, which `lerobot-train` uses with
`--policy.path`) needs `attach_ript_converter`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset
from lerobot.configs import FeatureType, PipelineFeatureType, PolicyFeature
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.policies.factory import make_policy, make_pre_post_processors
from lerobot.processor import PolicyProcessorPipeline, TransitionKey
from lerobot.processor.converters import batch_to_transition, create_transition, transition_to_batch
from lerobot.utils.constants import ACTION, OBS_STATE

from lerobot_ript.policy.configuration_ript import RiptConfig
from lerobot_ript.policy.modeling_ript import RiptPolicy
from lerobot_ript.policy.processor_ript import (
    RIPT_EXTRA_KEYS,
    StateDimAdapterStep,
    attach_ript_converter,
    ript_batch_to_transition,
)

ADVANTAGES = [0.5, -1.0, 0.0]  # one good, one bad, one null episode
FRAMES = 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(**overrides) -> RiptConfig:
    kwargs = dict(
        device="cpu", chunk_size=4, n_action_steps=2, hidden_dim=32, cond_dim=16, num_inference_steps=3
    )
    kwargs.update(overrides)
    return RiptConfig(**kwargs)


def open_with_chunks(root: Path, cfg: RiptConfig) -> LeRobotDataset:
    meta = LeRobotDatasetMetadata("local/tiny", root=root)
    return LeRobotDataset(
        "local/tiny", root=root, delta_timestamps=resolve_delta_timestamps(cfg, meta), video_backend="pyav"
    )


def first_batch(ds: LeRobotDataset, batch_size: int) -> dict:
    return next(iter(torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)))


@pytest.fixture(scope="module")
def adv_dataset(tmp_path_factory) -> Path:
    """3 episodes x 10 frames, state 6, with `advantages` and `init_hash` columns."""
    root = tmp_path_factory.mktemp("adv") / "ds"
    make_tiny_dataset(root, state_dim=6, episodes=3, frames=FRAMES, advantages=ADVANTAGES)
    return root


@pytest.fixture
def policy_and_processors(adv_dataset: Path):
    cfg = tiny_config(cfg_dropout_prob=0.0)
    meta = LeRobotDatasetMetadata("local/tiny", root=adv_dataset)
    policy = make_policy(cfg, ds_meta=meta)
    pre, post = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    raw = first_batch(open_with_chunks(adv_dataset, cfg), batch_size=3 * FRAMES)
    return cfg, policy, pre, post, raw


def assert_ript_keys_equal(processed: dict, raw: dict) -> None:
    for key in ("advantages", "init_hash"):
        assert key in processed, f"'{key}' was dropped by the preprocessor"
        assert torch.equal(torch.as_tensor(processed[key]).cpu(), raw[key]), key


def label_shares(policy: RiptPolicy, batch: dict) -> tuple[float, float]:
    policy.eval()
    with torch.no_grad():
        _, metrics = policy.forward(batch)
    return metrics["share_good"], metrics["share_bad"]


# ------------------------------------------------------------------------------------- RIPT keys survive
def test_ript_keys_reach_forward_through_the_real_preprocessor(policy_and_processors) -> None:
    cfg, policy, pre, _, raw = policy_and_processors
    assert raw["advantages"].shape == (3 * FRAMES,)
    assert sorted(set(raw["init_hash"].tolist())) == [1000, 1001, 1002]
    processed = pre(raw)
    assert_ript_keys_equal(processed, raw)
    # forward reads them: labels follow the sign of each episode's advantage (1/3 good, 1/3 bad, 1/3 null).
    good, bad = label_shares(policy, processed)
    assert good == pytest.approx(1 / 3) and bad == pytest.approx(1 / 3)


def test_lerobot_default_converter_drops_ript_keys(policy_and_processors) -> None:
    """The trap: the same steps with LeRobot's `batch_to_transition` lose the keys and every frame trains as
    'good' without any error."""
    _, policy, pre, _, raw = policy_and_processors
    assert all(k not in transition_to_batch(batch_to_transition(raw)) for k in RIPT_EXTRA_KEYS)
    assert all(k in transition_to_batch(ript_batch_to_transition(raw)) for k in ("advantages", "init_hash"))
    default = PolicyProcessorPipeline(
        steps=pre.steps, to_transition=batch_to_transition, to_output=transition_to_batch
    )
    processed = default(raw)
    assert "advantages" not in processed and "init_hash" not in processed
    # a policy that make_policy built on this dataset refuses such a batch instead of training every frame as good
    with pytest.raises(ValueError, match=r"labels its frames with 'advantages'.*attach_ript_converter"):
        label_shares(policy, processed)


def test_dataset_feature_keys_live_in_the_process_only(policy_and_processors, tmp_path: Path) -> None:
    """What make_policy told the config about the dataset is not saved: a reloaded policy does not refuse
    batches without advantages (a plain LeRobotDataset still trains), until make_policy tells it again."""
    cfg, policy, _, _, raw = policy_and_processors
    policy.save_pretrained(tmp_path)
    assert "_dataset_feature_keys" not in (tmp_path / "config.json").read_text()
    no_adv = {k: v for k, v in raw.items() if k not in RIPT_EXTRA_KEYS}
    assert label_shares(RiptPolicy.from_pretrained(tmp_path), no_adv) == (1.0, 0.0)


def test_ript_keys_survive_a_saved_and_reloaded_pipeline(policy_and_processors, tmp_path: Path) -> None:
    cfg, policy, pre, post, raw = policy_and_processors
    pre.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)
    expected = pre(raw)

    reloaded = PolicyProcessorPipeline.from_pretrained(tmp_path, config_filename="policy_preprocessor.json")
    assert "advantages" not in reloaded(raw)  # the converter is not serialised with the pipeline...
    attach_ript_converter(reloaded)  # ...so it has to be attached again
    processed = reloaded(raw)
    assert_ript_keys_equal(processed, raw)
    for key in (OBS_STATE, ACTION):
        torch.testing.assert_close(processed[key], expected[key])
    assert label_shares(policy, processed) == pytest.approx((1 / 3, 1 / 3))

    # LeRobot's factory (what lerobot-train does with --policy.path) has the same trap and the same fix.
    via_factory, _ = make_pre_post_processors(cfg, pretrained_path=str(tmp_path))
    assert "advantages" not in via_factory(raw)
    assert_ript_keys_equal(attach_ript_converter(via_factory)(raw), raw)


def test_advantage_weights_survive_too(policy_and_processors) -> None:
    _, _, pre, _, raw = policy_and_processors
    raw = dict(raw, advantage_weights=raw["advantages"].abs())
    processed = pre(raw)
    assert torch.equal(processed["advantage_weights"], raw["advantage_weights"])


# ---------------------------------------------------------------------------------- StateDimAdapterStep
def run_step(step: StateDimAdapterStep, obs: dict) -> dict:
    return step(create_transition(observation=obs))[TransitionKey.OBSERVATION]


@pytest.mark.parametrize("shape", [(6,), (3, 6), (3, 2, 6)], ids=["S", "BxS", "BxTxS"])
def test_state_adapter_pads_with_zeros(shape: tuple[int, ...]) -> None:
    state = torch.randn(shape)
    out = run_step(StateDimAdapterStep(target_state_dim=10), {OBS_STATE: state})[OBS_STATE]
    assert out.shape == (*shape[:-1], 10)
    torch.testing.assert_close(out[..., :6], state)
    assert torch.count_nonzero(out[..., 6:]) == 0


@pytest.mark.parametrize("shape", [(14,), (3, 14)], ids=["S", "BxS"])
def test_state_adapter_truncates(shape: tuple[int, ...]) -> None:
    state = torch.randn(shape)
    out = run_step(StateDimAdapterStep(target_state_dim=10), {OBS_STATE: state})[OBS_STATE]
    assert out.shape == (*shape[:-1], 10)
    torch.testing.assert_close(out, state[..., :10])


def test_state_adapter_off_when_none_and_leaves_other_keys() -> None:
    state, image = torch.randn(3, 6), torch.rand(3, 3, 8, 8)
    obs = {OBS_STATE: state, "observation.images.top": image}
    out = run_step(StateDimAdapterStep(target_state_dim=None), obs)
    assert out[OBS_STATE] is state and out["observation.images.top"] is image
    out = run_step(StateDimAdapterStep(target_state_dim=4), obs)
    assert out["observation.images.top"] is image and out[OBS_STATE].shape == (3, 4)
    assert obs[OBS_STATE] is state  # the caller's observation dict is not rewritten
    # No state at all (an image-only robot): nothing to adapt.
    assert run_step(StateDimAdapterStep(target_state_dim=4), {"observation.images.top": image}).keys() == {
        "observation.images.top"
    }


def test_state_adapter_transforms_features() -> None:
    features = {PipelineFeatureType.OBSERVATION: {OBS_STATE: PolicyFeature(FeatureType.STATE, (6,))}}
    out = StateDimAdapterStep(target_state_dim=10).transform_features(features)
    assert out[PipelineFeatureType.OBSERVATION][OBS_STATE].shape == (10,)


def test_state_adapter_saved_and_reloaded_with_the_pipeline(adv_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_config(target_state_dim=10)
    meta = LeRobotDatasetMetadata("local/tiny", root=adv_dataset)
    policy = make_policy(cfg, ds_meta=meta)
    pre, post = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    policy.save_pretrained(tmp_path)
    pre.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)

    pre2, _ = make_pre_post_processors(cfg, pretrained_path=str(tmp_path))
    # reloaded: the dataset's advantages must reach forward (it refuses otherwise)
    attach_ript_converter(pre2)
    steps = [s for s in pre2.steps if isinstance(s, StateDimAdapterStep)]
    assert len(steps) == 1 and steps[0].target_state_dim == 10
    raw = first_batch(open_with_chunks(adv_dataset, cfg), batch_size=8)
    out = pre2(raw)
    assert out[OBS_STATE].shape == (8, 10)
    torch.testing.assert_close(out[OBS_STATE], pre(raw)[OBS_STATE])
    assert torch.count_nonzero(out[OBS_STATE][:, 6:]) == 0
    assert torch.isfinite(policy.forward(out)[0])


@pytest.mark.parametrize("state_dim", [6, 14])
def test_policy_with_target_state_dim_trains_on_other_state_sizes(tmp_path: Path, state_dim: int) -> None:
    make_tiny_dataset(tmp_path / "ds", state_dim=state_dim, episodes=2, frames=12, advantages=[1.0, -1.0])
    cfg = tiny_config(target_state_dim=10)
    meta = LeRobotDatasetMetadata("local/tiny", root=tmp_path / "ds")
    torch.manual_seed(0)
    policy = make_policy(cfg, ds_meta=meta)
    assert policy.backbone.state_proj[0].in_features == 10
    pre, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    loader = torch.utils.data.DataLoader(open_with_chunks(tmp_path / "ds", cfg), batch_size=8, shuffle=True)
    batches = [pre(b) for b in loader]
    assert all(b[OBS_STATE].shape[-1] == 10 for b in batches)

    # Without the adapter the raw state is refused with the fix in the message.
    with pytest.raises(ValueError, match=rf"has {state_dim} dims.*expects 10.*target_state_dim"):
        policy.forward({**batches[0], OBS_STATE: torch.randn(8, state_dim)})

    state_proj_before = policy.backbone.state_proj[0].weight.detach().clone()
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        for batch in batches:
            loss, _ = policy.forward(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(policy.backbone.state_proj[0].weight, state_proj_before)
    assert sum(losses[-len(batches) :]) < sum(losses[: len(batches)])


@pytest.mark.parametrize("dim", [3, 5, 7])
def test_pad_or_truncate_numpy_and_torch_agree(dim):
    """One helper serves the dataset (numpy) and the processor step (torch): same values, same type back."""
    import numpy as np

    from lerobot_ript.shapes import pad_or_truncate

    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    out_np, out_t = pad_or_truncate(x, dim), pad_or_truncate(torch.from_numpy(x), dim)
    assert isinstance(out_np, np.ndarray) and isinstance(out_t, torch.Tensor)
    assert out_np.shape == (2, 3, dim) and out_np.dtype == np.float32
    np.testing.assert_array_equal(out_np, out_t.numpy())
    np.testing.assert_array_equal(out_np[..., : min(dim, 5)], x[..., : min(dim, 5)])
    assert not out_np[..., 5:].any()  # padding is zeros


# ------------------------------------------------------------------------------------- state std floor
def test_state_std_min_floors_the_state_std_and_is_saved_with_the_pipeline(
    adv_dataset: Path, tmp_path
) -> None:
    """A state dim with a near-zero std in the stats is normalised with the floor instead (z = (x - mean) /
    max(std, floor)); dims above the floor and the action stats are untouched; the dataset's stats object is
    not modified; the floored stats are what the saved pipeline reloads."""
    meta = LeRobotDatasetMetadata("local/tiny", root=adv_dataset)
    stats = {k: {s: torch.as_tensor(v).clone() for s, v in d.items()} for k, d in meta.stats.items()}
    stats[OBS_STATE]["std"][0] = 1e-4  # a dim that barely moved in the demos
    stats[OBS_STATE]["std"][1] = 2.0  # a dim above the floor
    original = stats[OBS_STATE]["std"].clone()
    state = stats[OBS_STATE]["mean"].clone()
    state[0] += 0.05
    state[1] += 0.5

    plain_cfg = tiny_config()
    floored_cfg = tiny_config(state_std_min=0.1)
    for cfg in (plain_cfg, floored_cfg):
        make_policy(cfg, ds_meta=meta)  # fills the config's input / output features from the dataset
    plain, _ = make_pre_post_processors(plain_cfg, dataset_stats=stats)
    floored, post = make_pre_post_processors(floored_cfg, dataset_stats=stats)
    torch.testing.assert_close(stats[OBS_STATE]["std"], original)  # the caller's stats are not changed
    batch = {OBS_STATE: state[None].float()}
    z_plain = plain(dict(batch))[OBS_STATE][0]
    z_floor = floored(dict(batch))[OBS_STATE][0]
    assert z_plain[0] > 400  # 0.05 / 1e-4: what a rollout's puck rotation looked like without the floor
    torch.testing.assert_close(z_floor[0], torch.tensor(0.5))  # 0.05 / 0.1
    torch.testing.assert_close(z_floor[1], torch.tensor(0.25))  # 0.5 / 2.0, unchanged
    torch.testing.assert_close(z_plain[1], z_floor[1])

    floored.save_pretrained(tmp_path)
    post.save_pretrained(tmp_path)
    reloaded, _ = make_pre_post_processors(floored_cfg, pretrained_path=str(tmp_path))
    torch.testing.assert_close(reloaded(dict(batch))[OBS_STATE][0], z_floor)


def test_state_std_min_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="state_std_min=-1.0 must be >= 0"):
        tiny_config(state_std_min=-1.0).validate_hyperparameters()
