"""DDP plumbing for `torchrun --nproc_per_node=N -m lth.train ...`: gloo on CPU, nccl on GPU.
Without torchrun (WORLD_SIZE unset or 1) every helper is a no-op."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """rank 0's object on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def same_everywhere(self, value: float) -> bool:
        if not self.enabled:
            return True
        t = torch.tensor([value, -value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0] == value and -t[1] == value)

    def average_buffers(self, model: torch.nn.Module):
        """Batch-norm running statistics averaged over ranks (buffers are not broadcast every
        step: the sparse index buffers never change)."""
        if not self.enabled:
            return
        for name, buf in model.named_buffers():
            if buf.is_floating_point() and ("running_mean" in name or "running_var" in name):
                dist.all_reduce(buf)
                buf.div_(self.world)


def setup(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                local_world=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
