"""Run under torchrun (2 ranks) by tests/test_moe_distributed.py: split target sets and gathered negatives.

* classification with ``split_targets`` gives the same loss as encoding the whole target set on every rank, and the
  same gradient summed over ranks;
* retrieval with ``gather_negatives``: the mean of the ranks' losses equals the loss of one process holding the
  concatenated batch.
"""

import condmoe.models._compat  # noqa: F401  (first: before anything imports timm or torchvision)

import os
import sys

import torch

from condmoe.models import create_model
from condmoe.models.generalist import LocalCollectives
from condmoe.train.collectives import DataParallelCollectives
from condmoe.train.dist import shutdown_distributed

VOCAB, SPE = 60, 4
RANK = os.environ.get("RANK", "?")


def check(ok: bool, message: str) -> None:
    if not ok:
        print(f"rank {RANK}: FAILED: {message}", file=sys.stderr, flush=True)
        sys.exit(1)


def batch_of(rank: int, size: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    mask = torch.ones(size, 10, dtype=torch.bool)
    mask[:, 7:] = False
    return {"images": torch.randn(size, 3, 32, 32, generator=g), "labels": torch.arange(size) % 5,
            "text_ids": torch.randint(5, VOCAB, (size, 10), generator=g), "text_mask": mask}


def main() -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    check_collectives(rank, torch.distributed.get_world_size())
    torch.distributed.barrier()
    # the checks' tensors and autograd graphs (which hold the group of the gathered negatives) are gone here
    check(not shutdown_distributed(), "communication threads outlived the process groups")
    if rank == 0:
        print("COLLECTIVES-OK", flush=True)


def check_collectives(rank: int, world: int) -> None:
    torch.manual_seed(0)
    model = create_model("debug", vocab_size=VOCAB, spe_token_id=SPE, max_text_len=10).eval()
    model.collectives = DataParallelCollectives()
    targets = {"target_ids": torch.randint(5, VOCAB, (7, 10), generator=torch.Generator().manual_seed(7)),
               "target_mask": torch.ones(7, 10, dtype=torch.bool)}  # 7 classes: uneven chunks over 2 ranks
    batch = {**batch_of(rank), **targets}

    grads = []
    for split in (True, False):
        model.zero_grad()
        out = model("image_classification", batch, split_targets=split)
        out.loss.backward()
        grad = model.text_embed.token_embed.weight.grad.clone()
        torch.distributed.all_reduce(grad)
        grads.append((out.loss.detach(), grad))
    check(torch.allclose(grads[0][0], grads[1][0], atol=1e-6), "split targets change the loss")
    check(torch.allclose(grads[0][1], grads[1][1], atol=1e-6), "split targets change the summed gradient")

    out = model("image_text_retrieval", batch_of(rank), gather_negatives=True)
    check(out.logits.shape == (3, 3 * world), f"gathered logits have shape {tuple(out.logits.shape)}")
    mean = out.loss.detach().clone()
    torch.distributed.all_reduce(mean)
    mean /= world
    model.collectives = LocalCollectives()
    full = {k: torch.cat([batch_of(r)[k] for r in range(world)]) for k in batch_of(0)}
    single = model("image_text_retrieval", full).loss.detach()
    check(torch.allclose(mean, single, atol=1e-5), f"gathered retrieval {mean.item()} != concatenated {single.item()}")


if __name__ == "__main__":
    main()
