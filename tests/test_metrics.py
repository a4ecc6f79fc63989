"""CIDEr-D in train/metrics.py: a hand-computed case, known properties, and numbers from pycocoevalcap's scorer."""

import math

import pytest

from condmoe.train.metrics import cider_scores, corpus_cider


def _tok(sentences: list[str]) -> list[list[str]]:
    return [s.split() for s in sentences]


def test_cider_hand_computed():
    # Image 1: refs "a cat sits", "a cat"; hyp "a cat cat". Image 2: ref "a dog"; hyp "a dog runs".
    hyps = _tok(["a cat cat", "a dog runs"])
    refs = [_tok(["a cat sits", "a cat"]), _tok(["a dog"])]
    # Two images: idf(g) = log 2 - log max(1, df(g)). "a" is in both images' references (df 2, weight 0); every
    # other n-gram is in one image's references or in none (df 1 or 0, weight log 2).
    log_n = math.log(2.0)
    w_a = log_n - math.log(2.0)
    w = log_n - math.log(1.0)
    assert w_a == 0.0

    def cos(dot: float, norm_h: float, norm_r: float) -> float:
        return dot / (norm_h * norm_r) if norm_h and norm_r else dot

    def penalty(len_h: int, len_r: int) -> float:  # lengths are bigram counts
        return math.exp(-((len_h - len_r) ** 2) / (2 * 6.0 ** 2))

    # "a cat cat": 1-grams a:1*w_a, cat:2*w; 2-grams (a cat):w, (cat cat):w; 3-gram (a cat cat):w; 2 bigrams.
    h1 = [math.sqrt(w_a ** 2 + (2 * w) ** 2), math.sqrt(2 * w ** 2), w, 0.0]
    # vs "a cat sits" (a:w_a, cat:w, sits:w | (a cat):w, (cat sits):w | (a cat sits):w; 2 bigrams). Clipping: cat
    # contributes min(2w, w) * w; (cat cat) and (a cat cat) are missing from the reference.
    r = [math.sqrt(w_a ** 2 + 2 * w ** 2), math.sqrt(2 * w ** 2), w, 0.0]
    vs_ref1 = [cos(min(w_a, w_a) * w_a + min(2 * w, w) * w, h1[0], r[0]), cos(min(w, w) * w, h1[1], r[1]), 0.0, 0.0]
    vs_ref1 = [v * penalty(2, 2) for v in vs_ref1]
    # vs "a cat" (a:w_a, cat:w | (a cat):w; 1 bigram).
    r = [math.sqrt(w_a ** 2 + w ** 2), w, 0.0, 0.0]
    vs_ref2 = [cos(min(w_a, w_a) * w_a + min(2 * w, w) * w, h1[0], r[0]), cos(w * w, h1[1], r[1]), 0.0, 0.0]
    vs_ref2 = [v * penalty(2, 1) for v in vs_ref2]
    image1 = 10.0 * (sum(vs_ref1) + sum(vs_ref2)) / 4 / 2
    # "a dog runs" (a:w_a, dog:w, runs:w | (a dog):w, (dog runs):w | (a dog runs):w; 2 bigrams) vs "a dog"
    # (a:w_a, dog:w | (a dog):w; 1 bigram).
    h2 = [math.sqrt(w_a ** 2 + 2 * w ** 2), math.sqrt(2 * w ** 2), w, 0.0]
    r = [math.sqrt(w_a ** 2 + w ** 2), w, 0.0, 0.0]
    vs_ref = [cos(w_a * w_a + w * w, h2[0], r[0]), cos(w * w, h2[1], r[1]), 0.0, 0.0]
    image2 = 10.0 * sum(v * penalty(2, 1) for v in vs_ref) / 4 / 1

    assert cider_scores(hyps, refs) == pytest.approx([image1, image2], rel=1e-12)
    assert corpus_cider(hyps, refs) == pytest.approx((image1 + image2) / 2, rel=1e-12)
    # The same numbers in closed form, as a check on the spelled-out arithmetic above.
    assert image1 == pytest.approx(10 * ((1 / (2 * math.sqrt(2)) + 0.5) + math.exp(-1 / 72) * (0.5 + 1 / math.sqrt(2)))
                                   / 8)
    assert image2 == pytest.approx(10 * math.exp(-1 / 72) * math.sqrt(2) / 4)


def test_cider_identical_caption_with_unique_ngrams_scores_ten():
    # Every reference n-gram is in one image only (idf > 0), each hypothesis equals its single reference and has
    # 4+ words, so all four orders have cosine 1 and no length penalty.
    refs = [_tok(["a man riding a horse"]), _tok(["two dogs play in snow"]), _tok(["red bus parked by road"])]
    hyps = [r[0] for r in refs]
    assert cider_scores(hyps, refs) == pytest.approx([10.0, 10.0, 10.0], rel=1e-12)
    assert corpus_cider(hyps, refs) == pytest.approx(10.0, rel=1e-12)


