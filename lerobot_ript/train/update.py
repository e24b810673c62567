"""One optimizer step of the ript policy (LeRobot's `update_policy` contract, with gradient accumulation)."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator


def update_step(
    policy: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    accelerator: Accelerator,
    grad_clip_norm: float,
) -> dict[str, float]:
    """Exactly ONE optimizer step over `gradient_accumulation_steps` micro-batches (already preprocessed).

    Gradients sync (and are clipped) only on the last micro-batch; the scheduler steps with the optimizer.
    Returns loss (mean over micro-batches), grad_norm, lr and update_s.
    """
    if len(micro_batches) != accelerator.gradient_accumulation_steps:
        raise ValueError(
            f"got {len(micro_batches)} micro-batches for gradient_accumulation_steps="
            f"{accelerator.gradient_accumulation_steps}; pass exactly one optimizer step's worth."
        )
    t0 = time.perf_counter()
    policy.train()
    losses, extra, grad_norm = [], {}, float("nan")
    for batch in micro_batches:
        with accelerator.accumulate(policy):
            with accelerator.autocast():
                loss, out = policy(batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = float(accelerator.clip_grad_norm_(policy.parameters(), grad_clip_norm))
            optimizer.step()
            if scheduler is not None and accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        extra = {k: v for k, v in out.items() if k != "loss"}
    if not accelerator.sync_gradients:
        raise RuntimeError("update_step ended without an optimizer step; check gradient_accumulation_steps.")
    return {
        "loss": sum(losses) / len(losses),
        "grad_norm": grad_norm,
        "lr": optimizer.param_groups[0]["lr"],
        "update_s": time.perf_counter() - t0,
        **extra,
    }
