"""Captioning metrics in pure Python, as pycocoevalcap computes them: corpus BLEU-4 (Papineni et al. 2002) and
CIDEr-D (Vedantam et al. 2015; pycocoevalcap's ``Cider``, which clips and length-penalises, i.e. CIDEr-D)."""

import math
from collections import Counter


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: list[list[str]], references: list[list[list[str]]], max_n: int = 4) -> float:
    """Corpus BLEU: clipped n-gram precisions (n = 1..max_n) summed over the corpus, geometric mean, times the
    brevity penalty ``exp(1 - r / c)`` when the hypotheses are shorter than the closest reference lengths."""
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            best = Counter()
            for ref in refs:
                best |= _ngrams(ref, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(0, len(hyp) - n + 1)
    if min(matches) == 0 or hyp_len == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_precision)


def _all_ngrams(tokens: list[str], n: int) -> Counter:
    """Counts of every 1..n-gram of ``tokens``, in pycocoevalcap's ``precook`` order (by order, then position)."""
    counts = Counter()
    for k in range(1, n + 1):
        counts.update(_ngrams(tokens, k))
    return counts


def cider_scores(hypotheses: list[list[str]], references: list[list[list[str]]], n: int = 4,
                 sigma: float = 6.0) -> list[float]:
    """Per-image CIDEr-D, following pycocoevalcap's ``CiderScorer.compute_cider`` step for step.

    Document frequency ``df(g)`` is the number of images whose reference set contains n-gram ``g``; with ``N`` images
    a sentence's order-k vector is ``tf(g) * (log N - log max(1, df(g)))`` over its k-grams, and its "length" is its
    number of bigrams. Against each reference and order: ``sum_g min(h[g], r[g]) * r[g]``, divided by ``|h| * |r|``
    when both norms are non-zero, times ``exp(-(len_h - len_r)^2 / (2 sigma^2))``. An image scores 10 times the mean
    over orders, averaged over its references. The idf comes from the references of this corpus only, so a one-image
    corpus scores 0 (``log 1 = 0``)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("every image needs at least one reference")
    if not references:
        return []
    cooked_refs = [[_all_ngrams(ref, n) for ref in refs] for refs in references]
    doc_freq = Counter()
    for refs in cooked_refs:
        doc_freq.update({g for ref in refs for g in ref})
    log_num_images = math.log(float(len(references)))

    def counts_to_vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, term_freq in counts.items():
            k = len(g) - 1
            vec[k][g] = weight = float(term_freq) * (log_num_images - math.log(max(1.0, doc_freq[g])))
            norm[k] += weight ** 2
            if k == 1:
                length += term_freq
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, refs in zip(hypotheses, cooked_refs):
        vec_hyp, norm_hyp, len_hyp = counts_to_vec(_all_ngrams(hyp, n))
        per_order = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, len_ref = counts_to_vec(ref)
            # math.e ** x as the original's np.e ** x: bit-identical scores (math.exp can differ in the last bit)
            penalty = math.e ** (-(float(len_hyp - len_ref) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = 0.0
                for g, weight in vec_hyp[k].items():
                    ref_weight = vec_ref[k].get(g, 0.0)
                    val += min(weight, ref_weight) * ref_weight
                if norm_hyp[k] != 0 and norm_ref[k] != 0:
                    val /= norm_hyp[k] * norm_ref[k]
                per_order[k] += val * penalty
        scores.append(sum(per_order) / n / len(refs) * 10.0)
    return scores


def corpus_cider(hypotheses: list[list[str]], references: list[list[list[str]]], n: int = 4,
                 sigma: float = 6.0) -> float:
    """Corpus CIDEr-D: the mean of ``cider_scores`` over the images (0.0 for an empty corpus)."""
    scores = cider_scores(hypotheses, references, n, sigma)
    return sum(scores) / len(scores) if scores else 0.0
