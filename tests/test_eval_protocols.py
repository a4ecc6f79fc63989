"""Standard evaluation protocols (issue 18 item 1): retrieval against every caption of an input (Karpathy-split
R@k and rsum), captioning scored against all references with the COCO toolkit's tokenisation and BLEU."""

import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

import condmoe.train.evaluate as evaluate
from condmoe.models import create_model
from condmoe.models.text_tokenizer import TextTokenizer
from condmoe.train.config import TaskConfig
from condmoe.train.data import Collate
from condmoe.train.evaluate import evaluate_captioning, evaluate_recall, retrieval_recall
from condmoe.train.metrics import coco_tokenize


def test_retrieval_recall_with_several_captions_per_input_by_hand():
    # 2 images, 5 captions: image 0 owns captions 0-2, image 1 owns 3-4
    sim = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0],
                        [0.7, 0.3, 0.1, 0.2, 0.6]])
    r = retrieval_recall(sim, torch.tensor([0, 0, 0, 1, 1]), ks=(1, 2))
    # i2t: image 0's best caption is 1 (its own); image 1's best is 0 (not), its top-2 {0, 4} holds 4
    assert (r["i2t_r1"], r["i2t_r2"]) == (0.5, 1.0)
    # t2i: caption 0 -> image 1 (wrong), 1 -> 0 ok, 2 -> 0 ok, 3 -> 0 (wrong), 4 -> 1 ok; top-2 holds both images
    assert r["t2i_r1"] == pytest.approx(3 / 5) and r["t2i_r2"] == 1.0
    assert r["rsum"] == pytest.approx(100 * (0.5 + 1.0 + 0.6 + 1.0))
    square = torch.tensor([[0.9, 0.1], [0.8, 0.7]])  # one caption each: row i matches column i
    assert retrieval_recall(square, ks=(1,)) == retrieval_recall(square, torch.tensor([0, 1]), ks=(1,))


def test_collate_keeps_every_caption_for_evaluation(tiny_data):
    tokenizer = TextTokenizer(tiny_data / "tokenizer", 16)
    from PIL import Image

    image = Image.new("RGB", (32, 32))
    samples = [("a", image, 0, "a red circle\n\na big red circle \n"), ("b", image, 1, "a blue square")]
    batch = Collate("image_text_retrieval", 32, tokenizer, random_caption=False, all_captions=True)(samples)
    assert batch["captions"] == [["a red circle", "a big red circle"], ["a blue square"]]
    assert torch.equal(batch["text_ids"], tokenizer(["a red circle", "a blue square"])[0])  # the first caption
    assert "captions" not in Collate("image_text_retrieval", 32, tokenizer)(samples)  # training: not carried


def _model(tokenizer):
    torch.manual_seed(0)
    return create_model("debug", vocab_size=tokenizer.vocab_size, spe_token_id=tokenizer.spe_id,
                        max_text_len=16).eval()


CAPTIONS = [["a red circle", "a big red circle", "red round shape"], ["a blue square"],
            ["two green stars", "green stars, two of them", "stars", "a pair of green stars"]]


def test_recall_scores_every_caption_against_every_input(tiny_data):
    tokenizer = TextTokenizer(tiny_data / "tokenizer", 16)
    model = _model(tokenizer)
    images = torch.randn(3, 3, 32, 32)
    batches = [{"images": images[:2], "captions": CAPTIONS[:2]}, {"images": images[2:], "captions": CAPTIONS[2:]}]
    task = TaskConfig(name="r", type="image_text_retrieval")
    with torch.no_grad():
        metrics = evaluate_recall(model, None, task, iter(batches), tokenizer, 0)
        # by hand: every caption encoded alone, every input alone
        visual = torch.cat([torch.nn.functional.normalize(model.encode_images(images[i:i + 1]), dim=-1)
                            for i in range(3)])
        texts = [c for caps in CAPTIONS for c in caps]
        text = torch.cat([torch.nn.functional.normalize(model.encode_texts(*tokenizer([t])), dim=-1) for t in texts])
    owner = [i for i, caps in enumerate(CAPTIONS) for _ in caps]
    sim = visual @ text.t()
    i2t = [owner[int(sim[i].argmax())] == i for i in range(3)]
    t2i = [int(sim[:, c].argmax()) == owner[c] for c in range(len(texts))]
    assert metrics["num_samples"] == 3 and metrics["num_captions"] == 8
    assert metrics["i2t_r1"] == pytest.approx(sum(i2t) / 3) and metrics["t2i_r1"] == pytest.approx(sum(t2i) / 8)
    assert metrics["i2t_r10"] == 1.0 and metrics["t2i_r5"] == 1.0  # 8 captions, 3 images


