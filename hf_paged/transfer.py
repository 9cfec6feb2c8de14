"""Host <-> device copies that never make the host wait for the GPU.

The engine prepares step N+1 on the host while the GPU runs step N (DESIGN.md: no host synchronisation in the
step loop beyond what sampling needs). `torch.tensor(values, device="cuda")` would copy from pageable memory and
wait for the stream; these helpers go through pinned memory with `non_blocking=True` instead.
NOTE: torch's caching host allocator keeps a pinned buffer alive until the copies that read it have run, so the
temporary pinned tensors here are safe to drop at once.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list / numpy array as a tensor on `device`, copied asynchronously when `device` is a GPU."""
    host = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if host.dtype != dtype:
        host = host.to(dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to (pinned) host memory; valid once the stream has passed this point."""
    if not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def block_table_rows(tables: list[list[int]], min_width: int = 1) -> np.ndarray:
    """Block tables as one zero-padded (rows, longest or min_width) int32 array."""
    rows = np.zeros((len(tables), max([min_width] + [len(ids) for ids in tables])), dtype=np.int32)
    for row, ids in enumerate(tables):
        rows[row, : len(ids)] = ids
    return rows
