"""DDP correctness on 2 gloo processes: global CLIP negatives and a collectively built, identical support bank."""

from __future__ import annotations

import torch

from ddp_workers import GLOBAL_BATCH, dataset, global_inputs, run_distributed
from xcardia.losses import clip_loss
from xcardia.support_bank import build_kmeans_bank


def test_clip_loss_and_gradients_on_two_ranks_equal_the_single_process_global_batch(tmp_path):
    ranks = run_distributed("clip", 2, tmp_path)
    img, tab = global_inputs()
    img.requires_grad_()
    tab.requires_grad_()
    tau = torch.tensor(0.1, requires_grad=True)
    loss = clip_loss(img, tab, tau)
    loss.backward()
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss.detach())
    share = GLOBAL_BATCH // 2
    for rank, result in enumerate(ranks):
        # each rank receives the sum over ranks of its slice's gradient; DDP's averaging divides by the world size
        torch.testing.assert_close(result["img_grad"] / 2, img.grad[rank * share:(rank + 1) * share])
        torch.testing.assert_close(result["tab_grad"] / 2, tab.grad[rank * share:(rank + 1) * share])
    torch.testing.assert_close(torch.stack([r["tau_grad"] for r in ranks]).mean(), tau.grad)


def test_support_bank_is_built_collectively_identical_on_every_rank_and_equal_to_one_process(tmp_path):
    ranks = run_distributed("bank", 2, tmp_path)
    for key in ("embeddings", "targets", "indices"):
        torch.testing.assert_close(ranks[0]["bank"][key], ranks[1]["bank"][key], equal_nan=True)
        torch.testing.assert_close(ranks[0]["queue"][key], ranks[1]["queue"][key], equal_nan=True)
    emb, concepts = dataset()
    single = build_kmeans_bank(emb, concepts, torch.arange(len(emb)), k_per_concept=3, seed=0)
    torch.testing.assert_close(ranks[0]["bank"]["embeddings"], single.embeddings)
    torch.testing.assert_close(ranks[0]["bank"]["indices"], single.indices)
