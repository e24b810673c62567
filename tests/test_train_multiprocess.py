"""A real 2-process run on a CPU: `accelerate launch --config_file accelerate_configs/cpu.yaml` (two gloo ranks).

Why not `accelerate launch --cpu --num_processes 2 ...`? With Accelerate 1.15 it starts ONE process: run by hand
on this machine with the debug preset, it logged "Accelerate: 1 process(es), device cpu" and saved
train_config.json with "world_size": 1 and only ript_state_0.json / random_states_0.pkl, so a "2-process" test
would silently test a single process. cpu.yaml (MULTI_GPU + use_cpu: true) starts two ranks in one process
group; every multi-process test asserts the world size it got.
"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from test_train import ckpt, run_ok, subprocess_env, two_rank_train_cmd

from lerobot_ript.train.loop import CHECKSUM_ENV_VAR, param_checksum


@pytest.mark.multiprocess
def test_two_rank_cpu_run_trains_one_model_on_both_ranks(tmp_path):
    out = tmp_path / "out"
    cmd = two_rank_train_cmd(out, "--eval.eval_episodes=2")
    log = run_ok(cmd, subprocess_env(tmp_path, **{CHECKSUM_ENV_VAR: "1"}), tmp_path / "train.log")

    assert log.count("Accelerate: 2 process(es)") == 1  # said by the main process only
    pretrained = ckpt(out, "last")
    assert json.loads((pretrained / "train_config.json").read_text())["world_size"] == 2
    state = out / "checkpoints" / "last" / "training_state"
    for rank in (0, 1):  # both ranks took part in the collective checkpoint
        assert (state / f"ript_state_{rank}.json").exists() and (state / f"random_states_{rank}.pkl").exists()
        assert json.loads((state / f"ript_state_{rank}.json").read_text())["iteration"] == 2
    # the eval episodes were split across the ranks and summed: 2 held-out episodes in all
    assert json.loads((state / "ript_state_0.json").read_text())["history"][-1]["n"] == 2
    # every rank ends with the parameters that the checkpoint holds (DDP kept them in sync)
    saved = param_checksum(load_file(pretrained / "model.safetensors"))
    per_rank = [(out / f"param_checksum_rank{r}.txt").read_text().strip() for r in (0, 1)]
    assert per_rank == [saved, saved]
