"""Zero-shot evaluation on val splits, one task at a time, in one process on the plain model.

"Zero-shot" in Uni-Perceiver's sense: no classifier head and no tuning; predictions are the most similar encoded
target. Classification: top-1/top-5 against the encoded class names. Retrieval: R@1/5/10 both ways over the whole
split. MLM: accuracy of the masked tokens against the encoded vocabulary. Captioning: corpus BLEU-4 and CIDEr-D of
beam-search captions.
"""

import torch
import torch.nn.functional as F

from condmoe.data_prep import schema
from condmoe.models import UniPerceiver
from condmoe.models.captioning import generate
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.config import Config
from condmoe.train.data import dense_targets, val_batches
from condmoe.train.metrics import coco_tokenize, corpus_bleu_scores, corpus_cider


def vocabulary_targets(tokenizer: TextTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token id v as the one-token sentence ``<|spe|> v <|endoftext|>`` (row v), MLM's target set."""
    vocab = torch.arange(tokenizer.vocab_size)
    ids = torch.stack([torch.full_like(vocab, tokenizer.spe_id), vocab, torch.full_like(vocab, tokenizer.eos_id)], 1)
    return ids, torch.ones_like(ids, dtype=torch.bool)


@torch.no_grad()
def evaluate_task(model: UniPerceiver, cfg: Config, task_index: int, tokenizer: TextTokenizer,
                  model_task_id: int | None = None, batch_size: int = 128) -> dict[str, float]:
    """Metrics of ``cfg.tasks[task_index]`` on its dataset's val split; ``model_task_id`` routes task-conditioned
    layers (default: the task's index; an extracted single-task model runs its task as 0)."""
    model.eval()
    task = cfg.tasks[task_index]
    task_id = task_index if model_task_id is None else model_task_id
    img_size = model.image_embed.patch_embed.img_size[0]
    device = next(model.parameters()).device
    dense = dense_targets(cfg.data.root, [task]) if task.spec.targets == "pixels" else None
    views = (cfg.data.test_clips, cfg.data.test_crops) if task.type == "video_classification" else (1, 1)
    batches = ({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()} for batch in
               val_batches(cfg.data.root, task.dataset, img_size, batch_size, tokenizer, task_type=task.type,
                           num_frames=cfg.data.num_frames, dense=dense, views=views, spec=task.val_data,
                           num_samples=task.val_num_samples))
    return METRICS[task.spec.metric](model, cfg, task, batches, tokenizer, task_id)


def evaluate_topk(model: UniPerceiver, cfg: Config, task, batches, tokenizer: TextTokenizer,
                  task_id: int) -> dict[str, float]:
    """Top-1/top-5 accuracy against the encoded class names. Videos of several views (``data.test_clips`` x
    ``data.test_crops``: ``[B, V, T, 3, H, W]``) score the mean of the views' class probabilities (softmax)."""
    device = next(model.parameters()).device
    names = schema.read_classes(cfg.data.root)[task.dataset]
    targets = model.encode_texts(*(t.to(device) for t in tokenizer(names)), task_id)
    correct1 = correct5 = total = 0
    views = 1
    for batch in batches:
        pixels = batch.get("videos", batch.get("images"))
        if pixels.dim() == 6:
            views = pixels.shape[1]
            features = model.encode_images(pixels.flatten(0, 1), task_id)
            logits = model.classification_logits(features, targets, task.type)
            scores = logits.softmax(-1).unflatten(0, pixels.shape[:2]).mean(1)
        else:
            scores = model.classification_logits(model.encode_images(pixels, task_id), targets, task.type)
        top = scores.topk(min(5, scores.shape[1]), dim=-1).indices
        correct1 += int(top[:, 0].eq(batch["labels"]).sum())
        correct5 += int(top.eq(batch["labels"][:, None]).any(dim=-1).sum())
        total += len(batch["labels"])
    _require(total, task)
    return {"num_samples": total, **({"views": views} if views > 1 else {}), "top1": correct1 / total,
            "top5": correct5 / total}


def evaluate_recall(model: UniPerceiver, cfg: Config, task, batches, tokenizer: TextTokenizer,
                    task_id: int) -> dict[str, float]:
    """R@1/5/10 both ways and rsum over the whole split, against every caption of every sample (COCO and Flickr30k
    Karpathy test: 5 per image; MSR-VTT 1k-A: the one its prep stores): ``retrieval_recall`` says what counts."""
    visual, texts, owner = [], [], []
    device = next(model.parameters()).device
    for batch in batches:
        first = len(owner) and owner[-1] + 1  # this batch's first input
        visual.append(F.normalize(model.encode_images(batch.get("videos", batch.get("images")), task_id), dim=-1))
        captions = batch["captions"]
        ids, mask = tokenizer([c for caps in captions for c in caps])
        texts.append(F.normalize(model.encode_texts(ids.to(device), mask.to(device), task_id), dim=-1))
        owner += [first + i for i, caps in enumerate(captions) for _ in caps]
    _require(len(visual), task)
    visual_ND, texts_CD = torch.cat(visual), torch.cat(texts)
    return {"num_samples": len(visual_ND), "num_captions": len(texts_CD),
            **retrieval_recall(visual_ND @ texts_CD.t(), torch.tensor(owner, device=device))}


def evaluate_token_accuracy(model: UniPerceiver, cfg: Config, task, batches, tokenizer: TextTokenizer,
                            task_id: int) -> dict[str, float]:
    """Accuracy of the masked tokens against the encoded vocabulary."""
    vocab_ids, vocab_mask = (t.to(next(model.parameters()).device) for t in vocabulary_targets(tokenizer))
    correct = total = 0
    for batch in batches:
        batch.pop("num_skipped", None)
        out = model(task.type, {**batch, "target_ids": vocab_ids, "target_mask": vocab_mask}, task_id=task_id)
        labels = batch["mlm_labels"][batch["mlm_labels"] >= 0]
        correct += int(out.logits.argmax(dim=-1).eq(labels).sum())
        total += len(labels)
    _require(total, task)
    return {"num_masked_tokens": total, "accuracy": correct / total}


def evaluate_captioning(model: UniPerceiver, cfg: Config, task, batches, tokenizer: TextTokenizer, task_id: int,
                        beam_size: int = 2, max_length: int = 20) -> dict[str, float]:
    """Beam-search captions (KV cache) scored as the COCO caption evaluation scores them: hypotheses and ALL of a
    sample's captions through its tokenisation (``coco_tokenize``), corpus BLEU-1..4 with its smoothing and CIDEr-D
    (``train/metrics.py``; equal to pycocoevalcap's scorers in tests)."""
    vocab_ids, vocab_mask = (t.to(next(model.parameters()).device) for t in vocabulary_targets(tokenizer))
    vocab = model.encode_texts(vocab_ids, vocab_mask, task_id, attribute="vocab_target")
    banned = [i for i in tokenizer.tokenizer.all_special_ids if i != tokenizer.eos_id]
    hypotheses, references = [], []
    for batch in batches:
        pixels = batch.get("videos", batch.get("images"))
        for (ids, _), captions in zip(generate(model, pixels, vocab, tokenizer.spe_id, tokenizer.eos_id,
                                               max_length, beam_size, task_id, banned=banned), batch["captions"]):
            hypotheses.append(coco_tokenize(tokenizer.decode(ids)))
            references.append([coco_tokenize(c) for c in captions])
    _require(len(hypotheses), task)
    bleu = corpus_bleu_scores(hypotheses, references)
    return {"num_samples": len(hypotheses), "num_references": sum(map(len, references)),
            **{f"bleu{n}": b for n, b in enumerate(bleu, 1)}, "cider": corpus_cider(hypotheses, references),
            "example": " ".join(hypotheses[0])}


def task_inputs(cfg: Config, tokenizer: TextTokenizer, task) -> tuple[dict, dict]:
    """What a task's forward needs besides its batch: the encoded target set's ids (class names, vocabulary) and the
    dense head's name, as ``(batch entries, keyword options)``."""
    if task.spec.targets == "classes":
        return dict(zip(("target_ids", "target_mask"), tokenizer(schema.read_classes(cfg.data.root)[task.dataset]))), {}
    if task.spec.targets == "vocabulary":
        return dict(zip(("target_ids", "target_mask"), vocabulary_targets(tokenizer))), {}
    return {}, ({"head": task.name} if task.spec.targets == "pixels" else {})


def evaluate_dense(model: UniPerceiver, cfg: Config, task, batches, tokenizer: TextTokenizer,
                   task_id: int) -> dict[str, float]:
    """The dense family's meter over the val split at the model's input resolution (label maps resized with
    nearest neighbours, as the training targets are): ``train/dense_metrics.py`` says what each metric counts.
    ``headline`` names the metric the task is summarised by (Delta_m, extraction)."""
    from condmoe.train.dense_metrics import create_meter

    family, spec = task.spec.dense, dense_targets(cfg.data.root, [task])[task.name].spec
    meter = create_meter(family, spec)  # by family first (edges), then by the label's encoding
    total = 0
    for batch in batches:
        pred = model.dense_predict(batch["images"], task_id, task.name)
        target = batch[f"target.{task.name}"]
        meter.update(pred, target, torch.isfinite(target) if target.is_floating_point() and target.dim() == 3 else None)
        total += len(batch["images"])
    _require(total, task)
    return {"num_samples": total, **meter.compute(), "headline": dense_headline(task.spec)}


def multi_task_delta(metrics: dict[str, dict], single_task_files: list[str]) -> dict:
    """Delta_m (percent, positive when the multi-task model is better; ``train/dense_metrics.py`` ``delta_m``) of the
    dense tasks in ``metrics`` that the single-task runs' eval.json files also hold, on each task's headline metric.
    A ValueError names a file that is unreadable or holds no such task."""
    import json
    from pathlib import Path

    from condmoe.train.dense_metrics import LOWER_IS_BETTER, delta_m

    mine = {task: values for task, values in metrics.items() if isinstance(values, dict) and "headline" in values}
    single = {}
    for name in single_task_files:
        try:
            data = json.loads(Path(name).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--single-task {name}: cannot read it ({exc})") from None
        shared = [task for task in data if task in mine]
        if not shared:
            raise ValueError(f"--single-task {name}: none of this run's dense tasks ({', '.join(mine)}) in it")
        for task in shared:
            single[task] = data[task][mine[task]["headline"]]
    heads = {task: mine[task]["headline"] for task in single}
    lower = {t: LOWER_IS_BETTER[h] for t, h in heads.items()}
    value = delta_m({t: mine[t][h] for t, h in heads.items()}, single, lower)
    return {"value": value, "metrics": heads, "single_task": single}


def dense_headline(spec) -> str:
    """The metric a dense task type is summarised by (Delta_m, extraction): mIoU, maxF, odsF, mErr or rmse."""
    from condmoe.train.dense_metrics import dense_metric

    return dense_metric(spec.dense, spec.encoding).headline


# TaskSpec.metric -> its scorer: (model, cfg, task, val batches, tokenizer, task id) -> metrics
METRICS = {"topk": evaluate_topk, "recall": evaluate_recall, "token_accuracy": evaluate_token_accuracy,
           "caption": evaluate_captioning, "dense": evaluate_dense}


def evaluate(model: UniPerceiver, cfg: Config, tokenizer: TextTokenizer, batch_size: int = 128) -> dict[str, dict]:
    """Every task of the config: ``{task name: metrics}``."""
    return {task.name: evaluate_task(model, cfg, i, tokenizer, batch_size=batch_size)
            for i, task in enumerate(cfg.tasks)}


def retrieval_recall(sim_NC: torch.Tensor, owner_C: torch.Tensor | None = None,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@k both ways and ``rsum`` for ``N`` visual inputs and ``C`` captions, caption c belonging to input
    ``owner_C[c]`` (default: row i matches column i). As in the Karpathy-split protocol (VSE++, CLIP): image-to-text
    R@k is the share of inputs with ANY of their captions among their k most similar captions; text-to-image R@k the
    share of captions whose input is among their k most similar inputs. ``rsum`` adds the six recalls in percent."""
    if owner_C is None:
        owner_C = torch.arange(sim_NC.shape[0], device=sim_NC.device)
    inputs_N = torch.arange(sim_NC.shape[0], device=sim_NC.device)
    out = {}
    for k in ks:
        top_NK = sim_NC.topk(min(k, sim_NC.shape[1]), dim=1).indices
        out[f"i2t_r{k}"] = float(owner_C[top_NK].eq(inputs_N[:, None]).any(dim=1).float().mean())
        top_CK = sim_NC.t().topk(min(k, sim_NC.shape[0]), dim=1).indices
        out[f"t2i_r{k}"] = float(top_CK.eq(owner_C[:, None]).any(dim=1).float().mean())
    out["rsum"] = 100 * sum(out[f"{way}_r{k}"] for k in ks for way in ("i2t", "t2i"))
    return out


def _require(count: int, task) -> None:
    if not count:
        raise ValueError(f"tasks[{task.name}]: no val samples for {task.type} in dataset {task.dataset!r}")


def format_table(metrics: dict[str, dict]) -> str:
    lines = ["| task | metric | value |", "|---|---|---|"]
    for task, values in metrics.items():
        for name, value in values.items():
            lines.append(f"| {task} | {name} | {value:.4f} |" if isinstance(value, float) else
                         f"| {task} | {name} | {value} |")
    return "\n".join(lines)
