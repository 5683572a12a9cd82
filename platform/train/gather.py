"""Collect per-rank rows on rank 0, in rank order: the collective of evaluation on every rank.

Each rank holds a float64 block (n_r, F) (n_r may differ, and may be 0); rank 0 receives their
concatenation (sum n_r, F). Two collectives: an all-gather of (n_r, F, failed) so every rank learns
the sizes (and whether one rank could not compute its block), then a `gather` of the blocks padded
to the largest n_r (torch.distributed's gather takes equal shapes). `gather`, not `all_gather`: only
rank 0 computes the metric, and a 50k x 2048 float64 block is 800 MB that the other ranks need not hold.

A rank that failed (sampling or the feature network raised) still joins the first collective,
so no rank waits forever for it: every rank then raises.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


class RankFailed(RuntimeError):
    """Another rank could not compute its share (its own log has the cause)."""


def block_range(num_items: int, block: int, rank: int, world_size: int) -> range:
    """The blocks of `block` items (the last may be short) this rank owns: a contiguous run of
    ceil(num_items / block) blocks split as evenly as possible, so concatenating the ranks' shares in
    rank order gives item order, and each block is computed whole whatever the world size."""
    blocks = -(-num_items // block)
    return range(blocks * rank // world_size, blocks * (rank + 1) // world_size)


def gather_rows(local: np.ndarray | None, *, rank: int, world_size: int, device: torch.device,
                error: BaseException | None = None) -> np.ndarray | None:
    """Rank 0: every rank's rows concatenated in rank order, (sum n_r, F) float64; others: None.

    local: this rank's rows (n_r, F), or None with `error` set when this rank failed (it is re-raised
    here, after the others have been told). device: where the collective's tensors live (the CUDA
    device under NCCL, the CPU under gloo)."""
    if world_size == 1 or not dist.is_initialized():
        if error is not None:
            raise error
        return np.asarray(local, dtype=np.float64)
    rows = None if local is None else torch.as_tensor(np.asarray(local, dtype=np.float64))
    shape = torch.tensor([0, 0, 1] if rows is None else [rows.shape[0], rows.shape[1], 0], dtype=torch.int64,
                         device=device)
    shapes = [torch.zeros_like(shape) for _ in range(world_size)]
    dist.all_gather(shapes, shape)
    table = torch.stack(shapes).cpu().tolist()  # (world, 3): rows, width, failed
    failed = [r for r, (_, _, f) in enumerate(table) if f]
    if failed:
        if error is not None:
            raise error
        raise RankFailed(f"evaluation failed on rank(s) {failed}; see their log for the cause")
    widths = {w for n, w, _ in table if n}
    assert len(widths) <= 1, f"ranks computed rows of different widths {sorted(widths)}"
    width = widths.pop() if widths else 0
    most = max(n for n, _, _ in table)
    padded = torch.zeros((most, width), dtype=torch.float64, device=device)
    if rows is not None and rows.shape[0]:
        padded[:rows.shape[0]] = rows.to(device)
    blocks = [torch.empty_like(padded) for _ in range(world_size)] if rank == 0 else None
    dist.gather(padded, blocks, dst=0)
    if rank != 0:
        return None
    return torch.cat([b[:n] for b, (n, _, _) in zip(blocks, table)]).cpu().numpy()  # (sum n_r, width)
