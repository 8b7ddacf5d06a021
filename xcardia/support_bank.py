"""The NW head's support bank: which embedded exemplars the Nadaraya–Watson head regresses from.

Three kinds, one interface (``embeddings``, ``targets`` of the current bank):

- :func:`kmeans_exemplars` — the paper's: for each concept, k-means (k per concept) over the patients positive for
  it, and the patient closest to each centre; rebuilt every N epochs from embeddings of the whole training set.
- :class:`QueueBank` — a FIFO queue of detached embeddings and targets of recent batches (MoCo-style).
- the current batch — each query regresses from the other patients of its batch (``exclude`` its own entry).

Under ``torch.distributed`` every rank computes embeddings of its shard; :func:`build_kmeans_bank` gathers them
collectively (all ranks take part — defect 3 of the public code gathered on rank 0 only, so it hung), sorts them
by dataset index and runs the same seeded k-means, so every rank holds an identical bank, equal to the
single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xcardia.distributed import gather_no_grad


@dataclass
class SupportBank:
    """Embeddings (S, D), targets (S, C) with NaN for missing, and the dataset indices they came from (S,)."""

    embeddings: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings.cpu(), "targets": self.targets.cpu(), "indices": self.indices.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> "SupportBank":
        return cls(state["embeddings"].to(device), state["targets"].to(device), state["indices"].to(device))


def kmeans_exemplars(embeddings: np.ndarray, concepts: np.ndarray, k_per_concept: int = 5, seed: int = 0,
                     fallback: int = 8, n_init: int | str = 10) -> np.ndarray:
    """Indices of the paper's exemplars: per concept, the patients closest to k-means centres among its positives.

    Args:
        embeddings: (N, D).
        concepts: (N, C) of 1, 0 or NaN. Only observed positives count: a missing concept is not positive (the
            public code counted it as abnormal).
        k_per_concept: exemplars per concept (paper: 5).
        seed: k-means seed.
        fallback: if no concept has a positive, this many patients at random (seeded), as the paper does.
        n_init: k-means restarts (the public code: ``"auto"``, i.e. one k-means++ run, ``Pretraining.py:310``).

    Returns:
        Sorted unique row indices.
    """
    from sklearn.cluster import KMeans

    chosen: set[int] = set()
    for c in range(concepts.shape[1]):
        positives = np.flatnonzero(concepts[:, c] == 1)
        if positives.size == 0:
            continue
        k = min(k_per_concept, positives.size)
        if k <= 1:
            chosen.update(int(i) for i in positives[:k])
            continue
        points = embeddings[positives].astype(np.float64)
        centres = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(points).cluster_centers_
        for centre in centres:
            chosen.add(int(positives[np.argmin(((points - centre) ** 2).sum(1))]))
    if not chosen:
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(embeddings.shape[0], size=min(fallback, embeddings.shape[0]), replace=False))
    return np.array(sorted(chosen), dtype=np.int64)


@torch.no_grad()
def build_kmeans_bank(embeddings: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor,
                      k_per_concept: int = 5, seed: int = 0, n_init: int | str = 10) -> SupportBank:
    """The paper's bank from this rank's embedded shard, built collectively across ranks.

    Args:
        embeddings: (n, D) embeddings of this rank's patients (all ranks call this together).
        targets: (n, C) their concept targets (NaN = missing).
        indices: (n,) their dataset indices; duplicates from a padded distributed sampler are dropped.
        k_per_concept: exemplars per concept.
        seed: k-means seed (the same on every rank).
        n_init: k-means restarts (see :func:`kmeans_exemplars`).
    """
    all_emb = gather_no_grad(embeddings.float())
    all_tgt = gather_no_grad(targets.float())
    all_idx = gather_no_grad(indices.long())
    order = np.argsort(all_idx.cpu().numpy(), kind="stable")
    idx_sorted = all_idx.cpu().numpy()[order]
    keep = order[np.concatenate([[True], idx_sorted[1:] != idx_sorted[:-1]])]
    emb = all_emb[keep]
    tgt = all_tgt[keep]
    pick = kmeans_exemplars(emb.cpu().numpy(), tgt.cpu().numpy(), k_per_concept, seed, n_init=n_init)
    pick_t = torch.as_tensor(pick, device=emb.device)
    return SupportBank(emb[pick_t].clone(), tgt[pick_t].clone(), all_idx[keep][pick_t].clone())


class QueueBank:
    """FIFO queue of detached (embedding, target) pairs from recent batches.

    Args:
        size: capacity (e.g. 4,096 or 65,536).
        dim: embedding dimension.
        n_targets: targets per entry.
    """

    def __init__(self, size: int, dim: int, n_targets: int, device=None):
        self.size = int(size)
        self.embeddings = torch.zeros(self.size, dim, device=device)
        self.targets = torch.full((self.size, n_targets), float("nan"), device=device)
        self.indices = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.pointer = 0
        self.filled = 0

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> None:
        """Add a batch (gathered from every rank under DDP, so all ranks enqueue the same entries)."""
        embeddings = gather_no_grad(embeddings.detach().float())
        targets = gather_no_grad(targets.float())
        indices = gather_no_grad(indices.long())
        n = embeddings.shape[0]
        if n >= self.size:
            embeddings, targets, indices, n = embeddings[-self.size:], targets[-self.size:], indices[-self.size:], self.size
        slots = (self.pointer + torch.arange(n, device=self.embeddings.device)) % self.size
        self.embeddings[slots] = embeddings.to(self.embeddings.device)
        self.targets[slots] = targets.to(self.targets.device)
        self.indices[slots] = indices.to(self.indices.device)
        self.pointer = int((self.pointer + n) % self.size)
        self.filled = min(self.filled + n, self.size)

    def bank(self) -> SupportBank:
        """The filled part of the queue, oldest first."""
        if self.filled < self.size:
            order = torch.arange(self.filled, device=self.embeddings.device)
        else:
            order = (self.pointer + torch.arange(self.size, device=self.embeddings.device)) % self.size
        return SupportBank(self.embeddings[order], self.targets[order], self.indices[order])

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings.cpu(), "targets": self.targets.cpu(), "indices": self.indices.cpu(),
                "pointer": self.pointer, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.embeddings.copy_(state["embeddings"])
        self.targets.copy_(state["targets"])
        self.indices.copy_(state["indices"])
        self.pointer, self.filled = int(state["pointer"]), int(state["filled"])


def batch_bank(embeddings: torch.Tensor, targets: torch.Tensor) -> tuple[SupportBank, torch.Tensor]:
    """The current batch as the support, and the (B, B) mask that leaves each query out of its own support."""
    n = embeddings.shape[0]
    exclude = torch.eye(n, dtype=torch.bool, device=embeddings.device)
    return SupportBank(embeddings, targets, torch.arange(n, device=embeddings.device)), exclude


def step_support(kind: str, bank: SupportBank | None, queue: QueueBank | None):
    """The support one training step uses, as a function of its query: ``(query, concepts) → (support, targets,
    exclude)``. ``kmeans``: the current exemplar bank; ``queue``: the queue (the batch itself, each query left out,
    while the queue is still empty); ``batch``: the batch, each query left out of its own support."""
    def support_for(query: torch.Tensor, concepts: torch.Tensor):
        if kind == "kmeans":
            return bank.embeddings, bank.targets, None
        if kind == "queue":
            current = queue.bank()
            if len(current):
                return current.embeddings, current.targets, None
        own, exclude = batch_bank(query, concepts)
        return own.embeddings, own.targets, exclude
    return support_for
