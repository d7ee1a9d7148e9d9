"""Where a training run executes: its process group, device, precision, sharding and RNG fences.

A run is a plain process (no process group) or one of torchrun's ranks (gloo on CPU, NCCL on
GPU), in which case student and teacher are sharded with FSDP2, one unit per transformer block.
"""

import os
import random
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from curate.train.model import SSLNetwork
from schemas.train import TrainConfig


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device
    created_group: bool  # this run initialised the process group, so it also destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_runtime() -> Runtime:
    """Join torchrun's process group when launched by it (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return Runtime(rank=rank, world_size=world, device=device, created_group=created)


def compute_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """bfloat16 on GPU and float32 on CPU unless the config says otherwise."""
    if config.mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32


def shard_network(network: SSLNetwork, runtime: Runtime, dtype: torch.dtype) -> None:
    """FSDP2: one unit per transformer block, the rest (tokens, norms, heads) in the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The networks return slices (class tokens, logits split by crop kind); nothing downstream
    # modifies them in place, which is what FSDP2's warning about views is for.
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in network.backbone.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(network, mesh=mesh, mp_policy=policy)


@contextmanager
def fenced_rngs() -> Iterator[None]:
    """Run the body without moving the global RNGs (Python's, torch's CPU and current GPU).

    For what a run does between steps that must not change the random draws of the steps that
    follow (loading data, checkpoints, evaluations): a resumed run, which skips some of them,
    must draw exactly what an uninterrupted one draws.
    """
    python_rng = random.getstate()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(python_rng)
