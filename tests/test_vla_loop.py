"""The RIPT loop (`lerobot_ript.train`) with a wrapped tiny VLA on `metaworld_state` with camera images: one
iteration in process per backbone, and a 2-rank DDP run (`accelerate launch`, two gloo ranks) for pi05."""

from __future__ import annotations

import json

import pytest
import torch
import vla_fixtures as vf
from safetensors.torch import load_file
from test_train import (
    DEBUG_YAML,
    TINY,
    ckpt,
    run_ok,
    spy_on_loop,
    subprocess_env,
    train_in_process,
    two_rank_train_cmd,
)
from test_vla_cli import tiny_vla_env

KINDS = ("pi0", "pi05", "smolvla")
INSTRUCTION = "Push the puck to a goal"


def vla_overrides(kind: str, base) -> list[str]:
    return [
        f"--policy.backbone={kind}",
        f"--policy.backbone_path={base}",
        "--policy.chunk_size=8",
        "--policy.n_action_steps=4",
        "--policy.num_inference_steps=3",
        "--env.obs_type=state_pixels",
        "--env.cameras=corner2",
        "--env.image_size=32",
        "--env.episode_length=12",
        "--data.good_share=0.5",
        "--data.bad_share=0.5",
        "--advantage.estimator=success",  # failures are labelled bad, so both labels train
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_one_ript_iteration_with_a_wrapped_vla(kind, tmp_path, monkeypatch, fresh_accelerate_state):
    pytest.importorskip("metaworld")
    from lerobot_ript.policy.modeling_ript import RiptPolicy
    from lerobot_ript.train.cli import parse_config

    vf.install_tiny_vla_sizes()
    base = vf.make_tiny_vla_checkpoint(kind, tmp_path / "base")
    out = tmp_path / "out"
    cfg = parse_config(
        ["--config_path", str(DEBUG_YAML), f"--output_dir={out}", *TINY, "--num_train_steps=1"]
        + vla_overrides(kind, base)
        + ["--optim.sft_steps=1", "--data.num_demos=1"]
    )
    spy = spy_on_loop(monkeypatch)
    run = train_in_process(cfg)
    seen = spy.batches

    assert type(run.model.backbone).__name__ == {"pi0": "Pi0Backbone", "pi05": "Pi05Backbone"}.get(
        kind, "SmolVLABackbone"
    )
    assert len(seen) == 2  # 1 SFT step, 1 RIPT step
    for batch in seen:  # the VLA's processors tokenised the instruction of every row
        assert "observation.language.tokens" in batch  # pi05 writes the state into the prompt too
        assert batch["task"] and all(INSTRUCTION in task for task in batch["task"])
        assert batch["observation.images.corner2"].shape[-2:] == (32, 32)
    labels = torch.sign(seen[-1]["advantages"])
    assert (labels > 0).any() and (labels < 0).any()  # demos (good) and failed rollouts (bad)
    saved = ckpt(out, "last")
    config = json.loads((saved / "config.json").read_text())
    assert config["backbone"] == kind and config["backbone_config"]["type"] == kind
    state = load_file(saved / "model.safetensors")
    trained = [k for k in state if "label" in k and k.endswith("weight") and state[k].abs().sum() > 0]
    assert any("film" in k or "gate" in k or "action_time" in k for k in trained), sorted(state)[:5]
    reloaded = RiptPolicy.from_pretrained(saved)  # architecture from backbone_config, weights from the run
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, state[name]), name
    history = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert history  # the metrics file has the final line


@pytest.mark.multiprocess
def test_two_rank_ddp_run_with_a_wrapped_vla(tmp_path):
    pytest.importorskip("metaworld")
    vf.install_tiny_vla_sizes()
    base = vf.make_tiny_vla_checkpoint("pi05", tmp_path / "base")
    out = tmp_path / "out"
    cmd = two_rank_train_cmd(out, "--num_train_steps=1", *vla_overrides("pi05", base))
    env = subprocess_env(tmp_path)
    env["PYTHONPATH"] = tiny_vla_env(tmp_path)["PYTHONPATH"]  # the tiny-size patch in every rank
    log = run_ok(cmd, env, tmp_path / "train.log")
    assert log.count("Accelerate: 2 process(es)") == 1
    pretrained = ckpt(out, "last")
    assert json.loads((pretrained / "train_config.json").read_text())["world_size"] == 2
    assert json.loads((pretrained / "config.json").read_text())["backbone"] == "pi05"
    state = out / "checkpoints" / "last" / "training_state"
    for rank in (0, 1):
        assert json.loads((state / f"ript_state_{rank}.json").read_text())["iteration"] == 1


def test_a_checkpoint_that_does_not_fit_the_env_stops_before_any_demo_is_recorded(
    tmp_path, fresh_accelerate_state
):
    import lerobot_ript.train.loop as loop
    from lerobot_ript.train.cli import parse_config

    vf.install_tiny_vla_sizes()
    base = vf.make_tiny_vla_checkpoint("pi05", tmp_path / "base", chunk_size=6)
    out = tmp_path / "out"
    cfg = parse_config(
        ["--config_path", str(DEBUG_YAML), f"--output_dir={out}", *TINY, *vla_overrides("pi05", base)]
    )
    with pytest.raises(ValueError, match=r"--policy.chunk_size=6"):
        loop.train(cfg, loop.build_accelerator(cfg))
    assert not (out / "demos").exists()
    other_cam = parse_config(
        ["--config_path", str(DEBUG_YAML), f"--output_dir={out}", *TINY, *vla_overrides("pi05", base)]
        + ["--policy.chunk_size=6", "--policy.n_action_steps=4", "--env.cameras=topview"]
    )
    with pytest.raises(ValueError, match=r"cameras.*corner2"):
        loop.train(other_cam, loop.build_accelerator(other_cam))
    assert not (out / "demos").exists()
