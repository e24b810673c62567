"""FSDP2 sharding of a wrapped VLA on a CPU: two real gloo ranks (torch.distributed.run), the whole `ript` policy
as one FSDP unit, as `accelerate_configs/fsdp.yaml` (NO_WRAP) shards it.

Accelerate 1.16 cannot run FSDP on a CPU (a CPU run is MULTI_CPU, and FSDP is only set up for GPU-like
distributed types), so this drives torch's `fully_shard` directly: what it checks is that the policy shards,
trains and gathers back to a full LeRobot checkpoint. The Accelerate FSDP launch itself needs GPUs.

Why one unit and not one per decoder layer: LeRobot's pi0 / pi05 training pass (`compute_layer_complete` in
modeling_pi05.py) calls each decoder layer's submodules directly, never the layer's `forward`, so a per-layer
FSDP unit is never gathered ("aten.mul.Tensor got mixed torch.Tensor and DTensor", reproduced here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import vla_fixtures as vf

TESTS = Path(__file__).parent
KINDS = ("pi0", "pi05", "smolvla")
STEPS = 2

WORKER = """
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
import vla_fixtures as vf; vf.install_tiny_vla_sizes()
import test_vla_backbones as t
from pathlib import Path
from torch.distributed.fsdp import fully_shard
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(1234)  # the label embedding's random init, as in the reference run
policy, pre, post = t.wrap({kind!r}, Path({ckpt!r}), cfg_dropout_prob=0.0)
total = sum(p.numel() for p in policy.parameters())
fully_shard(policy)
local = sum(p.to_local().numel() for p in policy.parameters())
opt = torch.optim.SGD(policy.parameters(), lr=0.05)  # linear in the gradient: comparable across runs
batch = t.train_batch(pre)  # the same batch on both ranks: FSDP's averaged gradient equals one process's
losses = []
policy.train()
for _ in range({steps}):
    torch.manual_seed(0)  # the same noise and flow time on both ranks and in the reference run
    loss, _ = policy(batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
full = {{k: v.clone() for k, v in full.items()}}  # views of one buffer: own them (as lerobot_ript.train does)
if rank == 0:
    policy.save_pretrained({out!r}, state_dict=full)
print("RESULT " + json.dumps(dict(rank=rank, world=world, total=total, local=local, losses=losses)), flush=True)
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)  # a gloo rank can abort in interpreter teardown ("terminate called without an active exception")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_two_ranks_shard_train_and_gather_a_wrapped_vla(kind, tmp_path):
    import test_vla_backbones as t

    from lerobot_ript.policy.modeling_ript import RiptPolicy

    vf.install_tiny_vla_sizes()
    ckpt = vf.make_tiny_vla_checkpoint(kind, tmp_path / "base")
    out = tmp_path / "fsdp_ckpt"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS), kind=kind, ckpt=str(ckpt), out=str(out), steps=STEPS))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    proc = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = sorted(
        (json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line),
        key=lambda r: r["rank"],
    )
    assert [r["world"] for r in results] == [2, 2] and [r["rank"] for r in results] == [0, 1]
    total = results[0]["total"]
    # each rank holds about half of every parameter (dim 0 split in two)
    assert sum(r["local"] for r in results) == total and all(r["local"] < 0.6 * total for r in results)
    assert results[0]["losses"] == results[1]["losses"]

    # the same steps in one process give the same parameters as the two sharded ranks
    torch.manual_seed(1234)
    policy, pre, _ = t.wrap(kind, ckpt, cfg_dropout_prob=0.0)
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)  # linear in the gradient: comparable across runs
    batch = t.train_batch(pre)
    policy.train()
    for step in range(STEPS):
        torch.manual_seed(0)
        loss, _ = policy(batch)
        assert loss.item() == pytest.approx(results[0]["losses"][step], rel=1e-5, abs=1e-6)
        loss.backward()
        opt.step()
        opt.zero_grad()
    # the gathered checkpoint is a full ript policy (the reload is strict)
    gathered = RiptPolicy.from_pretrained(out)
    reference = policy.state_dict()
    for name, value in gathered.state_dict().items():
        torch.testing.assert_close(value, reference[name], atol=1e-5, rtol=1e-4, msg=name)
    trained = [n for n, p in gathered.named_parameters() if "label" in n and p.abs().sum() > 0]
    assert trained, "the label path was not trained under FSDP"
