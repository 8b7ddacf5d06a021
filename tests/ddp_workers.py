"""Functions run inside spawned gloo processes by the distributed tests (importable by the children)."""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOBAL_BATCH = 8
DIM = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(GLOBAL_BATCH, DIM, generator=g), torch.randn(GLOBAL_BATCH, DIM, generator=g)


def clip_on_rank(rank: int, world: int) -> dict:
    from xcardia.losses import clip_loss

    img, tab = global_inputs()
    share = GLOBAL_BATCH // world
    img = img[rank * share:(rank + 1) * share].clone().requires_grad_()
    tab = tab[rank * share:(rank + 1) * share].clone().requires_grad_()
    tau = torch.tensor(0.1, requires_grad=True)
    loss = clip_loss(img, tab, tau)
    loss.backward()
    return {"loss": loss.detach(), "img_grad": img.grad, "tab_grad": tab.grad, "tau_grad": tau.grad}


def dataset():
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(31, 3, generator=g)
    concepts = (torch.rand(31, 2, generator=g) > 0.5).float()
    concepts[::5, 1] = float("nan")
    return emb, concepts


def bank_on_rank(rank: int, world: int) -> dict:
    from torch.utils.data.distributed import DistributedSampler

    from xcardia.support_bank import QueueBank, build_kmeans_bank

    emb, concepts = dataset()
    idx = torch.tensor(list(DistributedSampler(range(31), num_replicas=world, rank=rank, shuffle=False)))
    bank = build_kmeans_bank(emb[idx], concepts[idx], idx, k_per_concept=3, seed=0)
    queue = QueueBank(size=6, dim=3, n_targets=2)
    queue.enqueue(emb[idx[:4]], concepts[idx[:4]], idx[:4])
    return {"bank": bank.state_dict(), "queue": queue.bank().state_dict()}


TASKS = {"clip": clip_on_rank, "bank": bank_on_rank}


def _worker(rank: int, world: int, port: int, task: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(TASKS[task](rank, world), Path(out_dir) / f"rank{rank}.pt")
    except Exception:  # noqa: BLE001 - surface the child's traceback to the test
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(task: str, world: int, out_dir: Path, timeout_s: float = 180.0) -> list[dict]:
    """Run ``TASKS[task]`` on ``world`` spawned gloo ranks; fail (never hang) after ``timeout_s``."""
    ctx = mp.start_processes(_worker, args=(world, free_port(), task, str(out_dir)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed task {task!r} did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world)]


def tiny_pretrain_specs(method: str = "clip", batch_size: int = 8, epochs: int = 1, bank: str = "kmeans"):
    """Small, batch-independent settings (instance norm, no dropout, no augmentation) for exact comparisons."""
    from xcardia.data.imaging import PreprocessSpec
    from xcardia.models.image_encoder import ImageEncoderSpec
    from xcardia.models.xcardia_model import ModelSpec
    from xcardia.pretrain import PretrainSpec, apply_variant

    model = ModelSpec(image=ImageEncoderSpec(arch="resnet10", widths=(8, 8, 16, 16), conv1_size=3, conv1_stride=2,
                                             max_pool=False, norm="instance"),
                      tabular_d_model=16, tabular_layers=1, tabular_heads=2, tabular_ff=32, tabular_dropout=0.0, proj_dim=16)
    spec = PretrainSpec(method=method, epochs=epochs, batch_size=batch_size, lr=1e-3, restart_period=5,
                        bank=bank, bank_refresh_every=1, augment=False, in_memory=True, seed=1)
    model, spec = apply_variant(model, spec)
    return model, spec, PreprocessSpec(shape=(24, 24, 24), spacing_mm=8.0)


def pretrain_on_rank(rank: int, world: int) -> dict:
    from xcardia.pretrain import pretrain

    out = Path(os.environ["XCARDIA_TEST_OUT"])
    model, spec, pre = tiny_pretrain_specs(os.environ.get("XCARDIA_TEST_METHOD", "clip"), batch_size=8 // world)
    pretrain(os.environ["XCARDIA_TEST_DATA"], out / "run", model, spec, pre, cache_dir=out / "cache", progress=False,
             log=lambda *_: None)
    state = torch.load(out / "run" / "checkpoint.pt", weights_only=True) if rank == 0 else None
    return {"model": state["model"] if state else {}, "bank": state["bank"] if state else None}


TASKS["pretrain"] = pretrain_on_rank