def test_cider_no_shared_ngram_scores_zero():
    refs = [_tok(["a man riding a horse", "a person on a horse"]), _tok(["two dogs play in snow"])]
    hyps = _tok(["green apples beside table", "two dogs play in snow"])
    scores = cider_scores(hyps, refs)
    assert scores[0] == 0.0
    assert scores[1] > 0.0


def test_cider_single_image_corpus_scores_zero():
    # idf is log(number of images) - log df, and the one image's reference n-grams all have df 1: log 1 - log 1 = 0.
    refs = [_tok(["a man riding a horse"])]
    assert corpus_cider(refs[0], refs) == 0.0


def test_cider_invariant_to_image_order():
    hyps = _tok(["a man riding a horse on a beach", "a dog with a frisbee", "cats on a red couch"])
    refs = [_tok(["a man riding a horse on the beach", "a man on a horse"]),
            _tok(["a dog catches a red frisbee", "a brown dog jumping for a frisbee"]),
            _tok(["two cats sleeping on a red couch", "cats on a couch"])]
    order = [2, 0, 1]
    scores = cider_scores(hyps, refs)
    permuted = cider_scores([hyps[i] for i in order], [refs[i] for i in order])
    assert permuted == pytest.approx([scores[i] for i in order], rel=1e-12)
    assert corpus_cider([hyps[i] for i in order], [refs[i] for i in order]) == pytest.approx(
        corpus_cider(hyps, refs), rel=1e-12)
    assert len(set(scores)) == 3  # distinct per-image scores, so a wrong permutation would show


def test_cider_penalises_extra_length():
    # idf depends on the references only, so swapping one hypothesis leaves the weights unchanged.
    refs = [_tok(["a man riding a horse"]), _tok(["two dogs play in snow"])]
    exact = cider_scores(_tok(["a man riding a horse", "two dogs play in snow"]), refs)[0]
    longer = cider_scores(_tok(["a man riding a horse on the beach", "two dogs play in snow"]), refs)[0]
    much_longer = cider_scores(_tok(["a man riding a horse on the beach at sunset today", "two dogs play in snow"]),
                               refs)[0]
    assert exact > longer > much_longer > 0.0


def test_cider_sigma_controls_length_penalty():
    refs = [_tok(["a man riding a horse"]), _tok(["two dogs play in snow"])]
    hyps = _tok(["a man riding a horse on the beach", "two dogs play in snow"])
    assert cider_scores(hyps, refs, sigma=2.0)[0] < cider_scores(hyps, refs, sigma=6.0)[0]


def test_cider_rejects_bad_input():
    with pytest.raises(ValueError):
        cider_scores(_tok(["a b"]), [])
    with pytest.raises(ValueError):
        cider_scores(_tok(["a b", "c d"]), [_tok(["a b"]), []])
    assert cider_scores([], []) == []
    assert corpus_cider([], []) == 0.0


# A fixed corpus and the scores of pycocoevalcap 1.2's Cider (pycocoevalcap/cider/cider_scorer.py from the PyPI wheel
# pycocoevalcap-1.2-py3-none-any.whl, the Python 3 port of tylin/coco-caption), run once with numpy 2.4 on these
# captions joined with spaces: Cider(sigma=sigma).compute_score(gts, res).
PYCOCO_GTS = [
    ["a man riding a horse on the beach", "a person rides a brown horse along the shore", "a man on a horse"],
    ["a dog catches a red frisbee", "a brown dog jumping for a frisbee in the park"],
    ["two cats sleeping on a red couch", "a pair of cats asleep on the sofa", "cats on a couch",
     "two cats lying on a couch"],
    ["a plate of food with broccoli and rice"],
    ["a man holding an umbrella in the rain", "a person with a black umbrella on a street"],
]
PYCOCO_RES = [
    "a man riding a horse on a beach",
    "a dog a dog a dog with a frisbee",
    "two cats on a red couch in the living room near a window",
    "an airplane flying over mountains",
    "",
]
PYCOCO_SCORES = {
    6.0: (1.0968344411280546, [3.5063516874682983, 0.942986010353068, 1.0348345078189072, 0.0, 0.0]),
    2.0: (0.7187155710565862, [3.0022620858492965, 0.5754783678342514, 0.01583740159938317, 0.0, 0.0]),
}


@pytest.mark.parametrize("sigma", sorted(PYCOCO_SCORES))
def test_cider_matches_pycocoevalcap(sigma: float):
    hyps = _tok(PYCOCO_RES)
    refs = [_tok(r) for r in PYCOCO_GTS]
    corpus, per_image = PYCOCO_SCORES[sigma]
    assert cider_scores(hyps, refs, sigma=sigma) == pytest.approx(per_image, rel=1e-12, abs=1e-15)
    assert corpus_cider(hyps, refs, sigma=sigma) == pytest.approx(corpus, rel=1e-12)
