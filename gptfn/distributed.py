"""Data-parallel training: the process group that torchrun launches, and the DDP wrapper.

``torchrun --nproc_per_node N -m gptfn train ...`` starts N processes, each with RANK,
WORLD_SIZE and LOCAL_RANK in its environment. ``process_group(device)`` joins them into one
group for the block (nccl on CUDA, gloo on the CPU), puts each CUDA process on the GPU its
LOCAL_RANK names, and says where this process stands; a plain ``gptfn train`` (no
WORLD_SIZE) is one process of one and starts no group. ``data_parallel`` wraps the model
so that backward averages the gradients over the processes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class Process:
    """This process's place in a run: its device, its rank and how many processes train."""

    device: torch.device
    rank: int
    world_size: int


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[Process]:
    """The process group torchrun set up the environment for, held for the block."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Process(device, 0, world)
        return
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":  # one GPU per process: the one torchrun numbered for this node
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        yield Process(device, rank, world)
    finally:
        dist.destroy_process_group()


def data_parallel(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """``model`` as the optimizer steps call it: itself for one process, else DDP around it
    (which reads the same parameters, so ``model`` still evaluates, samples and saves)."""
    if world_size <= 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
