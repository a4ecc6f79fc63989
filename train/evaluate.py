"""Zero-shot evaluation on the val split: classification top-1 against encoded class names, retrieval R@1.

"Zero-shot" in Uni-Perceiver's sense: no classifier head and no tuning; predictions are the most similar encoded
target. Runs in one process on the plain model.
"""

import torch
import torch.nn.functional as F

from models import UniPerceiver
from models.text_tokenizer import TextTokenizer
from train.data import read_json, val_batches


@torch.no_grad()
def evaluate(model: UniPerceiver, root: str, dataset: str, tokenizer: TextTokenizer, img_size: int,
             batch_size: int = 128, classification_task: int = 0, retrieval_task: int = 0) -> dict[str, float]:
    """Returns ``top1`` (classification), ``i2t_r1``/``t2i_r1`` (retrieval over the whole val split) and
    ``num_samples``. The task ids select the routing of task-conditioned MoE layers (the tasks' config indices)."""
    model.eval()
    class_names = read_json(root, "classes.json")[dataset]
    class_ids, class_mask = tokenizer(class_names)
    class_feats = F.normalize(model.encode_texts(class_ids, class_mask, classification_task), dim=-1)

    correct, image_feats, text_feats = 0, [], []
    for batch in val_batches(root, dataset, img_size, batch_size, tokenizer):
        feats = F.normalize(model.encode_images(batch["images"], classification_task), dim=-1)
        correct += int((feats @ class_feats.t()).argmax(dim=-1).eq(batch["labels"]).sum())
        if retrieval_task != classification_task:
            feats = F.normalize(model.encode_images(batch["images"], retrieval_task), dim=-1)
        image_feats.append(feats)
        texts = model.encode_texts(batch["text_ids"], batch["text_mask"], retrieval_task)
        text_feats.append(F.normalize(texts, dim=-1))
    if not image_feats:
        raise ValueError(f"no val samples in {root}/{dataset}/val")
    images, texts = torch.cat(image_feats), torch.cat(text_feats)
    return {"num_samples": len(images), "top1": correct / len(images), **retrieval_recall(images @ texts.t())}


def retrieval_recall(sim_NN: torch.Tensor) -> dict[str, float]:
    """R@1 both ways for paired inputs (row i matches column i)."""
    target = torch.arange(sim_NN.shape[0])
    return {"i2t_r1": float(sim_NN.argmax(dim=1).eq(target).float().mean()),
            "t2i_r1": float(sim_NN.argmax(dim=0).eq(target).float().mean())}
