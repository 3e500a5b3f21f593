"""Data-parallel training on torch.distributed (DDP), launched with ``torchrun``.

    torchrun --nproc-per-node 2 -m tiedlm train configs/ptb/medium-real.toml

Every rank holds the whole model. The training split is batchified exactly as
in one process (B = ``data.batch_size`` contiguous streams); rank r of N trains
on streams [r·B/N, (r+1)·B/N). DistributedDataParallel averages the gradients,
and each rank's loss is averaged over its own B/N streams, so one step equals
one step of a single process with batch B. The dropout masks are drawn for all
B streams on every rank (the same generator everywhere) and each rank keeps its
rows, so the masks are the same as in one process, too.

Only rank 0 writes: run.json, metrics.jsonl, checkpoints, best/, final.json.
A mid-epoch checkpoint holds the recurrent state of all B streams (gathered to
rank 0), so a run can resume with any number of ranks, or in one process.
Every rank evaluates the validation split itself (the weights are identical),
so all ranks reach the same early-stopping decisions without communicating.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tiedlm.errors import TiedlmError


@dataclass
class World:
    """Where this process stands: rank, number of ranks, local rank (GPU index on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def shard(self, source: torch.Tensor) -> torch.Tensor:
        """This rank's streams of a batchified (T, B) tensor."""
        if not self.distributed:
            return source
        width = source.size(1) // self.size
        return source[:, self.rank * width : (self.rank + 1) * width]

    def batch_slice(self, batch_size: int) -> tuple[int, int, int] | None:
        """(start, stop, B): the rows of the batch-wide dropout masks this rank keeps."""
        if not self.distributed:
            return None
        width = batch_size // self.size
        return self.rank * width, (self.rank + 1) * width, batch_size

    def gather_state(self, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The recurrent state of all streams (every part is (layers, B/N, H) → (layers, B, H))."""
        if not self.distributed:
            return state
        gathered = []
        for part in state:
            pieces = [torch.empty_like(part) for _ in range(self.size)]
            dist.all_gather(pieces, part.contiguous())
            gathered.append(torch.cat(pieces, dim=1))
        return tuple(gathered)

    def local_state(self, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's streams of a whole-batch recurrent state."""
        if not self.distributed:
            return state
        width = state[0].size(1) // self.size
        return tuple(part[:, self.rank * width : (self.rank + 1) * width].contiguous() for part in state)


def world_from_env() -> World:
    """The world torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (one process without them)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise TiedlmError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
    return World(rank, size, local_rank)


def init_world(world: World, device: torch.device) -> None:
    """Join the process group: NCCL for CUDA, gloo for the CPU."""
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_batch(world: World, batch_size: int) -> None:
    if world.distributed and batch_size % world.size:
        raise TiedlmError(f"data.batch_size: {batch_size} streams cannot be split evenly over {world.size} ranks")
