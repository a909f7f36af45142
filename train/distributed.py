"""Process-group setup that works the same under `python`, `torchrun`, `deepspeed` and `srun`."""

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_int(env: dict, *names: str, default: int) -> int:
    for name in names:
        if name in env:
            return int(env[name])
    return default


def world_info_from_env(env: dict | None = None) -> WorldInfo:
    """Rank, local rank and world size from torchrun/deepspeed variables, else Slurm's, else a single process."""
    env = os.environ if env is None else env
    return WorldInfo(
        rank=_first_int(env, "RANK", "SLURM_PROCID", default=0),
        local_rank=_first_int(env, "LOCAL_RANK", "SLURM_LOCALID", default=0),
        world_size=_first_int(env, "WORLD_SIZE", "SLURM_NTASKS", default=1),
    )


def slurm_master_addr(nodelist: str) -> str:
    """First host of a Slurm node list, as `scontrol show hostnames` expands it."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> WorldInfo:
    """Fill the env:// rendezvous variables from whichever launcher started us, then join the group.

    NCCL on GPU, gloo on CPU. Idempotent: a second call returns the current world.
    """
    info = world_info_from_env()
    if dist.is_initialized():
        return WorldInfo(dist.get_rank(), info.local_rank, dist.get_world_size())
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    if "MASTER_ADDR" not in os.environ:
        if "SLURM_JOB_NODELIST" in os.environ and info.world_size > 1:
            os.environ["MASTER_ADDR"] = slurm_master_addr(os.environ["SLURM_JOB_NODELIST"])
        else:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        if info.world_size > 1:
            # every rank must agree: derive from the job id under Slurm, else the torch default
            job = int(os.environ.get("SLURM_JOB_ID", "0"))
            os.environ["MASTER_PORT"] = str(20000 + job % 20000 if job else 29500)
        else:
            os.environ["MASTER_PORT"] = str(free_port())
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)
    return WorldInfo(dist.get_rank(), info.local_rank, dist.get_world_size())


def device_for(info: WorldInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank `src` decides, everyone receives (e.g. which checkpoint to resume)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`x` of every rank concatenated along dim 0 (rank order), gradients flowing back to each rank's part.

    The global-batch negatives of SimCLR and MoCo v3: the backward sums every rank's gradient for this
    rank's rows, so averaging parameter gradients over ranks gives the gradient of the global-batch loss.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_single  # autograd: backward reduce-scatters

    return all_gather_single(x.contiguous(), 0, dist.group.WORLD)
