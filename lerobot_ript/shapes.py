"""Shape helpers shared by the data and policy packages (imports nothing of ours)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def pad_or_truncate[ArrayT: (np.ndarray, torch.Tensor)](x: ArrayT, dim: int) -> ArrayT:
    """Zero-pad or truncate the last dimension of `x` (..., S) to `dim`; numpy arrays and tensors alike."""
    size = x.shape[-1]
    if size == dim:
        return x
    if size > dim:
        return x[..., :dim]
    if isinstance(x, np.ndarray):
        return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dim - size)])
    return F.pad(x, (0, dim - size))
