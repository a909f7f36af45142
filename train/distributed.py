"""Process-group setup that works the same under `python`, `torchrun`, `deepspeed` and `srun`."""

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from data_pipeline.shards import available_cpus


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
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise RuntimeError(f"MASTER_ADDR is not set and `scontrol show hostnames {nodelist}` failed ({err}); "
                           "export MASTER_ADDR (slurm/pretrain.sh does)") from None
    return out.stdout.split()[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_env(env: dict) -> dict[str, str]:
    """The env:// variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) that `env` lacks.

    Under Slurm the master is the first host of the job's node list and the port is derived from
    the job id, so every task computes the same values without talking to the others.
    """
    info = world_info_from_env(env)
    out = {"RANK": str(info.rank), "LOCAL_RANK": str(info.local_rank), "WORLD_SIZE": str(info.world_size)}
    if "MASTER_ADDR" not in env:
        on_slurm = "SLURM_JOB_NODELIST" in env and info.world_size > 1
        out["MASTER_ADDR"] = slurm_master_addr(env["SLURM_JOB_NODELIST"]) if on_slurm else "127.0.0.1"
    if "MASTER_PORT" not in env:
        # every rank must agree: derived from the job id under Slurm, else the torch default
        job = int(env.get("SLURM_JOB_ID", "0"))
        out["MASTER_PORT"] = str(20000 + job % 20000 if job else 29500) if info.world_size > 1 else str(free_port())
    return {k: v for k, v in out.items() if k not in env}


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU a process uses: its local rank among the node's GPUs, or the only GPU the launcher left it."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank} but only {visible} GPUs are visible: start one process per GPU "
                           "(Slurm: --ntasks-per-node equal to --gpus-per-node)")
    return local_rank


def cpu_threads_per_rank(env: dict, cpus: int) -> int | None:
    """Intra-op threads for one of several CPU ranks on a node, or None to leave torch's choice.

    torchrun sets OMP_NUM_THREADS=1 itself; the deepspeed launcher does not (unless --bind_cores_to_rank),
    so every rank would start one thread per core and the node would run ranks x cores threads.
    """
    if "OMP_NUM_THREADS" in env:
        return None
    local = _first_int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", default=1)
    return max(1, cpus // local) if local > 1 else None


def init_distributed() -> WorldInfo:
    """Fill the env:// rendezvous variables from whichever launcher started us, then join the group.

    NCCL on GPU, gloo on CPU. Idempotent: a second call returns the current world.
    """
    info = world_info_from_env()
    if dist.is_initialized():
        return WorldInfo(dist.get_rank(), info.local_rank, dist.get_world_size())
    os.environ.update(rendezvous_env(dict(os.environ)))
    if torch.cuda.is_available():
        torch.cuda.set_device(cuda_index(info.local_rank, torch.cuda.device_count()))
    elif threads := cpu_threads_per_rank(os.environ, available_cpus()):  # CPU ranks sharing a node
        torch.set_num_threads(threads)
    import deepspeed  # heavy: only when initialising a process group

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False)
    return WorldInfo(dist.get_rank(), info.local_rank, dist.get_world_size())


def device_for(info: WorldInfo) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", cuda_index(info.local_rank, torch.cuda.device_count()))


def rank() -> int:
    """This process's rank in the initialised process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the initialised process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def global_batch(cfg, world: int | None = None) -> int:
    """Images per optimizer step: `train.global_batch_size`, else `data.batch_size` x world size (no accumulation)."""
    return cfg.train.global_batch_size or cfg.data.batch_size * (world_size() if world is None else world)


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
