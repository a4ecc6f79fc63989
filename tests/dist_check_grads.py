"""Run under torchrun (2 ranks) by tests/test_distributed.py: the gradient DeepSpeed reduces is the mean of the ranks'
gradients when the ranks run different tasks.

Each rank builds the demo model the trainer builds (``build_model`` / ``create_engine``, token-routed MoE, ep_size 1)
and a plain copy. Rank 0 runs image classification then masked language modelling, rank 1 the other order, as two
micro-steps of one optimizer step, so their graphs produce gradients in different orders. The check: DeepSpeed's
reduced gradient of every parameter (``safe_get_full_grad``) equals the all-reduced mean of the copies' gradients.

    dist_check_grads.py zero2_cpu.json [--raw] [--linear]

``--linear``: Uni-Perceiver-MoE's linear experts on attention and FFN with attribute routing, where a call touches
only its chosen experts and the step's aux loss gives the others their zero gradient (the ranks choose different
experts).

``--raw`` runs the micro-steps without ``MicroSteps`` (DeepSpeed's per-hook reduction, one micro-step per rank) and
expects the mismatch: it shows the check can fail and what the trainer must not do (DeepSpeed 0.19.8).
"""

import condmoe.models._compat  # noqa: F401  (first: before anything imports timm or torchvision)

import copy
import os
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from condmoe.models import pop_moe_stats
from condmoe.models.ds_moe import global_parameter_names
from condmoe.train.config import load_config
from condmoe.train.dist import shutdown_distributed
from condmoe.train.engine import MicroSteps, build_model, create_engine, destroy_engine

VOCAB, SPE = 60, 59
RANK = os.environ.get("RANK", "?")


def fail(message: str) -> None:
    print(f"rank {RANK}: FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def batch_of(task: str, rank: int, size: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(size, 3, 32, 32, generator=g)
    mask = torch.arange(10)[None, :] < torch.randint(3, 11, (size, 1), generator=g)
    text = torch.randint(5, VOCAB - 1, (size, 10), generator=g)
    if task == "image_classification":
        return {"images": images, "labels": torch.arange(size) % 5, "target_ids": text[:, :6].repeat(2, 1)[:5],
                "target_mask": torch.ones(5, 6, dtype=torch.bool)}
    # mlm: a text-only graph (the visual embedding's exact-zero gradient comes at another point of the backward)
    labels = torch.where(torch.rand(size, 10, generator=g) < 0.3, text, torch.full_like(text, -100))
    labels[:, 1] = text[:, 1]
    vocab = torch.arange(VOCAB)[:, None]
    return {"text_ids": torch.where(labels >= 0, 3, text), "text_mask": mask | (labels >= 0), "mlm_labels": labels,
            "target_ids": torch.cat([torch.full_like(vocab, SPE), vocab], 1),
            "target_mask": torch.ones(VOCAB, 2, dtype=torch.bool)}


def loss_of(model, task: str, task_id: int, rank: int) -> torch.Tensor:
    out = model(task, batch_of(task, rank), task_id=task_id)
    stats = pop_moe_stats(model.module if hasattr(model, "module") else model)
    return out.loss + (stats.aux_loss if stats is not None else 0.0)


def main() -> None:
    ds_config, raw, linear = sys.argv[1], "--raw" in sys.argv[2:], "--linear" in sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    micro_steps = 1 if raw else 2
    overrides = [f"deepspeed_config=ds_configs/{ds_config}", "moe.ep_size=1", "model.drop_path_rate=0",
                 f"run.gradient_accumulation_steps={micro_steps}"]
    if linear:
        overrides += ["moe.expert_type=linear", "moe.routing=attribute", "moe.targets=[attn, ffn]"]
    cfg = load_config("configs/demo.yaml", overrides)
    tasks = [("image_classification", 0), ("mlm", 1)]
    order = tasks if rank == 0 else tasks[::-1]
    if raw:
        order = order[:1]  # one micro-step: each rank runs one task, as the trainer's ranks do

    model = build_model(cfg, VOCAB, SPE)
    reference = copy.deepcopy(model)
    engine = create_engine(cfg, model)
    steps = None
    if raw:
        engine.backward(loss_of(engine, *order[0], rank))
    else:
        steps = MicroSteps(engine, len(order))
        with steps:
            for task, task_id in order:
                steps.backward(loss_of(engine, task, task_id, rank))
    names = global_parameter_names(engine.module)
    reduced = {names[p]: safe_get_full_grad(p).float().clone() for p in engine.module.parameters()}

    for task, task_id in order:
        (loss_of(reference, task, task_id, rank) / len(order)).backward()
    wrong = []
    for name, param in reference.named_parameters():
        expected = param.grad.clone()
        torch.distributed.all_reduce(expected)
        expected /= world
        if not torch.allclose(reduced[name], expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item()):
            wrong.append(name)
    if raw and not wrong:
        fail("DeepSpeed's per-hook reduction matched although the ranks' gradients arrived in different orders")
    if not raw and wrong:
        fail(f"{len(wrong)} of {len(reduced)} reduced gradients differ from the ranks' mean, e.g. {wrong[:3]}")
    destroy_engine(engine)
    del engine, model, names, steps
    if shutdown_distributed():
        fail("communication threads outlived the process groups")
    if rank == 0:
        print(f"GRADS-OK {ds_config}{' linear' if linear else ''}"
              f"{' raw: ' + str(len(wrong)) + ' gradients mis-reduced' if raw else ''}", flush=True)


if __name__ == "__main__":
    main()
