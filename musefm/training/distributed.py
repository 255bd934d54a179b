"""torchrun support: one code path for 1 and N processes (gloo on CPU, NCCL on GPU).

Only rank 0 writes files and logs. ``shutdown`` ends with a barrier and destroys the process group:
without it gloo workers can abort at interpreter exit ("terminate called without an active
exception").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(requested)


def init_distributed(requested_device: str = "auto") -> DistributedContext:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistributedContext(rank, world_size, local_rank, device)


def barrier(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.barrier()


def mean_across_ranks(values: dict[str, float], context: DistributedContext, weights_key: str | None = None) -> dict:
    """Average metrics over ranks (token-weighted when ``weights_key`` names a count)."""
    if not context.enabled:
        return values
    keys = sorted(values)
    weight = float(values.get(weights_key, 1.0)) if weights_key else 1.0
    tensor = torch.tensor([float(values[k]) * (1.0 if k == weights_key else weight) for k in keys] + [weight],
                          dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    total_weight = float(tensor[-1])
    return {k: float(tensor[i]) if k == weights_key else float(tensor[i]) / total_weight for i, k in enumerate(keys)}


def broadcast_flags(context: DistributedContext, *flags: bool) -> tuple[bool, ...]:
    """Each flag true on every rank if it is true on any (e.g. stop requested by one rank); one
    collective for all of them."""
    if not context.enabled:
        return tuple(bool(flag) for flag in flags)
    tensor = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=context.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(bool(value > 0) for value in tensor.tolist())


def shutdown(context: DistributedContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
