"""Every shipped config builds, and where its design is dropless (static routing levels, Mod-Squad's task gates) its
MoE layers drop no assignment at step 0: on the demo data for the demo configs, on random inputs of the right shape
for the full-size recipe (its datasets are not on this machine)."""

from pathlib import Path

import pytest
import torch
from conftest import REPO

from condmoe.data_prep import schema
from condmoe.models import pop_moe_stats
from condmoe.models.router import STATIC_LEVELS
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.config import load_config
from condmoe.train.data import dense_targets, val_batches
from condmoe.train.engine import build_model
from condmoe.train.evaluate import vocabulary_targets

NEEDS_ITS_DATA = {"taskonomy_modsquad.yaml"}  # its heads are sized from its dense.json: tests/test_taskonomy.py
ON_META = {"uniperceiver_moe_l.yaml", "uniperceiver_moe_b_stage2.yaml"}  # built on the meta device: test_recipes.py
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in NEEDS_ITS_DATA | ON_META)
FULL_SIZE = {"uniperceiver_moe_b.yaml"}


def dropless_by_design(cfg) -> bool:
    return cfg.moe.num_experts > 0 and (cfg.moe.routing in STATIC_LEVELS or not cfg.moe.drop_tokens)


def demo_batches(cfg, tokenizer: TextTokenizer, img_size: int):
    """One val batch of every task, with the targets the trainer adds."""
    classes = schema.read_classes(cfg.data.root)
    for task_id, task in enumerate(cfg.tasks):
        dense = dense_targets(cfg.data.root, [task]) if task.spec.targets == "pixels" else None
        batch = next(iter(val_batches(cfg.data.root, task.dataset, img_size, 8, tokenizer, task_type=task.type,
                                      num_frames=cfg.data.num_frames, dense=dense)))
        batch.pop("num_skipped", None)
        if task.spec.targets == "classes":
            batch["target_ids"], batch["target_mask"] = tokenizer(classes[task.dataset])
        elif task.spec.targets == "vocabulary":
            batch["target_ids"], batch["target_mask"] = vocabulary_targets(tokenizer)
        yield task, task_id, batch


def random_batches(cfg, img_size: int, vocab: int = 100, spe: int = 4):
    g = torch.Generator().manual_seed(0)
    for task_id, task in enumerate(cfg.tasks):
        if task.spec.inputs == "text":
            continue  # exercised by the demo configs; the point here is the visual and target passes' routing
        pixels = torch.randn(2, 3, img_size, img_size, generator=g)
        if task.spec.inputs == "video":
            pixels = torch.randn(2, cfg.data.num_frames, 3, img_size, img_size, generator=g)
        ids = torch.randint(5, vocab, (2, 12), generator=g)
        ids[:, 0] = spe
        batch = {"videos" if task.spec.inputs == "video" else "images": pixels, "labels": torch.zeros(2).long(),
                 "text_ids": ids, "text_mask": torch.ones(2, 12, dtype=torch.bool),
                 "target_ids": ids, "target_mask": torch.ones(2, 12, dtype=torch.bool)}  # two "class names"
        if task.spec.targets == "vocabulary":
            tokens = torch.arange(vocab)
            batch["target_ids"] = torch.stack([torch.full_like(tokens, spe), tokens, torch.full_like(tokens, 2)], 1)
            batch["target_mask"] = torch.ones(vocab, 3, dtype=torch.bool)
        yield task, task_id, batch


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in FULL_SIZE else n for n in CONFIGS])
def test_shipped_config_builds_and_drops_nothing_where_dropless(name, tiny_data):
    overrides = [] if name in FULL_SIZE else [f"data.root={tiny_data}"]
    cfg = load_config(REPO / "configs" / name, overrides)
    if name in FULL_SIZE:
        vocab, spe, batches = 100, 4, None
    else:
        tokenizer = TextTokenizer(Path(tiny_data) / "tokenizer", cfg.data.max_text_len)
        vocab, spe = tokenizer.vocab_size, tokenizer.spe_id
    model = build_model(cfg, vocab, spe).train()  # step 0: training capacity, as the first step routes
    img_size = model.image_embed.patch_embed.img_size[0]
    batches = random_batches(cfg, img_size) if name in FULL_SIZE else demo_batches(cfg, tokenizer, img_size)
    dropped = []
    with torch.no_grad():
        for task, task_id, batch in batches:
            model(task.type, batch, task_id=task_id, head=task.name if task.spec.targets == "pixels" else "")
            stats = pop_moe_stats(model)
            if stats is not None:
                dropped.append(stats.dropped_fraction.item())
    if cfg.moe.num_experts or cfg.moa.num_experts:
        assert dropped, "no routed layer ran"
    if dropless_by_design(cfg):
        assert max(dropped) < 0.01, f"{name}: {max(dropped):.1%} of expert assignments dropped at step 0"
