"""torchrun support: the process group from the launcher's environment, and the few collectives gantk needs.

Under `torchrun --nproc-per-node N -m gantk ...` every process reads RANK, LOCAL_RANK and WORLD_SIZE;
without torchrun the world is one process and every call here is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from .errors import GantkError, UsageError, default_sigterm


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """The world torchrun describes in the environment (one process without it)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    return World(rank, size, local)


def init(world: World, device_type: str) -> bool:
    """Join the process group (NCCL on CUDA, Gloo on CPU); True when this call created it. One process
    alone imports nothing (torch takes 2 s to import, which generate --no-parity never needs)."""
    if not world.active:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    with default_sigterm():  # waiting for the other ranks in native code, a Python handler would never run
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return True


def shutdown(created: bool) -> None:
    if not created:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(world: World, tensor):
    """Sum a tensor over ranks in place (and return it)."""
    if world.active:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def gather(world: World, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not world.active:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist

        dist.barrier()


def on_main(world: World, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 and hand its result (or its error, re-raised) to every rank."""
    result: tuple[str, Any] = ("ok", None)
    if world.main:
        try:
            result = ("ok", fn())
        except GantkError as e:
            result = ("error", (e.exit_code, str(e)))
            if not world.active:
                raise
    if world.active:
        import torch.distributed as dist

        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if result[0] == "error":
        err = GantkError(result[1][1])
        err.exit_code = result[1][0]
        raise err
    return result[1]
