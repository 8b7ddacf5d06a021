"""``torch.distributed`` helpers: start-up under ``torchrun``, rank queries, and the gathers the losses need.

Every entry point runs unchanged under ``torchrun --nproc_per_node N -m xcardia ...``: NCCL on GPUs, gloo on CPU.
Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything is single-process and these helpers are
identities.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_environment(timeout_s: int = 1800) -> torch.device:
    """Join the process group ``torchrun`` describes (if any) and return this process's device.

    NCCL with one GPU per process when CUDA is available, gloo on CPU. A no-op for a single process.
    """
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums, over ranks, the gradient of this rank's slice.

    Synchronous collectives only (``all_gather`` forward, ``all_reduce`` backward): torch's own autograd gathers
    are deprecated (``torch.distributed.nn``) or private and asynchronous (functional collectives).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = (dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every slice: sum their gradients
        return grad[ctx.rows[0]: ctx.rows[1]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, keeping the autograd graph.

    The backward pass gives each rank the gradient of its own slice summed over ranks (open_clip's
    ``gather_features(gather_with_grad=True)``); with DDP's gradient averaging the parameter gradients then equal
    those of one process holding the global batch.
    """
    if not is_distributed():
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 without gradient; the first dimension may differ by rank."""
    if not is_distributed():
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)], dim=0)


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world_size()


def barrier() -> None:
    if is_distributed():
        dist.barrier()