def test_captioning_is_scored_against_all_references_like_the_coco_toolkit(tiny_data, monkeypatch):
    tokenizer = TextTokenizer(tiny_data / "tokenizer", 16)
    hypotheses = ["a big red circle.", "a blue square", "green stars"]
    ids = [tokenizer([h])[0][0, 1:].tolist() for h in hypotheses]  # without the leading <|spe|>
    monkeypatch.setattr(evaluate, "generate", lambda model, pixels, *a, **k: [(i, 0.0) for i in ids[:len(pixels)]])
    model = _model(tokenizer)
    batches = [{"images": torch.randn(3, 3, 32, 32), "captions": CAPTIONS}]
    metrics = evaluate_captioning(model, None, TaskConfig(name="c", type="captioning"), iter(batches), tokenizer, 0)
    decoded = [coco_tokenize(tokenizer.decode(i)) for i in ids]
    assert decoded[0] == ["a", "big", "red", "circle"]  # the period goes, as in the toolkit
    gts = {i: [" ".join(coco_tokenize(c)) for c in caps] for i, caps in enumerate(CAPTIONS)}
    res = {i: [" ".join(h)] for i, h in enumerate(decoded)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    assert [metrics[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(bleu, rel=1e-12)
    assert metrics["cider"] == pytest.approx(cider, rel=1e-12)
    assert metrics["num_samples"] == 3 and metrics["num_references"] == 8
    first_only = {i: caps[:1] for i, caps in gts.items()}  # what a one-reference evaluation would score
    assert metrics["bleu4"] > Bleu(4).compute_score(first_only, res, verbose=0)[0][3]


def test_view_frame_indices_shift_each_clip_within_the_segments():
    from condmoe.data_prep.schema import uniform_frame_indices
    from condmoe.train.video import view_frame_indices

    assert view_frame_indices(16, 4, 0, 1) == uniform_frame_indices(16, 4) == [2, 6, 10, 14]
    assert [view_frame_indices(16, 4, c, 2) for c in range(2)] == [[1, 5, 9, 13], [3, 7, 11, 15]]
    assert view_frame_indices(3, 4, 0, 1) == [0, 1, 1, 2]  # a short clip repeats frames, as training does


def test_three_crops_take_start_centre_and_end_of_the_long_side():
    import numpy as np
    from PIL import Image

    from condmoe.train.video import three_crops

    columns = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (32, 1, 3))  # 64 wide, 32 high
    crops = three_crops(Image.fromarray(columns), 16)  # short side 32 -> 16: 32 x 16, crops at x = 0, 8, 16
    assert [c.shape for c in crops] == [(16, 16, 3)] * 3
    left, centre, right = (int(c[8, :, 0].mean()) for c in crops)
    assert left < centre < right
    tall = three_crops(Image.fromarray(np.ascontiguousarray(columns.transpose(1, 0, 2))), 16)  # 32 wide, 64 high
    assert [c.shape for c in tall] == [(16, 16, 3)] * 3 and tall[0][:, :, 0].mean() < tall[2][:, :, 0].mean()


def test_multi_view_video_classification_averages_the_views_probabilities(tiny_data):
    from PIL import Image

    tokenizer = TextTokenizer(tiny_data / "tokenizer", 16)
    frames = [Image.new("RGB", (40, 32), (16 * i, 0, 0)) for i in range(8)]
    collate = Collate("video_classification", 32, tokenizer, random_caption=False, num_frames=4, views=(2, 3))
    batch = collate([("a", frames, 1, ""), ("b", frames[::-1], 0, "")])
    assert batch["videos"].shape == (2, 6, 4, 3, 32, 32)  # clips x crops, clip-major
    clip1 = [16 * i for i in (1, 3, 5, 7)]  # view_frame_indices(8, 4, 1, 2)
    red = batch["videos"][0, 3, :, 0, 0, 0]  # clip 1, crop 0: its frames' red value, normalised
    from condmoe.train.data import MEAN, STD

    assert torch.allclose(red, (torch.tensor(clip1) / 255 - MEAN[0]) / STD[0], atol=1e-5)
    model = _model(tokenizer)
    task = TaskConfig(name="v", type="video_classification", dataset="video")
    import condmoe.train.evaluate as ev

    class Cfg:  # evaluate_topk reads the class names only
        data = type("D", (), {"root": str(tiny_data)})

    with torch.no_grad():
        metrics = ev.evaluate_topk(model, Cfg, task, iter([batch]), tokenizer, 0)
        names = ev.schema.read_classes(tiny_data)["video"]
        targets = model.encode_texts(*tokenizer(names), 0)
        views = model.classification_logits(model.encode_images(batch["videos"].flatten(0, 1)), targets, task.type)
    mean = views.softmax(-1).unflatten(0, (2, 6)).mean(1)
    assert metrics["views"] == 6 and metrics["num_samples"] == 2
    assert metrics["top1"] == float(mean.argmax(-1).eq(batch["labels"]).float().mean())


@pytest.mark.slow
def test_condmoe_eval_with_several_views_of_each_video(multitask_run, tiny_data, capsys):
    import json

    from condmoe.train.cli import eval_main

    args = ["--batch-size", "4", "--config", str(multitask_run / "config.yaml"), f"data.root={tiny_data}"]
    assert eval_main([*args, "data.test_clips=2", "data.test_crops=3"]) == 0
    metrics = json.loads((multitask_run / "eval.data.test_clips=2,data.test_crops=3.json").read_text())
    assert metrics["motion_classification"]["views"] == 6 and metrics["motion_classification"]["num_samples"] == 4
    assert "views" not in metrics["shapes_classification"]  # images: one view
    capsys.readouterr()
    assert eval_main([*args, "data.test_crops=2"]) == 2
    assert "data.test_crops=2 must be 1 or 3" in capsys.readouterr().err


def test_caption_datasets_without_classes_are_read_by_caption_tasks(tiny_data, tmp_path):
    """coco / karpathy / msrvtt samples hold no cls: retrieval and captioning read them (classification would not)."""
    import io

    import webdataset as wds
    from PIL import Image

    from condmoe.train.data import val_batches

    (tmp_path / "coco" / "val").mkdir(parents=True)
    with wds.TarWriter(str(tmp_path / "coco" / "val" / "000000.tar")) as sink:
        for i in range(3):
            jpeg = io.BytesIO()
            Image.new("RGB", (40, 30), (80 * i, 0, 0)).save(jpeg, format="JPEG")
            sink.write({"__key__": f"{i:06d}", "jpg": jpeg.getvalue(), "txt": "a red circle\na big red circle"})
    tokenizer = TextTokenizer(tiny_data / "tokenizer", 16)
    for task_type in ("image_text_retrieval", "captioning"):
        batches = list(val_batches(tmp_path, "coco", 32, 8, tokenizer, task_type=task_type))
        assert len(batches) == 1 and batches[0]["images"].shape == (3, 3, 32, 32), task_type
        assert batches[0]["captions"] == [["a red circle", "a big red circle"]] * 3
