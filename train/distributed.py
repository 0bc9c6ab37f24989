"""Process-group setup from torchrun's environment (or a single process without one), via DeepSpeed's comm.

The same call serves 64 GPUs (NCCL) and one CPU process (gloo): the backend follows the accelerator DeepSpeed
detects. Without torchrun's variables a one-process group is formed on a free local port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


_SINGLE = "KEYE_SINGLE_PROCESS_GROUP"  # marks torchrun-style variables that init_distributed set itself


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or form) the process group; idempotent. Sets the CUDA device to ``LOCAL_RANK`` when there is one."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    formed_here = os.environ.get(_SINGLE) == "1"
    if ("RANK" not in os.environ or formed_here) and not torch.distributed.is_initialized():
        # plain `keye train`: a one-process group on a fresh port (also for a second run in the same process)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.update(MASTER_PORT=str(_free_port()), **{_SINGLE: "1"})
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(accel.device_name())
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)
    return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    """Leave the process group so the next run in this process (tests, the demo) starts cleanly."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
